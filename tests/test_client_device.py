"""``NbdClient`` as a ``BlockDevice`` in one process: against our ``NbdServer`` over a memory device, and
against a tiny old-fashioned server (no GO, no structured replies) for the ``EXPORT_NAME`` fallback.
The reconnect replay rules are checked here, where the test controls exactly which request is stuck."""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sockkit import export_name_handshake, serve_unix

from backup.memory import MemoryDevice
from nbd import constants as c
from nbd import wire
from nbd.client import NbdClient, subtract_ranges
from nbd.device import BlockDevice
from nbd.errors import DisconnectedError
from nbd.server import Export, NbdServer

SIZE = 4 << 20


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[NbdServer, MemoryDevice, str]]:
    server = NbdServer()
    device = MemoryDevice(SIZE)
    server.add_export(Export("mem", device))
    path = tmp_path / "s.sock"
    await server.listen_unix(path)
    try:
        yield server, device, f"nbd+unix:///mem?socket={path}"
    finally:
        await server.stop()


async def test_is_a_block_device(served: tuple[NbdServer, MemoryDevice, str]) -> None:
    _, device, uri = served
    async with await NbdClient.connect(uri, max_in_flight=4) as client:
        assert isinstance(client, BlockDevice)
        assert client.size == SIZE and not client.read_only
        assert client.capabilities.can_zero and client.capabilities.can_extents
        data = random.Random(2).randbytes(SIZE)
        await asyncio.gather(*(client.pwrite(o, data[o : o + 65536]) for o in range(0, SIZE, 65536)))
        assert device.data == data
        assert await client.pread(0, SIZE) == data  # one call bigger than many requests
        await client.zero(0, SIZE, may_trim=True)
        assert [(e.length, e.flags) for e in await client.block_status(0, SIZE)] == [(SIZE, 3)]
        assert await client.block_status(100, 50) and (await client.block_status(100, 50))[0].length == 50
        with pytest.raises(OSError) as info:
            await client.pread(SIZE - 10, 20)
        assert info.value.errno == errno.EINVAL
        assert await client.pread(0, 0) == b""
    with pytest.raises(OSError) as info:
        await client.pread(0, 10)
    assert info.value.errno == errno.EBADF


async def test_max_in_flight_bounds_requests(served: tuple[NbdServer, MemoryDevice, str]) -> None:
    _, _, uri = served
    client = await NbdClient.connect(uri, max_in_flight=3, connections=1)
    try:
        peak = 0
        original = client._conns[0].send

        def counting_send(op: object) -> None:
            nonlocal peak
            original(op)  # type: ignore[arg-type]
            peak = max(peak, client._conns[0].inflight)

        client._conns[0].send = counting_send  # type: ignore[method-assign]
        await asyncio.gather(*(client.pread(o, 4096) for o in range(0, 1 << 20, 4096)))
        assert 1 <= peak <= 3
    finally:
        await client.close()


# --- a server without NBD_OPT_GO or structured replies --------------------------------------------------


async def old_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, disk: bytearray) -> None:
    await export_name_handshake(reader, writer, len(disk))
    while True:
        _, _, cmd, cookie, offset, length = wire.REQUEST_FAST.unpack(await reader.readexactly(28))
        if cmd == c.Cmd.DISC:
            writer.close()
            return
        if cmd == c.Cmd.WRITE:
            disk[offset : offset + length] = await reader.readexactly(length)
        payload = bytes(disk[offset : offset + length]) if cmd == c.Cmd.READ else b""
        writer.write(wire.SIMPLE_REPLY_FAST.pack(c.SIMPLE_REPLY_MAGIC, 0, cookie) + payload)


async def test_export_name_fallback_and_simple_replies(tmp_path: Path) -> None:
    disk = bytearray(1 << 20)
    path = tmp_path / "old.sock"
    server = await asyncio.start_unix_server(lambda r, w: old_server(r, w, disk), str(path))
    try:
        client = await asyncio.wait_for(NbdClient.connect(f"nbd+unix:///?socket={path}"), 10)
        info = client.export_info
        assert (info.used_go, info.structured, info.size, client.connections) == (False, False, 1 << 20, 1)
        assert not client.capabilities.can_zero and not client.capabilities.can_trim
        await client.pwrite(10, b"hello")
        await client.zero(100, 1000)  # no WRITE_ZEROES: zero buffers are written
        await client.trim(0, 4096)  # no TRIM: advisory, nothing sent
        await client.pwrite(5000, b"fua", fua=True)  # no FUA: a flush follows
        assert await client.pread(0, 20) == bytes(10) + b"hello" + bytes(5)
        await client.close()
        assert disk[5000:5003] == b"fua"
    finally:
        server.close()
        await server.wait_closed()


# --- reconnect replay rules -----------------------------------------------------------------------------


