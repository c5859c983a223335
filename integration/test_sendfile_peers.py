"""``NbdClient.pwrite_from_fd`` (write payloads sent with ``sendfile`` from a file) against real NBD
servers: byte-exact with payloads that stop half-way in a tiny socket buffer, whole or split in smaller
requests (none of these servers asks for that: the client is told to); and a source failing in the middle
of a payload fails that write without the server ever applying part of it.
(nbdkit 1.32's blocksize filter advertises no limits, so the minimum-block-size merge is covered by the
unit tests against our server.)"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import SIZE, Peer, nbdcopy_to_file, nbdkit, peer_of_kind

from nbd import client_transport
from nbd.client import NbdClient

KINDS = ["nbdkit-memory", "qemu-nbd", "nbd-server", "nbd-backup", "nbdkit-slow"]
PIECE = 256 * 1024


@pytest.fixture(params=KINDS)
def peer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Peer]:
    if request.param == "nbdkit-slow":  # takes its time over each write: our socket fills up for sure
        with nbdkit(tmp_path, "--filter=delay", "memory", f"size={SIZE}", "wdelay=20ms") as server:
            server.kind = "nbdkit-slow"
            yield server
        return
    with peer_of_kind(request.param, tmp_path) as server:
        yield server


def shrink_send_buffers(client: NbdClient) -> None:
    for conn in client._conns:
        assert conn.transport is not None
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


class CountingSendfile:
    """``os.sendfile`` as the client sees it, counting; with ``fail_after``, each call sends at most 64 KiB
    and the first call inside a request's payload once that many bytes went out fails (EIO)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.sent = 0
        self.eagain = 0
        self.fail_after = fail_after
        self.failed_at: int | None = None
        self._real = os.sendfile

    def __call__(self, out_fd: int, in_fd: int, offset: int, count: int) -> int:
        if self.fail_after is not None and self.sent >= self.fail_after and offset % PIECE:
            self.fail_after = None
            self.failed_at = offset
            raise OSError(errno.EIO, "Input/output error")
        if self.fail_after is not None:
            count = min(count, 65536)
        try:
            sent = self._real(out_fd, in_fd, offset, count)
        except BlockingIOError:
            self.eagain += 1
            raise
        self.sent += sent
        return sent


@pytest.mark.parametrize("split", [False, True])
async def test_file_payloads_read_back_byte_exact(
    peer: Peer, split: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = random.Random(9).randbytes(5 << 20)
    path = tmp_path / "source.img"
    path.write_bytes(source)
    model = bytearray(SIZE)
    spy = CountingSendfile()
    monkeypatch.setattr(client_transport.os, "sendfile", spy)
    fd = os.open(path, os.O_RDONLY)
    client = await asyncio.wait_for(NbdClient.connect(peer.uri, max_in_flight=16), 30)
    try:
        shrink_send_buffers(client)
        if split:
            client._max_payload = PIECE  # smaller requests than the server allows: always legal
        writes = []
        for i, (offset, file_offset, length) in enumerate(
            [(0, 3 << 20, 1 << 20), (1 << 20, 0, 2 << 20), (3 << 20, 2 << 20, 1 << 20), (5 << 20, 4 << 20, 1 << 20)]
        ):
            model[offset : offset + length] = source[file_offset : file_offset + length]
            writes.append(client.pwrite_from_fd(offset, fd, file_offset, length))
            if i == 1:
                model[6 << 20 : (6 << 20) + 70_001] = b"\x77" * 70_001
                writes.append(client.pwrite(6 << 20, b"\x77" * 70_001))  # ordinary writes in between
        model[(7 << 20) + 100 : (7 << 20) + 100 + 5000] = source[12345 : 12345 + 5000]
        writes.append(client.pwrite_from_fd((7 << 20) + 100, fd, 12345, 5000))  # unaligned
        await asyncio.wait_for(asyncio.gather(*writes), 60)
        await client.flush()
        assert await client.pread(0, SIZE) == model
    finally:
        await client.close()
        os.close(fd)
    assert spy.sent >= 5 << 20  # the payloads went by sendfile
    if peer.kind == "nbdkit-slow":
        assert spy.eagain  # and waited for the socket half-way
    assert nbdcopy_to_file(peer.uri, tmp_path / "readback.img") == model


async def test_a_source_failing_mid_payload_is_never_applied(
    peer: Peer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = random.Random(10).randbytes(2 << 20)
    path = tmp_path / "source.img"
    path.write_bytes(source)
    setup = await asyncio.wait_for(NbdClient.connect(peer.uri), 30)
    try:
        await setup.pwrite(0, b"\xee" * (2 << 20))
        await setup.flush()
    finally:
        await setup.close()
    spy = CountingSendfile(fail_after=PIECE + 40_000)
    monkeypatch.setattr(client_transport.os, "sendfile", spy)
    fd = os.open(path, os.O_RDONLY)
    client = await asyncio.wait_for(NbdClient.connect(peer.uri, connections=1), 30)
    try:
        shrink_send_buffers(client)
        client._max_payload = PIECE  # four requests: the failure is in the second one's payload
        with pytest.raises(OSError) as info:
            await asyncio.wait_for(client.pwrite_from_fd(0, fd, 0, 1 << 20), 30)
        assert info.value.errno == errno.EIO and spy.failed_at is not None
    finally:
        await client.close()
        os.close(fd)
    monkeypatch.undo()
    check = await asyncio.wait_for(NbdClient.connect(peer.uri), 30)
    try:
        data = await check.pread(0, 1 << 20)
    finally:
        await check.close()
    # The server saw the first request whole (it may have written it), then a header and part of the
    # second's payload, then the connection closed: nothing of the second, nor of those never sent.
    assert spy.failed_at is not None and PIECE < spy.failed_at < 2 * PIECE
    assert data[:PIECE] in (source[:PIECE], b"\xee" * PIECE)
    assert data[PIECE:] == b"\xee" * ((1 << 20) - PIECE)
