"""The asyncio NBD server over real sockets with memory devices, on both event loops: pipelining and
out-of-order replies, sparse reads, block status, error mapping, limits and timeouts, shutdown."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import sockkit

from backup.filter import BlockFilter
from backup.memory import MemoryDevice
from backup.node import BlockNode
from nbd import constants as c
from nbd import wire
from nbd.constants import Cmd, CmdFlag, Errno, Opt, Rep, ReplyType
from nbd.server import Export, NbdServer, ServerLimits

LOOPS = ["asyncio", "uvloop"]
run_on = partial(sockkit.run_on, timeout=30)  # every scenario here is bounded


class RawClient:
    """Just enough of an NBD client, by hand, to see exactly what the server sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def greeting(self) -> None:
        wire.ServerGreeting.parse(await self.reader.readexactly(18))
        self.writer.write(struct.pack(">I", 3))

    def option(self, opt: int, data: bytes = b"") -> None:
        self.writer.write(wire.OptionHeader.build({"option": opt, "length": len(data)}) + data)

    async def option_reply(self) -> tuple[int, bytes]:
        header = wire.OptionReplyHeader.parse(await self.reader.readexactly(20))
        return header.reply, await self.reader.readexactly(header.length)

    async def go(self, name: str, *, structured: bool = True) -> None:
        await self.greeting()
        if structured:
            self.option(Opt.STRUCTURED_REPLY)
            assert (await self.option_reply())[0] == Rep.ACK
            self.option(
                Opt.SET_META_CONTEXT, wire.MetaContextRequest.build({"name": name, "queries": ["base:allocation"]})
            )
            assert (await self.option_reply())[0] == Rep.META_CONTEXT
            assert (await self.option_reply())[0] == Rep.ACK
        self.option(Opt.GO, wire.InfoRequest.build({"name": name, "requests": []}))
        while True:
            reply, _ = await self.option_reply()
            if reply != Rep.INFO:
                assert reply == Rep.ACK
                return

    def request(
        self, cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
    ) -> None:
        header = wire.REQUEST_FAST.pack(c.REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        self.writer.write(header + data)

    async def reply(self) -> tuple[int, int, int, int, bytes]:
        """(magic, cookie, error or chunk type, flags, payload) of the next simple reply or chunk."""
        head = await self.reader.readexactly(4)
        (magic,) = struct.unpack(">I", head)
        if magic == c.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", await self.reader.readexactly(12))
            return magic, cookie, error, 0, b""
        flags, rtype, cookie, length = struct.unpack(">HHQI", await self.reader.readexactly(16))
        return magic, cookie, rtype, flags, await self.reader.readexactly(length)

    async def read_data(self, cookie: int) -> tuple[bytes, list[int]]:
        """Reassemble a structured read; returns the bytes and the chunk types seen."""
        parts: dict[int, bytes] = {}
        types = []
        while True:
            magic, got, rtype, flags, payload = await self.reply()
            assert got == cookie and magic == c.STRUCTURED_REPLY_MAGIC
            types.append(rtype)
            if rtype == ReplyType.OFFSET_DATA:
                parts[struct.unpack(">Q", payload[:8])[0]] = payload[8:]
            elif rtype == ReplyType.OFFSET_HOLE:
                offset, length = struct.unpack(">QI", payload)
                parts[offset] = bytes(length)
            else:
                assert rtype == ReplyType.NONE, rtype
            if flags & c.ReplyFlag.DONE:
                return b"".join(parts[k] for k in sorted(parts)), types

    async def close(self) -> None:
        await sockkit.close_stream(self.writer)


async def serving(device: Any, body: Callable[[NbdServer, int], Awaitable[None]], **server_args: Any) -> None:
    server = NbdServer(**server_args)
    server.add_export(Export("disk", device))
    _, port = await server.listen_tcp("127.0.0.1", 0)
    try:
        await body(server, port)
    finally:
        await server.stop()


class GatedDevice(MemoryDevice):
    """Reads at offset 0 wait for a gate, so a later request can overtake them."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = asyncio.Event()

    async def pread(self, offset: int, length: int) -> bytes:
        if offset == 0:
            await self.gate.wait()
        return await super().pread(offset, length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        await super().pwrite(offset, data, fua=fua)
        self.gate.set()


@pytest.mark.parametrize("loop", LOOPS)
def test_pipelined_requests_reply_out_of_order(loop: str) -> None:
    async def body(server: NbdServer, port: int) -> None:
        client = await RawClient.connect(port)
        await client.go("disk", structured=False)
        client.request(Cmd.READ, 1, 0, 4096)
        client.request(Cmd.WRITE, 2, 8192, 4096, data=b"\x42" * 4096)
        # The write completes first although it was sent second.
        assert (await client.reply())[1:3] == (2, 0)
        _magic, cookie, error, _, _ = await client.reply()
        assert (cookie, error) == (1, 0)
        assert await client.reader.readexactly(4096) == bytes(4096)
        client.request(Cmd.READ, 3, 8192, 4096)
        assert (await client.reply())[1:3] == (3, 0)
        assert await client.reader.readexactly(4096) == b"\x42" * 4096
        client.request(Cmd.DISC, 4)
        assert await asyncio.wait_for(client.reader.read(), 5) == b""
        await client.close()

    run_on(loop, serving(GatedDevice(1 << 20), body))


@pytest.mark.parametrize("loop", LOOPS)
def test_sparse_read_block_status_and_errors(loop: str) -> None:
    device = MemoryDevice(1 << 20)

    async def body(server: NbdServer, port: int) -> None:
        await device.pwrite(65536, b"\x11" * 4096)
        client = await RawClient.connect(port)
        await client.go("disk")
        client.request(Cmd.READ, 1, 0, 256 * 1024)
        data, types = await client.read_data(1)
        assert data == bytes(65536) + b"\x11" * 4096 + bytes(256 * 1024 - 65536 - 4096)
        assert ReplyType.OFFSET_HOLE in types and ReplyType.OFFSET_DATA in types
        # DF: one content chunk.
        client.request(Cmd.READ, 2, 0, 256 * 1024, flags=CmdFlag.DF)
        data2, types = await client.read_data(2)
        assert data2 == data and types == [ReplyType.OFFSET_DATA]
        client.request(Cmd.BLOCK_STATUS, 3, 0, 1 << 20)
        _magic, _cookie, rtype, flags, payload = await client.reply()
        assert rtype == ReplyType.BLOCK_STATUS and flags & c.ReplyFlag.DONE
        parsed = wire.BlockStatusPayload.parse(payload)
        assert [(d.length, d.status_flags) for d in parsed.descriptors] == [
            (65536, 3),
            (4096, 0),
            ((1 << 20) - 65536 - 4096, 3),
        ]
        client.request(Cmd.BLOCK_STATUS, 4, 0, 1 << 20, flags=CmdFlag.REQ_ONE)
        payload = (await client.reply())[4]
        assert len(wire.BlockStatusPayload.parse(payload).descriptors) == 1
        # Out of bounds read: a structured error chunk.
        client.request(Cmd.READ, 5, (1 << 20) - 512, 1024)
        _magic, _cookie, rtype, flags, payload = await client.reply()
        assert rtype == ReplyType.ERROR and wire.ErrorChunk.parse(payload).error == Errno.EINVAL
        # Zero-length read: a NONE chunk.
        client.request(Cmd.READ, 6, 0, 0)
        assert (await client.reply())[2] == ReplyType.NONE
        await client.close()

    run_on(loop, serving(device, body))


class FailingDevice(MemoryDevice):
    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        raise OSError(errno.EDQUOT, "quota")

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        raise OSError(errno.ENOTSUP, "no fast zero")

    async def flush(self) -> None:
        raise RuntimeError("a bug")


@pytest.mark.parametrize("loop", LOOPS)
def test_device_errors_are_mapped(loop: str) -> None:
    async def body(server: NbdServer, port: int) -> None:
        client = await RawClient.connect(port)
        await client.go("disk")
        client.request(Cmd.WRITE, 1, 0, 512, data=bytes(512))
        assert (await client.reply())[1:3] == (1, Errno.ENOSPC)
        client.request(Cmd.WRITE_ZEROES, 2, 0, 512, flags=CmdFlag.FAST_ZERO)
        assert (await client.reply())[1:3] == (2, Errno.ENOTSUP)
        client.request(Cmd.WRITE_ZEROES, 3, 0, 512)
        assert (await client.reply())[1:3] == (3, Errno.EINVAL)
        client.request(Cmd.FLUSH, 4)
        assert (await client.reply())[1:3] == (4, Errno.EIO)
        # Still serving.
        client.request(Cmd.READ, 5, 0, 512)
        data, _ = await client.read_data(5)
        assert data == bytes(512)
        await client.close()

    run_on(loop, serving(FailingDevice(1 << 20), body))


@pytest.mark.parametrize("loop", LOOPS)
def test_handshake_timeout(loop: str) -> None:
    async def body(server: NbdServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readexactly(18)
        # Say nothing: the server must hang up by itself.
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()

    run_on(loop, serving(MemoryDevice(4096), body, limits=ServerLimits(handshake_timeout=0.2)))


@pytest.mark.parametrize("loop", LOOPS)
def test_connection_limit(loop: str) -> None:
    async def body(server: NbdServer, port: int) -> None:
        first = await RawClient.connect(port)
        await first.go("disk")
        assert server.connection_count("disk") == 1
        second = await RawClient.connect(port)
        await second.greeting()
        second.option(Opt.GO, wire.InfoRequest.build({"name": "disk", "requests": []}))
        reply, message = await second.option_reply()
        assert reply == Rep.ERR_POLICY and b"too many connections" in message
        second.option(Opt.ABORT)
        assert (await second.option_reply())[0] == Rep.ACK
        assert await asyncio.wait_for(second.reader.read(), 5) == b""
        await second.close()
        # The first one is unaffected.
        first.request(Cmd.READ, 1, 0, 512)
        assert (await first.read_data(1))[0] == bytes(512)
        await first.close()

    run_on(loop, serving(MemoryDevice(1 << 20), body, limits=ServerLimits(max_connections=1)))


@pytest.mark.parametrize("loop", LOOPS)
def test_unix_socket_node_export_and_remove(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        node = BlockNode("n", MemoryDevice(1 << 20))
        server = NbdServer()
        export = Export("n", node, writable=False, description="memory")
        server.add_export(export)
        assert export in node.users
        path = tmp_path / "nbd.sock"
        await server.listen_unix(path)
        reader, writer = await asyncio.open_unix_connection(str(path))
        client = RawClient(reader, writer)
        await client.go("")  # the only export is the default one
        client.request(Cmd.WRITE, 1, 0, 512, data=bytes(512))
        assert (await client.reply())[1:3] == (1, Errno.EPERM)
        assert server.connection_count("n") == 1
        server.remove_export("n")
        assert export not in node.users
        assert await asyncio.wait_for(reader.read(), 5) == b""
        await server.stop()
        assert not path.exists()
        await client.close()

    run_on(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_stop_waits_for_in_flight_requests(loop: str) -> None:
    device = GatedDevice(1 << 20)

    async def main() -> None:
        server = NbdServer()
        server.add_export(Export("disk", device))
        _, port = await server.listen_tcp("127.0.0.1", 0)
        client = await RawClient.connect(port)
        await client.go("disk", structured=False)
        client.request(Cmd.READ, 1, 0, 512)
        await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(server.stop())
        await asyncio.sleep(0.05)
        device.gate.set()
        await stopping
        assert (await client.reply())[1:3] == (1, 0)
        assert await client.reader.readexactly(512) == bytes(512)
        assert await asyncio.wait_for(client.reader.read(), 5) == b""
        await client.close()

    run_on(loop, main())


class SlowFailingDevice(MemoryDevice):
    """Verbs that suspend first, then fail (or get cancelled): the eager-start driver's slow path."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.pending: list[asyncio.Future[None]] = []

    async def pread(self, offset: int, length: int) -> bytes:
        await asyncio.sleep(0)
        raise OSError(errno.EIO, "media error")

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        await fut  # cancelled below: the request fails, the connection goes on

    async def flush(self) -> None:
        await asyncio.sleep(0)
        await asyncio.sleep(0)


@pytest.mark.parametrize("loop", LOOPS)
def test_suspended_requests_fail_and_cancel_cleanly(loop: str) -> None:
    device = SlowFailingDevice(1 << 20)

    async def body(server: NbdServer, port: int) -> None:
        client = await RawClient.connect(port)
        await client.go("disk")
        client.request(Cmd.READ, 1, 0, 4096)
        _magic, cookie, rtype, _flags, payload = await client.reply()
        assert (cookie, rtype) == (1, ReplyType.ERROR) and wire.ErrorChunk.parse(payload).error == Errno.EIO
        client.request(Cmd.TRIM, 2, 0, 4096)
        while not device.pending:
            await asyncio.sleep(0.01)
        device.pending[0].cancel()
        client.request(Cmd.FLUSH, 3)
        replies = {(await client.reply())[1:3] for _ in range(2)}
        assert replies == {(2, Errno.EIO), (3, 0)}
        await client.close()

    run_on(loop, serving(device, body))


class CountingGate(MemoryDevice):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = asyncio.Event()
        self.active = 0
        self.max_active = 0

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        await self.gate.wait()
        await super().pwrite(offset, data, fua=fua)
        self.active -= 1


@pytest.mark.parametrize("loop", LOOPS)
def test_bytes_in_flight_are_bounded(loop: str) -> None:
    device = CountingGate(8 << 20)
    big = 4 << 20

    async def body(server: NbdServer, port: int) -> None:
        client = await RawClient.connect(port)
        await client.go("disk", structured=False)
        for i in range(24):
            client.request(Cmd.WRITE, i, 0, big, data=bytes(big))
        # 16 writes of 4 MiB are 64 MiB in flight: the server stops reading there.
        while device.active < 16:
            await asyncio.sleep(0.01)
        device.gate.set()
        cookies = {(await client.reply())[1] for _ in range(24)}
        assert cookies == set(range(24))
        assert device.max_active <= 16
        await client.close()

    run_on(loop, serving(device, body))


@pytest.mark.parametrize("loop", LOOPS)
def test_connection_flood_is_cut_off(loop: str) -> None:
    async def body(server: NbdServer, port: int) -> None:
        first = await RawClient.connect(port)
        await first.go("disk")
        second = await RawClient.connect(port)
        await second.greeting()  # refused politely: a greeting, then ERR_POLICY
        while server.connections < 2:
            await asyncio.sleep(0.01)
        third = await RawClient.connect(port)
        # Twice the limit: not even a greeting.
        assert await asyncio.wait_for(third.reader.read(), 5) == b""
        for client in (first, second, third):
            await client.close()

    run_on(loop, serving(MemoryDevice(1 << 20), body, limits=ServerLimits(max_connections=1)))


class RecordingFilter(BlockFilter):
    def __init__(self, next_device: Any) -> None:
        super().__init__(next_device)
        self.writes: list[tuple[int, int]] = []

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        self.writes.append((offset, len(data)))
        await super().pwrite(offset, data, fua=fua)


@pytest.mark.parametrize("loop", LOOPS)
def test_filter_inserted_under_a_live_export(loop: str) -> None:
    """What a backup does: drain the node, put its filter on top; the connection never notices."""
    node = BlockNode("n", MemoryDevice(1 << 20))

    async def body(server: NbdServer, port: int) -> None:
        client = await RawClient.connect(port)
        await client.go("disk", structured=False)
        client.request(Cmd.WRITE, 1, 0, 4096, data=b"\x01" * 4096)
        assert (await client.reply())[1:3] == (1, 0)
        async with node.drained():
            recorder = node.insert_filter(RecordingFilter)
        client.request(Cmd.WRITE, 2, 8192, 4096, data=b"\x02" * 4096)
        assert (await client.reply())[1:3] == (2, 0)
        assert isinstance(recorder, RecordingFilter) and recorder.writes == [(8192, 4096)]
        async with node.drained():
            node.remove_filter(recorder)
        client.request(Cmd.WRITE, 3, 0, 4096, data=b"\x03" * 4096)
        assert (await client.reply())[1:3] == (3, 0)
        assert recorder.writes == [(8192, 4096)]
        assert node.device.data[:4096] == b"\x03" * 4096  # type: ignore[attr-defined]
        await client.close()

    run_on(loop, serving(node, body))


@pytest.mark.parametrize("loop", LOOPS)
def test_default_export_keeps_its_meta_context(loop: str) -> None:
    async def body(server: NbdServer, port: int) -> None:
        client = await RawClient.connect(port)
        await client.go("")  # SET_META_CONTEXT and GO both name the default export ""
        client.request(Cmd.BLOCK_STATUS, 1, 0, 4096)
        assert (await client.reply())[2] == ReplyType.BLOCK_STATUS
        await client.close()

    run_on(loop, serving(MemoryDevice(1 << 20), body))


async def _raw_file(tmp_path: Path, size: int) -> tuple[Any, bytes]:
    from backup.rawfile import RawFileDevice

    data = bytes((i * 7 + 3) & 0xFF for i in range(size))
    path = tmp_path / "big.raw"
    path.write_bytes(data)
    return await RawFileDevice.open(path), data


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("structured", [True, False])
def test_big_reads_of_a_raw_file(loop: str, structured: bool, tmp_path: Path) -> None:
    """Big reads go out by sendfile: whole, unaligned tail, and when the socket takes only part."""
    size = 3 * 1024 * 1024 + 1000  # exported as the next multiple of 512

    async def main() -> None:
        device, data = await _raw_file(tmp_path, size)
        expected = data + bytes(24)
        node = BlockNode("n", device)

        async def body(server: NbdServer, port: int) -> None:
            client = await RawClient.connect(port)
            await client.go("disk", structured=structured)

            async def read(cookie: int, offset: int, length: int) -> bytes:
                client.request(Cmd.READ, cookie, offset, length)
                if structured:
                    return (await client.read_data(cookie))[0]
                assert (await client.reply())[1:3] == (cookie, 0)
                return await client.reader.readexactly(length)

            assert await read(1, 0, 1 << 20) == expected[: 1 << 20]
            assert await read(2, len(expected) - (512 << 10), 512 << 10) == expected[-(512 << 10) :]
            # A tiny socket buffer: sendfile sends a little, the transport the rest, in order.
            (conn,) = server._connections
            conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            for cookie in range(3, 7):
                client.request(Cmd.READ, cookie, cookie << 18, 1 << 20)
            # Replies may come in any order (a read that cannot take the shortcut runs in a thread).
            got: dict[int, bytearray] = {cookie: bytearray(1 << 20) for cookie in range(3, 7)}
            pending = set(got)
            while pending:
                _magic, cookie, rtype, flags, payload = await client.reply()
                if not structured:
                    assert rtype == 0
                    got[cookie][:] = await client.reader.readexactly(1 << 20)
                    pending.discard(cookie)
                    continue
                assert rtype == ReplyType.OFFSET_DATA
                start = struct.unpack(">Q", payload[:8])[0] - (cookie << 18)
                got[cookie][start : start + len(payload) - 8] = payload[8:]
                if flags & c.ReplyFlag.DONE:
                    pending.discard(cookie)
            for cookie, data in got.items():
                assert data == expected[cookie << 18 : (cookie << 18) + (1 << 20)]
            # A filter that changes what reads return: no shortcut around it.
            async with node.drained():
                node.insert_filter(InvertingFilter)
            assert await read(9, 0, 256 << 10) == bytes(b ^ 0xFF for b in expected[: 256 << 10])
            await client.close()

        await serving(node, body)
        await device.close()

    run_on(loop, main())


class InvertingFilter(BlockFilter):
    async def pread(self, offset: int, length: int) -> bytes:
        return bytes(b ^ 0xFF for b in await super().pread(offset, length))


@pytest.mark.parametrize("loop", LOOPS)
def test_big_writes_are_answered_once(loop: str) -> None:
    """Writes over the 16 MiB spare budget, up to the 32 MiB we advertise: one reply each, so the
    read after them gets its own reply (a second, EIO reply to the write used to come first)."""
    device = MemoryDevice(64 << 20)

    async def body(server: NbdServer, port: int) -> None:
        client = await RawClient.connect(port)
        await client.go("disk")
        for cookie, size in ((1, 20 << 20), (3, 32 << 20), (5, 32 << 20)):
            fill = bytes([cookie]) * size
            client.request(Cmd.WRITE, cookie, 0, size, data=fill)
            client.request(Cmd.READ, cookie + 1, size - 4096, 4096)
            assert (await client.reply())[1:3] == (cookie, 0)
            data, _ = await client.read_data(cookie + 1)
            assert data == fill[:4096]
        client.request(Cmd.DISC, 9)
        assert await asyncio.wait_for(client.reader.read(), 5) == b""
        await client.close()

    run_on(loop, serving(device, body))


@pytest.mark.parametrize("loop", LOOPS)
def test_nothing_after_a_reply_can_answer_again(loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever raises once a request's reply went out is logged, never answered a second time."""
    from nbd.server_core import ServerCore

    def broken(self: ServerCore, payload: bytearray) -> None:
        raise RuntimeError("a bug after the reply")

    monkeypatch.setattr(ServerCore, "recycle", broken)

    async def body(server: NbdServer, port: int) -> None:
        client = await RawClient.connect(port)
        await client.go("disk")
        client.request(Cmd.WRITE, 1, 0, 1 << 20, data=b"\x07" * (1 << 20))
        client.request(Cmd.READ, 2, 0, 4096)
        assert (await client.reply())[1:3] == (1, 0)
        assert (await client.read_data(2))[0] == b"\x07" * 4096
        client.request(Cmd.FLUSH, 3)
        assert (await client.reply())[1:3] == (3, 0)
        await client.close()

    run_on(loop, serving(MemoryDevice(4 << 20), body))


async def _settle(port: int, rounds: int = 5) -> None:
    """Round trips on an honest connection: by then the server has been through what others sent."""
    probe = await RawClient.connect(port)
    await probe.go("disk", structured=False)
    for cookie in range(rounds):
        probe.request(Cmd.READ, cookie, 0, 512)
        assert (await probe.reply())[1:3] == (cookie, 0)
        await probe.reader.readexactly(512)
    await probe.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_unread_replies_are_bounded_per_connection_and_server(loop: str) -> None:
    """Clients that pipeline reads of a fast device and never read the replies: each connection
    stops starting requests at its limits, all of them together at the server's budget; once the
    clients read, every request is answered and nothing stays charged."""
    from nbd import server as server_mod

    count, length, budget = 200, 256 << 10, 8 << 20

    async def body(server: NbdServer, port: int) -> None:
        flooders = [await RawClient.connect(port) for _ in range(3)]
        for flooder in flooders:
            await flooder.go("disk", structured=False)
            for cookie in range(count):
                flooder.request(Cmd.READ, cookie, 0, length)
        await _settle(port)
        assert server.buffered <= budget
        unsent = sum(conn.transport.get_write_buffer_size() for conn in server._connections)
        # Each transport holds what was charged, plus at most its high-water mark and one batch.
        slack = server_mod.WRITE_HIGH_WATER + server_mod.BATCH_BYTES + length
        assert unsent <= budget + 3 * slack, unsent

        async def drain(client: RawClient) -> set[int]:
            cookies = set()
            for _ in range(count):
                _magic, cookie, error, _, _ = await client.reply()
                assert error == 0
                await client.reader.readexactly(length)
                cookies.add(cookie)
            return cookies

        got = await asyncio.gather(*(drain(flooder) for flooder in flooders))
        assert all(cookies == set(range(count)) for cookies in got)
        for _ in range(100):
            if not server.buffered:
                break
            await asyncio.sleep(0.01)
        assert server.buffered == 0
        for flooder in flooders:
            await flooder.close()

    run_on(loop, serving(MemoryDevice(1 << 20), body, buffer_budget=budget))


@pytest.mark.parametrize("loop", LOOPS)
def test_stalled_write_payloads_are_bounded(loop: str, tmp_path: Path) -> None:
    """Writes that stall one byte into their payload: each is charged its whole length before any of
    it is read, the server's budget bounds them all, and one client (address) gets at most half of
    it, so another client still writes and reads."""
    size, budget = 4 << 20, 16 << 20

    async def main() -> None:
        server = NbdServer(buffer_budget=budget, stall_timeout=0)
        server.add_export(Export("disk", MemoryDevice(size)))
        _, port = await server.listen_tcp("127.0.0.1", 0)
        path = tmp_path / "nbd.sock"
        await server.listen_unix(path)
        stalled = [await RawClient.connect(port) for _ in range(6)]
        for client in stalled:
            await client.go("disk")
            client.request(Cmd.WRITE, 1, 0, size, data=b"\x01")
            await client.writer.drain()
        other = RawClient(*await asyncio.open_unix_connection(str(path)))
        await other.go("disk")
        other.request(Cmd.WRITE, 2, 0, size, data=b"\x02" * size)
        assert (await other.reply())[1:3] == (2, 0)
        other.request(Cmd.READ, 3, size - 512, 512)
        assert (await other.read_data(3))[0] == b"\x02" * 512
        # 127.0.0.1 holds half the budget (two payloads); the other four wait without reading.
        assert server.buffered == budget // 2
        for client in stalled:
            await client.close()
        await other.close()
        for _ in range(100):
            if not server.buffered:
                break
            await asyncio.sleep(0.01)
        assert server.buffered == 0
        await server.stop()

    run_on(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_idle_and_stalled_connections_are_closed(loop: str) -> None:
    device = GatedDevice(4 << 20)

    async def body(server: NbdServer, port: int) -> None:
        idle = await RawClient.connect(port)
        await idle.go("disk")
        not_reading = await RawClient.connect(port)
        await not_reading.go("disk", structured=False)
        not_reading.writer.transport.set_write_buffer_limits(high=0)
        for cookie in range(64):
            not_reading.request(Cmd.READ, cookie, 1 << 20, 1 << 20)
        half_written = await RawClient.connect(port)
        await half_written.go("disk")
        half_written.request(Cmd.WRITE, 1, 0, 1 << 20, data=b"\x01")
        # Waiting for the device is neither idle nor stalled: this one is answered.
        busy = await RawClient.connect(port)
        await busy.go("disk")
        busy.request(Cmd.READ, 1, 0, 512)  # offset 0: waits for the gate
        for client in (idle, half_written):
            assert await asyncio.wait_for(client.reader.read(), 10) == b""
        # The one that does not read is cut off once the server stops getting its replies out.
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(not_reading.reader.readexactly(1 << 30), 10)
        device.gate.set()
        assert (await busy.read_data(1))[0] == bytes(512)
        for client in (idle, not_reading, half_written, busy):
            await client.close()

    run_on(loop, serving(device, body, limits=ServerLimits(idle_timeout=0.3), stall_timeout=0.3))


@pytest.mark.parametrize("loop", LOOPS)
def test_per_client_limit_and_silent_sockets(loop: str, tmp_path: Path) -> None:
    """One address gets at most its share of the connections; silent sockets (connected, then
    nothing) make room for a real client when the server is full."""

    async def main() -> None:
        server = NbdServer(limits=ServerLimits(max_connections=4, max_connections_per_client=2))
        server.add_export(Export("disk", MemoryDevice(1 << 20)))
        _, port = await server.listen_tcp("127.0.0.1", 0)
        path = tmp_path / "nbd.sock"
        await server.listen_unix(path)
        first = [await RawClient.connect(port) for _ in range(2)]
        for client in first:
            await client.go("disk")
        third = await RawClient.connect(port)
        await third.greeting()
        third.option(Opt.GO, wire.InfoRequest.build({"name": "disk", "requests": []}))
        reply, message = await third.option_reply()
        assert reply == Rep.ERR_POLICY and b"too many connections from 127.0.0.1" in message
        await third.close()
        # Silent sockets (unix: no per-address limit) fill the server ...
        silent = [await asyncio.open_unix_connection(str(path)) for _ in range(2)]
        while server.connections < 4:
            await asyncio.sleep(0.01)
        # ... and a real client still gets in: a silent one is dropped for it.
        real = RawClient(*await asyncio.open_unix_connection(str(path)))
        await real.go("disk")
        real.request(Cmd.READ, 1, 0, 512)
        assert (await real.read_data(1))[0] == bytes(512)
        dropped = 0
        for reader, writer in silent:
            await reader.readexactly(18)  # the greeting
            if await asyncio.wait_for(reader.read(), 5) == b"":
                dropped += 1
                writer.close()
                break
        assert dropped == 1
        for client in (*first, real):
            await client.close()
        for _, writer in silent:
            writer.close()
        await server.stop()

    run_on(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_receive_buffer_is_small_until_negotiated(loop: str) -> None:
    from nbd import server as server_mod

    async def body(server: NbdServer, port: int) -> None:
        client = await RawClient.connect(port)
        await client.greeting()
        client.option(Opt.LIST)
        while (await client.option_reply())[0] != Rep.ACK:
            pass
        (conn,) = server._connections
        assert conn._rbuf is not None and len(conn._rbuf) == server_mod.HANDSHAKE_BUFFER
        client.option(Opt.GO, wire.InfoRequest.build({"name": "disk", "requests": []}))
        while (await client.option_reply())[0] != Rep.ACK:
            pass
        client.request(Cmd.READ, 1, 0, 512)
        assert (await client.reply())[1:3] == (1, 0)
        assert conn._rbuf is not None and len(conn._rbuf) == server_mod.RECEIVE_BUFFER
        await client.close()

    run_on(loop, serving(MemoryDevice(1 << 20), body))


@pytest.mark.parametrize("loop", LOOPS)
def test_big_write_payloads_are_received_in_place_not_copied(loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream of big writes sent at once (the socket always full): only the first few KiB of each
    payload pass through the receive buffer (and are copied); the rest is received straight into the
    payload. A full-size receive after each payload used to carry (and copy) most of the next one."""
    from nbd import server as server_mod

    through_buffer: list[int] = []  # bytes received into the receive buffer, once negotiated
    real_buffer_updated = server_mod._Connection.buffer_updated

    def buffer_updated(conn: Any, nbytes: int) -> None:
        if not conn._into_payload and conn.export is not None:
            through_buffer.append(nbytes)
        real_buffer_updated(conn, nbytes)

    monkeypatch.setattr(server_mod._Connection, "buffer_updated", buffer_updated)
    device = MemoryDevice(64 << 20)
    count, size = 32, 1 << 20

    async def body(server: NbdServer, port: int) -> None:
        client = await RawClient.connect(port)
        await client.go("disk")
        through_buffer.clear()
        for cookie in range(count):
            client.request(Cmd.WRITE, cookie, cookie * size, size, data=bytes([cookie + 1]) * size)
        for _ in range(count):
            assert (await client.reply())[2] == 0
        await client.close()

    run_on(loop, serving(device, body))
    assert device.data[: count * size] == b"".join(bytes([n + 1]) * size for n in range(count))
    # The first receive may be big (nothing was received in place yet); every later one is small.
    assert through_buffer and all(n <= server_mod.AFTER_PAYLOAD_RECEIVE for n in through_buffer[1:])
    assert sum(through_buffer) <= server_mod.RECEIVE_BUFFER + count * server_mod.AFTER_PAYLOAD_RECEIVE


@pytest.mark.parametrize("loop", LOOPS)
def test_small_writes_sent_at_once_are_received_many_per_receive(loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """4 KiB writes sent at once: the receive buffer takes dozens of requests per system call, also
    when a payload straddled two receives (a short receive after every such payload fell out of step
    with the stream and took one request per receive: half the IOPS)."""
    from nbd import server as server_mod

    receives = [0]
    real_buffer_updated = server_mod._Connection.buffer_updated

    def buffer_updated(conn: Any, nbytes: int) -> None:
        if conn.export is not None:
            receives[0] += 1
        real_buffer_updated(conn, nbytes)

    monkeypatch.setattr(server_mod._Connection, "buffer_updated", buffer_updated)
    device = MemoryDevice(8 << 20)
    count, size = 1024, 4096

    async def body(server: NbdServer, port: int) -> None:
        client = await RawClient.connect(port)
        await client.go("disk")
        receives[0] = 0
        header = wire.REQUEST_FAST
        client.writer.write(
            b"".join(
                header.pack(c.REQUEST_MAGIC, 0, Cmd.WRITE, n, n * size, size) + bytes([n % 251 + 1]) * size
                for n in range(count)
            )
        )
        for _ in range(count):
            assert (await client.reply())[2] == 0
        await client.close()

    run_on(loop, serving(device, body))
    assert device.data[: count * size] == b"".join(bytes([n % 251 + 1]) * size for n in range(count))
    assert receives[0] <= count // 8, receives[0]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_lost_while_reading_is_paused_still_finishes(loop: str) -> None:
    """Found by the fuzzer: a connection whose transport died while it had stopped reading (too many
    requests in flight) stayed open for good after its last request finished."""
    device = GatedDevice(1 << 20)

    async def body(server: NbdServer, port: int) -> None:
        client = await RawClient.connect(port)
        await client.go("disk", structured=False)
        client.request(Cmd.READ, 1, 0, 4096)  # waits for the gate: reading pauses at one in flight
        client.request(Cmd.READ, 2, 4096, 4096)
        while not server._connections or next(iter(server._connections))._in_flight < 1:
            await asyncio.sleep(0.005)
        conn = next(iter(server._connections))
        assert conn._reading_paused
        conn.transport.abort()  # the transport dies (as on a reset) while a request is in flight
        while not conn._lost:
            await asyncio.sleep(0.005)
        device.gate.set()  # the last request finishes after the client is gone
        await asyncio.wait_for(asyncio.shield(conn.closed), 10)
        assert not server._connections

    run_on(loop, serving(device, body, max_in_flight=1))


async def test_a_burst_of_unix_connections_fits_the_listen_backlog(tmp_path: Path) -> None:
    """300 clients connecting in the same instant (fio starting 128 jobs, a fleet's backups at midnight)
    all get through ``connect``: the server accepts them later. A unix socket refuses a connect beyond
    its backlog outright (EAGAIN) — asyncio's default backlog of 100 made fio's 128 jobs fail. (TCP
    retransmits a dropped SYN instead: a full backlog there is a delay, not an error.)"""
    server = NbdServer()
    server.add_export(Export("d", MemoryDevice(1 << 20)))
    clients: list[socket.socket] = []
    try:
        path = str(tmp_path / "s.sock")
        await server.listen_unix(path)
        for _ in range(300):  # no await in between: the loop cannot accept any of them meanwhile
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(client)
            client.setblocking(False)
            err = client.connect_ex(path)
            assert err in (0, errno.EINPROGRESS), errno.errorcode.get(err, err)
    finally:
        for client in clients:
            client.close()
        await server.stop()
