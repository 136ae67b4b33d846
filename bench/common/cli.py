"""The flags every benchmark has: its database, which rows, a smoke run, keep the database,
write JSON."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def bench_parser(description: str, *, url_env: str, default_url: str) -> argparse.ArgumentParser:
    """A parser that shows defaults, with `--url` (from `url_env` if set) as its first flag."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--url",
        default=os.environ.get(url_env, default_url),
        help="benchmark database (DROPPED and re-created; its name must contain 'bench';"
        f" env {url_env})",
    )
    return parser


def add_run_flags(parser: argparse.ArgumentParser, *, only_help: str, quick_help: str) -> None:
    """--only, --quick, --keep-db and --json, in that order."""
    parser.add_argument("--only", default="", help=only_help)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--keep-db", action="store_true", help="do not drop the database")
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")


def only_keys(text: str) -> tuple[str, ...]:
    """--only's comma-separated keys."""
    return tuple(s.strip() for s in text.split(",") if s.strip())
