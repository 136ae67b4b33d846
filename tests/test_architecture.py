"""A small lint for the invariants of the layout (docs/explanation/layout.md): the domain imports
no adapter (`api`, `worker`, `cli`, the emulator) and no framework (FastAPI, Celery, Typer); a
transaction is committed in one place (`session_scope`, which the API's request dependency uses
too; plus the async path of POST /v1/usage); the Celery task names are stable."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADAPTER_FRAMEWORKS = ("fastapi", "starlette", "celery", "kombu", "typer", "uvicorn")
# The adapters and the emulator: the domain imports none of them, not even lazily. The CLI
# (`cli/`) starts the API, the worker and the emulator; nothing imports the CLI.
ADAPTERS = ("api", "worker", "cli", "polar_emulator")
# The places that commit: the domain's session_scope(), used by the API's request dependency,
# the worker and the CLI alike; and the async transaction of POST /v1/usage (api/asyncdb.py),
# the one path that runs on a psycopg connection rather than a Session
# (docs/explanation/request-path.md).
COMMITTERS = {"outbox/db.py", "api/asyncdb.py"}


def python_files(*packages: str) -> Iterator[Path]:
    for package in packages:
        yield from sorted((ROOT / package).rglob("*.py"))


def imports(tree: ast.AST) -> Iterator[tuple[ast.stmt, str, bool]]:
    """Every imported module name, and whether the import is at module level."""
    top_level = {id(node) for node in getattr(tree, "body", [])}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, id(node) in top_level
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node, node.module, id(node) in top_level


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_domain_never_imports_a_web_or_task_framework() -> None:
    offenders = []
    for path in python_files("outbox"):
        for node, module, _ in imports(ast.parse(path.read_text(), str(path))):
            if module.split(".")[0] in ADAPTER_FRAMEWORKS:
                offenders.append(f"{rel(path)}:{node.lineno} imports {module}")
    assert offenders == []


def test_the_domain_never_imports_an_adapter() -> None:
    offenders = []
    for path in python_files("outbox"):
        for node, module, _ in imports(ast.parse(path.read_text(), str(path))):
            if module.split(".")[0] in ADAPTERS:
                offenders.append(f"{rel(path)}:{node.lineno} imports {module}")
    assert offenders == []


def test_nothing_imports_the_cli() -> None:
    """The CLI is the outermost adapter: the API, the worker, the emulator and the domain
    never depend on it (so `cli/` can start them all without a cycle)."""
    offenders = []
    for path in python_files("outbox", "api", "worker", "polar_emulator"):
        for node, module, _ in imports(ast.parse(path.read_text(), str(path))):
            if module.split(".")[0] == "cli":
                offenders.append(f"{rel(path)}:{node.lineno} imports {module}")
    assert offenders == []


def test_the_operator_tools_are_used_only_from_above() -> None:
    """`outbox.ops` (replay, reconcile, doctor, the metrics collector) sits on top of the
    domain: the ledger, delivery and Polar rooms never import it."""
    offenders = []
    for path in python_files("outbox"):
        if "ops" in path.relative_to(ROOT / "outbox").parts:
            continue
        for node, module, _ in imports(ast.parse(path.read_text(), str(path))):
            if module.startswith("outbox.ops"):
                offenders.append(f"{rel(path)}:{node.lineno} imports {module}")
    assert offenders == []


@pytest.mark.slow
def test_importing_every_domain_module_loads_no_framework() -> None:
    """The same, at run time: transitive imports count too."""
    script = (
        "import importlib, pkgutil, sys, outbox\n"
        "for m in pkgutil.walk_packages(outbox.__path__, 'outbox.'):\n"
        "    if not m.name.startswith('outbox.migrations'):\n"
        "        importlib.import_module(m.name)\n"
        f"loaded = sorted({{n.split('.')[0] for n in sys.modules}} & {set(ADAPTER_FRAMEWORKS)!r})\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_commit_is_called_only_by_session_scope() -> None:
    """`.commit(`, or a committing `sessionmaker.begin()` / `engine.begin()` block."""
    offenders = []
    for path in python_files("outbox", "api", "worker"):
        if "migrations" in path.parts:
            continue  # Alembic owns its transactions
        for number, line in enumerate(path.read_text().splitlines(), 1):
            committing = ".commit(" in line or ".begin()" in line
            if committing and rel(path) not in COMMITTERS:
                offenders.append(f"{rel(path)}:{number}: {line.strip()}")
    assert offenders == []


def test_session_scope_is_where_the_domain_commits() -> None:
    """Keeps the lint honest: if `session_scope` moved, the allow-list above must move too."""
    for path, name in (("outbox/db.py", "session_scope"), ("api/asyncdb.py", "run")):
        tree = ast.parse((ROOT / path).read_text())
        [function] = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name
        ]
        assert ".commit(" in ast.unparse(function), (path, name)


def test_celery_task_names_are_stable_and_dotted() -> None:
    import worker.tasks  # noqa: F401 - registers the tasks
    from worker.celery_app import app

    ours = sorted(name for name in app.tasks if name.startswith("outbox."))
    assert ours == ["outbox.drain", "outbox.expire_holds", "outbox.prune", "outbox.rescue"]


def test_files_that_running_the_project_writes_are_ignored_by_git() -> None:
    """Beat's schedule (`celerybeat-schedule*` where `outbox worker` runs), dev's database,
    its lock and its emulator's events, the venv's install lock."""
    names = [
        "celerybeat-schedule",
        "celerybeat-schedule.db",
        "celerybeat-schedule-shm",
        "outbox.db",
        "outbox.db.dev-lock",
        "outbox.db.polar-emulator.json",
        ".venv.lock",
    ]
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", *names],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert sorted(result.stdout.split()) == sorted(names), result.stdout + result.stderr
