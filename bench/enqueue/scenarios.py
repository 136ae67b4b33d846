"""The rows of the enqueue table, in order, and how each one runs: pgbench, client processes
in-process, or the HTTP load generator against a server the runner started."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

from bench.common import HUGE_BALANCE, ScenarioResult, create_usage_token
from bench.enqueue.ceiling import run_pgbench
from bench.enqueue.clients import ClientSpec, run_clients
from bench.enqueue.config import TAIL_SECONDS, Config

if TYPE_CHECKING:
    from bench.enqueue.runner import Bench


@dataclass
class Scenario:
    key: str
    label: str
    customers: int  # seeded; 1 = only the hot customer
    run: Callable[[Bench, Scenario], ScenarioResult]
    balance: int = HUGE_BALANCE
    server: str = ""  # "" (none), "api", "bare" (bench/enqueue/bare_app.py) or "base" (--base)
    replays: bool = False


def scenarios(cfg: Config) -> list[Scenario]:
    """The rows `--only` selects, in the table's order."""
    many = cfg.customers
    out = [
        Scenario("a", f"pgbench, {cfg.clients} clients, raw SQL", many, pgbench),
        Scenario("a-hot", f"pgbench, {cfg.clients} clients, ONE customer", 1, pgbench),
    ]
    for procs, threads in cfg.layouts:
        out.append(
            Scenario(
                f"a-py-{procs}x{threads}",
                f"same SQL via psycopg, {procs} proc x {threads} threads",
                many,
                clients("psycopg", procs, threads),
            )
        )
    for procs, threads in cfg.layouts:
        out.append(
            Scenario(
                f"b-{procs}x{threads}",
                f"record_usage + session_scope, {procs} proc x {threads} threads",
                many,
                clients("record_usage", procs, threads),
            )
        )
    http = f"{cfg.http_workers} uvicorn workers, {cfg.http_clients} in flight"
    out.append(
        Scenario(
            "c-bare",
            f"floor: same SQL, one async Starlette route + psycopg, {http}",
            many,
            http_load(),
            server="bare",
        )
    )
    servers = ["api", "base"] if cfg.base_dir is not None else ["api"]
    for key, what, mode in (
        ("c", "POST /v1/usage", ""),
        ("c-idem", "POST /v1/usage + fresh Idempotency-Key", "fresh"),
        ("c-replay", "POST /v1/usage, replayed Idempotency-Key", "replay"),
    ):
        for server in servers:
            suffix = "-base" if server == "base" else ""
            out.append(
                Scenario(
                    key + suffix,
                    f"{what}{' (--base)' if suffix else ''}, {http}",
                    many,
                    http_load(idempotency=mode),
                    server=server,
                    replays=mode == "replay",
                )
            )
    out += [
        Scenario("d-http", f"ONE customer, {http}", 1, http_load(), server="api"),
        Scenario(
            "d-http-402",
            "ONE customer, balance runs out half-way",
            1,
            http_load(),
            balance=0,  # sized from d-http's throughput, see Bench.run_once()
            server="api",
        ),
    ]
    procs, threads = max(cfg.layouts)
    out.append(
        Scenario(
            "d-lib",
            f"ONE customer, record_usage, {procs} proc x {threads} threads",
            1,
            clients("record_usage", procs, threads),
        )
    )
    return [s for s in out if selected(s.key, cfg.only)]


def selected(key: str, only: tuple[str, ...]) -> bool:
    """Whether `--only` selects `key`: a key, a prefix ("b" is every b-*), or "=key" alone."""
    if not only:
        return True
    return any(
        key == sel.removeprefix("=") or (sel[:1] != "=" and key.startswith(sel + "-"))
        for sel in only
    )


def pgbench(bench: Bench, scenario: Scenario) -> ScenarioResult:
    return run_pgbench(bench.cfg, scenario.key, scenario.label, scenario.customers)


def clients(kind: str, procs: int, threads: int) -> Callable[[Bench, Scenario], ScenarioResult]:
    """`procs` client processes of `kind`, `threads` threads each."""
    return partial(_run_clients, kind=kind, procs=procs, threads=threads)


def _run_clients(
    bench: Bench, scenario: Scenario, *, kind: str, procs: int, threads: int
) -> ScenarioResult:
    cfg = bench.cfg
    specs = [
        ClientSpec(
            kind=kind,
            url=cfg.url,
            concurrency=threads,
            customers=scenario.customers,
            run_seconds=cfg.warmup + cfg.seconds + TAIL_SECONDS,
            seed=i + 1,
        )
        for i in range(procs)
    ]
    return run_clients(cfg, scenario.key, scenario.label, specs)


def http_load(*, idempotency: str = "") -> Callable[[Bench, Scenario], ScenarioResult]:
    """The HTTP load generator against the scenario's server, with a fresh usage token."""
    return partial(_run_http, idempotency=idempotency)


def _run_http(bench: Bench, scenario: Scenario, *, idempotency: str) -> ScenarioResult:
    cfg = bench.cfg
    server = bench.servers[scenario.server]
    assert server.proc is not None
    token = create_usage_token(cfg.url)
    gens = cfg.gen_procs
    per_gen = [
        cfg.http_clients // gens + (1 if i < cfg.http_clients % gens else 0) for i in range(gens)
    ]
    base = ClientSpec(
        kind="http",
        url=cfg.url,
        concurrency=0,
        customers=scenario.customers,
        run_seconds=cfg.warmup + cfg.seconds + TAIL_SECONDS,
        seed=0,
        port=server.port,
        token=token,
        idempotency=idempotency,
    )
    specs = [replace(base, concurrency=n, seed=i + 1) for i, n in enumerate(per_gen) if n]
    return run_clients(cfg, scenario.key, scenario.label, specs, server_pids=(server.proc.pid,))
