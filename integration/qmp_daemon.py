"""Run ``nbd-backup serve --qmp`` as a real process for end-to-end QMP tests, and stop it cleanly.

The daemon is ready when it has written its ``--pid-file`` (it does so only once every socket
listens). ``stop()`` sends SIGTERM and returns the exit status; a daemon that ignores SIGTERM is
killed and the test fails. Its stderr goes to a file, shown when something goes wrong.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from qsd import QmpSync  # noqa: E402  (the harness lives next to this file)

READY = "nbd-backup: ready"


def nbd_backup_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", *args]


@dataclass
class OurDaemon:
    proc: subprocess.Popen[bytes]
    workdir: Path
    qmp_path: Path
    pid_path: Path
    log_path: Path

    def connect(self, *, timeout: float = 30) -> QmpSync:
        return QmpSync(self.qmp_path, timeout=timeout)

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and the exit status (a daemon still running after ``timeout`` fails the test)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"nbd-backup serve ignored SIGTERM for {timeout} s\n{self.stderr()}")
        return self.proc.returncode


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        if proc.poll() is not None:
            pytest.fail(f"nbd-backup serve exited {proc.returncode}:\n{log.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"nbd-backup serve not ready after {timeout} s:\n{log.read_text(errors='replace')}")
        time.sleep(0.02)


def start_daemon(workdir: Path, *extra: str, name: str = "ours") -> OurDaemon:
    workdir.mkdir(parents=True, exist_ok=True)
    qmp_path = workdir / f"{name}-qmp.sock"
    pid_path = workdir / f"{name}.pid"
    log_path = workdir / f"{name}.log"
    argv = nbd_backup_argv("serve", "--qmp", f"unix:{qmp_path}", "--pid-file", str(pid_path), *extra)
    with open(log_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    daemon = OurDaemon(proc, workdir, qmp_path, pid_path, log_path)
    try:
        wait_for_file(pid_path, proc, log_path)
    except BaseException:
        daemon.stop()
        raise
    return daemon


@contextmanager
def our_daemon(workdir: Path, *extra: str, name: str = "ours", check_exit: bool = True) -> Iterator[OurDaemon]:
    """``nbd-backup serve --qmp unix:… --pid-file …`` for the ``with`` block; stopped with SIGTERM after,
    and (``check_exit``) its exit status must be 0."""
    daemon = start_daemon(workdir, *extra, name=name)
    try:
        yield daemon
    finally:
        status = daemon.stop()
        if check_exit and status != 0:
            pytest.fail(f"nbd-backup serve exited {status} after SIGTERM:\n{daemon.stderr()}")


def make_image(path: Path, size: int, pattern: int = 0x5A) -> Path:
    """A raw image whose every 4 KiB block differs (so misplaced blocks are caught), written quickly."""
    block = 4096
    with open(path, "wb") as f:
        for index in range(size // block):
            f.write(bytes([pattern ^ (index & 0xFF)]) * (block - 8) + index.to_bytes(8, "little"))
    os.truncate(path, size)
    return path
