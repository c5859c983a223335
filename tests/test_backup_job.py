"""BackupJob against memory devices: point in time under guest writes, sync modes, zeroes, policies."""

from __future__ import annotations

import asyncio
import errno
import random
from typing import Any

import pytest
from backup_faults import FaultyDevice, pattern

from backup.backup_job import BackupJob, BackupOptions, backup_cluster_size
from backup.cbw import CopyBeforeWriteFilter
from backup.errors import InvalidArgument
from backup.events import Event, EventBus
from backup.filter import BlockFilter
from backup.memory import MemoryDevice
from backup.node import BlockNode
from nbd.constants import State
from nbd.device import BlockLimits

CS = 65536
KiB = 1024


class Recorder:
    def __init__(self, bus: EventBus) -> None:
        self.events: list[Event] = []
        bus.subscribe(self.events.append)

    def names(self) -> list[str]:
        return [e.name if e.name != "JOB_STATUS_CHANGE" else e.data["status"] for e in self.events]

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.name == name]


def make_job(
    source_data: bytes,
    *,
    zero_init: bool = True,
    target_size: int | None = None,
    **options: Any,
) -> tuple[BlockNode, MemoryDevice, FaultyDevice, BackupJob, Recorder]:
    size = len(source_data)
    source = MemoryDevice(size, data=source_data)
    node = BlockNode("disk", source)
    target_mem = MemoryDevice(target_size or size)
    target = FaultyDevice(target_mem)
    bus = EventBus()
    rec = Recorder(bus)
    options.setdefault("max_chunk", 2 * CS)
    job = BackupJob("job0", node, target, BackupOptions(**options), events=bus, target_zero_init=zero_init)
    return node, target_mem, target, job, rec


async def guest(node: BlockNode, seed: int, count: int) -> None:
    """Random writes, write-zeroes and trims, some unaligned and crossing clusters."""
    rnd = random.Random(seed)
    size = node.size
    for _ in range(count):
        offset = rnd.randrange(size)
        length = min(size - offset, rnd.choice([1, 511, 4096, CS, CS + 3, 3 * CS]))
        verb = rnd.random()
        if verb < 0.6:
            await node.pwrite(offset, bytes([rnd.randrange(1, 256)]) * length)
        elif verb < 0.8:
            await node.zero(offset, length, may_trim=rnd.random() < 0.5)
        else:
            await node.trim(offset, length)
        await asyncio.sleep(0)


async def finish(job: BackupJob) -> None:
    await asyncio.wait_for(job.wait(), 30)


