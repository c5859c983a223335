"""Socket activation as systemd does it: the test binds the NBD and QMP sockets, execs the daemon with
them at fd 3 and 4 and LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES set (LISTEN_PID is the daemon's own pid:
a tiny wrapper sets it, then execs), and checks the daemon serves exactly those sockets."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import READY, ROOT, free_port, log_text, require, run, stop_ours, wait_until
from qmp_daemon import make_image
from qsd import QmpSync

SIZE = 1 << 20

# Put the inherited fds (argv[1], comma-separated) at 3, 4, … as systemd does, set the variables with
# LISTEN_PID = this pid (or this pid + argv[2] to play a process the sockets are not meant for), exec.
WRAPPER = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid() + int(sys.argv[2]))
os.environ["LISTEN_FDNAMES"] = "nbd:qmp"
os.execv(sys.executable, [sys.executable, "-m", "server.cli", *sys.argv[3:]])
"""


def listening_inodes(pid: int) -> set[int]:
    """Inodes of the listening sockets (TCP, TCP6, unix) process ``pid`` holds an fd to."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            held.add(int(target[8:-1]))
    listening = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A":  # TCP_LISTEN
                listening.add(int(parts[9]))
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if int(parts[3], 16) & 0x10000:  # __SO_ACCEPTCON
            listening.add(int(parts[6]))
    return held & listening


class Activated:
    def __init__(self, tmp: Path) -> None:
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.qmp_path = tmp / "activated-qmp.sock"
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(str(self.qmp_path))
        self.unix.listen()
        self.inodes = {os.fstat(s.fileno()).st_ino for s in (self.tcp, self.unix)}
        self.log = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str, pid_offset: int = 0) -> subprocess.Popen[bytes]:
        fds = (self.tcp.fileno(), self.unix.fileno())
        argv = [sys.executable, "-c", WRAPPER, ",".join(map(str, fds)), str(pid_offset), *args]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=ROOT, pass_fds=fds)
        proc = self.proc
        wait_until(lambda: READY in log_text(self.log), proc, self.log, "socket-activated nbd-backup serve")
        return proc

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert stop_ours(self.proc, self.log) == 0, log_text(self.log)
        self.tcp.close()
        self.unix.close()


@pytest.fixture
def activated(tmp_path: Path) -> Iterator[Activated]:
    sockets = Activated(tmp_path)
    try:
        yield sockets
    finally:
        sockets.close()


def test_passed_sockets_replace_the_bound_ones(tmp_path: Path, activated: Activated) -> None:
    require("qemu-img")
    image = make_image(tmp_path / "disk.raw", SIZE)
    unbound_port = free_port()
    unbound_qmp = tmp_path / "cmdline-qmp.sock"
    proc = activated.start(
        "serve",
        "--nbd",
        f"127.0.0.1:{unbound_port}",
        "--qmp",
        f"unix:{unbound_qmp}",
        "--export",
        f"disk={image},format=raw",
    )
    ready = log_text(activated.log)
    assert re.search(rf"nbd=127\.0\.0\.1:{activated.port} .*qmp=unix:{re.escape(str(activated.qmp_path))} ", ready)
    assert listening_inodes(proc.pid) == activated.inodes, "the daemon listens on something it was not passed"
    assert not unbound_qmp.exists()
    with QmpSync(activated.qmp_path) as q:
        assert [e["id"] for e in q.ok("query-block-exports")] == ["disk"]
        assert "qemu" in q.ok("query-version")
    uri = f"nbd://127.0.0.1:{activated.port}/disk"
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri, cwd=str(tmp_path))
    assert stop_ours(proc, activated.log) == 0, log_text(activated.log)
    assert activated.qmp_path.exists()  # the socket file belongs to whoever bound it (systemd)


def test_nbd_socket_alone_starts_the_nbd_server(tmp_path: Path, activated: Activated) -> None:
    """A passed nbd socket starts the NBD server even without --nbd/--export (what the .socket unit
    promises); exports come later over QMP, on the passed qmp socket."""
    require("qemu-img")
    image = make_image(tmp_path / "disk.raw", SIZE)
    proc = activated.start("serve", "--allow-dir", str(tmp_path))
    with QmpSync(activated.qmp_path) as q:
        q.ok("blockdev-add", {"driver": "raw", "node-name": "n0", "file": {"driver": "file", "filename": str(image)}})
        q.ok("block-export-add", {"type": "nbd", "id": "disk", "node-name": "n0", "name": "disk"})
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), f"nbd://127.0.0.1:{activated.port}/disk")
    assert listening_inodes(proc.pid) == activated.inodes


def test_other_listen_pid_is_ignored(tmp_path: Path, activated: Activated) -> None:
    """LISTEN_PID of another process: the sockets are not for us (sd_listen_fds returns 0), the daemon
    binds what its command line says."""
    own_qmp = tmp_path / "own-qmp.sock"
    proc = activated.start("serve", "--nbd", "127.0.0.1:0", "--qmp", f"unix:{own_qmp}", pid_offset=1)
    ready = log_text(activated.log)
    assert re.search(rf"nbd=127\.0\.0\.1:(\d+) .*qmp=unix:{re.escape(str(own_qmp))} ", ready), ready
    assert f":{activated.port} " not in ready
    with QmpSync(own_qmp) as q:
        assert "qemu" in q.ok("query-version")
    assert len(listening_inodes(proc.pid) - activated.inodes) == 2  # its own NBD and QMP sockets


def test_unknown_name_stops_the_daemon(tmp_path: Path) -> None:
    """A unit whose FileDescriptorName= the daemon does not know is an error at start, not a socket
    nobody serves."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        wrapper = WRAPPER.replace('"nbd:qmp"', '"nbd-tls"')
        proc = subprocess.run(
            [sys.executable, "-c", wrapper, str(sock.fileno()), "0", "serve"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            pass_fds=(sock.fileno(),),
            timeout=60,
        )
    assert proc.returncode == 1
    assert "fd 3 is named 'nbd-tls'" in proc.stderr
