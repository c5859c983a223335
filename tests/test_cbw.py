"""CopyBeforeWriteFilter: old data reaches the target first, once per cluster, without unrelated waits."""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass

import pytest
from backup_faults import FaultyDevice, pattern

from backup.block_copy import BlockCopier, CopyError
from backup.cbw import CopyBeforeWriteFilter, OnCbwError
from backup.memory import MemoryDevice
from backup.node import BlockNode
from nbd.constants import State

CS = 65536


@dataclass
class Rig:
    node: BlockNode
    source: MemoryDevice
    target_mem: MemoryDevice
    target: FaultyDevice
    copier: BlockCopier
    cbw: CopyBeforeWriteFilter
    snapshot: bytes


def rig(size: int = 8 * CS, *, zero_init: bool = True, data: bytes | None = None, **options: object) -> Rig:
    data = pattern(size) if data is None else data
    source = MemoryDevice(size, data=data)
    node = BlockNode("src", source)
    target_mem = MemoryDevice(size)
    target = FaultyDevice(target_mem)
    copier = BlockCopier(source, target, size=size, cluster_size=CS, target_zero_init=zero_init)
    cbw = node.insert_filter(lambda below: CopyBeforeWriteFilter(below, copier, **options))  # type: ignore[arg-type]
    assert isinstance(cbw, CopyBeforeWriteFilter)
    return Rig(node, source, target_mem, target, copier, cbw, source.data)


def copied_clusters(r: Rig) -> set[int]:
    return {c for c in range(r.copier.clusters) if not r.copier.bitmap[c]}


async def test_write_copies_old_data_of_touched_clusters_only() -> None:
    r = rig()
    await r.node.pwrite(CS + 100, b"N" * 10)
    assert copied_clusters(r) == {1}
    assert r.target_mem.data[CS : 2 * CS] == r.snapshot[CS : 2 * CS]
    assert r.target_mem.data[:CS] == bytes(CS)  # untouched cluster not copied
    assert r.source.data[CS + 100 : CS + 110] == b"N" * 10
    assert r.target.writes == [("write", CS, CS)]


async def test_unaligned_crossing_and_tail_requests() -> None:
    size = 5 * CS + 1000  # the last cluster is partial
    r = rig(size)
    await r.node.pwrite(CS - 1, b"xy")  # crosses clusters 0 and 1
    assert copied_clusters(r) == {0, 1}
    await r.node.zero(3 * CS + 5, CS)  # crosses 3 and 4
    await r.node.trim(size - 10, 10)  # the partial tail cluster
    assert copied_clusters(r) == {0, 1, 3, 4, 5}
    for c in (0, 1, 3, 4, 5):
        lo, hi = c * CS, min((c + 1) * CS, size)
        assert r.target_mem.data[lo:hi] == r.snapshot[lo:hi], c
    assert r.target.writes[-1] == ("write", 5 * CS, 1000)
    # zero-length requests and requests past the end touch nothing of the snapshot
    await r.node.pwrite(2 * CS, b"")
    assert r.copier.bitmap[2]


async def test_concurrent_writes_to_one_cluster_copy_it_once() -> None:
    r = rig()
    r.target.gate.clear()
    writers = [asyncio.create_task(r.node.pwrite(2 * CS + i * 100, b"w")) for i in range(5)]
    while r.target.stalled == 0:
        await asyncio.sleep(0)
    for _ in range(5):
        await asyncio.sleep(0)
    assert r.target.stalled == 1  # one copy in flight, the other four wait for it
    assert all(not w.done() for w in writers)
    r.target.gate.set()
    await asyncio.gather(*writers)
    assert r.target.writes == [("write", 2 * CS, CS)]
    assert r.target_mem.data[2 * CS : 3 * CS] == r.snapshot[2 * CS : 3 * CS]


async def test_unrelated_clusters_never_wait() -> None:
    r = rig()
    await r.node.pwrite(5 * CS, b"a")  # cluster 5 already copied
    r.target.gate.clear()
    blocked = asyncio.create_task(r.node.pwrite(0, b"b"))
    while r.target.stalled == 0:
        await asyncio.sleep(0)
    assert r.target.stalled == 1
    # a write to an already-copied cluster and a read of the stalled one go straight through
    await asyncio.wait_for(r.node.pwrite(5 * CS + 1, b"c"), 5)
    assert await asyncio.wait_for(r.node.pread(0, 4), 5) == r.snapshot[:4]
    assert not blocked.done()
    r.target.gate.set()
    await blocked
    assert r.source.data[0:1] == b"b"


