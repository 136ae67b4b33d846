"""What every benchmark prints: progress on stderr, then its table, the notes, the machine, the
command and the goals on stdout, and the same as JSON if asked."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.common.machine import describe_machine
from bench.common.samples import ScenarioResult


def fmt(value: float, digits: int = 1) -> str:
    """A number for a table cell, "-" when there is none (NaN)."""
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def announce(key: str, label: str) -> None:
    """Say on stderr which scenario starts."""
    print(f"running {key}: {label} ...", file=sys.stderr, flush=True)


def show_row(table: str) -> None:
    """Print a one-row table's row on stderr, as soon as it is measured."""
    print(table.splitlines()[-1], file=sys.stderr, flush=True)


def command_line(argv: list[str] | None) -> str:
    """The command that ran, as the report shows it."""
    return "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])


def print_report(
    results: Sequence[ScenarioResult],
    facts: dict[str, str],
    argv: list[str] | None,
    *,
    table: str,
    cpu_line: str,
    goals: Sequence[str],
    json_path: Path | None,
) -> None:
    """A benchmark's report: its table, every row's notes, the machine, how CPU was counted,
    the speed reference, the command (`argv`), the goals; and the same as JSON if asked."""
    command = command_line(argv)
    print()
    print(table)
    print()
    for r in results:
        for note in r.notes:
            print(f"- {r.key}: {note}")
    print()
    print(describe_machine(facts))
    print(cpu_line)
    references = [r.cpu_reference_ms for r in results if r.cpu_reference_ms]
    if references:
        print(
            f"CPU speed reference (a fixed pure-Python loop, before each scenario):"
            f" {min(references):.0f}-{max(references):.0f} ms"
            " (a wide range means the machine's speed drifted during the run)"
        )
    print(f"command: {command}")
    if goals:
        print()
        print("\n".join(goals))
    if json_path is not None:
        report = {"machine": facts, "command": command, "results": [r.as_dict() for r in results]}
        json_path.write_text(json.dumps(report, indent=2) + "\n")
