"""Starting, waiting for and stopping the processes end-to-end tests run: our daemon, nbdkit, qemu-nbd and
the reference nbd-server.

Every process logs to a file in the test's tmp dir (a pipe nobody drains could block it) and counts as
started only once it says it listens — our daemon prints its ready line, nbdkit and qemu-nbd write their
pid file only once the socket accepts connections — so no test sleeps and hopes, and a slow machine only
makes start-up slower. Stopping is SIGTERM, then SIGKILL after a timeout, and always reaps the process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port, require, run

ROOT = Path(__file__).resolve().parent.parent
READY = "nbd-backup: ready"
START_TIMEOUT = 60.0  # generous: a loaded 2-core CI machine starts a Python daemon slowly
SIZE = 8 << 20


def log_text(path: Path | None) -> str:
    try:
        return path.read_text(errors="replace") if path is not None else ""
    except OSError:
        return ""


def spawn(
    argv: Sequence[str | os.PathLike[str]], log: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr going to ``log`` (and stdin closed)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [os.fspath(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=None if env is None else {**os.environ, **env},
        )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0, sig: int = signal.SIGTERM) -> bool:
    """Send ``sig`` and reap; SIGKILL after ``timeout``. True when the process exited on its own."""
    if proc.poll() is not None:
        return True
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


def pid_file_written(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def wait_until(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes] | None,
    log: Path | None,
    what: str,
    timeout: float = START_TIMEOUT,
) -> None:
    """Poll ``ready()``; the test fails if ``proc`` exits first or ``timeout`` passes (``proc`` is then killed)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what} exited {proc.returncode} before it was ready:\n{log_text(log)}")
        if time.monotonic() > deadline:
            if proc is not None:
                stop_process(proc, 0)
            pytest.fail(f"{what} not ready after {timeout} s:\n{log_text(log)}")
        time.sleep(0.02)


# --- our daemon ------------------------------------------------------------------------------------------


def nbd_backup_argv(*args: str) -> list[str]:
    """Our command line, run from the interpreter running the tests (the project's venv)."""
    return [sys.executable, "-m", "server.cli", *args]


def start_ours(
    args: Sequence[str], log: Path, *, env: dict[str, str] | None = None, what: str = "nbd-backup serve"
) -> subprocess.Popen[bytes]:
    """``nbd-backup ARGS`` started and waited for until it has printed its ready line (by then every socket
    listens and the ``--pid-file``, if any, is written)."""
    proc = spawn(nbd_backup_argv(*args), log, cwd=ROOT, env=env)
    wait_until(lambda: READY in log_text(log), proc, log, what)
    return proc


