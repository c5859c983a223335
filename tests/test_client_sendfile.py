"""``NbdClient.pwrite_from_fd``: write payloads sent with ``sendfile`` from a file straight into the socket.

Against our ``NbdServer`` in the same process, on both loops (the CLI runs uvloop), with a tiny socket send
buffer so payloads stop half-way (EAGAIN) while other requests queue behind them; with a source that
fails half-way through a payload; and across a reconnect, where a replayed write must send the same bytes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_client_device import StuckFirstWrite
from test_server import LOOPS, run_on

from backup.memory import MemoryDevice
from nbd import client_transport, wire
from nbd import constants as c
from nbd.client import NbdClient
from nbd.client_core import ClientTransmission
from nbd.device import BlockLimits
from nbd.errors import DisconnectedError
from nbd.server import Export, NbdServer

SIZE = 8 << 20
PAYLOAD = 1 << 20


class LimitedDevice(MemoryDevice):
    """Advertises a minimum and a maximum block size, so writes are split and unaligned ones merged."""

    @property
    def block_limits(self) -> BlockLimits:
        return BlockLimits(minimum=512, preferred=4096, maximum=256 * 1024)


class SendfileSpy:
    """Wraps ``os.sendfile`` as the client sees it: counts bytes, partial sends and EAGAINs; and can fail
    (EIO, as a bad disk would) once ``fail_after`` bytes went out, at the first call inside a payload."""

    def __init__(self) -> None:
        self.sent = 0
        self.partial = 0
        self.eagain = 0
        self.fail_after: int | None = None
        self.failed_at: int | None = None  # the file offset of the failed call
        self._real = os.sendfile

    def __call__(self, out_fd: int, in_fd: int, offset: int, count: int) -> int:
        if self.fail_after is not None and self.sent >= self.fail_after and offset % PAYLOAD:
            self.fail_after = None
            self.failed_at = offset
            raise OSError(errno.EIO, "Input/output error")
        try:
            sent = self._real(out_fd, in_fd, offset, count)
        except BlockingIOError:
            self.eagain += 1
            raise
        if sent < count:
            self.partial += 1
        self.sent += sent
        return sent


@contextmanager
def spying(monkeypatch: pytest.MonkeyPatch) -> Iterator[SendfileSpy]:
    spy = SendfileSpy()
    monkeypatch.setattr(client_transport.os, "sendfile", spy)
    yield spy


async def serve(device: MemoryDevice, path: Path) -> tuple[NbdServer, str]:
    server = NbdServer()
    server.add_export(Export("d", device))
    await server.listen_unix(path)
    return server, f"nbd+unix:///d?socket={path}"


@asynccontextmanager
async def served(device: MemoryDevice, path: Path, source: Path) -> AsyncIterator[tuple[str, int]]:
    """Our server exporting ``device`` on ``path``, and ``source`` open for reading: (URI, descriptor)."""
    server, uri = await serve(device, path)
    fd = os.open(source, os.O_RDONLY)
    try:
        yield uri, fd
    finally:
        os.close(fd)
        await server.stop()


def shrink_send_buffers(client: NbdClient) -> None:
    """A send buffer of a few KiB: every large payload stops part-way and waits for the socket."""
    for conn in client._conns:
        assert conn.transport is not None
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def source_file(tmp_path: Path, size: int, seed: int) -> tuple[Path, bytes]:
    data = random.Random(seed).randbytes(size)
    path = tmp_path / f"source-{seed}.img"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("small_buffer", [False, True])
def test_file_payloads_are_byte_exact_among_other_requests(
    loop_name: str, small_buffer: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Split, unaligned (merged), short-source and whole-MiB file writes, pipelined with ordinary writes,
    reads and zeroes on the same connections: everything lands where it should and reads back right."""
    src_path, src = source_file(tmp_path, 3 << 20, 1)
    device = LimitedDevice(SIZE)

    async def scenario() -> None:
        async with served(device, tmp_path / "s.sock", src_path) as (uri, fd):
            with spying(monkeypatch) as spy:
                client = await NbdClient.connect(uri, connections=2, max_in_flight=16)
                if small_buffer:
                    shrink_send_buffers(client)
                model = bytearray(SIZE)
                ops: list[Coroutine[Any, Any, Any]] = []

                expected_sent = 0

                def from_file(offset: int, file_offset: int, length: int) -> None:
                    nonlocal expected_sent
                    chunk = src[file_offset : file_offset + length]
                    if offset % 512 == 0 and length % 512 == 0:
                        expected_sent += len(chunk)
                    model[offset : offset + length] = chunk + bytes(length - len(chunk))  # past EOF: zeroes
                    ops.append(client.pwrite_from_fd(offset, fd, file_offset, length))

                def plain(offset: int, data: bytes) -> None:
                    model[offset : offset + len(data)] = data
                    ops.append(client.pwrite(offset, data))

                plain((6 << 20) + 512, b"\x5a" * 300_000)  # still in the transport when file payloads follow
                for i in range(4):  # whole MiB payloads (four 256 KiB requests each); the first runs past EOF
                    from_file(i << 20, (3 - i) * 700_000, 1 << 20)
                from_file((4 << 20) + 100, 12_345, 70_000)  # unaligned: read-modify-write
                from_file(5 << 20, (3 << 20) - 8192, 65536)  # the source ends after 8 KiB: the rest is zeroes
                plain((6 << 20) + 400_000, b"\xa5" * 200_000)
                model[7 << 20 : (7 << 20) + 65536] = bytes(65536)
                ops.append(client.zero(7 << 20, 65536))
                await asyncio.gather(*ops, client.pread(0, 1 << 20))
                assert device.data == bytes(model)
                assert await client.pread(0, SIZE) == bytes(model)
                await client.close()
            assert spy.sent == expected_sent  # the fast path carried the aligned payloads (up to the source's end)
            if small_buffer:
                assert spy.partial and spy.eagain  # payloads stopped half-way and went on later

    run_on(loop_name, scenario())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_file_payload_waits_for_what_the_transport_holds(loop_name: str, tmp_path: Path) -> None:
    """An ordinary write handed to the transport in the same loop iteration (uvloop sends it only at the
    end of the iteration) goes out first: the file payload must not jump the queue into the socket."""
    src_path, src = source_file(tmp_path, 1 << 20, 7)
    device = MemoryDevice(SIZE)

    async def scenario() -> None:
        async with served(device, tmp_path / "t.sock", src_path) as (uri, fd):
            client = await NbdClient.connect(uri, connections=1)
            for _ in range(3):
                await asyncio.gather(
                    client.pwrite(0, b"\x11" * 300_000),
                    client.pwrite_from_fd(1 << 20, fd, 0, 1 << 20),
                    client.pwrite(2 << 20, b"\x22" * 4096),
                )
            assert device.data[: 3 << 20] == b"\x11" * 300_000 + bytes(
                (1 << 20) - 300_000
            ) + src + b"\x22" * 4096 + bytes((1 << 20) - 4096)
            await client.close()

    run_on(loop_name, scenario())


