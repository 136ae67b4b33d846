"""Runs the enqueue scenarios in rounds, each on freshly emptied and seeded tables, with the
servers a row needs, and checks the ledger after every row."""

from __future__ import annotations

import sys

from bench.common import (
    REFUSED,
    ApiServer,
    ScenarioResult,
    announce,
    check_ledger,
    cpu_reference_ms,
    drop_database,
    recreate_database,
    reset_tables,
    seed_customers,
    show_row,
)
from bench.enqueue.config import PROBLEMS, REPLAY_KEYS, Config
from bench.enqueue.report import format_table
from bench.enqueue.scenarios import Scenario, scenarios


class Bench:
    """Runs the selected scenarios in order, each on freshly emptied and seeded tables."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.servers: dict[str, ApiServer] = {}
        self._last: dict[str, ScenarioResult] = {}
        self.runs: dict[str, list[ScenarioResult]] = {}

    def run(self) -> list[ScenarioResult]:
        """Run every selected scenario `--repeat` times, in rounds (a, b, ..., then a, b, ...
        again) so a slow minute on a shared machine hits every row alike; each row is the
        median run by throughput."""
        cfg = self.cfg
        selected = scenarios(cfg)
        runs: dict[str, list[ScenarioResult]] = {s.key: [] for s in selected}
        self.runs = runs
        recreate_database(cfg.url)
        try:
            for round_number in range(cfg.repeat):
                if cfg.repeat > 1:
                    print(f"round {round_number + 1} of {cfg.repeat}", file=sys.stderr)
                for scenario in selected:
                    if scenario.server and scenario.server not in self.servers:
                        server = self._make_server(scenario.server)
                        self.servers[scenario.server] = server
                        server.start()
                    runs[scenario.key].append(self.run_once(scenario))
                    # A server keeps its pooled connections (each scenario's new token fills
                    # the sync pool once): stop it, so that the next row finds PostgreSQL's
                    # max_connections free. It restarts in seconds, before the warm-up.
                    self._stop_servers()
        finally:
            self._stop_servers()
            if not cfg.keep_db:
                drop_database(cfg.url)
        results = [median_run(runs[s.key]) for s in selected]
        if runs.get("a") and cfg.repeat > 1:
            self._ratios_to_a(selected, results)
        return results

    def _ratios_to_a(self, selected: list[Scenario], results: list[ScenarioResult]) -> None:
        """Ratios to (a) of the same round: the machine's speed drifts between rounds."""
        baseline = self.runs["a"]
        for scenario, result in zip(selected, results, strict=True):
            ratios = sorted(
                r.throughput / a.throughput
                for r, a in zip(self.runs[scenario.key], baseline, strict=True)
                if a.throughput
            )
            if ratios and scenario.key != "a":
                result.ratio = ratios[len(ratios) // 2]
                result.notes.append(
                    "ratio to (a) of the same round: "
                    + ", ".join(f"{x:.0%}" for x in ratios)
                    + " (the median is the table's)"
                )

    def _make_server(self, kind: str) -> ApiServer:
        cfg = self.cfg
        if kind == "bare":
            return ApiServer(cfg.url, cfg.http_workers, "bench.enqueue.bare_app:create_app")
        if kind == "base":
            assert cfg.base_dir is not None
            return ApiServer(cfg.url, cfg.http_workers, cfg.app, cwd=cfg.base_dir)
        return ApiServer(cfg.url, cfg.http_workers, cfg.app)

    def _stop_servers(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()

    def round_ratio(self, key: str, base: str) -> tuple[float, list[float]] | None:
        """The median over rounds of key's throughput / base's throughput in the same round,
        and every round's ratio (None if either row was not run)."""
        mine, theirs = self.runs.get(key), self.runs.get(base)
        if not mine or not theirs:
            return None
        ratios = [
            m.throughput / t.throughput for m, t in zip(mine, theirs, strict=True) if t.throughput
        ]
        if not ratios:
            return None
        return sorted(ratios)[len(ratios) // 2], ratios

    def run_once(self, scenario: Scenario) -> ScenarioResult:
        """One run of one row on emptied, re-seeded tables; the ledger checked after it."""
        balance = scenario.balance
        if scenario.key == "d-http-402":
            balance = self._runout_balance()
        reset_tables(self.cfg.url)
        seed_customers(self.cfg.url, scenario.customers, balance)
        announce(scenario.key, scenario.label)
        reference = cpu_reference_ms()
        result = scenario.run(self, scenario)
        result.cpu_reference_ms = reference
        result.ledger = check_ledger(self.cfg.url)
        check(scenario, result, balance)
        show_row(format_table([result]))
        self._last[scenario.key] = result
        return result

    def _runout_balance(self) -> int:
        """Enough credits for the warm-up and half the window at d-http's pace."""
        hot = self._last.get("d-http")
        pace = hot.throughput if hot is not None and hot.throughput else 500.0
        return max(100, int(pace * (self.cfg.warmup + self.cfg.seconds / 2)))


def check(scenario: Scenario, result: ScenarioResult, balance: int) -> None:
    """Note every broken invariant on the row: the ledger, outbox rows == usages accepted (at
    most one per key when replaying), no error other than 402."""
    ledger = result.ledger
    assert ledger is not None
    if not ledger.consistent:
        result.notes.append(f"LEDGER INCONSISTENT: {ledger}")
    if scenario.replays:
        if ledger.events > REPLAY_KEYS:
            result.notes.append(f"outbox rows {ledger.events} > {REPLAY_KEYS} keys replayed")
    elif ledger.events != result.total_ok:
        result.notes.append(
            f"outbox rows {ledger.events} != successful usages seen {result.total_ok}"
        )
    if result.failed:
        result.notes.append(f"errors other than 402: {result.errors}")
    if result.key == "d-http-402":
        result.notes.append(
            f"balance {balance:,} credits: {result.total_ok:,} accepted in the whole run"
            f" (warm-up included), then {result.codes.get(REFUSED, 0):,} refused with 402"
            f" in the window"
        )


def median_run(runs: list[ScenarioResult]) -> ScenarioResult:
    """The median run by throughput, noting every run's figure and any run's problems."""
    ordered = sorted(runs, key=lambda r: r.throughput)
    result = ordered[len(ordered) // 2]
    if len(ordered) > 1:
        result.notes.append(
            f"median of {len(ordered)} runs: "
            + ", ".join(f"{r.throughput:,.0f}" for r in runs)
            + " tx/s (in run order)"
        )
        for other in ordered:  # a problem in any run shows, not only in the median
            if other is not result:
                result.notes += [n for n in other.notes if n.startswith(PROBLEMS)]
    return result
