"""Helpers every benchmark shares (`from bench.common import ...`):

- `database`: the benchmark database: `recreate_database`, `drop_database`, `reset_tables`,
  `seed_customers`, `check_ledger`, `create_usage_token`, URL helpers.
- `samples`: per-transaction `Samples`, `percentile`, one table row (`ScenarioResult`) and
  `summarize` for a measured window.
- `cpu`: CPU by process group from /proc (`GroupCpuMeter`, `CpuMeter`).
- `machine`: the machine's facts and speed (`machine_facts`, `cpu_reference_ms`).
- `processes`: free ports, waiting for children, an environment without our settings.
- `servers`: the API under uvicorn (`ApiServer`), the Polar `Emulator`, `CeleryWorkers`.
- `broker`: Celery tasks sent over Redis, the benchmark's Redis db emptied.
- `pgbench`: pgbench found and started with a custom script.
- `cli`: the flags every benchmark has (`bench_parser`, `add_run_flags`).
- `report`: progress lines, number cells, and the report printed after a run (`print_report`).
"""

from bench.common.broker import flush_redis, queue_idle, send_tasks
from bench.common.cli import add_run_flags, bench_parser, only_keys
from bench.common.cpu import CpuMeter, GroupCpuMeter
from bench.common.database import (
    CUSTOMER_PREFIX,
    DEFAULT_URL,
    HOT_CUSTOMER,
    HUGE_BALANCE,
    LedgerCheck,
    check_ledger,
    connect,
    create_usage_token,
    customer_id,
    database_name,
    drop_database,
    libpq_url,
    maintenance_url,
    recreate_database,
    reset_tables,
    seed_customers,
)
from bench.common.machine import cpu_reference_ms, describe_machine, machine_facts
from bench.common.pgbench import find_pgbench, pgbench_command, start_pgbench
from bench.common.processes import (
    OUR_PREFIXES,
    REPO,
    clean_env,
    drop_our_settings,
    free_port,
    run_in_threads,
    sleep_until,
    stop_process,
    wait_ready,
)
from bench.common.report import announce, command_line, fmt, print_report, show_row
from bench.common.samples import (
    FAILED,
    OK,
    REFUSED,
    Samples,
    ScenarioResult,
    percentile,
    summarize,
)
from bench.common.servers import ApiServer, CeleryWorkers, Emulator

__all__ = [
    "CUSTOMER_PREFIX",
    "DEFAULT_URL",
    "FAILED",
    "HOT_CUSTOMER",
    "HUGE_BALANCE",
    "OK",
    "OUR_PREFIXES",
    "REFUSED",
    "REPO",
    "ApiServer",
    "CeleryWorkers",
    "CpuMeter",
    "Emulator",
    "GroupCpuMeter",
    "LedgerCheck",
    "Samples",
    "ScenarioResult",
    "add_run_flags",
    "announce",
    "bench_parser",
    "check_ledger",
    "clean_env",
    "command_line",
    "connect",
    "cpu_reference_ms",
    "create_usage_token",
    "customer_id",
    "database_name",
    "describe_machine",
    "drop_database",
    "drop_our_settings",
    "find_pgbench",
    "flush_redis",
    "fmt",
    "free_port",
    "libpq_url",
    "machine_facts",
    "maintenance_url",
    "only_keys",
    "percentile",
    "pgbench_command",
    "print_report",
    "queue_idle",
    "recreate_database",
    "reset_tables",
    "run_in_threads",
    "seed_customers",
    "send_tasks",
    "show_row",
    "sleep_until",
    "start_pgbench",
    "stop_process",
    "summarize",
    "wait_ready",
]
