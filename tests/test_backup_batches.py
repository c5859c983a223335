"""Batched copies: a job whose target takes scattered writes as one request (``pwrite_many``, qcow2's)
copies small claims together. The point in time, error policies and cancellation hold for a batch
as for a single claim: a batch that fails, or a job cancelled while it gathers one, leaves every
cluster of it to copy again."""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backup_faults import FaultyDevice

from backup.backup_job import BackupJob, BackupOptions
from backup.block_copy import BATCH_BYTES
from backup.dirty_bitmap import DirtyBitmap
from backup.events import EventBus
from backup.memory import MemoryDevice
from backup.node import BlockNode
from backup.qcow2 import Qcow2Device
from backup.qcow2.check import check_image
from backup.rawfile import RawFileDevice
from nbd.device import Extent

CS = 65536
GRANULES = 128
SIZE = GRANULES * CS


class BatchingDevice(FaultyDevice):
    """A target that takes ``pwrite_many`` (as separate writes, each of which may fail or stall) and
    records every batch it was given."""

    def __init__(self, next_device: MemoryDevice) -> None:
        super().__init__(next_device)
        self.batches: list[list[tuple[int, int]]] = []

    async def pwrite_many(self, pieces: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        self.batches.append([(offset, len(data)) for offset, data in pieces])
        for offset, data in pieces:
            await self.pwrite(offset, bytes(data))


def source_node(rnd: random.Random) -> BlockNode:
    return BlockNode("disk", MemoryDevice(SIZE, data=rnd.randbytes(SIZE)))


def sync_bitmap_job(node: BlockNode, target: Any, dirty: list[int], **options: Any) -> tuple[DirtyBitmap, BackupJob]:
    bitmap = DirtyBitmap("b", SIZE, CS)
    node.add_bitmap(bitmap)
    for granule in dirty:
        bitmap.set_range(granule * CS, CS)
    opts = BackupOptions(sync="bitmap", bitmap=bitmap, max_chunk=CS, **options)
    return bitmap, BackupJob("j", node, target, opts, events=EventBus(), target_zero_init=True)


async def test_scattered_clusters_go_in_batches_and_keep_the_point_in_time() -> None:
    """Dirty clusters all over the disk reach the target in a few ``pwrite_many`` calls of at most
    ``BATCH_BYTES``, while a guest keeps overwriting them: the target holds every dirty cluster as it
    was at the start, and nothing else."""
    rnd = random.Random(1)
    node = source_node(rnd)
    dirty = sorted(rnd.sample(range(GRANULES), 60))
    target = BatchingDevice(MemoryDevice(SIZE))
    bitmap, job = sync_bitmap_job(node, target, dirty, max_workers=2)
    await job.attach()
    snapshot = bytes(node.device.data)  # type: ignore[attr-defined]
    target.gate.clear()  # the first batch stalls until the guest has started writing
    job.start()
    guest = [rnd.choice(dirty) for _ in range(30)] + [rnd.randrange(GRANULES) for _ in range(10)]
    writes = [asyncio.ensure_future(node.pwrite(g * CS + rnd.randrange(CS - 9), b"guest data")) for g in guest]
    await asyncio.sleep(0)
    target.gate.set()
    await asyncio.gather(*writes)
    await asyncio.wait_for(job.wait(), 10)
    assert job.error is None
    copied = target.next.data  # type: ignore[attr-defined]
    for g in range(GRANULES):
        expected = snapshot[g * CS : (g + 1) * CS] if g in dirty else bytes(CS)
        assert copied[g * CS : (g + 1) * CS] == expected, g
    assert 1 < len(target.batches) < len(dirty)
    assert all(sum(n for _, n in batch) <= BATCH_BYTES for batch in target.batches)
    assert {off // CS for batch in target.batches for off, _ in batch} <= set(dirty)
    assert bitmap.count == len({g for g in guest}) * CS  # the writes after the point in time, recorded


async def test_a_failed_batch_is_copied_again_after_a_stop() -> None:
    """The target fails inside a batch (``enospc`` stops the job): none of the batch counts as copied,
    and after ``resume`` every cluster of it is copied again; the image is the point in time."""
    rnd = random.Random(2)
    node = source_node(rnd)
    dirty = sorted(rnd.sample(range(GRANULES), 40))
    target = BatchingDevice(MemoryDevice(SIZE))
    target.fail_writes, target.fail_writes_times = errno.ENOSPC, 1
    _, job = sync_bitmap_job(node, target, dirty, max_workers=1, on_target_error="enospc")
    await job.attach()
    snapshot = bytes(node.device.data)  # type: ignore[attr-defined]
    job.start()
    while job.status != "paused":
        await asyncio.sleep(0)
    assert job.copier is not None and job.copier.bitmap.count > 0 and not job.copier.in_flight
    job.resume()
    await asyncio.wait_for(job.wait(), 10)
    assert job.error is None
    copied = target.next.data  # type: ignore[attr-defined]
    assert all(copied[g * CS : (g + 1) * CS] == snapshot[g * CS : (g + 1) * CS] for g in dirty)


class OneExtentAtATime(MemoryDevice):
    """Reports block status one cluster at a time, and from the second question on only once
    ``answer`` is set: a job gathering a batch waits there with claims in hand."""

    def __init__(self, size: int, data: bytes) -> None:
        super().__init__(size, data=data)
        self.answer = asyncio.Event()
        self.asked = 0

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self.asked += 1
        if self.asked > 1:
            await self.answer.wait()
        return [Extent(min(CS - offset % CS, length), 0)]


async def test_a_job_cancelled_while_gathering_a_batch_gives_its_claims_back() -> None:
    rnd = random.Random(3)
    source = OneExtentAtATime(SIZE, rnd.randbytes(SIZE))
    node = BlockNode("disk", source)
    dirty = [3, 40, 77]
    target = BatchingDevice(MemoryDevice(SIZE))
    bitmap, job = sync_bitmap_job(node, target, dirty, max_workers=1)
    await job.attach()
    job.start()
    while source.asked < 2:
        await asyncio.sleep(0)
    copier = job.copier
    assert copier is not None and copier.in_flight  # the first claim, held while the next is asked for
    job.cancel(force=True)
    await asyncio.wait_for(job.wait(), 10)
    assert not copier.in_flight and copier.bitmap.count == len(dirty) * (CS // copier.cluster_size)
    assert target.batches == [] and sorted(i // CS for i in range(0, SIZE, CS) if bitmap.is_dirty(i)) == dirty


async def test_an_incremental_from_a_file_into_qcow2_is_batched_and_clean(tmp_path: Path) -> None:
    """The real pair: a raw file source read with ``preadv``, a qcow2 target written with one
    ``pwritev`` per batch; the image checks clean and holds exactly the dirty clusters."""
    rnd = random.Random(4)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(rnd.randbytes(SIZE))
    node = BlockNode("disk", await RawFileDevice.open(str(raw)))
    image = await Qcow2Device.create(tmp_path / "inc.qcow2", SIZE)
    many = image.pwrite_many
    calls: list[int] = []

    async def counted(pieces: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        calls.append(len(pieces))
        await many(pieces)

    image.pwrite_many = counted  # type: ignore[method-assign]
    dirty = sorted(rnd.sample(range(GRANULES), 50))
    _, job = sync_bitmap_job(node, image, dirty, max_workers=4)
    await job.attach()
    job.start()
    await asyncio.wait_for(job.wait(), 10)
    assert job.error is None and 0 < len(calls) < len(dirty) and sum(calls) == len(dirty)
    source = raw.read_bytes()
    for g in range(GRANULES):
        expected = source[g * CS : (g + 1) * CS] if g in dirty else bytes(CS)
        assert await image.pread(g * CS, CS) == expected, g
    await image.close()
    await node.close()
    result = check_image(str(tmp_path / "inc.qcow2"))
    assert result.clean and result.allocated_clusters == len(dirty)


class CountedStatus(MemoryDevice):
    def __init__(self, size: int, data: bytes) -> None:
        super().__init__(size, data=data)
        self.asked = 0

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self.asked += 1
        return await super().block_status(offset, length)


async def test_scattered_claims_over_dense_data_ask_the_source_a_handful_of_times() -> None:
    """An incremental of a dense disk claims clusters megabytes apart; each answer that is data to
    the end of its window widens the next question, so the source is asked a few times, not once
    per claim (the claims still copy exactly the dirty clusters)."""
    rnd = random.Random(5)
    size = 1024 * CS
    source = CountedStatus(size, rnd.randbytes(size))
    node = BlockNode("disk", source)
    bitmap = DirtyBitmap("b", size, CS)
    node.add_bitmap(bitmap)
    dirty = sorted(rnd.sample(range(1024), 100))
    for granule in dirty:
        bitmap.set_range(granule * CS, CS)
    target = MemoryDevice(size)
    opts = BackupOptions(sync="bitmap", bitmap=bitmap, max_chunk=CS, max_workers=1)
    job = BackupJob("j", node, target, opts, events=EventBus(), target_zero_init=True)
    await job.attach()
    job.start()
    await asyncio.wait_for(job.wait(), 10)
    assert job.error is None
    assert source.asked <= 12, source.asked
    copied, original = target.data, source.data
    assert all(copied[g * CS : (g + 1) * CS] == original[g * CS : (g + 1) * CS] for g in dirty)
