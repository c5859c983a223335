"""Socket activation (``sd_listen_fds``): the sockets systemd passes, checked and named ``nbd``/``qmp``."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.activation import ENV_NAMES, listen_fds
from server.errors import ConfigError

FIRST = 300  # the tests put the "passed" sockets here instead of at 3 (pytest owns the low fds)


@pytest.fixture
def passed(tmp_path: Path) -> Iterator[list[socket.socket]]:
    """A listening TCP socket at fd FIRST and a listening unix socket at FIRST+1, as systemd lays them out."""
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "qmp.sock"))
    unix.listen()
    os.dup2(tcp.fileno(), FIRST)
    os.dup2(unix.fileno(), FIRST + 1)
    yield [tcp, unix]
    for fd in (FIRST, FIRST + 1):
        try:
            os.close(fd)
        except OSError:
            pass
    tcp.close()
    unix.close()


def env(count: int, names: str | None, pid: int | None = None) -> dict[str, str]:
    environ = {"LISTEN_FDS": str(count), "LISTEN_PID": str(pid if pid is not None else os.getpid()), "HOME": "/"}
    if names is not None:
        environ["LISTEN_FDNAMES"] = names
    return environ


def test_nothing_passed() -> None:
    assert listen_fds({}, first_fd=FIRST) == {}


def test_named_sockets_by_name_and_environment_cleared(passed: list[socket.socket]) -> None:
    environ = env(2, "nbd:qmp")
    found = listen_fds(environ, first_fd=FIRST)
    try:
        assert set(found) == {"nbd", "qmp"}
        [nbd] = found["nbd"]
        [qmp] = found["qmp"]
        assert nbd.fileno() == FIRST and nbd.family == socket.AF_INET
        assert nbd.getsockname() == passed[0].getsockname()
        assert qmp.fileno() == FIRST + 1 and qmp.family == socket.AF_UNIX
        assert not os.get_inheritable(FIRST)  # close-on-exec: children (qemu-img …) do not inherit them
    finally:
        for sockets in found.values():
            for sock in sockets:
                sock.detach()
    assert not set(ENV_NAMES) & set(environ)  # as sd_listen_fds(1): not seen again by children
    assert environ == {"HOME": "/"}


def test_several_sockets_of_one_name(passed: list[socket.socket]) -> None:
    found = listen_fds(env(2, "nbd:nbd"), first_fd=FIRST)
    assert [s.fileno() for s in found["nbd"]] == [FIRST, FIRST + 1]
    for sock in found["nbd"]:
        sock.detach()


def test_other_pid_is_ignored_as_systemd_specifies(passed: list[socket.socket]) -> None:
    environ = env(2, "nbd:qmp", pid=os.getpid() + 1)
    assert listen_fds(environ, first_fd=FIRST) == {}
    os.fstat(FIRST)  # left alone: not ours to close
    assert "LISTEN_FDS" not in environ


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (None, "LISTEN_FDNAMES"),
        ("nbd:console", "'console'"),
        ("nbd", "2 sockets but 1 name"),
    ],
)
def test_bad_names_are_refused(passed: list[socket.socket], names: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        listen_fds(env(2, names), first_fd=FIRST)


def test_garbled_count_is_refused() -> None:
    with pytest.raises(ConfigError, match="LISTEN_FDS"):
        listen_fds(env(0, "nbd") | {"LISTEN_FDS": "two"}, first_fd=FIRST)


def test_not_a_listening_socket_is_refused(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    os.dup2(a.fileno(), FIRST)
    try:
        with pytest.raises(ConfigError, match="not a listening stream socket"):
            listen_fds(env(1, "nbd"), first_fd=FIRST)
    finally:
        os.close(FIRST)
        a.close()
        b.close()