class StuckFirstWrite(MemoryDevice):
    """The first write never completes (until released, and then it fails): its reply is never sent."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.release = asyncio.Event()
        self.stuck = asyncio.Event()
        self.writes = 0

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        self.writes += 1
        if self.writes == 1:
            self.stuck.set()
            await self.release.wait()
            raise OSError(errno.EIO, "the old connection is gone")
        await super().pwrite(offset, data, fua=fua)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ((0, b"1" * 8192), (0, b"2" * 8192), b"2" * 8192),  # fully superseded: not replayed
        ((0, b"1" * 8192), (4096, b"2" * 4096), b"1" * 4096 + b"2" * 4096),  # only the uncovered part
        ((0, b"1" * 8192), (2048, b"2" * 2048), b"1" * 2048 + b"2" * 2048 + b"1" * 4096),  # a gap in the middle
        ((0, b"1" * 8192), (16384, b"2" * 10), b"1" * 8192),  # unrelated: replayed whole
    ],
)
async def test_replay_never_overwrites_a_newer_acknowledged_write(
    tmp_path: Path, old: tuple[int, bytes], new: tuple[int, bytes], expected: bytes
) -> None:
    device = StuckFirstWrite(SIZE)
    async with serve_unix(tmp_path, device) as uri:
        client = await NbdClient.connect(uri, connections=1, reconnect_delay=20)
        first = asyncio.ensure_future(client.pwrite(*old))
        await asyncio.wait_for(device.stuck.wait(), 10)
        await asyncio.wait_for(client.pwrite(*new), 10)  # newer, acknowledged
        old_conn = client._conns[0]
        old_conn.abort(DisconnectedError("network dropped"))  # as if the network failed
        await asyncio.wait_for(first, 20)  # replayed (or found superseded) on a new connection
        assert client._conns[0] is not old_conn
        assert await client.pread(0, len(expected)) == expected
        device.release.set()
        await client.close()


async def test_requests_wait_during_reconnect_and_reads_replay(tmp_path: Path) -> None:
    device = MemoryDevice(SIZE, data=b"\x42" * SIZE)
    async with serve_unix(tmp_path, device) as uri:
        client = await NbdClient.connect(uri, connections=1, reconnect_delay=20)
        client._conns[0].abort(DisconnectedError("dropped"))
        assert await asyncio.wait_for(client.pread(0, 4), 20) == b"\x42" * 4
        await client.close()


async def test_close_while_reconnecting_fails_pending_requests(tmp_path: Path) -> None:
    server = NbdServer()
    server.add_export(Export("d", MemoryDevice(SIZE)))
    path = tmp_path / "c.sock"
    await server.listen_unix(path)
    client = await NbdClient.connect(f"nbd+unix:///d?socket={path}", connections=1, reconnect_delay=60)
    await server.stop()  # nobody to reconnect to
    await asyncio.sleep(0.1)
    waiting = asyncio.ensure_future(client.pread(0, 512))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await asyncio.wait_for(client.close(), 10)
    with pytest.raises(OSError):
        await asyncio.wait_for(waiting, 5)


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(
    start=st.integers(0, 100),
    length=st.integers(1, 100),
    covers=st.lists(st.tuples(st.integers(0, 220), st.integers(1, 60)), max_size=6),
)
def test_subtract_ranges_matches_a_model(start: int, length: int, covers: list[tuple[int, int]]) -> None:
    ranges = [(a, a + n) for a, n in covers]
    pieces = subtract_ranges(start, start + length, ranges)
    covered = {x for a, b in ranges for x in range(a, b)}
    expected = [x for x in range(start, start + length) if x not in covered]
    assert [x for a, b in pieces for x in range(a, b)] == expected
    assert all(a < b for a, b in pieces)


async def test_pread_into_reused_buffers_over_holes(served: tuple[NbdServer, MemoryDevice, str]) -> None:
    _, _, uri = served
    async with await NbdClient.connect(uri) as client:
        await client.pwrite(0, b"\x11" * SIZE)
        await client.zero(1 << 20, 1 << 20, may_trim=True)
        buffer = bytearray(b"\xee" * (3 << 20))
        await client.pread_into(0, buffer)
        assert buffer == b"\x11" * (1 << 20) + bytes(1 << 20) + b"\x11" * (1 << 20)
        view = memoryview(buffer)[10:20]
        await client.pread_into((1 << 20) - 5, view)
        assert bytes(view) == b"\x11" * 5 + bytes(5)


async def test_multi_conn_opens_side_by_side_and_a_failure_closes_every_one(
    served: tuple[NbdServer, MemoryDevice, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _, uri = served
    async with await NbdClient.connect(uri, connections=4) as client:
        assert client.connections == 4
        assert server.connections == 4
    real_open = NbdClient._open
    calls = 0

    async def open_some(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 3:  # the second extra connection is refused; the others open
            await asyncio.sleep(0.01)
            raise ConnectionRefusedError(111, "refused")
        return await real_open(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(NbdClient, "_open", staticmethod(open_some))
    with pytest.raises(ConnectionRefusedError):
        await NbdClient.connect(uri, connections=4)
    assert calls == 4
    for _ in range(200):  # the server notices the closed sockets
        if server.connections == 0:
            break
        await asyncio.sleep(0.01)
    assert server.connections == 0


async def test_a_failed_remote_flush_latches(tmp_path: Path) -> None:
    """A server whose FLUSH failed once and then succeeds (what Linux does after a writeback error)
    must not make the client report the data as durable: every later flush and FUA write fails."""
    from backup_faults import FaultyDevice

    device = FaultyDevice(MemoryDevice(SIZE))
    server = NbdServer()
    server.add_export(Export("mem", device))
    path = tmp_path / "f.sock"
    await server.listen_unix(path)
    try:
        async with await NbdClient.connect(f"nbd+unix:///mem?socket={path}", connections=1) as client:
            await client.pwrite(0, b"a" * 4096)
            device.flush_failures = 1
            with pytest.raises(OSError) as info:
                await client.flush()
            assert info.value.errno == errno.EIO
            flushes = device.flushes
            for call in (
                client.flush,
                lambda: client.pwrite(0, b"b" * 4096, fua=True),
                lambda: client.zero(0, 4096, fua=True),
                lambda: client.trim(0, 4096, fua=True),
            ):
                with pytest.raises(OSError) as info:
                    await call()
                assert info.value.errno == errno.EIO
                assert "earlier flush failed" in str(info.value)
            assert device.flushes == flushes  # refused locally: the server's "success" is never asked for
            await client.pwrite(4096, b"c" * 4096)  # plain writes go on
    finally:
        await server.stop()
