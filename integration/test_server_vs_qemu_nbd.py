"""Differential: the same malformed options and requests, byte for byte, to qemu-nbd and to us — the
option reply types and request error values must be the same (qemu-nbd is the reference)."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require
from peers import qemu_nbd, serve

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
SIMPLE = 0x67446698
STRUCTURED = 0x668E33EF
SIZE = 1 << 20


class Raw:
    """A blocking, by-hand NBD client: sends exactly what a test says, reports what comes back."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.recv(18)
        self.sock.sendall(struct.pack(">I", 3))

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("server closed the connection")
            data += chunk
        return data

    def option(self, opt: int, data: bytes = b"") -> list[int]:
        """Send an option; the reply types up to the final one (ACK or an error)."""
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        types = []
        while True:
            _, _, reply, length = struct.unpack(">QIII", self.recv(20))
            self.recv(length)
            types.append(reply)
            if reply == 1 or reply & 0x80000000:
                return types

    def go(self, name: str, *, structured: bool) -> None:
        if structured:
            assert self.option(8) == [1]
        data = struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
        assert self.option(7, data)[-1] == 1

    def request(self, cmd: int, *, flags: int = 0, offset: int = 0, length: int = 0, data: bytes = b"") -> int:
        """Send a request; the error value of its reply (simple reply or error chunk)."""
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, 1, offset, length) + data)
        error = 0
        while True:
            (magic,) = struct.unpack(">I", self.recv(4))
            if magic == SIMPLE:
                error, _ = struct.unpack(">IQ", self.recv(12))
                if cmd == 0 and not error:
                    self.recv(length)
                return int(error)
            assert magic == STRUCTURED
            rflags, rtype, _, length_ = struct.unpack(">HHQI", self.recv(16))
            payload = self.recv(length_)
            if rtype & 0x8000:
                error = struct.unpack(">I", payload[:4])[0]
            if rflags & 1:
                return int(error)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[dict[str, dict[str, str]]]:
    """Unix socket paths of a writable and a read-only export, from qemu-nbd and from us."""
    require("qemu-nbd")
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(SIZE))
    with contextlib.ExitStack() as stack:
        sockets = {}
        for mode, extra in (("rw", ()), ("ro", ("-r",))):
            peer = stack.enter_context(
                qemu_nbd(tmp_path, image, export="d", extra=extra, name=f"qemu-{mode}", shared=1)
            )
            sockets[mode] = str(peer.socket)
        ours_dir = tmp_path / "ours"
        ours_dir.mkdir()
        with serve(ours_dir, [f"d={image}"]) as rw:
            ro_dir = tmp_path / "ours-ro"
            ro_dir.mkdir()
            with serve(ro_dir, [f"d={image},readonly"]) as ro:
                yield {"qemu-nbd": sockets, "ours": {"rw": str(rw.socket), "ro": str(ro.socket)}}


def _string(text: str) -> bytes:
    return struct.pack(">I", len(text)) + text.encode()


OPTION_CASES = {
    "unknown option with data": (42, b"\x00" * 100),
    "go to a missing export": (7, _string("nope") + struct.pack(">H", 0)),
    "list with data": (3, b"x"),
    "extended headers": (11, b""),
    "set meta context before structured replies": (
        10,
        _string("d") + struct.pack(">I", 1) + _string("base:allocation"),
    ),
    "info with a truncated request": (6, _string("d")),
    "peek export": (4, b""),
    "starttls without tls": (5, b""),
    "structured replies with data": (8, b"x"),
}


def _option_outcomes(path: str) -> dict[str, list[int]]:
    client = Raw(path)
    try:
        return {name: client.option(opt, data) for name, (opt, data) in OPTION_CASES.items()}
    finally:
        client.close()


def test_option_refusals_match_qemu_nbd(servers: dict[str, dict[str, str]]) -> None:
    theirs = _option_outcomes(servers["qemu-nbd"]["rw"])
    ours = _option_outcomes(servers["ours"]["rw"])
    assert ours == theirs


REQUEST_CASES: dict[str, dict[str, Any]] = {
    "read past the end": dict(cmd=0, offset=SIZE - 512, length=1024),
    "write past the end": dict(cmd=1, offset=SIZE - 512, length=1024, data=b"\x01" * 1024),
    "write zeroes past the end": dict(cmd=6, offset=SIZE, length=512),
    "trim past the end": dict(cmd=4, offset=SIZE, length=512),
    "unknown command": dict(cmd=42, length=512),
    "unknown read flag": dict(cmd=0, flags=1 << 9, length=512),
    "block status without a meta context": dict(cmd=7, length=512),
    "read after all that": dict(cmd=0, length=512),
}
READ_ONLY_CASES: dict[str, dict[str, Any]] = {
    "write to a read-only export": dict(cmd=1, length=512, data=b"\x01" * 512),
    "trim on a read-only export": dict(cmd=4, length=512),
    "write zeroes on a read-only export": dict(cmd=6, length=512),
    "read after the refused writes": dict(cmd=0, length=512),
}


def _request_outcomes(path: str, cases: dict[str, dict[str, Any]], structured: bool) -> dict[str, int]:
    client = Raw(path)
    try:
        client.go("d", structured=structured)
        return {name: client.request(**case) for name, case in cases.items()}
    finally:
        client.close()


# Where we follow the spec's "Error values" ("SHOULD return NBD_ENOSPC if it receives a write request
# including one or more sectors beyond the size of the device") and qemu-nbd 7.2 says EINVAL.
DELIBERATE = {"write past the end": (22, 28), "write zeroes past the end": (22, 28)}
# ... and "SHOULD return NBD_EPERM if it receives a write or trim request on a read-only export".
DELIBERATE_READ_ONLY = {
    "write to a read-only export": (22, 1),
    "trim on a read-only export": (22, 1),
    "write zeroes on a read-only export": (22, 1),
}


@pytest.mark.parametrize("structured", [True, False])
def test_request_errors_match_qemu_nbd(servers: dict[str, dict[str, str]], structured: bool) -> None:
    theirs = _request_outcomes(servers["qemu-nbd"]["rw"], REQUEST_CASES, structured)
    ours = _request_outcomes(servers["ours"]["rw"], REQUEST_CASES, structured)
    for case, (qemu_value, our_value) in DELIBERATE.items():
        assert (theirs.pop(case), ours.pop(case)) == (qemu_value, our_value)
    assert ours == theirs
    assert theirs["read after all that"] == 0  # the stream stayed in sync
    theirs = _request_outcomes(servers["qemu-nbd"]["ro"], READ_ONLY_CASES, structured)
    ours = _request_outcomes(servers["ours"]["ro"], READ_ONLY_CASES, structured)
    for case, (qemu_value, our_value) in DELIBERATE_READ_ONLY.items():
        assert (theirs.pop(case), ours.pop(case)) == (qemu_value, our_value)
    assert ours == theirs == {"read after the refused writes": 0}