async def test_full_backup_under_guest_writes_equals_the_snapshot() -> None:
    size = 16 * CS + 777  # a partial tail cluster
    node, target, _, job, rec = make_job(pattern(size))
    snapshot = node.device.data  # type: ignore[attr-defined]
    await job.attach()
    job.start()
    await asyncio.gather(guest(node, 1, 60), guest(node, 2, 60))
    await finish(job)
    assert target.data == snapshot
    assert rec.names() == ["created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    completed = rec.named("BLOCK_JOB_COMPLETED")[0]
    assert completed == {"type": "backup", "device": "job0", "len": size, "offset": size, "speed": 0}
    assert node.filters == [] and node.users == set()
    assert target.flush_count >= 1


async def test_sparse_source_gives_sparse_target_without_writes() -> None:
    size = 32 * CS
    data = bytearray(size)
    data[5 * CS : 6 * CS] = pattern(CS)
    data[20 * CS + 100 : 20 * CS + 200] = b"x" * 100
    _node, target_mem, target, job, _ = make_job(bytes(data))
    await job.attach()
    job.start()
    await finish(job)
    assert target_mem.data == bytes(data)
    assert {(verb, off) for verb, off, _ in target.writes} == {("write", 5 * CS), ("write", 20 * CS)}
    assert job.current_progress == size


async def test_zeroes_become_write_zeroes_on_a_used_target() -> None:
    size = 8 * CS
    data = bytes(3 * CS) + pattern(CS) + bytes(4 * CS)
    _node, target_mem, target, job, _ = make_job(data, zero_init=False)
    target_mem._data[:] = b"\xaa" * size
    await job.attach()
    job.start()
    await finish(job)
    assert target_mem.data == data
    assert all(verb in ("zero", "write") for verb, _, _ in target.writes)
    assert ("write", 3 * CS, CS) in target.writes
    extents = await target_mem.block_status(0, size)
    assert extents[0].flags & State.HOLE and extents[0].length >= 3 * CS


async def test_cluster_size_follows_the_target() -> None:
    class Big(BlockFilter):
        @property
        def block_limits(self) -> BlockLimits:
            return BlockLimits(preferred=256 * KiB)

    assert backup_cluster_size(MemoryDevice(CS)) == CS
    assert backup_cluster_size(Big(MemoryDevice(CS))) == 256 * KiB
    assert backup_cluster_size(MemoryDevice(CS), 128 * KiB) == 128 * KiB


async def test_sync_none_keeps_only_overwritten_old_data_until_cancelled() -> None:
    size = 8 * CS
    node, target, _, job, rec = make_job(pattern(size), sync="none")
    snapshot = node.device.data  # type: ignore[attr-defined]
    await job.attach()
    job.start()
    await node.pwrite(2 * CS + 10, b"new")
    await node.zero(6 * CS - 1, 2)
    for _ in range(5):
        await asyncio.sleep(0)
    assert job.status == "running"  # sync=none never finishes on its own
    job.cancel()
    await finish(job)
    expected = bytearray(size)
    for c in (2, 5, 6):
        expected[c * CS : (c + 1) * CS] = snapshot[c * CS : (c + 1) * CS]
    assert target.data == bytes(expected)
    assert "BLOCK_JOB_CANCELLED" in rec.names()
    assert node.filters == []


async def test_sync_top_copies_only_what_the_top_allocates() -> None:
    size = 8 * CS

    class Overlay(MemoryDevice):
        async def top_allocation(self, offset: int, length: int) -> list[tuple[int, bool]]:
            # only the first half belongs to the top image; the rest comes from a backing file
            half = self.size // 2
            if offset >= half:
                return [(length, False)]
            first = min(length, half - offset)
            return [(first, True)] + ([(length - first, False)] if length > first else [])

    source = Overlay(size, data=pattern(size))
    node = BlockNode("disk", source)
    target = MemoryDevice(size)
    bus = EventBus()
    rec = Recorder(bus)
    job = BackupJob("t", node, target, BackupOptions(sync="top"), events=bus, target_zero_init=True)
    await job.attach()
    assert job.total_progress == size
    # A guest write to an unallocated cluster before the scan: nothing to copy, and not "done" either.
    await node.pwrite(size - CS, b"\x09" * CS)
    job.start()
    await finish(job)
    assert target.data == pattern(size)[: size // 2] + bytes(size // 2)
    # Like QEMU: the clusters the top image does not allocate shrink ``len``; they are not progress.
    (completed,) = rec.named("BLOCK_JOB_COMPLETED")
    assert completed["len"] == completed["offset"] == size // 2
    assert job.total_progress == job.current_progress == size // 2


async def test_throttled_job_claims_small_steps() -> None:
    """Under a speed limit every worker claims about one throttle slice (at least a cluster), so
    progress advances by small steps: here 1 B/s parks each of 2 workers after one cluster."""
    size = 16 * CS
    _node, target, _, job, _ = make_job(pattern(size), speed=1, max_workers=2, max_chunk=16 * CS)
    await job.attach()
    job.start()
    while job.current_progress < 2 * CS:
        await asyncio.sleep(0)
    for _ in range(20):
        await asyncio.sleep(0)
    assert job.current_progress == 2 * CS
    assert not job.busy
    job.set_speed(0)
    await finish(job)
    assert target.data == pattern(size)
    assert job.current_progress == job.total_progress == size


async def test_speed_limit_changes_while_running() -> None:
    size = 16 * CS
    _node, target, _, job, _ = make_job(pattern(size), speed=1, max_workers=1)
    await job.attach()
    job.start()
    while job.current_progress == 0:
        await asyncio.sleep(0)
    for _ in range(20):
        await asyncio.sleep(0)
    assert job.current_progress < size  # 1 byte/s: parked in throttle after the first chunk
    assert not job.busy
    job.set_speed(0)
    await finish(job)
    assert target.data == pattern(size)


async def test_pause_resume_while_the_guest_writes() -> None:
    size = 16 * CS
    node, target, _, job, rec = make_job(pattern(size), max_workers=2)
    snapshot = node.device.data  # type: ignore[attr-defined]
    await job.attach()
    job.start()
    job.pause()
    await asyncio.sleep(0)
    progress = job.current_progress
    await guest(node, 7, 40)  # copy-before-write keeps working while the job is paused
    assert job.status == "paused"
    assert job.current_progress >= progress
    job.resume()
    await finish(job)
    assert target.data == snapshot
    assert rec.names()[:4] == ["created", "running", "paused", "running"]


async def test_bounded_parallelism_and_chunks() -> None:
    size = 64 * CS
    _node, _, target, job, _ = make_job(pattern(size), max_workers=3, max_chunk=4 * CS)
    peak = 0
    current = 0
    original = target.pwrite

    async def counting(offset: int, data: Any, *, fua: bool = False) -> None:
        nonlocal peak, current
        assert len(data) <= 4 * CS
        current += 1
        peak = max(peak, current)
        try:
            await original(offset, data, fua=fua)
        finally:
            current -= 1

    target.pwrite = counting  # type: ignore[method-assign]
    await job.attach()
    job.start()
    await finish(job)
    assert 1 <= peak <= 3


@pytest.mark.parametrize("where", ["source", "target"])
async def test_report_policy_fails_the_job(where: str) -> None:
    node, _, target, job, rec = make_job(pattern(8 * CS))
    if where == "target":
        target.fail_writes = errno.EIO
    else:
        source_fault = FaultyDevice(node.device)
        node.device = source_fault
        node.top = source_fault
        source_fault.fail_reads = errno.EIO
    await job.attach()
    job.start()
    await finish(job)
    errors = rec.named("BLOCK_JOB_ERROR")
    assert errors[0] == {"device": "job0", "operation": "read" if where == "source" else "write", "action": "report"}
    assert rec.named("BLOCK_JOB_COMPLETED")[0]["error"] == "Input/output error"
    assert "aborting" in rec.names()
    assert node.filters == []


async def test_ignore_policy_retries_and_completes() -> None:
    size = 8 * CS
    _node, target_mem, target, job, rec = make_job(pattern(size), on_target_error="ignore", retry_delay=0)
    target.fail_writes, target.fail_writes_times = errno.EIO, 3
    await job.attach()
    job.start()
    await finish(job)
    assert [e["action"] for e in rec.named("BLOCK_JOB_ERROR")] == ["ignore"] * 3
    assert "error" not in rec.named("BLOCK_JOB_COMPLETED")[0]
    assert target_mem.data == pattern(size)


async def test_stop_policy_pauses_then_resume_completes() -> None:
    size = 8 * CS
    node, target_mem, target, job, rec = make_job(pattern(size), on_target_error="enospc", max_workers=1)
    snapshot = node.device.data  # type: ignore[attr-defined]
    target.fail_writes = errno.ENOSPC
    await job.attach()
    job.start()
    while job.status != "paused":
        await asyncio.sleep(0)
    assert job.io_status == "nospace"
    assert rec.named("BLOCK_JOB_ERROR")[0]["action"] == "stop"
    with pytest.raises(OSError) as info:  # break-guest-write: the guest cannot overwrite uncopied data
        await node.pwrite(7 * CS, b"w")
    assert info.value.errno == errno.ENOSPC
    target.fail_writes = None
    job.resume()
    await finish(job)
    assert job.io_status == "ok"
    assert target_mem.data == snapshot
    assert "error" not in rec.named("BLOCK_JOB_COMPLETED")[0]


async def spin_until(predicate: Any, bound: int = 10_000) -> None:
    """Let the loop run until ``predicate()`` holds (a bounded number of turns, no clock)."""
    for _ in range(bound):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def test_failures_from_before_a_stop_do_not_stop_the_resumed_job() -> None:
    """Four copies are in flight when the target starts failing; their failures arrive one by one:
    the first stops the job, one more arrives while it is stopped, the fault is repaired and the job
    resumed, then the last two arrive. They belong to requests issued before the stop: they are
    retried, do not stop the job again (no event), and the backup completes with the point in time."""
    size = 8 * CS
    node, target_mem, target, job, rec = make_job(pattern(size), on_target_error="stop", max_workers=4, max_chunk=CS)
    snapshot = bytes(node.device.data)  # type: ignore[attr-defined]
    held: list[asyncio.Future[None]] = []
    target.held_failures = held
    target.fail_writes = errno.ENOSPC
    await job.attach()
    job.start()
    await spin_until(lambda: len(held) == 4)  # every worker's write failed, no reply delivered yet
    held[0].set_result(None)
    await spin_until(lambda: job.status == "paused")
    assert job.io_status == "nospace"
    held[1].set_result(None)  # a failure that arrives while the job is stopped
    await spin_until(lambda: len(rec.named("BLOCK_JOB_ERROR")) == 2)
    target.fail_writes = None  # the fault is repaired
    await node.pwrite(7 * CS, b"g" * 100)  # a guest write copies the old data first (the target works again)
    job.resume()
    held[2].set_result(None)  # late failures of requests issued before the stop
    held[3].set_result(None)
    await spin_until(lambda: job.status == "null" or job.user_paused)
    assert not job.user_paused, "a failure from before the stop stopped the resumed job"
    await finish(job)
    assert [e["action"] for e in rec.named("BLOCK_JOB_ERROR")] == ["stop", "stop"]
    assert "error" not in rec.named("BLOCK_JOB_COMPLETED")[0]
    assert job.io_status == "ok"
    assert target_mem.data == snapshot


async def test_break_snapshot_fails_the_job() -> None:
    size = 8 * CS
    node, _, target, job, rec = make_job(pattern(size), on_cbw_error="break-snapshot", sync="none")
    await job.attach()
    job.start()
    target.fail_writes = errno.EIO
    await node.pwrite(CS, b"x")  # succeeds, breaks the snapshot
    await finish(job)
    assert rec.named("BLOCK_JOB_COMPLETED")[0]["error"] == "Input/output error"
    assert job.snapshot_error is not None
    assert node.device.data[CS : CS + 1] == b"x"  # type: ignore[attr-defined]
    assert node.filters == []


async def test_cancel_with_a_dead_target_is_prompt() -> None:
    size = 16 * CS
    node, _, target, job, rec = make_job(pattern(size), cbw_timeout=0.05)
    await job.attach()
    job.start()
    while job.current_progress == 0:
        await asyncio.sleep(0)
    target.gate.clear()  # the target stops answering
    with pytest.raises(OSError) as info:
        await asyncio.wait_for(node.pwrite(15 * CS, b"g"), 10)
    assert info.value.errno == errno.ETIMEDOUT
    job.cancel(force=True)
    await finish(job)
    assert "BLOCK_JOB_CANCELLED" in rec.names()
    await asyncio.wait_for(node.pwrite(15 * CS, b"g"), 10)  # no filter any more
    target.gate.set()


async def test_two_backups_of_one_device_stack() -> None:
    size = 16 * CS
    source = MemoryDevice(size, data=pattern(size))
    node = BlockNode("disk", source)
    bus = EventBus()
    t1, t2 = FaultyDevice(MemoryDevice(size)), FaultyDevice(MemoryDevice(size))
    j1 = BackupJob("a", node, t1, BackupOptions(max_chunk=CS), events=bus, target_zero_init=True)
    await j1.attach()
    snap1 = source.data
    await node.pwrite(0, b"between" * 100)
    j2 = BackupJob("b", node, t2, BackupOptions(max_chunk=CS), events=bus, target_zero_init=True)
    await j2.attach()
    snap2 = source.data
    j1.start()
    j2.start()
    await asyncio.gather(guest(node, 3, 50), guest(node, 4, 50))
    await finish(j1)
    await finish(j2)
    assert t1.next.data == snap1  # type: ignore[attr-defined]
    assert t2.next.data == snap2  # type: ignore[attr-defined]
    assert node.filters == []


async def test_refusals() -> None:
    source = MemoryDevice(4 * CS)
    node = BlockNode("disk", source)
    bus = EventBus()
    for target in (node, source):
        with pytest.raises(InvalidArgument, match="cannot be the same"):
            BackupJob("x", node, target, BackupOptions(), events=bus, target_zero_init=True)
    with pytest.raises(InvalidArgument, match="different sizes"):
        BackupJob("x", node, MemoryDevice(CS), BackupOptions(), events=bus, target_zero_init=True)
    with pytest.raises(InvalidArgument):
        BackupOptions(sync="incremental")  # QMP's spelling of sync=bitmap + on-success, desugared there
    with pytest.raises(InvalidArgument, match="must provide a valid bitmap"):
        BackupJob("x", node, MemoryDevice(4 * CS), BackupOptions(sync="bitmap"), events=bus, target_zero_init=True)
    with pytest.raises(InvalidArgument):
        BackupOptions(bitmap_mode="sometimes")
    with pytest.raises(InvalidArgument):
        BackupOptions(on_source_error="explode")
    job = BackupJob("x", node, MemoryDevice(4 * CS), BackupOptions(), events=bus, target_zero_init=True)
    job.install_filter()
    assert isinstance(node.top, CopyBeforeWriteFilter)
    job.early_fail()  # a transaction that failed before start: nothing left behind
    assert node.filters == [] and node.users == set()


@pytest.mark.parametrize("policy", ["report", "ignore", "stop", "enospc", "auto"])
async def test_a_target_flush_that_failed_once_fails_the_job_whatever_the_policy(policy: str) -> None:
    """The target's flush fails once and would succeed if asked again (Linux marks the pages clean
    after reporting a writeback error): the data may be lost, so the job must fail — not retry,
    not pause — under every ``on-target-error`` policy."""
    size = 8 * CS
    _node, _, target, job, rec = make_job(pattern(size), on_target_error=policy, retry_delay=0)
    target.flush_failures = 1
    await job.attach()
    job.start()
    for _ in range(10_000):  # a job that paused (stop) is resumed once: it must still fail
        if job.status in ("concluded", "null"):
            break
        if job.status == "paused" and job.user_paused:
            job.resume()
        await asyncio.sleep(0)
    await finish(job)
    completed = rec.named("BLOCK_JOB_COMPLETED")
    assert completed and completed[0]["error"] == "Input/output error"
    assert [e["action"] for e in rec.named("BLOCK_JOB_ERROR")] == ["report"]
    assert target.flushes == 0
