"""The architecture's invariants, checked by reading the code (STYLE.md):
- the domain (`outbox/`) imports neither FastAPI/Starlette nor Celery;
- a transaction is committed in one place, `outbox/db.py`'s `session_scope`, which both the
  API's request dependency (one request = one transaction) and the worker/CLI use."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_DOMAIN = ("fastapi", "starlette", "celery", "kombu")
# `outbox dev` and `outbox polar-emulator` start the API and the emulator from the CLI: these
# imports are inside the command functions, never at module level.
LAZY_ALLOWED = {
    "outbox/devserver.py": {"api.app", "polar_emulator"},
    "outbox/cli.py": {"polar_emulator"},
}


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def imported_modules(tree: ast.AST) -> list[tuple[str, bool]]:
    """(module, at module level?) for every import in the file."""
    top_level = {id(node) for node in getattr(tree, "body", [])}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, id(node) in top_level))
    return found


def test_the_domain_imports_no_web_or_task_framework() -> None:
    offenders = []
    for path in python_files("outbox"):
        relative = str(path.relative_to(ROOT))
        for module, top_level in imported_modules(ast.parse(path.read_text())):
            root = module.split(".")[0]
            if root in FORBIDDEN_IN_DOMAIN:
                offenders.append(f"{relative}: {module}")
            if root in ("api", "worker", "polar_emulator"):
                allowed = LAZY_ALLOWED.get(relative, set())
                if top_level or module not in allowed:
                    offenders.append(f"{relative}: {module} (the domain must not depend on it)")
    assert offenders == []


def test_transactions_commit_only_in_session_scope() -> None:
    """`.commit()` or a committing `sessionmaker.begin()` / `engine.begin()` block."""
    committing = set()
    for path in python_files("outbox", "api", "worker"):
        if path.parts[-2] == "migrations":
            continue  # Alembic owns its transactions
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("commit", "begin")
            ):
                committing.add(str(path.relative_to(ROOT)))
    assert committing == {"outbox/db.py"}


def test_celery_task_names_are_stable_and_dotted() -> None:
    import worker.tasks  # noqa: F401 - registers the tasks
    from worker.celery_app import app

    ours = sorted(name for name in app.tasks if name.startswith("outbox."))
    assert ours == ["outbox.drain", "outbox.expire_holds", "outbox.prune", "outbox.rescue"]
