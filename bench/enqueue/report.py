"""The enqueue table (throughput, latency, ratio to (a), outcomes, CPU) and the goals of the
benchmark, each marked met or missed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from bench.common import OK, REFUSED, ScenarioResult, fmt

if TYPE_CHECKING:
    from bench.enqueue.runner import Bench


def format_table(results: Sequence[ScenarioResult], baseline: str = "a") -> str:
    """A Markdown table: throughput, latency, ratio to the baseline row, outcomes, CPU."""
    base = next((r for r in results if r.key == baseline), None)
    header = (
        "| scenario | what | tx/s | p50 ms | p99 ms | vs (a) | 201 | 402 | other"
        " | CPU cores: pg / load / server / other | CPU ms per tx: pg / client+server |"
    )
    lines = [header, "|" + "---|" * 11]
    for r in results:
        ratio = (
            "100%"
            if r is base
            else f"{r.ratio_to(base):.0%}"
            if base is not None and base.throughput
            else "-"
        )
        cpu = (
            " / ".join(f"{r.cpu.get(k, 0.0):.2f}" for k in ("postgres", "load", "server", "other"))
            if r.cpu
            else "-"
        )
        per_tx = (
            f"{1000 * r.cpu.get('postgres', 0.0) / r.throughput:.2f} / "
            f"{1000 * (r.cpu.get('load', 0.0) + r.cpu.get('server', 0.0)) / r.throughput:.2f}"
            if r.cpu and r.throughput
            else "-"
        )
        lines.append(
            f"| {r.key} | {r.label} | {fmt(r.throughput, 0)} | {fmt(r.p50_ms, 2)}"
            f" | {fmt(r.p99_ms, 2)} | {ratio} | {r.codes.get(OK, 0):,}"
            f" | {r.codes.get(REFUSED, 0):,} | {r.failed:,} | {cpu} | {per_tx} |"
        )
    return "\n".join(lines)


def goal_lines(results: list[ScenarioResult], bench: Bench | None = None) -> list[str]:
    """Issue #3's and #13's goals, each marked met or missed (ratios: the median over rounds
    of the ratio within a round)."""
    by_key = {r.key: r for r in results}
    base = by_key.get("a")
    lines = []
    if bench is not None:
        for key, other, goal, what in (
            ("c", "c-bare", 0.8, "goal (c) >= 80% of the floor (c-bare)"),
            ("c-idem", "c", 0.8, "goal (c-idem) >= 80% of (c)"),
            ("c-replay", "c", 1.0, "goal (c-replay) >= (c)"),
            ("c", "c-base", 0.0, "A/B: c vs c-base (--base)"),
            ("c-idem", "c-idem-base", 0.0, "A/B: c-idem vs c-idem-base (--base)"),
            ("c-replay", "c-replay-base", 0.0, "A/B: c-replay vs c-replay-base (--base)"),
        ):
            found = bench.round_ratio(key, other)
            if found is None:
                continue
            ratio, each = found
            verdict = "" if not goal else " -> met" if ratio >= goal else " -> MISSED"
            lines.append(
                f"{what}: {ratio:.0%} (rounds: {', '.join(f'{r:.0%}' for r in each)}){verdict}"
            )
    if base is not None and base.throughput:
        bs = [r for r in results if r.key.startswith("b-")]
        if bs:
            best = max(bs, key=lambda r: r.throughput)
            ratio = best.ratio_to(base)
            lines.append(
                f"goal (b) >= 50% of (a): best {best.key} {ratio:.0%}"
                f" -> {'met' if ratio >= 0.5 else 'MISSED'}"
            )
        c = by_key.get("c")
        if c is not None:
            ratio = c.ratio_to(base)
            met = ratio >= 0.25 and c.p99_ms < 20
            lines.append(
                f"goal (c) >= 25% of (a) with p99 < 20 ms: {ratio:.0%}, p99 {c.p99_ms:.1f} ms"
                f" -> {'met' if met else 'MISSED'}"
            )
    ds = [r for r in results if r.key.startswith("d-")]
    if ds:
        bad = sum(r.failed for r in ds)
        lines.append(
            f"goal (d) no errors other than 402: {bad} other errors"
            f" -> {'met' if bad == 0 else 'MISSED'}"
        )
    return lines
