"""The backup job's sync bitmap (QEMU's ``backup_cleanup_sync_bitmap``): frozen while the job runs,
then cleared of what was copied or merged back, by ``bitmap-mode``, on success, failure and cancel;
``sync=bitmap`` copies only the dirty granules."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest
from backup_faults import FaultyDevice

from backup.backup_job import BackupJob, BackupOptions
from backup.dirty_bitmap import DirtyBitmap
from backup.events import EventBus
from backup.memory import MemoryDevice
from backup.node import BlockNode

CS = 65536
SIZE = 8 * CS


def setup(mode: str = "on-success", **options: Any) -> tuple[BlockNode, DirtyBitmap, FaultyDevice, BackupJob]:
    node = BlockNode("disk", MemoryDevice(SIZE, data=bytes([7]) * SIZE))
    bitmap = DirtyBitmap("b", SIZE, CS)
    node.add_bitmap(bitmap)
    target = FaultyDevice(MemoryDevice(SIZE))
    opts = BackupOptions(sync="bitmap", bitmap=bitmap, bitmap_mode=mode, max_workers=1, max_chunk=CS, **options)
    return node, bitmap, target, BackupJob("j", node, target, opts, events=EventBus(), target_zero_init=True)


def granules(bitmap: DirtyBitmap) -> list[int]:
    return [i for i in range(SIZE // CS) if bitmap.is_dirty(i * CS)]


async def test_only_dirty_granules_are_copied_and_writes_before_the_point_in_time_count() -> None:
    """A write between the job's creation (the freeze) and its point in time lands in the successor,
    yet belongs to this backup: it is copied, and the bitmap is clean after the success."""
    node, bitmap, target, job = setup()
    bitmap.set_range(100, 10)  # granule 0
    job_created_bitmap_busy = bitmap.busy
    await node.pwrite(3 * CS + 5, b"\x09" * 10)  # after the freeze, before the point in time
    await job.attach()
    job.start()
    await asyncio.wait_for(job.wait(), 10)
    assert job_created_bitmap_busy and job.error is None
    data = await target.pread(0, SIZE)
    copied = [i for i in range(SIZE // CS) if any(data[i * CS : (i + 1) * CS])]
    assert copied == [0, 3]
    assert data[3 * CS + 5 : 3 * CS + 15] == b"\x09" * 10
    assert granules(bitmap) == [] and not bitmap.busy and not bitmap.frozen


@pytest.mark.parametrize(
    ("mode", "after"),
    [("on-success", [0, 1, 2, 3, 6]), ("never", [0, 1, 2, 3, 6]), ("always", [1, 2, 3, 6])],
)
async def test_a_failure_part_way(mode: str, after: list[int]) -> None:
    """Granules 0-3 dirty; the first is copied, then the target fails. ``on-success`` and ``never``
    keep the old bits, ``always`` only what was not copied; all keep the writes made meanwhile (6)."""
    node, bitmap, target, job = setup(mode)
    bitmap.set_range(0, 4 * CS)
    await job.attach()
    copier = job.copier
    assert copier is not None
    progress = copier.on_progress

    def then_fail(nbytes: int) -> None:
        progress(nbytes)
        target.fail_writes = errno.EIO

    copier.on_progress = then_fail
    await node.pwrite(6 * CS, b"x")  # a new write while the job runs: the successor's
    job.start()
    await asyncio.wait_for(job.wait(), 10)
    assert job.error is not None
    assert granules(bitmap) == after and not bitmap.busy


@pytest.mark.parametrize(("mode", "after"), [("on-success", [2, 5]), ("never", [2, 5]), ("always", [2, 5])])
async def test_cancel_before_anything_was_copied(mode: str, after: list[int]) -> None:
    node, bitmap, target, job = setup(mode, speed=1)
    bitmap.set_range(2 * CS, 1)
    target.gate.clear()  # the first copy stalls: nothing reaches the target before the cancel
    await job.attach()
    job.start()
    await node.pwrite(5 * CS, b"y")
    await asyncio.sleep(0.01)
    job.cancel(force=True)
    target.gate.set()
    await asyncio.wait_for(job.wait(), 10)
    assert granules(bitmap) == after and not bitmap.busy


async def test_full_sync_with_a_bitmap_clears_it_on_success() -> None:
    node = BlockNode("disk", MemoryDevice(SIZE, data=bytes([7]) * SIZE))
    bitmap = DirtyBitmap("b", SIZE, CS)
    node.add_bitmap(bitmap)
    bitmap.set_range(0, SIZE)
    target = MemoryDevice(SIZE)
    opts = BackupOptions(sync="full", bitmap=bitmap, bitmap_mode="on-success")
    job = BackupJob("j", node, target, opts, events=EventBus(), target_zero_init=True)
    await job.attach()
    job.start()
    await asyncio.wait_for(job.wait(), 10)
    assert await target.pread(0, SIZE) == bytes([7]) * SIZE
    assert bitmap.count == 0 and not bitmap.busy


async def test_a_job_that_never_started_gives_the_bitmap_back() -> None:
    """A transaction that failed after the job was created: the bitmap is as it was, not busy."""
    _, bitmap, _, job = setup("always")
    bitmap.set_range(0, CS)
    job.early_fail()
    assert granules(bitmap) == [0] and not bitmap.busy