def stop_ours(proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> int:
    """SIGTERM and the exit status; a daemon still running after ``timeout`` is killed and fails the test."""
    if not stop_process(proc, timeout):
        pytest.fail(f"nbd-backup serve ignored SIGTERM for {timeout} s\n{log_text(log)}")
    return proc.returncode


def ready_nbd_port(log: Path) -> int:
    """The TCP port our daemon reports in its ready line (it was started with port 0: no free-port race)."""
    found = re.search(r"nbd=(?:\S*,)?127\.0\.0\.1:(\d+)", log_text(log))
    if found is None:
        pytest.fail(f"no NBD TCP address in the ready line:\n{log_text(log)}")
    return int(found.group(1))


# --- peer tools ------------------------------------------------------------------------------------------


def nbdinfo_json(uri: str, *extra: str) -> dict:
    """``nbdinfo --json``, run outside the repository (libnbd's Python module is also called nbd)."""
    require("nbdinfo")
    return json.loads(run("nbdinfo", "--json", *extra, uri, cwd="/").stdout)


def nbdcopy_to_file(uri: str, path: Path) -> bytes:
    require("nbdcopy")
    run("nbdcopy", uri, str(path), cwd="/")
    return path.read_bytes()


# --- other NBD servers -----------------------------------------------------------------------------------


@dataclass
class Peer:
    """A running NBD server: its URI, the image behind it (when there is one), and how to stop it."""

    kind: str
    uri: str
    image: Path | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    pid_file: Path | None = None
    log: Path | None = None
    socket: Path | None = None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server (abruptly by default: the tests of dropped connections use this)."""
        for proc in self.procs:
            stop_process(proc, 10, sig)
        if self.pid_file is not None and not self.procs:  # a daemonized server: only its pid file knows it
            try:
                os.kill(int(self.pid_file.read_text().strip()), sig)
            except (OSError, ValueError):
                pass

    def stderr(self) -> str:
        return log_text(self.log)


def make_image(path: Path, size: int = SIZE) -> Path:
    """A sparse raw image of ``size`` zero bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@contextmanager
def _pid_file_peer(
    kind: str,
    argv: Sequence[str | os.PathLike[str]],
    tmp: Path,
    log: Path,
    pid_file: Path,
    uri: str,
    *,
    image: Path | None = None,
    socket: Path | None = None,
) -> Iterator[Peer]:
    """A server that writes ``pid_file`` once it listens, as a ``Peer`` for the ``with`` block; SIGTERM after."""
    proc = spawn(argv, log, cwd=tmp)
    peer = Peer(kind, uri, image=image, procs=[proc], log=log, socket=socket)
    try:
        wait_until(lambda: pid_file_written(pid_file), proc, log, kind)
        yield peer
    finally:
        peer.kill(signal.SIGTERM)


@contextmanager
def nbdkit(tmp: Path, *args: str, name: str = "nbdkit", sock_path: Path | None = None) -> Iterator[Peer]:
    """``nbdkit -U SOCK -f ARGS…`` (arguments are the plugin, its parameters and any filters).

    E.g. ``nbdkit(tmp, "--filter=error", "memory", "4M", "error-pwrite-rate=1", f"error-pwrite-file={fault}")``
    gives a target that fails writes while ``fault`` exists.
    """
    require("nbdkit")
    sock_path = sock_path or tmp / f"{name}.sock"
    pid_file = tmp / f"{name}.nbdkit.pid"  # nbdkit writes it once it accepts connections
    log = tmp / f"{name}.log"
    argv: list[str | os.PathLike[str]] = ["nbdkit", "-U", sock_path, "-P", pid_file, "-f", "--exit-with-parent", *args]
    with _pid_file_peer(
        "nbdkit", argv, tmp, log, pid_file, f"nbd+unix:///?socket={sock_path}", socket=sock_path
    ) as peer:
        yield peer


@contextmanager
def qemu_nbd(
    tmp: Path,
    image: Path,
    *,
    export: str = "disk",
    extra: tuple[str, ...] = (),
    name: str = "qemu-nbd",
    shared: int = 8,
) -> Iterator[Peer]:
    """``qemu-nbd`` serving a raw ``image`` as ``export`` on a unix socket, persistent, ``shared`` clients at once."""
    require("qemu-nbd")
    sock_path = tmp / f"{name}.sock"
    pid_file = tmp / f"{name}.pid"  # qemu-nbd writes it once the socket listens
    log = tmp / f"{name}.log"
    argv: list[str | os.PathLike[str]] = [
        "qemu-nbd",
        "-k",
        sock_path,
        "--pid-file",
        pid_file,
        "-f",
        "raw",
        "-x",
        export,
        "-t",
        f"--shared={shared}",
    ]
    uri = f"nbd+unix:///{export}?socket={sock_path}"
    with _pid_file_peer(
        "qemu-nbd", [*argv, *extra, image], tmp, log, pid_file, uri, image=image, socket=sock_path
    ) as peer:
        yield peer


@contextmanager
def nbdkit_unix(tmp: Path, name: str, *args: str) -> Iterator[Path]:
    """``nbdkit(tmp, *args, name=name)`` for the ``with`` block; yields its unix socket."""
    with nbdkit(tmp, *args, name=name) as peer:
        assert peer.socket is not None
        yield peer.socket


@contextmanager
def nbdkit_tcp(tmp: Path, host: str, *args: str, attempts: int = 5) -> Iterator[tuple[Peer, int]]:
    """``nbdkit -i HOST -p PORT ARGS…`` on a free port; yields the peer and the port. nbdkit cannot report a
    port it chose, so a port taken by another process in the meantime (nbdkit then exits) means another try."""
    require("nbdkit")
    log = tmp / "nbdkit-tcp.log"
    for _ in range(attempts):
        port = free_port()
        pid_file = tmp / f"nbdkit-{port}.pid"
        argv: list[str | os.PathLike[str]] = [
            "nbdkit",
            "-i",
            host,
            "-p",
            str(port),
            "-P",
            pid_file,
            "-f",
            "--exit-with-parent",
            *args,
        ]
        proc = spawn(argv, log, cwd=tmp)
        while not pid_file_written(pid_file) and proc.poll() is None:
            time.sleep(0.02)
        if proc.poll() is not None:
            continue
        peer = Peer("nbdkit", f"nbd://{host}:{port}/", procs=[proc], log=log)
        try:
            yield peer, port
        finally:
            peer.kill(signal.SIGTERM)
        return
    pytest.fail(f"nbdkit failed to listen on TCP {attempts} times:\n{log_text(log)}")


def _daemon_state(pid_file: Path) -> str:
    """``"starting"`` (no pid yet), ``"gone"`` (exited: e.g. its port was taken) or ``"running"``."""
    if not pid_file_written(pid_file):
        return "starting"
    try:
        stat = Path(f"/proc/{int(pid_file.read_text().strip())}/stat").read_text()
    except (OSError, ValueError):
        return "gone"
    return "gone" if stat.rpartition(")")[2].split()[0] in ("Z", "X") else "running"


def _greets(port: int) -> bool:
    """An NBD server answers on ``port`` (its first bytes are the NBD magic)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            return sock.recv(8) == b"NBDMAGIC"
    except OSError:
        return False


@contextmanager
def nbd_server(tmp: Path, image: Path, *, export: str = "disk", attempts: int = 5) -> Iterator[Peer]:
    """The reference ``nbd-server`` on TCP (it daemonizes: it is stopped through its pid file).

    It cannot listen on port 0 and report the port, so it gets a free one; should another process take
    that port first (the daemon writes its pid file, then fails to bind and exits), it is started again
    on another port.
    """
    require("nbd-server")
    config = tmp / "nbd-server.conf"
    pid_file = tmp / "nbd-server.pid"
    log = tmp / "nbd-server.log"
    for _ in range(attempts):
        port = free_port()
        config.write_text(
            "[generic]\n"
            "    listenaddr = 127.0.0.1\n"
            f"    port = {port}\n"
            "    allowlist = true\n"
            f"[{export}]\n"
            f"    exportname = {image}\n"
            "    trim = true\n"
            "    flush = true\n"
            "    fua = true\n"
        )
        pid_file.unlink(missing_ok=True)
        with open(log, "ab") as err:
            subprocess.run(["nbd-server", "-C", config, "-p", pid_file], stderr=err, check=True, timeout=30)
        peer = Peer("nbd-server", f"nbd://127.0.0.1:{port}/{export}", image=image, pid_file=pid_file, log=log)
        deadline = time.monotonic() + START_TIMEOUT
        while (state := _daemon_state(pid_file)) != "gone" and not (state == "running" and _greets(port)):
            if time.monotonic() > deadline:
                peer.kill(signal.SIGKILL)
                pytest.fail(f"nbd-server not listening after {START_TIMEOUT} s:\n{log_text(log)}")
            time.sleep(0.02)
        if _daemon_state(pid_file) != "running":
            continue
        try:
            yield peer
        finally:
            peer.kill(signal.SIGTERM)
        return
    pytest.fail(f"nbd-server failed to start {attempts} times:\n{log_text(log)}")


# --- our daemon as an NBD server -------------------------------------------------------------------------


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
        return log_text(self.log)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, and the exit status (killed after ``timeout``: that is a test failure)."""
        return stop_ours(self.proc, self.log, timeout)


@contextmanager
def serve(tmp_path: Path, exports: Sequence[str], *extra: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    """Run ``nbd-backup serve`` on a TCP port of its choosing (port 0: no race for a free port) and a unix
    socket, with ``--export`` each of ``exports``; the sockets listen when the ``with`` block starts."""
    sock = tmp_path / "nbd.sock"
    log = tmp_path / f"serve-{len(list(tmp_path.glob('serve-*.log')))}.log"
    argv = ["serve", "--nbd", "127.0.0.1:0", "--nbd-socket", str(sock), *extra]
    for export in exports:
        argv += ["--export", export]
    proc = start_ours(argv, log, env=env)
    try:
        served = Served(proc, ready_nbd_port(log), sock, log)
        yield served
    finally:
        stop_ours(proc, log)


@contextmanager
def our_server(tmp: Path, image: Path, *, export: str = "disk") -> Iterator[Peer]:
    with serve(tmp, [f"{export}={image}"]) as served:
        yield Peer("nbd-backup", served.uri(export, "unix"), image=image, procs=[served.proc], log=served.log)


KINDS = ["qemu-nbd", "nbdkit-memory", "nbdkit-file", "nbd-server", "nbd-backup"]


@contextmanager
def peer_of_kind(kind: str, tmp: Path) -> Iterator[Peer]:
    """One of ``KINDS`` serving an 8 MiB disk (image-backed ones over a sparse file in ``tmp``)."""
    if kind == "nbdkit-memory":
        with nbdkit(tmp, "memory", f"size={SIZE}") as peer:
            yield peer
    elif kind == "nbdkit-file":
        image = make_image(tmp / "nbdkit.img")
        with nbdkit(tmp, "file", str(image)) as peer:
            peer.image = image
            yield peer
    elif kind == "qemu-nbd":
        with qemu_nbd(tmp, make_image(tmp / "qemu.img")) as peer:
            yield peer
    elif kind == "nbd-server":
        with nbd_server(tmp, make_image(tmp / "nbd-server.img")) as peer:
            yield peer
    elif kind == "nbd-backup":
        with our_server(tmp, make_image(tmp / "ours.img")) as peer:
            yield peer
    else:
        raise AssertionError(kind)
