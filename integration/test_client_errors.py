"""The client when things go wrong on the server side: NBD errors surface as ``OSError`` with the
right errno, a dead server fails every pending request at once, timeouts fire, and (when asked) the
client reconnects and replays what was never acknowledged."""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
from pathlib import Path

import pytest
from peers import make_image, nbdkit, qemu_nbd

from nbd.client import NbdClient
from nbd.errors import DisconnectedError, HandshakeError, NbdRequestError

SIZE = 4 << 20


@pytest.mark.parametrize(
    ("params", "operation", "expected"),
    [
        (("error-pread=EIO", "error-pread-rate=1"), "read", errno.EIO),
        (("error-pwrite=ENOSPC", "error-pwrite-rate=1"), "write", errno.ENOSPC),
        (("error-zero=EPERM", "error-zero-rate=1"), "zero", errno.EPERM),
        (("error-cache=ENOMEM", "error-cache-rate=1"), "cache", errno.ENOMEM),
        (("error-trim=EINVAL", "error-trim-rate=1"), "trim", errno.EINVAL),
        (("error-extents=EIO", "error-extents-rate=1"), "block_status", errno.EIO),
    ],
)
async def test_error_filter_raises_the_right_errno(
    tmp_path: Path, params: tuple[str, ...], operation: str, expected: int
) -> None:
    with nbdkit(tmp_path, "--filter=error", "memory", f"size={SIZE}", *params) as peer:
        client = await asyncio.wait_for(NbdClient.connect(peer.uri, connections=2), 30)
        try:
            calls = {
                "read": lambda: client.pread(0, 65536),
                "write": lambda: client.pwrite(4096, b"x" * 8192),
                "zero": lambda: client.zero(0, 65536),
                "cache": lambda: client.cache(0, 65536),
                "trim": lambda: client.trim(0, 65536),
                "block_status": lambda: client.block_status(0, SIZE),
            }
            for _ in range(3):  # the connection survives a request error
                with pytest.raises(NbdRequestError) as info:
                    await asyncio.wait_for(calls[operation](), 10)
                assert info.value.errno == expected
                assert isinstance(info.value, OSError)
            if operation != "read":
                assert await asyncio.wait_for(client.pread(0, 16), 10) == bytes(16)
        finally:
            await client.close()


async def test_errors_on_many_pipelined_reads_do_not_hang(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "--filter=error", "memory", f"size={SIZE}", "error-pread=EIO", "error-pread-rate=0.5") as p:
        client = await asyncio.wait_for(NbdClient.connect(p.uri, max_in_flight=16), 30)
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(client.pread(o, 4096) for o in range(0, SIZE, 4096)), return_exceptions=True), 30
            )
            failures = [r for r in results if isinstance(r, BaseException)]
            assert failures and all(isinstance(f, NbdRequestError) and f.errno == errno.EIO for f in failures)
            assert len(failures) < len(results)
        finally:
            await client.close()


async def test_killed_server_fails_every_pending_request_at_once(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "--filter=delay", "memory", f"size={SIZE}", "rdelay=20") as peer:
        client = await asyncio.wait_for(NbdClient.connect(peer.uri, connections=1), 30)
        reads = [asyncio.ensure_future(client.pread(o, 4096)) for o in range(0, 32 * 4096, 4096)]
        await asyncio.sleep(0.3)
        assert not any(r.done() for r in reads)
        peer.kill(signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 10)
        assert all(isinstance(r, DisconnectedError) for r in results), results
        assert "lost" in str(results[0])
        with pytest.raises(DisconnectedError):
            await asyncio.wait_for(client.pread(0, 512), 5)
        await asyncio.wait_for(client.close(), 10)


async def test_request_timeout(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "--filter=delay", "memory", f"size={SIZE}", "rdelay=30") as peer:
        client = await asyncio.wait_for(NbdClient.connect(peer.uri, connections=1, request_timeout=0.5), 30)
        try:
            with pytest.raises(OSError) as info:
                await asyncio.wait_for(client.pread(0, 4096), 10)
            assert info.value.errno == errno.ETIMEDOUT
            assert "timed out" in str(info.value)
            # The connection was dropped (a reply may still come); later requests fail fast.
            with pytest.raises(DisconnectedError):
                await asyncio.wait_for(client.pwrite(0, b"x"), 10)
        finally:
            await asyncio.wait_for(client.close(), 10)


async def test_delayed_server_still_serves_pipelined_requests(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "--filter=delay", "memory", f"size={SIZE}", "rdelay=50ms", "wdelay=50ms") as peer:
        client = await asyncio.wait_for(NbdClient.connect(peer.uri, max_in_flight=32), 30)
        try:
            data = bytes(range(256)) * 256
            await asyncio.wait_for(asyncio.gather(*(client.pwrite(o, data) for o in range(0, SIZE, len(data)))), 60)
            chunks = await asyncio.wait_for(
                asyncio.gather(*(client.pread(o, len(data)) for o in range(0, SIZE, len(data)))), 60
            )
            assert all(chunk == data for chunk in chunks)
        finally:
            await client.close()