async def test_break_guest_write_fails_the_write_and_keeps_the_snapshot() -> None:
    r = rig()
    r.target.fail_writes = errno.ENOSPC
    with pytest.raises(OSError) as info:
        await r.node.pwrite(CS, b"new")
    assert info.value.errno == errno.ENOSPC
    assert r.source.data == r.snapshot  # nothing reached the source
    assert r.copier.bitmap[1]  # still to copy, the job will retry it
    assert r.cbw.snapshot_error is None
    r.target.fail_writes = None
    await r.node.pwrite(CS, b"new")
    assert r.target_mem.data[CS : 2 * CS] == r.snapshot[CS : 2 * CS]


async def test_break_snapshot_lets_the_write_through_and_reports() -> None:
    broken: list[OSError] = []
    r = rig(on_cbw_error=OnCbwError.BREAK_SNAPSHOT, on_snapshot_broken=broken.append)
    r.target.fail_writes = errno.EIO
    await r.node.pwrite(CS, b"new")
    assert r.source.data[CS : CS + 3] == b"new"
    assert r.cbw.snapshot_error is not None and r.cbw.snapshot_error.errno == errno.EIO
    assert [e.errno for e in broken] == [errno.EIO]
    assert not r.copier.active
    r.target.fail_writes = None
    await r.node.pwrite(3 * CS, b"more")  # no more copying once broken
    assert r.target.writes == []


@pytest.mark.parametrize("mode", list(OnCbwError))
async def test_cbw_timeout_bounds_a_stalled_target(mode: OnCbwError) -> None:
    r = rig(cbw_timeout=0.05, on_cbw_error=mode)
    r.target.gate.clear()  # a dead target: never answers
    write = r.node.pwrite(CS, b"new")
    if mode is OnCbwError.BREAK_GUEST_WRITE:
        with pytest.raises(OSError) as info:
            await asyncio.wait_for(write, 10)
        assert info.value.errno == errno.ETIMEDOUT
        assert r.source.data == r.snapshot
        assert r.copier.bitmap[1]  # the abandoned copy gave its cluster back
        assert r.copier.in_flight == ()
    else:
        await asyncio.wait_for(write, 10)
        assert r.cbw.snapshot_error is not None and r.cbw.snapshot_error.errno == errno.ETIMEDOUT
        assert r.source.data[CS : CS + 3] == b"new"
    r.target.gate.set()


async def test_waiter_retries_when_the_copy_it_waited_for_fails() -> None:
    r = rig()
    r.target.gate.clear()
    r.target.fail_writes, r.target.fail_writes_times = errno.EIO, 1
    first = asyncio.create_task(r.node.pwrite(0, b"1"))
    await asyncio.sleep(0)
    second = asyncio.create_task(r.node.pwrite(10, b"2"))
    await asyncio.sleep(0)
    r.target.gate.set()
    with pytest.raises(OSError):
        await first
    await second  # the second writer copied it itself after the first copy failed
    assert r.target_mem.data[:CS] == r.snapshot[:CS]
    assert r.source.data[10:11] == b"2" and r.source.data[0:1] == r.snapshot[0:1]


async def test_zero_clusters_stay_sparse_on_a_non_zero_target() -> None:
    size = 4 * CS
    data = bytes(CS) + pattern(CS) + bytes(2 * CS)
    r = rig(size, zero_init=False, data=data)
    r.target_mem._data[:] = b"\xee" * size  # an existing target with junk in it
    await r.node.pwrite(0, b"z" * (4 * CS))
    assert r.target_mem.data == data
    verbs = {(verb, off) for verb, off, _ in r.target.writes}
    assert ("zero", 0) in verbs and ("write", CS) in verbs and ("zero", 2 * CS) in verbs
    extents = await r.target_mem.block_status(0, size)
    assert extents[0].flags & State.HOLE


async def test_zero_clusters_skipped_on_a_zero_init_target() -> None:
    data = bytes(2 * CS) + pattern(2 * CS)
    r = rig(4 * CS, data=data)
    await r.node.zero(0, 4 * CS)
    assert r.target.writes == [("write", 2 * CS, 2 * CS)]
    assert r.target_mem.data == data


