"""py-spy on the drainers (`--py-spy DIR`): raw collapsed stacks per scenario and process."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path


class Profiler:
    """py-spy record on a process tree, from now until `stop()`, as raw collapsed stacks: CPU
    only, or with `idle` also the frames waiting (on PostgreSQL, Polar, the broker)."""

    def __init__(self, directory: Path | None, *, idle: bool = False) -> None:
        self.directory = directory
        self.idle = idle
        self.procs: list[subprocess.Popen[bytes]] = []
        self.exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def record(self, key: str, name: str, pid: int) -> None:
        if self.directory is None:
            return
        out = self.directory / f"{key}-{name}.txt"
        self.procs.append(
            subprocess.Popen(
                [
                    self.exe,
                    "record",
                    *(["--idle"] if self.idle else []),
                    "--subprocesses",
                    "--nonblocking",
                    "-r",
                    "100",
                    "-f",
                    "raw",
                    "-o",
                    str(out),
                    "-p",
                    str(pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()