class HoldingTransport:
    """Just enough of a transport: a real socket, and a write buffer that holds ``held`` bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.held = 0

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.held

    def abort(self) -> None:
        raise AssertionError("nothing fails here")


@pytest.mark.parametrize("loop_name", LOOPS)
def test_nothing_is_written_directly_while_the_transport_holds_data(loop_name: str, tmp_path: Path) -> None:
    """Whatever the transport still holds was queued first: the header and file payload wait for it."""
    src_path, src = source_file(tmp_path, 65536, 8)

    async def scenario() -> None:
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        peer.setblocking(False)
        transport = HoldingTransport(ours)
        conn = client_transport.ClientConnection("test")
        conn.transport = transport  # type: ignore[assignment]
        conn.tx = ClientTransmission(structured=True)
        fd = os.open(src_path, os.O_RDONLY)
        source = client_transport.PayloadSource(fd)
        try:
            transport.held = 100
            future = asyncio.get_running_loop().create_future()
            conn.send(client_transport.Op(c.Cmd.WRITE, 4096, 65536, 0, future, source=source))
            for _ in range(5):
                await asyncio.sleep(0)
            with pytest.raises(BlockingIOError):
                peer.recv(1)  # nothing went out: the transport's bytes go first
            assert conn._pumping
            transport.held = 0  # the transport drained: the next writable event sends ours
            received = b""
            for _ in range(100):
                await asyncio.sleep(0)
                try:
                    received += peer.recv(1 << 20)
                except BlockingIOError:
                    pass
                if len(received) >= 28 + 65536:
                    break
            magic, _flags, cmd, _, offset, length = wire.REQUEST_FAST.unpack(received[:28])
            assert (magic, cmd, offset, length) == (c.REQUEST_MAGIC, c.Cmd.WRITE, 4096, 65536)
            assert received[28:] == src
            assert not conn._pumping and not conn._files
        finally:
            conn._stop_pump(close=True)
            source.release()
            os.close(fd)
            ours.close()
            peer.close()

    run_on(loop_name, scenario())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_source_failing_mid_payload_fails_that_write_and_the_rest_replays(
    loop_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header is out and half the payload: the write fails with the source's errno, the connection is
    dropped (the server never applies a partial payload), and with a reconnect delay the other writes in
    flight are replayed — from the file — and land intact."""
    src_path, src = source_file(tmp_path, 4 << 20, 2)
    device = MemoryDevice(SIZE, data=b"\xee" * SIZE)

    async def scenario() -> None:
        async with served(device, tmp_path / "f.sock", src_path) as (uri, fd):
            with spying(monkeypatch) as spy:
                client = await NbdClient.connect(uri, connections=1, max_in_flight=8, reconnect_delay=20)
                shrink_send_buffers(client)
                spy.fail_after = (2 << 20) + 12345
                results = await asyncio.gather(
                    *(client.pwrite_from_fd(i << 20, fd, i << 20, 1 << 20) for i in range(4)), return_exceptions=True
                )
                failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
                assert len(failed) == 1, results
                exc = results[failed[0]]
                assert isinstance(exc, OSError) and exc.errno == errno.EIO
                assert spy.failed_at is not None  # half-way through a payload (never at its start)
                bad = failed[0]
                for i in range(4):
                    expected = b"\xee" * (1 << 20) if i == bad else src[i << 20 : (i + 1) << 20]
                    assert device.data[i << 20 : (i + 1) << 20] == expected, i
                    assert await client.pread(i << 20, 1 << 20) == expected
                await client.close()

    run_on(loop_name, scenario())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_without_reconnect_a_failing_source_fails_the_client_not_the_data(
    loop_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src_path, src = source_file(tmp_path, 2 << 20, 3)
    device = MemoryDevice(SIZE, data=b"\xee" * SIZE)

    async def scenario() -> None:
        async with served(device, tmp_path / "n.sock", src_path) as (uri, fd):
            with spying(monkeypatch) as spy:
                client = await NbdClient.connect(uri, connections=1)
                shrink_send_buffers(client)
                spy.fail_after = 100_000
                results = await asyncio.gather(
                    *(client.pwrite_from_fd(i << 20, fd, i << 20, 1 << 20) for i in range(2)), return_exceptions=True
                )
                bad = [i for i, r in enumerate(results) if isinstance(r, OSError) and r.errno == errno.EIO]
                assert len(bad) == 1 and spy.failed_at is not None, results
                assert device.data[bad[0] << 20 : (bad[0] + 1) << 20] == b"\xee" * (1 << 20)  # nothing applied
                for i, result in enumerate(results):
                    if result is None:  # done before the failure
                        assert device.data[i << 20 : (i + 1) << 20] == src[i << 20 : (i + 1) << 20]
                    else:
                        assert isinstance(result, OSError)
                with pytest.raises(DisconnectedError):  # one connection, dropped: the client is done
                    await client.pread(0, 512)
                await client.close()

    run_on(loop_name, scenario())


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("newer", [None, (4096, 4096), (2048, 2048)])
def test_replayed_file_writes_send_the_same_bytes(
    loop_name: str, newer: tuple[int, int] | None, tmp_path: Path
) -> None:
    """A file write the server never acknowledged is replayed from the file after a reconnect — whole, or
    only the pieces no newer acknowledged write covered (each piece from its own place in the file)."""
    src_path, src = source_file(tmp_path, 65536, 4)
    device = StuckFirstWrite(SIZE)

    async def scenario() -> None:
        async with served(device, tmp_path / "r.sock", src_path) as (uri, fd):
            client = await NbdClient.connect(uri, connections=1, reconnect_delay=20)
            first = asyncio.ensure_future(client.pwrite_from_fd(0, fd, 1000, 8192))
            await asyncio.wait_for(device.stuck.wait(), 10)
            expected = bytearray(src[1000 : 1000 + 8192])
            if newer is not None:
                start, length = newer
                await client.pwrite(start, b"2" * length)
                expected[start : start + length] = b"2" * length
            old = client._conns[0]
            old.abort(DisconnectedError("network dropped"))
            await asyncio.wait_for(first, 20)
            assert client._conns[0] is not old
            assert await client.pread(0, 8192) == expected
            assert device.data[:8192] == expected
            device.release.set()
            await client.close()

    run_on(loop_name, scenario())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_the_callers_descriptor_may_be_closed_and_reused_mid_payload(loop_name: str, tmp_path: Path) -> None:
    """The client sends from its own duplicate: a payload still going out after the caller closed its
    descriptor (and a new file took the number) still carries the source's bytes."""
    src_path, src = source_file(tmp_path, 4 << 20, 5)
    device = MemoryDevice(SIZE)

    async def scenario() -> None:
        server, uri = await serve(device, tmp_path / "d.sock")
        client = await NbdClient.connect(uri, connections=1)
        shrink_send_buffers(client)
        fd = os.open(src_path, os.O_RDONLY)
        writing = asyncio.ensure_future(client.pwrite_from_fd(0, fd, 0, 4 << 20))
        for _ in range(3):
            await asyncio.sleep(0)
        assert not writing.done() and client._conns[0]._files  # a payload is half-way
        os.close(fd)
        garbage = tmp_path / "garbage"
        garbage.write_bytes(b"\x66" * (4 << 20))
        other = os.open(garbage, os.O_RDONLY)
        try:
            assert other == fd  # the number was reused
            await writing
            assert device.data[: 4 << 20] == src
            await client.close()
        finally:
            os.close(other)
            await server.stop()

    run_on(loop_name, scenario())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_close_after_file_writes_leaves_no_descriptor_behind(loop_name: str, tmp_path: Path) -> None:
    src_path, src = source_file(tmp_path, 2 << 20, 6)
    device = MemoryDevice(SIZE)

    def open_fds() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    async def scenario() -> None:
        async with served(device, tmp_path / "c.sock", src_path) as (uri, fd):
            before = open_fds()
            client = await NbdClient.connect(uri, connections=1)
            shrink_send_buffers(client)
            await client.pwrite_from_fd(0, fd, 0, 2 << 20)
            await client.close()
            for _ in range(10):
                await asyncio.sleep(0)
            assert open_fds() <= before  # the duplicates of the socket and of the source are closed
            assert device.data[: 2 << 20] == src

    run_on(loop_name, scenario())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_without_a_plain_socket_payloads_are_read_and_written_as_bytes(loop_name: str, tmp_path: Path) -> None:
    """Over TLS sendfile would bypass the encryption: the payload is read and goes through the transport
    (forced here on a plain connection); a source that cannot be read fails only its own write."""
    src_path, src = source_file(tmp_path, 1 << 20, 9)
    device = MemoryDevice(SIZE)

    async def scenario() -> None:
        async with served(device, tmp_path / "p.sock", src_path) as (uri, fd):
            directory = os.open(tmp_path, os.O_RDONLY)
            try:
                client = await NbdClient.connect(uri, connections=1)
                client._conns[0]._plain = False
                await client.pwrite_from_fd(4096, fd, 0, 1 << 20)
                assert device.data[4096 : 4096 + (1 << 20)] == src
                with pytest.raises(OSError) as info:
                    await client.pwrite_from_fd(0, directory, 0, 4096)  # pread of a directory: EISDIR
                assert info.value.errno == errno.EISDIR
                assert not client._pending_writes  # nothing left waiting for an acknowledgement
                await client.pwrite(0, b"still usable")
                assert device.data[:12] == b"still usable"
                await client.close()
            finally:
                os.close(directory)

    run_on(loop_name, scenario())
