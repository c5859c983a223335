"""Backup copies from a plain file into an NBD target go by ``sendfile`` (``NbdClient.pwrite_from_fd``).

The oracle is the general path's: the target holds the source's bytes, all-zero clusters take the zero
path (a sample of each cluster decides, and a cluster that only *starts* with zeroes is still data), and a
failure is reported as a read or a write and gives the clusters back.
"""

from __future__ import annotations

import errno
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from backup_faults import FaultyDevice

import backup.block_copy as block_copy
from backup.block_copy import BlockCopier, CopyError
from backup.cbw import CopyBeforeWriteFilter
from backup.copy_engine import ZERO_SAMPLE
from backup.memory import MemoryDevice
from backup.node import BlockNode
from backup.rawfile import RawFileDevice
from nbd.client import NbdClient
from nbd.server import Export, NbdServer

CS = 65536
CLUSTERS = 24
ZERO = 5  # an all-zero cluster
LATE_DATA = 9  # zeroes for its first 4 KiB, then data: must be copied as data


@dataclass
class Rig:
    node: BlockNode
    source: RawFileDevice
    target_device: MemoryDevice
    faults: FaultyDevice
    client: NbdClient
    copier: BlockCopier
    snapshot: bytes
    sent: list[tuple[int, int]]
    pwrites: list[tuple[int, int]]


def source_bytes(size: int) -> bytes:
    data = bytearray(random.Random(3).randbytes(size))
    data[ZERO * CS : (ZERO + 1) * CS] = bytes(CS)
    data[LATE_DATA * CS : LATE_DATA * CS + ZERO_SAMPLE] = bytes(ZERO_SAMPLE)
    return bytes(data)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    size = CLUSTERS * CS - 1000  # a partial last cluster, past the file's end once rounded up
    data = source_bytes(size)
    (tmp_path / "source.img").write_bytes(data)
    source = await RawFileDevice.open(tmp_path / "source.img")
    node = BlockNode("src", source)
    target_device = MemoryDevice(source.size)
    faults = FaultyDevice(target_device)
    server = NbdServer()
    server.add_export(Export("t", faults))
    await server.listen_unix(tmp_path / "t.sock")
    client = await NbdClient.connect(f"nbd+unix:///t?socket={tmp_path / 't.sock'}")
    sent: list[tuple[int, int]] = []
    real = client.pwrite_from_fd

    async def spy(offset: int, fd: int, file_offset: int, length: int, *, fua: bool = False) -> None:
        sent.append((offset, length))
        await real(offset, fd, file_offset, length, fua=fua)

    client.pwrite_from_fd = spy  # type: ignore[method-assign]
    pwrites: list[tuple[int, int]] = []
    real_pwrite = client.pwrite

    async def pwrite_spy(offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        pwrites.append((offset, len(data)))
        await real_pwrite(offset, data, fua=fua)

    client.pwrite = pwrite_spy  # type: ignore[method-assign]
    copier = BlockCopier(node, client, size=source.size, cluster_size=CS, target_zero_init=False)
    node.insert_filter(lambda below: CopyBeforeWriteFilter(below, copier))
    try:
        yield Rig(node, source, target_device, faults, client, copier, data + bytes(source.size - size), sent, pwrites)
    finally:
        await client.close()
        await server.stop()
        await node.close()


async def copy_all(r: Rig, chunk: int) -> None:
    pos = 0
    while (start := r.copier.bitmap.next_set(pos)) is not None:
        stop = min(r.copier.bitmap.run_end(start), start + chunk)
        await r.copier.run(r.copier.claim(start, stop))
        pos = stop


@pytest.mark.parametrize("chunk", [1, 7, CLUSTERS])
async def test_the_target_gets_every_byte_and_zero_clusters_stay_holes(rig: Rig, chunk: int) -> None:
    await copy_all(rig, chunk)
    assert bytes(rig.target_device.data) == rig.snapshot
    assert rig.sent  # the data really went by sendfile ...
    assert not rig.pwrites  # ... not through Python buffers
    zero_range = (ZERO * CS, CS)
    assert ("zero", *zero_range) in rig.faults.writes  # the all-zero cluster took the zero path
    assert not any(o <= ZERO * CS < o + n for o, n in rig.sent)
    assert any(o <= LATE_DATA * CS < o + n for o, n in rig.sent)  # zero head, data later: data
    statuses = await rig.target_device.block_status(ZERO * CS, CS)
    assert statuses[0].flags & 1 and statuses[0].length == CS  # a hole on the target
    assert rig.copier.written_bytes == sum(n for _, n in rig.sent)


async def test_guest_writes_during_the_backup_keep_the_point_in_time(rig: Rig) -> None:
    r = random.Random(5)
    for _ in range(30):
        offset = r.randrange(rig.source.size - 100)
        await rig.node.pwrite(offset, r.randbytes(100))  # copy-before-write (by sendfile) first
        if r.random() < 0.3:
            start = rig.copier.bitmap.next_set(0)
            if start is not None:
                await rig.copier.run(rig.copier.claim(start, rig.copier.bitmap.run_end(start, start + 3)))
    await copy_all(rig, 4)
    assert bytes(rig.target_device.data) == rig.snapshot


async def test_a_target_failure_is_a_write_error_and_gives_the_clusters_back(rig: Rig) -> None:
    rig.faults.fail_writes = errno.ENOSPC
    with pytest.raises(CopyError) as caught:
        await rig.copier.run(rig.copier.claim(0, 4))
    assert not caught.value.is_read and caught.value.errno == errno.ENOSPC
    assert all(rig.copier.bitmap[c] for c in range(4))
    rig.faults.fail_writes = None
    await copy_all(rig, 4)
    assert bytes(rig.target_device.data) == rig.snapshot


async def test_a_sample_read_failure_is_a_read_error(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> bytes:
        raise OSError(errno.EIO, "injected read failure")

    monkeypatch.setattr(block_copy.os, "pread", fail)
    with pytest.raises(CopyError) as caught:
        await rig.copier.run(rig.copier.claim(2, 3))
    assert caught.value.is_read and caught.value.errno == errno.EIO
    assert rig.copier.bitmap[2]
    assert not rig.sent


async def test_without_a_source_fd_the_general_path_is_taken(rig: Rig) -> None:
    memory_source = MemoryDevice(rig.source.size, data=rig.snapshot)
    copier = BlockCopier(memory_source, rig.client, size=rig.source.size, cluster_size=CS, target_zero_init=False)
    await copier.run(copier.claim(0, 3))
    assert not rig.sent and rig.pwrites
    assert bytes(rig.target_device.data[: 3 * CS]) == rig.snapshot[: 3 * CS]
