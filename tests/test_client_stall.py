"""``NbdClient`` against a stalled server: the request timeout declares a connection dead whoever still
waits for its requests (a caller that gave up included), spares a slow server that keeps answering, and
``close`` never leaves a connection open, even when the server stopped reading or ``close`` is cancelled."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from sockkit import export_name_handshake, serve_unix

from backup.memory import MemoryDevice
from nbd.client import NbdClient
from nbd.errors import DisconnectedError

SIZE = 4 << 20
FROZEN_SIZE = 64 << 20  # more than the socket buffers on both sides hold
BOUND = 20.0  # generous: nothing here may hang


class StallingDevice(MemoryDevice):
    """Reads never complete until ``release`` is set (a target whose process was stopped)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.release = asyncio.Event()
        self.stuck = asyncio.Event()

    async def pread(self, offset: int, length: int) -> bytes:
        self.stuck.set()
        await self.release.wait()
        return await super().pread(offset, length)


class SlowDevice(MemoryDevice):
    """Answers one read at a time, each after ``step`` seconds: slow, but never silent for long."""

    def __init__(self, size: int, step: float) -> None:
        super().__init__(size)
        self.step = step
        self.lock = asyncio.Lock()

    async def pread(self, offset: int, length: int) -> bytes:
        async with self.lock:
            await asyncio.sleep(self.step)
            return await super().pread(offset, length)


async def until(predicate: Callable[[], bool], timeout: float = BOUND) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def all_closed(client: NbdClient) -> bool:
    return all(conn.closed.done() for conn in client._conns)


async def test_a_request_whose_caller_gave_up_still_times_out_the_connection(tmp_path: Path) -> None:
    device = StallingDevice(SIZE)
    async with serve_unix(tmp_path, device, release=device.release) as uri:
        client = await NbdClient.connect(uri, connections=1, request_timeout=0.3)
        read = asyncio.ensure_future(client.pread(0, 4096))
        await asyncio.wait_for(device.stuck.wait(), BOUND)
        read.cancel()  # e.g. a copy-before-write that hit its own cbw-timeout
        await until(lambda: all_closed(client))
        with pytest.raises(DisconnectedError) as info:
            await asyncio.wait_for(client.pwrite(0, b"x"), BOUND)
        assert "no reply" in str(info.value)
        await asyncio.wait_for(client.close(), BOUND)


async def test_every_request_of_a_timed_out_connection_fails_with_etimedout(tmp_path: Path) -> None:
    device = StallingDevice(SIZE)
    async with serve_unix(tmp_path, device, release=device.release) as uri:
        client = await NbdClient.connect(uri, connections=2, request_timeout=0.3)
        reads = [asyncio.ensure_future(client.pread(o, 4096)) for o in range(0, 16 * 4096, 4096)]
        results = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), BOUND)
        assert all(isinstance(r, OSError) and r.errno == errno.ETIMEDOUT for r in results), results
        await until(lambda: all_closed(client))
        await asyncio.wait_for(client.close(), BOUND)


async def test_a_connection_dropped_because_another_timed_out_fails_with_etimedout_too(tmp_path: Path) -> None:
    """The second connection's read is younger than the timeout when the first connection times out: it
    is dropped for the same cause and must say so (ETIMEDOUT), not a generic disconnection — what a
    loaded machine made of the test above now and then, when its two connections timed out in two
    different watchdog passes."""
    device = StallingDevice(SIZE)
    async with serve_unix(tmp_path, device, release=device.release) as uri:
        client = await NbdClient.connect(uri, connections=2, request_timeout=0.3)
        first = asyncio.ensure_future(client.pread(0, 4096))
        await asyncio.sleep(0.2)
        second = asyncio.ensure_future(client.pread(4096, 4096))  # the idle connection takes it
        results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), BOUND)
        assert all(isinstance(r, OSError) and r.errno == errno.ETIMEDOUT for r in results), results
        await until(lambda: all_closed(client))
        await asyncio.wait_for(client.close(), BOUND)


async def test_a_slow_server_that_keeps_answering_is_not_timed_out(tmp_path: Path) -> None:
    """60 reads answered one by one every 40 ms: the last waits ~2.4 s, well past the timeout, but the
    connection is never silent for long, so nothing fails."""
    async with serve_unix(tmp_path, SlowDevice(SIZE, 0.04)) as uri:
        client = await NbdClient.connect(uri, connections=1, request_timeout=1.5)
        reads = [client.pread(o, 4096) for o in range(0, 60 * 4096, 4096)]
        assert await asyncio.wait_for(asyncio.gather(*reads), BOUND) == [bytes(4096)] * 60
        await asyncio.wait_for(client.close(), BOUND)


