"""Run the CEMA service as a child process on 127.0.0.1 — for tests, benchmarks and demos.

The service runs exactly as ``edgekit cloud serve`` would (a real uvicorn server in its own
process), so it can be killed with SIGKILL mid-stream and restarted on the same database.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalServer:
    def __init__(
        self,
        teacher: str,
        student: str,
        db: str | Path,
        port: int | None = None,
        cwd: str | Path | None = None,
        log: str | Path | None = None,
    ) -> None:
        self.teacher, self.student, self.db = teacher, student, str(db)
        self.port = port or free_port()
        self.cwd = str(cwd) if cwd else None
        self.log_path = str(log) if log else os.devnull
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> LocalServer:
        command = [
            sys.executable,
            "-c",
            "from edgekit.cli import main; main()",
            "cloud",
            "serve",
            "--teacher",
            self.teacher,
            "--student",
            self.student,
            "--db",
            self.db,
            "--port",
            str(self.port),
        ]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [self.cwd, os.environ.get("PYTHONPATH")])),
        }
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(command, cwd=self.cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode} (log: {self.log_path})")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not come up within {timeout_s} s")

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, no flushing — a crash."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)
        self._close_log()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self._close_log()

    def _close_log(self) -> None:
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
