"""Copy-before-write between two plain files: the fd-to-fd fast path and its aligned guest window.

The fast path bypasses the device layers, so these tests check it against the same oracle as the
general path (the target holds the point-in-time bytes, zero clusters stay holes, errors are reported as
reads or writes and give the clusters back) using real files.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import backup.block_copy as block_copy
from backup.block_copy import DIRECT_COPY_MAX, BlockCopier
from backup.cbw import CopyBeforeWriteFilter
from backup.filter import BlockFilter
from backup.memory import MemoryDevice
from backup.node import BlockNode
from backup.rawfile import RawFileDevice
from nbd.device import direct_read_fd
from server.qmp.block import ReadOnlyFilter

CS = 65536
WINDOW = DIRECT_COPY_MAX // CS


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
        size: int = 12 * CS, *, zero_init: bool = True, zero_clusters: tuple[int, ...] = (), widen: bool = True
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
            node, target, size=source.size, cluster_size=CS, target_zero_init=zero_init, widen_guest_copies=widen
        )
        cbw = node.insert_filter(lambda below: CopyBeforeWriteFilter(below, copier))
        assert isinstance(cbw, CopyBeforeWriteFilter)
        snapshot = data + bytes(source.size - len(data))  # the rounded-up tail reads as zeroes
        rig = FileRig(node, source, target, target_path, copier, cbw, snapshot)
        opened.append(rig)
        return rig

    yield make
    for rig in opened:
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


async def test_a_guest_write_copies_its_aligned_window(make_rig: MakeRig) -> None:
    rig = await make_rig()
    assert rig.copier._direct_fds() is not None  # the fast path is in use for two plain files
    await rig.node.pwrite(WINDOW * CS + CS + 7, b"new")  # inside the second window
    assert copied(rig) == set(range(WINDOW, 2 * WINDOW))
    assert target_bytes(rig, WINDOW, 2 * WINDOW) == rig.snapshot[WINDOW * CS : 2 * WINDOW * CS]
    assert target_bytes(rig, 0, WINDOW) == bytes(WINDOW * CS)  # the window before: untouched
    assert os.pread(rig.source.direct_read_fd() or -1, 3, WINDOW * CS + CS + 7) == b"new"
    assert rig.copier.written_bytes == WINDOW * CS


async def test_without_widening_a_guest_write_copies_only_its_clusters(make_rig: MakeRig) -> None:
    rig = await make_rig(widen=False)  # sync=none: the target holds exactly what guests overwrote
    await rig.node.pwrite(CS - 1, b"ab")
    assert copied(rig) == {0, 1}
    assert target_bytes(rig, 0, 2) == rig.snapshot[: 2 * CS]
    assert target_bytes(rig, 2, WINDOW) == bytes((WINDOW - 2) * CS)


async def test_the_window_never_takes_copied_or_claimed_clusters(make_rig: MakeRig) -> None:
    rig = await make_rig()
    task = rig.copier.claim(2, 3)  # the job is copying cluster 2 right now
    await rig.node.pwrite(0, b"x")
    assert copied(rig) == {0, 1, 2}  # 0-1 by the guest copy; 2 is still the job's
    assert target_bytes(rig, 2, 3) == bytes(CS)  # the guest copy did not write the job's cluster
    await rig.copier.run(task)
    rig.copier.bitmap.clear(WINDOW + 1, WINDOW + 2)  # as if copied already (its target bytes stay zero)
    await rig.node.pwrite((WINDOW + 2) * CS, b"y")
    assert copied(rig) == {0, 1, 2, WINDOW + 1, WINDOW + 2, WINDOW + 3}  # not back over WINDOW + 1
    assert target_bytes(rig, WINDOW, WINDOW + 2) == bytes(2 * CS)
    assert target_bytes(rig, WINDOW + 2, WINDOW + 4) == rig.snapshot[(WINDOW + 2) * CS : (WINDOW + 4) * CS]


async def test_the_window_never_stretches_forward_over_copied_clusters(make_rig: MakeRig) -> None:
    """Found by bench/soak.py: a write to the first cluster of a window whose next clusters were
    already copied failed with EIO (the widening took the run of *copied* clusters after it)."""
    rig = await make_rig()
    await rig.node.pwrite(1 * CS, bytes([1]) * (3 * CS))  # copies 1-3 (and 0, widened back)
    rig.copier.bitmap.set(0, 1)  # cluster 0 still to copy, 1-3 copied
    await rig.node.pwrite(0, bytes([2]) * 4096)
    assert copied(rig) == {0, 1, 2, 3}
    assert target_bytes(rig, 0, 1) == rig.snapshot[:CS]
    rig.copier.bitmap.set(WINDOW + 2, WINDOW + 3)  # a gap: WINDOW+1 copied, WINDOW+2 not
    rig.copier.bitmap.clear(WINDOW + 1, WINDOW + 2)
    await rig.node.pwrite(WINDOW * CS, b"z")
    assert copied(rig) >= {WINDOW, WINDOW + 1} and WINDOW + 2 not in copied(rig)


async def test_the_partial_last_cluster_and_the_rounded_tail(make_rig: MakeRig) -> None:
    size = 2 * WINDOW * CS + 1000  # a file whose end is no cluster (nor sector) boundary
    rig = await make_rig(size)
    last = rig.copier.clusters - 1
    await rig.node.pwrite(0, b"q")  # a full window first: the reused buffer now holds data
    await rig.node.pwrite(rig.source.size - 1, b"z")  # the last byte of the device (past the file's end)
    assert last in copied(rig)
    assert target_bytes(rig, last, last + 1) == rig.snapshot[last * CS :]
    assert rig.snapshot[size:] == bytes(rig.source.size - size)


async def test_zero_clusters_stay_holes_on_a_fresh_target(make_rig: MakeRig) -> None:
    rig = await make_rig(zero_clusters=(1,))
    await rig.node.pwrite(0, b"a")
    assert copied(rig) == set(range(WINDOW))
    assert target_bytes(rig, 0, WINDOW) == rig.snapshot[: WINDOW * CS]
    assert is_hole(rig.target_path, CS)
    assert not is_hole(rig.target_path, 0)


async def test_zero_clusters_are_zeroed_on_a_used_target(make_rig: MakeRig) -> None:
    rig = await make_rig(zero_init=False, zero_clusters=(2,))
    await rig.node.pwrite(3 * CS, b"b")
    assert copied(rig) == set(range(WINDOW))
    assert target_bytes(rig, 0, WINDOW) == rig.snapshot[: WINDOW * CS]  # the 0xee junk is gone, zeroes too
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
        await rig.node.pwrite(CS, b"lost")
    assert caught.value.errno == errno.EIO
    assert ("source read" if failing == "preadv" else "target write") in str(caught.value)
    assert copied(rig) == set()  # every cluster of the window is to be copied again
    assert rig.copier.in_flight == ()
    monkeypatch.undo()
    source_fd = rig.source.direct_read_fd() or -1
    assert os.pread(source_fd, 4, CS) == rig.snapshot[CS : CS + 4]  # the guest write never landed
    await rig.node.pwrite(CS, b"kept")  # and the next try copies and writes
    assert target_bytes(rig, 0, WINDOW) == rig.snapshot[: WINDOW * CS]


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
