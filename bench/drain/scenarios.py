"""The rows of the drain table, in order, each with the function that runs it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench.drain.config import BATCH, Config
from bench.drain.drains import (
    PGBENCH_CLAIM_DELIVER,
    PGBENCH_ONE_STATEMENT,
    run_celery,
    run_inproc,
    run_naive,
    run_pgbench,
)
from bench.drain.limited import run_limited
from bench.drain.offered import run_latency, run_paced
from bench.drain.result import DrainResult

if TYPE_CHECKING:
    from bench.drain.runner import Bench


@dataclass
class Scenario:
    key: str
    label: str
    run: Callable[[Bench, Scenario], DrainResult]
    options: dict[str, Any] = field(default_factory=dict)


def scenarios(cfg: Config) -> list[Scenario]:
    """The rows `--only` selects, in the table's order."""
    out = [
        Scenario(
            "a",
            f"pgbench, {cfg.clients} clients: claim {BATCH} (SKIP LOCKED) + mark delivered",
            run_pgbench,
            {"script": PGBENCH_CLAIM_DELIVER},
        ),
        Scenario(
            "a-1tx",
            f"pgbench, {cfg.clients} clients: claim + deliver in ONE statement",
            run_pgbench,
            {"script": PGBENCH_ONE_STATEMENT},
        ),
    ]
    for k in cfg.concurrency:
        out.append(
            Scenario(
                f"b-celery-{k}",
                f"celery worker --concurrency={k}, {k} outbox.drain tasks",
                run_celery,
                {"concurrency": k, "rows": cfg.rows},
            )
        )
    for t in cfg.threads:
        out.append(
            Scenario(
                f"b-inproc-{t}",
                f"Deliverer + drain, {t} thread{'s' if t > 1 else ''}, one process",
                run_inproc,
                {"threads": t},
            )
        )
    out += [
        Scenario(
            "c",
            f"naive: 1 task + 1 request per event, --concurrency={cfg.naive_concurrency}",
            run_naive,
        ),
        Scenario(
            "e-10k",
            f"{cfg.cliff_rows:,} pending alone, best b-celery",
            run_celery,
            {"rows": cfg.cliff_rows},
        ),
        Scenario(
            "e-1m",
            f"{cfg.cliff_rows:,} pending + {cfg.cliff_background:,} delivered, best b-celery",
            run_celery,
            {"rows": cfg.cliff_rows, "background": cfg.cliff_background},
        ),
        Scenario("lat", "commit -> accepted, ~half of best b, beat + nudge", run_latency),
        Scenario(
            "d",
            f"emulator {cfg.limit}/{cfg.window} s, POLAR_REQUESTS_PER_MINUTE={cfg.limit},"
            f" batch {cfg.limited_batch}",
            run_limited,
        ),
    ]
    for limit in cfg.pace_limits:
        capacity = limit * cfg.pace_batch / cfg.pace_window
        for load in cfg.pace_loads:
            out.append(
                Scenario(
                    f"pace-{limit}-{load}",
                    f"{load}% of {limit} req/{cfg.pace_window} s x batch {cfg.pace_batch}"
                    f" = {capacity * load / 100:,.0f} usages/s, nudge + beat",
                    run_paced,
                    {"limit": limit, "load": load},
                )
            )
        out.append(
            Scenario(
                f"sat-{limit}",
                f"saturated: backlog, emulator {limit}/{cfg.pace_window} s, batch {cfg.pace_batch}",
                run_limited,
                {"limit": limit, "batch": cfg.pace_batch, "window": cfg.pace_window},
            )
        )
    return [s for s in out if selected(s.key, cfg.only)]


def selected(key: str, only: tuple[str, ...]) -> bool:
    """Whether `--only` selects `key`: the key itself, or a prefix ("b" is every b-*)."""
    if not only:
        return True
    return any(key == sel or key.startswith(sel + "-") for sel in only)
