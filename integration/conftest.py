"""Shared helpers for end-to-end tests against the real peers (qemu-img, nbdkit, nbdinfo, fio …).

Locally a missing peer skips the test; with ``CI`` set, a missing peer fails it (CI installs every
peer, so a skip there would hide a broken setup).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def require(*tools: str) -> None:
    """Fail (in CI) or skip (locally) unless every tool is on PATH."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not missing:
        return
    message = f"peer(s) not installed: {', '.join(missing)}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must install every peer: scripts/setup.sh)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run(
    *argv: str | os.PathLike[str],
    timeout: float = 60,
    check: bool = True,
    cwd: str | None = None,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a peer; its stdout/stderr appear in the failure message when it fails."""
    proc = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        input=input.decode() if input is not None else None,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, argv))} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def nbd_backup_argv(*args: str) -> list[str]:
    """Our command line, run from the interpreter running the tests (the project's venv)."""
    return [sys.executable, "-m", "server.cli", *args]


@pytest.fixture
def outside_cwd(tmp_path: Path) -> Iterator[str]:
    """A working directory outside the repository: libnbd's Python module is also called ``nbd``."""
    yield str(tmp_path)


def _live_children() -> list[tuple[int, str]]:
    """(pid, command line) of every child of this process that still runs (zombies excluded)."""
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rpartition(")")[2].split()
            if int(fields[1]) != me or fields[0] in ("Z", "X"):
                continue
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # it exited meanwhile
        found.append((int(entry.name), cmdline.strip()))
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every process a test starts must be stopped by its fixture: a leftover fails the run (and is killed)."""
    leftovers = _live_children()
    if not leftovers:
        return
    for pid, _ in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    listing = "\n".join(f"  {pid}: {cmd}" for pid, cmd in leftovers)
    sys.stderr.write(f"\nprocesses left running by the tests (killed now):\n{listing}\n")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
