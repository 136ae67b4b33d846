"""The drain table (rows/s, ratio to (a), latency, 429s, CPU by group) and the goals of the
benchmark, each marked met or missed."""

from __future__ import annotations

from collections.abc import Iterable

from bench.common import fmt
from bench.drain.config import Config
from bench.drain.result import DrainResult

CPU_GROUPS = ("postgres", "drainers", "emulator", "producers", "redis", "other")


def format_table(results: Iterable[DrainResult], baseline: str = "a") -> str:
    """A Markdown table: rows/s, ratio to the baseline, latency, 429s, CPU by group."""
    results = list(results)
    base = next((r for r in results if r.key == baseline), None)
    header = (
        "| scenario | what | rows/s | vs (a) | rows | p50 ms | p99 ms | 429 | CPU cores:"
        " pg / drainers / emulator / producers / redis / other | CPU µs per row:"
        " pg / drainers / emulator |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in results:
        if r is base:
            ratio = "100%"
        elif base is not None and base.throughput:
            ratio = f"{r.throughput / base.throughput:.1%}"
        else:
            ratio = "-"
        cpu = " / ".join(f"{r.cpu.get(g, 0.0):.2f}" for g in CPU_GROUPS) if r.cpu else "-"
        per_row = " / ".join(
            fmt(r.cpu_us_per_row(g), 0) for g in ("postgres", "drainers", "emulator")
        )
        lines.append(
            f"| {r.key} | {r.label} | {fmt(r.throughput, 0)} | {ratio} | {r.rows:,}"
            f" | {fmt(r.p50_ms, 0)} | {fmt(r.p99_ms, 0)} | {r.status_429:,} | {cpu}"
            f" | {per_row} |"
        )
    return "\n".join(lines)


def goal_lines(results: list[DrainResult], cfg: Config) -> list[str]:
    """Issue #4's goals, each marked met or missed."""
    by_key = {r.key: r for r in results}
    a = by_key.get("a")
    bs = [r for r in results if r.key.startswith("b-celery-")]
    best = max(bs, key=lambda r: r.throughput) if bs else None
    lines = []
    if a is not None and best is not None and a.throughput:
        ratio = best.throughput / a.throughput
        lines.append(
            f"goal (b) >= 50% of (a): {best.key} {best.throughput:,.0f} rows/s = {ratio:.1%}"
            f" of {a.throughput:,.0f} -> {_verdict(ratio >= 0.5)}"
        )
    c = by_key.get("c")
    if c is not None and best is not None and c.throughput:
        times = best.throughput / c.throughput
        lines.append(
            f"goal (b) >= 50x (c): {best.throughput:,.0f} / {c.throughput:,.0f} = {times:.1f}x"
            f" -> {_verdict(times >= 50)}"
        )
    d = by_key.get("d")
    if d is not None:
        ceiling = cfg.limit * cfg.limited_batch / cfg.window
        share = d.throughput / ceiling
        lines.append(
            f"goal (d) >= 97% of the ceiling ({ceiling:,.0f}/s) with zero 429: {share:.1%},"
            f" {d.status_429} x 429 -> {_verdict(share >= 0.97 and d.status_429 == 0)}"
        )
    lat = by_key.get("lat")
    if lat is not None:
        where = f" at {lat.throughput:,.0f} usages/s"
        if best is not None and best.throughput:
            where += f" ({lat.throughput / best.throughput:.0%} of {best.key})"
        lines.append(
            f"goal p99 commit -> accepted < 2 s at ~half capacity: p99 {lat.p99_ms / 1000:.2f} s"
            f"{where} -> {_verdict(lat.p99_ms < 2000)}"
        )
    for r in results:
        if r.key.startswith("pace-"):
            lines += _pace_goal(r)
        if r.key.startswith("sat-"):
            lines.append(_saturated_goal(r, cfg))
    small, big = by_key.get("e-10k"), by_key.get("e-1m")
    if small is not None and big is not None and small.throughput:
        ratio = big.throughput / small.throughput
        lines.append(
            f"goal no cliff (read here as e-1m >= 80% of e-10k): {ratio:.0%}"
            f" -> {_verdict(ratio >= 0.8)}"
        )
    return lines


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _pace_goal(r: DrainResult) -> list[str]:
    """pace-L-50 and pace-L-90: p99 commit -> accepted under a bound, no 429."""
    _, limit, load = r.key.split("-")
    bound = 5.0 if int(load) >= 90 else (2.0 if int(limit) >= 500 else 3.0)
    if int(load) not in (50, 90):
        return []
    return [
        f"goal {r.key}: p99 commit -> accepted < {bound:g} s with 0 x 429:"
        f" p99 {r.p99_ms / 1000:.2f} s, {r.status_429} x 429"
        f" -> {_verdict(r.p99_ms < bound * 1000 and r.status_429 == 0)}"
    ]


def _saturated_goal(r: DrainResult, cfg: Config) -> str:
    """sat-L: at least 97% of the ceiling L x batch / window, no 429."""
    limit = int(r.key.split("-")[1])
    ceiling = limit * cfg.pace_batch / cfg.pace_window
    share = r.throughput / ceiling
    return (
        f"goal {r.key} >= 97% of the ceiling ({ceiling:,.0f}/s) with zero 429:"
        f" {share:.1%}, {r.status_429} x 429"
        f" -> {_verdict(share >= 0.97 and r.status_429 == 0)}"
    )
