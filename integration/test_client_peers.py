"""``NbdClient`` against every real NBD server we know: qemu-nbd, nbdkit (memory, file), nbd-server and
our own ``nbd-backup serve``. What the client learns matches ``nbdinfo``; what it writes reads back with
``nbdcopy`` (and ``qemu-img compare`` for file-backed servers); holes and zeroes survive.

The peer-starting helpers live in peers.py.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require, run
from peers import KINDS, SIZE, Peer, nbdcopy_to_file, nbdinfo_json, nbdkit_tcp, peer_of_kind

from nbd import constants as c
from nbd.client import NbdClient
from nbd.constants import State


@pytest.fixture(params=KINDS)
def peer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Peer]:
    with peer_of_kind(request.param, tmp_path) as server:
        yield server


# --- the tests -------------------------------------------------------------------------------------------


_FLAGS = {
    "is_read_only": c.TransmissionFlag.READ_ONLY,
    "is_rotational": c.TransmissionFlag.ROTATIONAL,
    "can_flush": c.TransmissionFlag.SEND_FLUSH,
    "can_fua": c.TransmissionFlag.SEND_FUA,
    "can_trim": c.TransmissionFlag.SEND_TRIM,
    "can_zero": c.TransmissionFlag.SEND_WRITE_ZEROES,
    "can_fast_zero": c.TransmissionFlag.SEND_FAST_ZERO,
    "can_cache": c.TransmissionFlag.SEND_CACHE,
    "can_multi_conn": c.TransmissionFlag.CAN_MULTI_CONN,
    "can_df": c.TransmissionFlag.SEND_DF,
}


async def test_size_and_flags_match_nbdinfo(peer: Peer) -> None:
    theirs = nbdinfo_json(peer.uri)["exports"][0]
    client = await asyncio.wait_for(NbdClient.connect(peer.uri), 30)
    try:
        info = client.export_info
        if peer.kind == "nbd-server":
            # nbdinfo 1.14 misreads nbd-server 3.24's NBD_OPT_INFO size as 0; --size uses GO, like we do.
            theirs["export-size"] = int(run("nbdinfo", "--size", peer.uri, cwd="/").stdout)
        assert info.size == client.size == theirs["export-size"] == SIZE
        for key, flag in _FLAGS.items():
            assert bool(info.flags & flag) == theirs[key], key
        assert list(info.contexts) == theirs.get("contexts", [])
        for ours, key in (
            (info.block_minimum, "block_size_minimum"),
            (info.block_preferred, "block_size_preferred"),
            (info.block_maximum, "block_size_maximum"),
        ):
            assert ours == theirs.get(key)
        assert client.capabilities.can_extents == ("base:allocation" in theirs.get("contexts", []))
    finally:
        await client.close()


async def test_written_data_reads_back_with_nbdcopy(peer: Peer, tmp_path: Path) -> None:
    rng = random.Random(7)
    model = bytearray(SIZE)
    client = await asyncio.wait_for(NbdClient.connect(peer.uri, max_in_flight=16), 30)
    try:
        writes = []
        for offset, length in [(0, 4096), (4096 * 3 + 17, 70_001), (1 << 20, 1 << 20), (SIZE - 513, 513)]:
            data = rng.randbytes(length)
            model[offset : offset + length] = data
            writes.append(client.pwrite(offset, data))
        await asyncio.wait_for(asyncio.gather(*writes), 30)
        await client.pwrite(3 << 20, rng.randbytes(65536), fua=True)
        model[3 << 20 : (3 << 20) + 65536] = await client.pread(3 << 20, 65536)
        # Zeroes, with and without permission to punch holes, and a trim (contents then unspecified,
        # so we re-zero it afterwards).
        await client.zero((1 << 20) + 4096, 65536, may_trim=True)
        model[(1 << 20) + 4096 : (1 << 20) + 4096 + 65536] = bytes(65536)
        await client.zero(100, 1000)
        model[100:1100] = bytes(1000)
        await client.trim(5 << 20, 1 << 20)
        await client.zero(5 << 20, 1 << 20, may_trim=True)
        await client.flush()
        await client.cache(0, 1 << 20)
        for offset, length in [(0, SIZE), (4096 * 3, 100_000), (SIZE - 600, 600)]:
            assert await client.pread(offset, length) == model[offset : offset + length]
    finally:
        await client.close()
    assert nbdcopy_to_file(peer.uri, tmp_path / "readback.img") == model
    if peer.image is not None:
        expected = tmp_path / "expected.img"
        expected.write_bytes(model)
        require("qemu-img")
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(expected), str(peer.image))


async def test_holes_and_zeroes_survive(peer: Peer) -> None:
    client = await asyncio.wait_for(NbdClient.connect(peer.uri), 30)
    try:
        await client.pwrite(0, b"\xaa" * SIZE)
        await client.zero(1 << 20, 2 << 20, may_trim=True)
        assert await client.pread(1 << 20, 2 << 20) == bytes(2 << 20)
        extents = await client.block_status(0, SIZE)
        assert sum(e.length for e in extents) <= SIZE
        if client.capabilities.can_extents:
            covered = 0
            for extent in extents:
                start, end = covered, covered + extent.length
                if start >= 1 << 20 and end <= 3 << 20:
                    assert extent.flags & State.ZERO, extents
                if end <= 1 << 20:
                    assert not extent.flags & State.ZERO, extents
                covered = end
            first_zero = await client.block_status(1 << 20, 4096)
            assert first_zero[0].flags & State.ZERO
    finally:
        await client.close()


async def test_pipelined_reads_over_several_connections(peer: Peer) -> None:
    client = await asyncio.wait_for(NbdClient.connect(peer.uri, max_in_flight=32), 30)
    try:
        if client.capabilities.can_multi_conn:
            assert client.connections > 1
        else:
            assert client.connections == 1
        data = random.Random(3).randbytes(SIZE)
        await client.pwrite(0, data)
        chunks = await asyncio.wait_for(
            asyncio.gather(*(client.pread(offset, 65536) for offset in range(0, SIZE, 65536))), 60
        )
        assert b"".join(chunks) == data
    finally:
        await client.close()


async def test_our_server_round_trip_in_process(tmp_path: Path) -> None:
    """Our client against our server in one process (no peer needed), both loops' code paths."""
    from backup.memory import MemoryDevice
    from nbd.server import Export, NbdServer

    server = NbdServer()
    device = MemoryDevice(SIZE)
    server.add_export(Export("mem", device, description="in-process"))
    sock_path = tmp_path / "ours.sock"
    await server.listen_unix(sock_path)
    try:
        client = await NbdClient.connect(f"nbd+unix:///mem?socket={sock_path}")
        try:
            assert client.export_info.description == "in-process"
            payload = random.Random(1).randbytes(3 << 20)
            await client.pwrite(12345, payload)
            assert await client.pread(12345, len(payload)) == payload
            assert device.data[12345 : 12345 + len(payload)] == payload
        finally:
            await client.close()
        assert [e.name for e in await NbdClient.list_exports(f"nbd+unix:///?socket={sock_path}")] == ["mem"]
    finally:
        await server.stop()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "legacy"])
async def test_tcp_uris(family: str, tmp_path: Path) -> None:
    """nbd://127.0.0.1:PORT/, nbd://[::1]:PORT/ and QEMU's nbd:HOST:PORT:exportname=X over real TCP."""
    require("nbdkit")
    if family == "ipv6" and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    host = "::1" if family == "ipv6" else "127.0.0.1"
    with nbdkit_tcp(tmp_path, host, "-e", "exp", "memory", f"size={SIZE}") as (_, port):
        uri = {
            "ipv4": f"nbd://127.0.0.1:{port}/exp",
            "ipv6": f"nbd://[::1]:{port}/exp",
            "legacy": f"nbd:127.0.0.1:{port}:exportname=exp",
        }[family]
        client = await asyncio.wait_for(NbdClient.connect(uri), 10)
        try:
            assert client.size == SIZE
            await client.pwrite(0, b"tcp")
            assert await client.pread(0, 3) == b"tcp"
        finally:
            await client.close()