async def test_two_backups_stack_each_with_its_own_point_in_time() -> None:
    size = 4 * CS
    r1 = rig(size)
    await r1.node.pwrite(0, b"A" * CS)  # between the two snapshots
    snap2 = r1.source.data
    target2 = MemoryDevice(size)
    copier2 = BlockCopier(r1.source, target2, size=size, cluster_size=CS, target_zero_init=True)
    cbw2 = r1.node.insert_filter(lambda below: CopyBeforeWriteFilter(below, copier2))
    await r1.node.pwrite(0, b"B" * (2 * CS))
    await r1.node.pwrite(3 * CS, b"C" * 7)
    # each backup: copy what its filter left, then compare with its own snapshot
    for copier in (r1.copier, copier2):
        for first, end in list(copier.bitmap.runs()):
            await copier.run(copier.claim(first, end))
    assert r1.target_mem.data == r1.snapshot
    assert target2.data == snap2
    r1.node.remove_filter(r1.cbw)  # the lower one goes first; the upper keeps working
    assert cbw2.next is r1.source
    assert await r1.node.pread(0, 1) == b"B"


def big_copier(zero_init: bool = True) -> tuple[MemoryDevice, FaultyDevice, BlockCopier]:
    size = 64 * CS  # 4 MiB: a job chunk copies in 1 MiB pieces, reading one while writing the last
    source = MemoryDevice(size, data=pattern(size))
    target = FaultyDevice(MemoryDevice(size))
    copier = BlockCopier(source, target, size=size, cluster_size=CS, target_zero_init=zero_init, max_chunk=size)
    return source, target, copier


async def test_pipelined_copy_reports_a_failed_piece_and_gives_the_clusters_back() -> None:
    source, target, copier = big_copier()
    target.fail_writes, target.fail_writes_times = errno.EIO, 1
    before = len(asyncio.all_tasks())
    task = copier.claim(0, copier.clusters)
    with pytest.raises(CopyError) as info:
        await copier.run(task)
    assert not info.value.is_read and info.value.errno == errno.EIO
    assert copier.bitmap.count == copier.clusters and copier.in_flight == ()
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before  # no piece left running
    written = await copier.run(copier.claim(0, copier.clusters))
    assert written == source.size and target.next.data == source.data  # type: ignore[attr-defined]


async def test_cancelled_copy_leaves_nothing_running() -> None:
    _, target, copier = big_copier()
    target.gate.clear()
    job = asyncio.create_task(copier.run(copier.claim(0, copier.clusters)))
    while target.stalled == 0:
        await asyncio.sleep(0)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    await asyncio.sleep(0)
    assert copier.bitmap.count == copier.clusters and copier.in_flight == ()
    assert target.stalled == 0  # the piece being written was cancelled too
    assert len(asyncio.all_tasks()) == 1


async def test_source_read_errors_are_reported_as_reads() -> None:
    source, _target, copier = big_copier()
    faulty = FaultyDevice(source)
    copier.source = faulty
    faulty.fail_reads = errno.EIO
    with pytest.raises(CopyError) as info:
        await copier.run(copier.claim(0, 2))
    assert info.value.is_read and copier.bitmap[0] and copier.bitmap[1]


async def test_pending_is_the_guest_fast_path_test() -> None:
    """``pending`` answers "does this request have to copy first" with the clusters it touches."""
    r = rig(size=4 * CS + 100)  # a partial last cluster
    c = r.copier
    assert c.pending(0, 1) == (0, 1)
    assert c.pending(CS - 1, 2) == (0, 2)
    assert c.pending(4 * CS, 1000) == (4, 5)  # clipped to the device
    assert c.pending(4 * CS + 100, 10) is None  # past the end
    assert c.pending(CS, 0) is None
    await r.node.pwrite(CS, b"x")
    assert c.pending(CS + 5, 10) is None  # copied
    assert c.pending(CS, CS + 1) == (1, 3)  # the next cluster still needs it
    task = c.claim(2, 3)
    assert c.pending(2 * CS, 1) == (2, 3)  # in flight: the caller must wait for it
    c._finish(task, True)
    assert c.pending(2 * CS, 1) is None
    c.deactivate()
    assert c.pending(0, 4 * CS) is None
