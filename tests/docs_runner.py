"""Run a Markdown document's code blocks as a reader would, in a fresh clone (tests/test_docs.py).

The reader's two terminals: the block marked `<!-- docs-test: server -->` runs in the first
one (in the background, until its banner has printed the `export` lines); every other `bash`
and `python` block runs, in order, in the second one, with those exports pasted and `.venv`
activated. A block marked `<!-- docs-test: skip REASON -->` is not run; blocks in other
languages (mermaid, yaml) are text. After the last block, once nothing is pending any more,
the report (each block's exit code and output, the outbox's status, Polar's totals) is printed
as JSON.

    python tests/docs_runner.py CLONE README.md docs/tutorial.md
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

BLOCK = re.compile(
    r"^(?:<!-- docs-test: (?P<mark>[^>]*?) -->\n)?```(?P<lang>[\w-]*)\n(?P<code>.*?)^```$",
    re.M | re.S,
)
API = "http://127.0.0.1:8000"  # the ports the documents use
EMULATOR = "http://127.0.0.1:8765"


@dataclass
class Block:
    lang: str
    code: str
    mark: str

    @property
    def runnable(self) -> bool:
        return self.lang in ("bash", "sh", "python") and not self.mark.startswith("skip")


def blocks(markdown: str) -> list[Block]:
    return [
        Block(m["lang"], m["code"], (m["mark"] or "").strip()) for m in BLOCK.finditer(markdown)
    ]


def second_terminal(clone: Path, exports: dict[str, str]) -> dict[str, str]:
    """A shell with `.venv` activated and the server's exports pasted, nothing else of ours."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OUTBOX_", "POLAR_", "VIRTUAL_ENV"))
        and k not in {"DATABASE_URL", "REDIS_URL", "TOKEN", "PYTHONPATH"}
    }
    env["VIRTUAL_ENV"] = str(clone / ".venv")
    env["PATH"] = f"{clone / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(exports)
    return env


def start_server(clone: Path, block: Block) -> tuple[subprocess.Popen[str], dict[str, str], str]:
    env = second_terminal(clone, {})
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # the first terminal: dev.sh activates .venv
    env.pop("VIRTUAL_ENV")
    env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(
        ["bash", "-c", block.code],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if "Ctrl-C stops cleanly" in line:
            break
    banner = "".join(seen)
    exports = dict(re.findall(r"^\s*export (\w+)=(\S+)", banner, re.M))
    if "TOKEN" not in exports:
        stop(process)
        raise SystemExit("the server block printed no export lines:\n" + banner)
    # The values are shell words (shlex.quote): unquote them as the shell would.
    for name, value in exports.items():
        exports[name] = subprocess.run(
            ["bash", "-c", f"printf %s {value}"], capture_output=True, text=True, check=True
        ).stdout
    return process, exports, banner


def stop(process: subprocess.Popen[str]) -> None:
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def run_block(clone: Path, env: dict[str, str], block: Block) -> dict[str, Any]:
    if block.lang == "python":
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
            script.write(block.code)
        command = [str(clone / ".venv" / "bin" / "python"), script.name]
    else:
        command = ["bash", "-euo", "pipefail", "-c", block.code]
    try:
        result = subprocess.run(
            command, cwd=clone, env=env, capture_output=True, text=True, timeout=120
        )
        return {"rc": result.returncode, "output": result.stdout + result.stderr}
    except subprocess.TimeoutExpired as exc:
        return {"rc": "timeout", "output": str(exc)}


def settled(clone: Path, env: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    """The outbox's status once nothing is pending or in flight (or the last one seen)."""
    stats: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run(
            ["outbox", "status", "--json"], cwd=clone, env=env, capture_output=True, text=True
        )
        if result.returncode == 0:
            stats = json.loads(result.stdout)
            if stats["counts"]["pending"] == 0 and stats["counts"]["inflight"] == 0:
                return stats
        time.sleep(0.5)
    return stats


def run_document(clone: Path, name: str) -> dict[str, Any]:
    document = blocks((clone / name).read_text())
    servers = [b for b in document if b.mark == "server"]
    assert len(servers) == 1, f"{name}: mark exactly one block <!-- docs-test: server -->"
    process, exports, banner = start_server(clone, servers[0])
    env = second_terminal(clone, exports)
    report: dict[str, Any] = {"banner": banner, "blocks": []}
    try:
        for block in document:
            if block is servers[0]:
                continue
            entry: dict[str, Any] = {"lang": block.lang, "code": block.code, "mark": block.mark}
            if block.runnable:
                entry.update(run_block(clone, env, block))
            report["blocks"].append(entry)
        report["status"] = settled(clone, env)
        report["totals"] = httpx.get(f"{EMULATOR}/_emulator/totals").json()
    finally:
        stop(process)
    report["server_exit"] = process.returncode
    return report


def main() -> None:
    clone = Path(sys.argv[1])
    reports = {name: run_document(clone, name) for name in sys.argv[2:]}
    print(json.dumps(reports))


if __name__ == "__main__":
    main()