# --- a server that stops reading after the handshake (as a SIGSTOPped process) ---------------------------


async def frozen_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stop: asyncio.Event) -> None:
    await export_name_handshake(reader, writer, FROZEN_SIZE)
    writer.transport.pause_reading()  # never reads again: the socket fills up
    await stop.wait()
    writer.transport.abort()


@pytest.fixture
async def frozen(tmp_path: Path) -> AsyncIterator[str]:
    stop = asyncio.Event()
    path = tmp_path / "frozen.sock"
    server = await asyncio.start_unix_server(lambda r, w: frozen_server(r, w, stop), str(path))
    try:
        yield f"nbd+unix:///?socket={path}"
    finally:
        stop.set()
        server.close()
        await server.wait_closed()


async def stuck_writes(client: NbdClient) -> list[asyncio.Future[None]]:
    """Writes the frozen server never takes: the socket and then the transport's buffer fill up."""
    data = bytes(1 << 20)
    writes = [asyncio.ensure_future(client.pwrite(o, data)) for o in range(0, FROZEN_SIZE, 1 << 20)]
    await asyncio.sleep(0.2)
    assert not any(w.done() for w in writes)
    assert any(conn.transport.get_write_buffer_size() for conn in client._conns if conn.transport)
    return writes


async def test_close_aborts_a_connection_the_server_no_longer_reads(frozen: str) -> None:
    client = await asyncio.wait_for(NbdClient.connect(frozen), BOUND)
    writes = await stuck_writes(client)
    for write in writes:  # a force-cancelled backup job gives up its requests
        write.cancel()
    await asyncio.gather(*writes, return_exceptions=True)
    await asyncio.wait_for(client.close(), BOUND)
    assert all_closed(client)


async def test_a_cancelled_close_still_aborts_every_connection(frozen: str) -> None:
    client = await asyncio.wait_for(NbdClient.connect(frozen), BOUND)
    writes = await stuck_writes(client)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):  # the job's bound on closing its target
            await client.close()  # waits for the stuck writes
    await until(lambda: all_closed(client))
    results = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), BOUND)
    assert all(isinstance(r, OSError) for r in results), results


async def test_close_does_not_wait_for_requests_on_a_silent_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request stuck on a server that went silent (a guest's copy-before-write on a stopped target)
    does not hold ``close`` for the connect timeout: a connection silent for ``CLOSE_GRACE`` is dropped."""
    import nbd.client

    monkeypatch.setattr(nbd.client, "CLOSE_GRACE", 0.2)
    device = StallingDevice(SIZE)
    async with serve_unix(tmp_path, device, release=device.release) as uri:
        client = await NbdClient.connect(uri, connections=1, connect_timeout=60)
        read = asyncio.ensure_future(client.pread(0, 4096))
        await asyncio.wait_for(device.stuck.wait(), BOUND)
        await asyncio.wait_for(client.close(), BOUND)
        assert all_closed(client)
        with pytest.raises(DisconnectedError):
            await asyncio.wait_for(read, BOUND)


class StallsOnce(MemoryDevice):
    """The first read never completes (a request the server lost); the others are answered."""

    def __init__(self, size: int) -> None:
        super().__init__(size, data=b"\x42" * size)
        self.reads = 0
        self.release = asyncio.Event()

    async def pread(self, offset: int, length: int) -> bytes:
        self.reads += 1
        if self.reads == 1:
            await self.release.wait()
        return await super().pread(offset, length)


async def test_a_timed_out_connection_is_reconnected_and_its_requests_replayed(tmp_path: Path) -> None:
    """With ``reconnect_delay`` (QEMU's ``reconnect-delay``) a connection dropped by the request timeout
    is replaced like any lost one, and the unanswered request is sent again."""
    device = StallsOnce(SIZE)
    async with serve_unix(tmp_path, device, release=device.release) as uri:
        client = await NbdClient.connect(uri, connections=1, request_timeout=0.3, reconnect_delay=20)
        first = client._conns[0]
        assert await asyncio.wait_for(client.pread(0, 16), BOUND) == b"\x42" * 16
        assert first.closed.done() and client._conns[0] is not first and device.reads == 2
        await asyncio.wait_for(client.close(), BOUND)
