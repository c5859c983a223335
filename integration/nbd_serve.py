"""Start ``nbd-backup serve`` as a real process for end-to-end tests, and stop it cleanly.

The daemon's stderr goes to a file (a pipe nobody drains could block it); the fixture waits for the
"nbd-backup: ready" line, so the sockets are listening when the test starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READY = "nbd-backup: ready"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def nbd_backup_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", *args]


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    socket: Path
    log: Path

    def uri(self, export: str, transport: str = "tcp") -> str:
        if transport == "tcp":
            return f"nbd://127.0.0.1:{self.port}/{export}"
        return f"nbd+unix:///{export}?socket={self.socket}"

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, and the exit status (killed after ``timeout``: that is a test failure)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"nbd-backup serve ignored SIGTERM for {timeout} s\n{self.stderr()}")
        return self.proc.returncode


def wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if READY in text:
            return
        if proc.poll() is not None:
            pytest.fail(f"nbd-backup serve exited {proc.returncode} before it was ready:\n{text}")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    pytest.fail(f"nbd-backup serve not ready after {timeout} s:\n{log.read_text(errors='replace')}")


@contextmanager
def serve(tmp_path: Path, exports: Sequence[str], *extra: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    """Run ``nbd-backup serve`` on a free TCP port and a unix socket with ``--export`` each of ``exports``."""
    port = free_port()
    sock = tmp_path / "nbd.sock"
    log = tmp_path / f"serve-{port}.log"
    argv = nbd_backup_argv("serve", "--nbd", f"127.0.0.1:{port}", "--nbd-socket", str(sock), *extra)
    for export in exports:
        argv += ["--export", export]
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env={**os.environ, **(env or {})}
        )
    served = Served(proc, port, sock, log)
    try:
        wait_ready(proc, log)
        yield served
    finally:
        served.stop()