async def test_connect_timeout_on_a_silent_server(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    path = tmp_path / "silent.sock"
    listener.bind(str(path))
    listener.listen(4)
    try:
        with pytest.raises(TimeoutError, match="no NBD session"):
            await asyncio.wait_for(NbdClient.connect(f"nbd+unix:///?socket={path}", connect_timeout=0.5), 10)
    finally:
        listener.close()


async def test_connection_refused(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        await asyncio.wait_for(NbdClient.connect(f"nbd+unix:///?socket={tmp_path}/none.sock"), 10)


async def test_unknown_export_is_a_clear_handshake_error(tmp_path: Path) -> None:
    image = make_image(tmp_path / "d.img", SIZE)
    with qemu_nbd(tmp_path, image, export="disk") as peer, pytest.raises(HandshakeError, match="no such export"):
        await asyncio.wait_for(NbdClient.connect(peer.uri.replace("/disk?", "/nope?")), 30)


async def test_read_only_export_refuses_writes_locally(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "-r", "memory", f"size={SIZE}") as peer:
        client = await asyncio.wait_for(NbdClient.connect(peer.uri), 30)
        try:
            assert client.read_only
            for call in (client.pwrite(0, b"x"), client.zero(0, 512), client.trim(0, 512)):
                with pytest.raises(OSError) as info:
                    await call
                assert info.value.errno == errno.EPERM
        finally:
            await client.close()


async def test_simple_replies_only(tmp_path: Path) -> None:
    """``--no-sr``: no structured replies, so no block status either; everything still works."""
    with nbdkit(tmp_path, "--no-sr", "memory", f"size={SIZE}") as peer:
        client = await asyncio.wait_for(NbdClient.connect(peer.uri), 30)
        try:
            assert not client.export_info.structured
            assert not client.capabilities.can_extents
            await client.pwrite(1000, b"hello" * 1000)
            assert await client.pread(1000, 5000) == b"hello" * 1000
            assert [e.length for e in await client.block_status(0, SIZE)] == [SIZE]
        finally:
            await client.close()


async def test_zero_falls_back_to_writes_without_write_zeroes(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "--filter=nozero", "memory", f"size={SIZE}", "zeromode=none") as peer:
        client = await asyncio.wait_for(NbdClient.connect(peer.uri), 30)
        try:
            assert not client.capabilities.can_zero
            await client.pwrite(0, b"\xff" * SIZE)
            await client.zero(4096, 3 << 20, may_trim=True)
            assert await client.pread(0, SIZE) == b"\xff" * 4096 + bytes(3 << 20) + b"\xff" * (SIZE - 4096 - (3 << 20))
            with pytest.raises(OSError) as info:
                await client.zero(0, 4096, fast=True)
            assert info.value.errno == errno.ENOTSUP
        finally:
            await client.close()


async def test_minimum_block_size_is_obeyed(tmp_path: Path) -> None:
    """A server that refuses unaligned requests: the client aligns them (read-modify-write)."""
    with nbdkit(
        tmp_path,
        "--filter=blocksize-policy",
        "memory",
        f"size={SIZE}",
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
        "blocksize-maximum=1M",
        "blocksize-error-policy=error",
    ) as peer:
        client = await asyncio.wait_for(NbdClient.connect(peer.uri), 30)
        try:
            assert (client.block_limits.minimum, client.block_limits.maximum) == (4096, 1 << 20)
            data = bytes(range(256)) * 40
            await client.pwrite(4000, data)  # unaligned both ends
            await client.pwrite(1 << 20, b"y" * (3 << 20))  # more than the maximum payload: split
            assert await client.pread(4000, len(data)) == data
            assert await client.pread(3999, 2) == b"\0\0"
            assert await client.pread(1 << 20, 3 << 20) == b"y" * (3 << 20)
            await client.zero(4001, 10000)
            assert await client.pread(4000, len(data)) == data[:1] + bytes(10000) + data[10001:]
            with pytest.raises(OSError) as info:
                await client.zero(4001, 10000, fast=True)
            assert info.value.errno == errno.ENOTSUP
            await client.zero(8192, 8192, fast=True)  # aligned: the server does it
        finally:
            await client.close()


async def test_reconnect_replays_unacknowledged_requests(tmp_path: Path) -> None:
    """Like QEMU's reconnect-delay: the server dies with writes in flight and comes back; nothing is lost."""
    image = make_image(tmp_path / "r.img", SIZE)
    sock_path = tmp_path / "r.sock"
    first = nbdkit(tmp_path, "--filter=delay", "file", str(image), "wdelay=10", name="first", sock_path=sock_path)
    with first as peer:
        client = await asyncio.wait_for(
            NbdClient.connect(peer.uri, connections=1, reconnect_delay=30, connect_timeout=5), 30
        )
        writes = [asyncio.ensure_future(client.pwrite(i * 65536, bytes([i + 1]) * 65536)) for i in range(8)]
        await asyncio.sleep(0.3)
        assert not any(w.done() for w in writes)
        peer.kill(signal.SIGKILL)
    sock_path.unlink(missing_ok=True)
    later = asyncio.ensure_future(client.pwrite(1 << 20, b"L" * 4096))  # waits for the reconnect
    await asyncio.sleep(0.5)
    assert not later.done()
    with nbdkit(tmp_path, "file", str(image), name="second", sock_path=sock_path):
        await asyncio.wait_for(asyncio.gather(*writes, later), 30)
        for i in range(8):
            assert await client.pread(i * 65536, 65536) == bytes([i + 1]) * 65536
        await client.close()
    data = image.read_bytes()
    assert data[: 8 * 65536] == b"".join(bytes([i + 1]) * 65536 for i in range(8))
    assert data[1 << 20 : (1 << 20) + 4096] == b"L" * 4096


async def test_reconnect_gives_up_after_the_delay(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "--filter=delay", "memory", f"size={SIZE}", "rdelay=20") as peer:
        client = await asyncio.wait_for(NbdClient.connect(peer.uri, connections=1, reconnect_delay=1), 30)
        pending = asyncio.ensure_future(client.pread(0, 4096))
        await asyncio.sleep(0.2)
        peer.kill(signal.SIGKILL)
        with pytest.raises(DisconnectedError, match="reconnect"):
            await asyncio.wait_for(pending, 20)
        with pytest.raises(DisconnectedError):
            await asyncio.wait_for(client.pread(0, 4096), 10)
        await asyncio.wait_for(client.close(), 10)
