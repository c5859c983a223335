"""Copy-before-write between two plain files: the fd-to-fd fast path.

The fast path bypasses the device layers (and, into a target that reads as zeroes, the claim's task),
so these tests check it against the same oracle as the general path (the target holds the point-in-time
bytes, zero clusters stay holes, errors are reported as reads or writes and give the clusters back)
using real files — also with a copy granularity finer than the zero unit, as backup jobs run it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import backup.block_copy as block_copy
from backup.backup_job import BackupJob, BackupOptions
from backup.block_copy import BlockCopier, copy_between_files
from backup.cbw import CopyBeforeWriteFilter
from backup.events import EventBus
from backup.filter import BlockFilter
from backup.memory import MemoryDevice
from backup.node import BlockNode
from backup.rawfile import RawFileDevice
from nbd.device import direct_read_fd
from server.qmp.block import ReadOnlyFilter

CS = 65536


@dataclass
class FileRig:
    node: BlockNode
    source: RawFileDevice
    target: RawFileDevice
    target_path: Path
    copier: BlockCopier
    cbw: CopyBeforeWriteFilter
    snapshot: bytes


def source_bytes(size: int, *, zero_clusters: tuple[int, ...] = ()) -> bytes:
    data = bytearray(random.Random(size).randbytes(size))
    for c in zero_clusters:
        data[c * CS : (c + 1) * CS] = bytes(len(data[c * CS : (c + 1) * CS]))
    return bytes(data)


MakeRig = Callable[..., Awaitable[FileRig]]


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[MakeRig]:
    opened: list[FileRig] = []

    async def make(
        size: int = 12 * CS, *, zero_init: bool = True, zero_clusters: tuple[int, ...] = (), zero_unit: int = CS
    ) -> FileRig:
        data = source_bytes(size, zero_clusters=zero_clusters)
        source_path = tmp_path / "source.img"
        source_path.write_bytes(data)
        target_path = tmp_path / "target.img"
        if zero_init:
            target = await RawFileDevice.create(target_path, size)
        else:
            target_path.write_bytes(b"\xee" * len(data))  # a used target: must be overwritten, zeroes too
            target = await RawFileDevice.open(target_path)
        source = await RawFileDevice.open(source_path)
        node = BlockNode("src", source)
        copier = BlockCopier(
            node, target, size=source.size, cluster_size=CS, target_zero_init=zero_init, zero_unit=zero_unit
        )
        cbw = node.insert_filter(lambda below: CopyBeforeWriteFilter(below, copier))
        assert isinstance(cbw, CopyBeforeWriteFilter)
        snapshot = data + bytes(source.size - len(data))  # the rounded-up tail reads as zeroes
        rig = FileRig(node, source, target, target_path, copier, cbw, snapshot)
        opened.append(rig)
        return rig

    yield make
    for rig in opened:
        await rig.copier.close()
        await rig.node.close()
        await rig.target.close()


def copied(rig: FileRig) -> set[int]:
    return {c for c in range(rig.copier.clusters) if not rig.copier.bitmap[c]}


def target_bytes(rig: FileRig, first: int, end: int) -> bytes:
    lo, hi = first * CS, min(end * CS, rig.copier.size)
    return os.pread(rig.target.direct_write_fd() or -1, hi - lo, lo)


def is_hole(path: Path, offset: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) != offset
    except OSError as exc:  # ENXIO: no data after offset
        return exc.errno == errno.ENXIO
    finally:
        os.close(fd)


async def test_a_guest_write_copies_only_its_clusters(make_rig: MakeRig) -> None:
    rig = await make_rig()
    assert rig.copier._direct_fds() is not None  # the fast path is in use for two plain files
    await rig.node.pwrite(4 * CS - 1, b"new")  # crosses clusters 3 and 4
    assert copied(rig) == {3, 4}
    assert target_bytes(rig, 3, 5) == rig.snapshot[3 * CS : 5 * CS]
    assert target_bytes(rig, 0, 3) == bytes(3 * CS)  # the neighbours: untouched
    assert target_bytes(rig, 5, 8) == bytes(3 * CS)
    assert os.pread(rig.source.direct_read_fd() or -1, 3, 4 * CS - 1) == b"new"
    assert rig.copier.written_bytes == 2 * CS
    assert rig.copier.copied_bytes == 2 * CS


async def test_the_fast_path_waits_for_a_claimed_cluster_and_never_copies_it(make_rig: MakeRig) -> None:
    rig = await make_rig()
    task = rig.copier.claim(2, 3)  # the job is copying cluster 2 right now
    await rig.node.pwrite(0, b"x")  # an unrelated cluster: copied at once
    assert copied(rig) == {0, 2}
    spanning = asyncio.create_task(rig.node.pwrite(CS, bytes(3 * CS)))  # clusters 1-3, 2 in flight
    for _ in range(5):
        await asyncio.sleep(0)
    assert not spanning.done()  # it waits for the job's copy of cluster 2 ...
    assert target_bytes(rig, 2, 3) == bytes(CS)  # ... and has not copied it itself
    await rig.copier.run(task)
    await spanning
    assert copied(rig) == {0, 1, 2, 3}
    assert target_bytes(rig, 0, 4) == rig.snapshot[: 4 * CS]


async def test_a_write_over_copied_and_uncopied_clusters_copies_only_the_uncopied(make_rig: MakeRig) -> None:
    """The fast path takes runs of set bits only (an earlier widening took a run of *copied* clusters
    after the written one, found by bench/soak.py: the guest write failed with EIO)."""
    rig = await make_rig()
    rig.copier.bitmap.clear(1, 2)  # cluster 1 copied already (its target bytes stay zero)
    rig.copier.bitmap.clear(3, 4)
    await rig.node.pwrite(0, bytes([2]) * (5 * CS))
    assert copied(rig) == {0, 1, 2, 3, 4}
    assert target_bytes(rig, 1, 2) == bytes(CS) and target_bytes(rig, 3, 4) == bytes(CS)
    for c in (0, 2, 4):
        assert target_bytes(rig, c, c + 1) == rig.snapshot[c * CS : (c + 1) * CS]
    assert rig.copier.written_bytes == 3 * CS


async def test_granules_finer_than_the_zero_unit(make_rig: MakeRig) -> None:
    """As a backup job runs it: 64 KiB granules tracked, zero detection in 256 KiB units."""
    rig = await make_rig(zero_init=False, zero_clusters=(5,), zero_unit=4 * CS)
    await rig.node.pwrite(5 * CS + 10, b"z")  # a zero granule inside a data unit: written as zeroes
    await rig.node.pwrite(6 * CS + 10, b"d")
    assert copied(rig) == {5, 6}
    assert target_bytes(rig, 5, 7) == rig.snapshot[5 * CS : 7 * CS]
    assert target_bytes(rig, 4, 5) == b"\xee" * CS  # the used target's bytes around: untouched
    assert target_bytes(rig, 7, 8) == b"\xee" * CS


async def test_the_partial_last_cluster_and_the_rounded_tail(make_rig: MakeRig) -> None:
    size = 8 * CS + 1000  # a file whose end is no cluster (nor sector) boundary
    rig = await make_rig(size)
    last = rig.copier.clusters - 1
    await rig.node.pwrite(0, bytes(4 * CS))  # a big copy first: the reused buffer now holds data
    await rig.node.pwrite(rig.source.size - 1, b"z")  # the last byte of the device (past the file's end)
    assert last in copied(rig)
    assert target_bytes(rig, last, last + 1) == rig.snapshot[last * CS :]
    assert rig.snapshot[size:] == bytes(rig.source.size - size)


async def test_zero_clusters_stay_holes_on_a_fresh_target(make_rig: MakeRig) -> None:
    rig = await make_rig(zero_clusters=(1,))
    await rig.node.pwrite(0, bytes(3 * CS))
    assert copied(rig) == {0, 1, 2}
    assert target_bytes(rig, 0, 3) == rig.snapshot[: 3 * CS]
    assert is_hole(rig.target_path, CS)
    assert not is_hole(rig.target_path, 0)


async def test_zero_clusters_are_zeroed_on_a_used_target(make_rig: MakeRig) -> None:
    rig = await make_rig(zero_init=False, zero_clusters=(2,))
    await rig.node.pwrite(0, bytes(4 * CS))
    assert copied(rig) == {0, 1, 2, 3}
    assert target_bytes(rig, 0, 4) == rig.snapshot[: 4 * CS]  # the 0xee junk is gone, zeroes too
    assert target_bytes(rig, 2, 3) == bytes(CS)


@pytest.mark.parametrize("failing", ["preadv", "pwrite"])
async def test_direct_errors_fail_the_guest_write_and_give_the_clusters_back(
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    rig = await make_rig()

    def fail(*args: object) -> int:
        raise OSError(errno.EIO, f"injected {failing} failure")

    monkeypatch.setattr(block_copy.os, failing, fail)
    with pytest.raises(OSError) as caught:
        await rig.node.pwrite(CS, bytes(2 * CS))
    assert caught.value.errno == errno.EIO
    assert ("source read" if failing == "preadv" else "target write") in str(caught.value)
    assert copied(rig) == set()  # both clusters are to be copied again
    assert rig.copier.in_flight == ()
    monkeypatch.undo()
    source_fd = rig.source.direct_read_fd() or -1
    assert os.pread(source_fd, 4, CS) == rig.snapshot[CS : CS + 4]  # the guest write never landed
    await rig.node.pwrite(CS, b"kept")  # and the next try copies and writes
    assert copied(rig) == {1}
    assert target_bytes(rig, 1, 2) == rig.snapshot[CS : 2 * CS]


async def test_random_guest_traffic_keeps_the_point_in_time(make_rig: MakeRig) -> None:
    size = 40 * CS + 3000
    rig = await make_rig(size, zero_clusters=(5, 6, 17))
    rnd = random.Random(7)

    async def guest(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(40):
            offset = r.randrange(rig.source.size)
            length = min(r.randrange(1, 3 * CS), rig.source.size - offset)
            verb = r.choice(("write", "write", "zero", "trim"))
            if verb == "write":
                await rig.node.pwrite(offset, r.randbytes(length))
            elif verb == "zero":
                await rig.node.zero(offset, length)
            else:
                await rig.node.trim(offset, length)
            await asyncio.sleep(0)

    async def job() -> None:  # the job's side: claims chunks of clusters in order, like BackupJob's workers
        pos = 0
        while pos < rig.copier.clusters:
            start = rig.copier.bitmap.next_set(pos)
            if start is None:
                break
            stop = min(rig.copier.bitmap.run_end(start), start + rnd.randrange(1, 20))
            await rig.copier.run(rig.copier.claim(start, stop))
            pos = stop
            await asyncio.sleep(0)

    await asyncio.gather(*(guest(s) for s in range(4)), job())
    await rig.copier.ensure_copied(0, rig.copier.clusters)
    assert copied(rig) == set(range(rig.copier.clusters))
    assert target_bytes(rig, 0, rig.copier.clusters) == rig.snapshot


async def test_direct_read_fd_looks_only_through_filters_that_pass_reads(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(CS))
    raw = await RawFileDevice.open(path)
    try:
        node = BlockNode("n", raw)
        assert direct_read_fd(node) == raw.direct_read_fd()
        node.insert_filter(ReadOnlyFilter)
        assert direct_read_fd(node) == raw.direct_read_fd()
        node.insert_filter(BlockFilter)  # a filter that may change reads: no shortcut under it
        assert direct_read_fd(node) is None
        assert direct_read_fd(MemoryDevice(CS)) is None
    finally:
        await raw.close()
    assert direct_read_fd(raw) is None  # closed
    assert raw.direct_write_fd() is None


# --- the job's chunks: the file-copy thread --------------------------------------------------------


def test_the_thread_copy_leaves_out_zero_units_and_reads_zeroes_past_the_end(tmp_path: Path) -> None:
    unit = 4096
    data = bytearray(random.Random(3).randbytes(6 * unit + 100))  # the file ends inside the 7th unit
    data[unit : 2 * unit] = bytes(unit)
    data[3 * unit + 10 : 4 * unit] = bytes(unit - 10)  # a unit that is zero but for its start: data
    source, target = tmp_path / "s", tmp_path / "t"
    source.write_bytes(bytes(data))
    target.write_bytes(b"\xee" * 8 * unit)
    with open(source, "rb") as s, open(target, "r+b") as t:
        written, zeroes = copy_between_files(
            s.fileno(), t.fileno(), 0, 8 * unit, bytearray(3 * unit), unit, bytes(unit), True
        )
    out = target.read_bytes()
    assert zeroes == [(unit, unit), (7 * unit, unit)]  # the zero unit and the one wholly past the end
    assert written == 6 * unit  # the unit holding the file's end is data, its tail written as zeroes
    assert out[:unit] == data[:unit] and out[2 * unit : 6 * unit] == data[2 * unit : 6 * unit]
    assert out[6 * unit : 7 * unit] == data[6 * unit :] + bytes(unit - 100)
    assert out[unit : 2 * unit] == b"\xee" * unit  # left for the caller's write-zeroes
    with open(source, "rb") as s, open(target, "r+b") as t:
        _, zeroes = copy_between_files(
            s.fileno(), t.fileno(), 0, 8 * unit, bytearray(3 * unit), unit, bytes(unit), False
        )
    assert zeroes == []  # a target that reads as zeroes needs none


@pytest.mark.parametrize("failing", ["source", "target"])
def test_the_thread_copy_says_which_side_failed(tmp_path: Path, failing: str) -> None:
    path = tmp_path / "f"
    path.write_bytes(random.Random(1).randbytes(8192))
    with open(path, "rb") as readable:
        fds = (readable.fileno(), readable.fileno())  # writing a file opened read-only fails: EBADF
        if failing == "source":
            fds = (-1, readable.fileno())
        with pytest.raises(block_copy.CopyError) as caught:
            copy_between_files(*fds, 0, 8192, bytearray(4096), 4096, bytes(4096), False)
    assert caught.value.is_read == (failing == "source")
    assert caught.value.errno == errno.EBADF


async def test_a_cancelled_chunk_copy_ends_only_when_the_thread_is_done(
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await make_rig()
    entered, release = threading.Event(), threading.Event()

    def held(*args: object) -> tuple[int, list[tuple[int, int]]]:
        entered.set()
        release.wait(30)
        return 0, []

    monkeypatch.setattr(block_copy, "copy_between_files", held)
    copy = asyncio.create_task(rig.copier.run(rig.copier.claim(0, 8)))  # 512 KiB: a job's chunk
    while not entered.is_set():
        await asyncio.sleep(0.01)
    copy.cancel()
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert not copy.done()  # the thread still uses the descriptors: the claim holds
    assert [(t.start, t.end) for t in rig.copier.in_flight] == [(0, 8)]
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await copy
    assert rig.copier.in_flight == () and copied(rig) == set()  # given back


async def test_a_backup_job_copies_its_chunks_in_one_thread_and_stops_it(tmp_path: Path) -> None:
    size = 3 * 1024 * 1024 + 5000
    data = source_bytes(size, zero_clusters=(4, 5, 6, 7, 20))
    (tmp_path / "source.img").write_bytes(data)
    source = await RawFileDevice.open(tmp_path / "source.img")
    target = await RawFileDevice.create(tmp_path / "target.img", source.size)
    node = BlockNode("src", source)
    try:
        job = BackupJob(
            "j", node, target, BackupOptions(max_chunk=1024 * 1024), events=EventBus(), target_zero_init=True
        )
        await job.attach()
        job.start()
        await asyncio.wait_for(job.wait(), 30)
        assert job.error is None
        assert job.copier is not None and job.copier._file_thread is not None  # the chunks went there
        assert job.copier._file_thread.stopped
        assert not [t for t in threading.enumerate() if t.name == "nbd-backup-copy"]
    finally:
        await node.close()
        await target.close()
    assert (tmp_path / "target.img").read_bytes()[: len(data)] == data
    assert is_hole(tmp_path / "target.img", 4 * CS)
