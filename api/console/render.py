"""Rendering the console: one autoescaping Jinja2 environment, the security headers every
console response carries, and the overview's chart drawn on the server as SVG."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from api.console.auth import ConsoleSession

TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "console"
STATIC = Path(__file__).resolve().parent.parent / "static"

# Nothing from another host, no inline script or style, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _when(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(value: datetime | None) -> str:
    if value is None:
        return "never"
    return _seconds((datetime.now(UTC) - value).total_seconds()) + " ago"


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    if value < 172800:
        return f"{value / 3600:.1f} h"
    return f"{value / 86400:.1f} d"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)


ENVIRONMENT = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=True,  # customer ids, metadata and Polar's messages are attacker-controlled
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENVIRONMENT.filters.update(when=_when, ago=_ago, seconds=_seconds, pretty=_pretty)


def page(
    request: Request,
    template: str,
    operator: ConsoleSession | None,
    *,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    """The rendered page (in the route's own thread, before its transaction commits)."""
    html = ENVIRONMENT.get_template(template).render(
        operator=operator, path=request.url.path, **context
    )
    return HTMLResponse(html, status_code=status_code)


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    height: float
    minute: int
    count: int


@dataclass(frozen=True)
class Chart:
    bars: list[Bar]
    width: int
    height: int
    bar_width: float
    peak: int
    total: int


def svg_bars(counts: list[int], *, width: int = 600, height: int = 120) -> Chart:
    """Bars for one value per minute, oldest first, scaled to the busiest minute."""
    peak = max(counts, default=0)
    step = width / max(1, len(counts))
    bars = []
    for n, count in enumerate(counts):
        h = 0.0 if peak == 0 else (height - 4) * count / peak
        bars.append(
            Bar(round(n * step, 2), round(height - h, 2), round(h, 2), len(counts) - n, count)
        )
    return Chart(bars, width, height, round(max(1.0, step - 1), 2), peak, sum(counts))
