"""Run ``nbd-backup serve --qmp`` as a real process for end-to-end QMP tests, and stop it cleanly.

The daemon is ready when it has printed its ready line (after every socket listens and its ``--pid-file``
is written). ``stop()`` sends SIGTERM and returns the exit status; a daemon that ignores SIGTERM is killed
and the test fails. Its stderr goes to a file, shown when something goes wrong.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import READY, log_text, nbd_backup_argv, start_ours, stop_ours  # noqa: F401 (re-exported)
from qsd import QmpSync, Qsd


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
        return log_text(self.log_path)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and the exit status (a daemon still running after ``timeout`` fails the test)."""
        return stop_ours(self.proc, self.log_path, timeout)


def start_daemon(workdir: Path, *extra: str, name: str = "ours") -> OurDaemon:
    """``nbd-backup serve --qmp unix:… --pid-file …``, returned once it has printed its ready line."""
    workdir.mkdir(parents=True, exist_ok=True)
    qmp_path = workdir / f"{name}-qmp.sock"
    pid_path = workdir / f"{name}.pid"
    log_path = workdir / f"{name}.log"
    proc = start_ours(["serve", "--qmp", f"unix:{qmp_path}", "--pid-file", str(pid_path), *extra], log_path)
    return OurDaemon(proc, workdir, qmp_path, pid_path, log_path)


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


def qmp_shell(daemon: OurDaemon, script: str, cwd: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """Feed ``script`` (one command a line) to QEMU's ``qmp-shell`` (installed with qemu.qmp) connected to
    ``daemon``; run from ``cwd``, outside the repository, because libnbd's Python module is also "nbd"."""
    shell = os.path.join(os.path.dirname(sys.executable), "qmp-shell")
    return subprocess.run(
        [shell, *options, str(daemon.qmp_path)],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


T = TypeVar("T")


def on_both(tmp_path: Path, scenario: Callable[[QmpSync, Path], T]) -> tuple[T, T]:
    """Run ``scenario`` against qemu-storage-daemon, then against our daemon, each in its own directory
    under ``tmp_path``; returns (theirs, ours) for the test to compare."""
    (tmp_path / "qsd").mkdir(exist_ok=True)
    with Qsd.start(tmp_path / "qsd") as qsd, qsd.connect() as q:
        theirs = scenario(q, tmp_path / "qsd")
    with our_daemon(tmp_path / "ours") as daemon, daemon.connect() as q:
        ours = scenario(q, tmp_path / "ours")
    return theirs, ours


class ReplyLog:
    """Calls QMP commands and keeps ``(command, return or error)`` of each, for comparing two daemons."""

    def __init__(self, q: QmpSync) -> None:
        self.q = q
        self.replies: list[tuple[str, Any]] = []

    def __call__(self, command: str, **args: Any) -> None:
        reply = self.q.execute(command, args)
        self.replies.append((command, reply.get("return", reply.get("error"))))
