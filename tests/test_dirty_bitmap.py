"""DirtyBitmap and BlockNode marking: granules touched by unaligned ranges, runs, counts, merges,
QEMU's limits, and marking on every path a write reaches a node by."""

from __future__ import annotations

import asyncio
import random

import pytest

from backup.backup_job import BackupJob, BackupOptions
from backup.bitmap import ClusterBitmap
from backup.dirty_bitmap import (
    DEFAULT_GRANULARITY,
    MAX_GRANULARITY,
    DirtyBitmap,
    default_granularity,
)
from backup.errors import InvalidArgument
from backup.events import EventBus
from backup.filter import BlockFilter
from backup.memory import MemoryDevice
from backup.node import BlockNode

G = 4096
SIZE = 64 * G + 100  # a partial last granule


def test_mark_sets_every_granule_an_unaligned_range_touches() -> None:
    b = DirtyBitmap("b", SIZE, G)
    b.mark(G - 1, 2)  # straddles granules 0 and 1
    b.mark(10 * G + 5, 1)
    b.mark(SIZE - 1, 1)  # the partial last granule counts whole, as QEMU's count does
    assert b.count == 4 * G
    assert [i for i in range(65) if b.is_dirty(i * G)] == [0, 1, 10, 64]


def test_mark_of_nothing_and_past_the_end_changes_nothing() -> None:
    b = DirtyBitmap("b", SIZE, G)
    b.mark(5, 0)
    b.mark(SIZE, G)
    b.mark(SIZE + 10 * G, 1)
    assert b.count == 0
    b.mark(SIZE - 1, 10 * G)  # clipped at the end
    assert b.count == G


def test_disabled_bitmap_does_not_record() -> None:
    b = DirtyBitmap("b", SIZE, G, recording=False)
    b.mark(0, SIZE)
    assert b.count == 0
    b.recording = True
    b.mark(0, 1)
    assert b.count == G


def test_dirty_runs_cover_the_range_exactly_with_granule_boundaries_inside() -> None:
    b = DirtyBitmap("b", SIZE, G)
    b.mark(2 * G, 2 * G)  # granules 2, 3
    b.mark(7 * G + 1, 1)  # granule 7
    assert b.dirty_runs(G + 10, 7 * G) == [(G - 10, False), (2 * G, True), (3 * G, False), (G, True), (10, False)]
    assert b.dirty_runs(0, SIZE) == [(2 * G, False), (2 * G, True), (3 * G, False), (G, True), (SIZE - 8 * G, False)]
    assert b.dirty_runs(SIZE - 50, 1000) == [(50, False)]  # clipped at the bitmap's end
    assert b.dirty_runs(2 * G + 1, 1) == [(1, True)]


def test_dirty_runs_random_against_a_byte_model() -> None:
    rnd = random.Random(5)
    for granularity in (512, 4096, 65536):
        size = rnd.randrange(1, 40) * granularity + rnd.randrange(granularity)
        b = DirtyBitmap("b", size, granularity)
        dirty = [False] * ((size + granularity - 1) // granularity)
        for _ in range(20):
            off, length = rnd.randrange(size), rnd.randrange(1, 3 * granularity)
            b.mark(off, length)
            for g in range(off // granularity, (min(off + length, size) - 1) // granularity + 1):
                dirty[g] = True
        off = rnd.randrange(size)
        length = rnd.randrange(1, size - off + 1)
        runs = b.dirty_runs(off, length)
        assert sum(n for n, _ in runs) == length
        assert all(runs[i][1] != runs[i + 1][1] for i in range(len(runs) - 1))
        pos = off
        for n, d in runs:
            assert all(dirty[p // granularity] == d for p in (pos, pos + n - 1))
            pos += n
        assert b.count == sum(dirty) * granularity


@pytest.mark.parametrize("granularity", [512, 4096, 65536])
@pytest.mark.parametrize("target", [512, 1024, 4096, 8192, 65536, 1 << 20, 1 << 24])
def test_at_granularity_sets_every_granule_that_overlaps_a_dirty_one(granularity: int, target: int) -> None:
    """The copy bitmap of an incremental backup: finer (table expansion, up to the 64x table and beyond
    it), equal (a copy) and coarser granules, against a byte model; a partial last granule included."""
    rnd = random.Random(granularity ^ target)
    for _ in range(5):
        size = rnd.randrange(1, 300) * granularity + rnd.randrange(granularity)
        b = DirtyBitmap("b", size, granularity)
        dirty_bytes = [False] * size
        for _ in range(rnd.randrange(0, 12)):
            off, length = rnd.randrange(size), rnd.randrange(1, 4 * granularity)
            b.mark(off, length)
            for g in range(off // granularity, (min(off + length, size) - 1) // granularity + 1):
                for p in range(g * granularity, min((g + 1) * granularity, size)):
                    dirty_bytes[p] = True
        bits = b.at_granularity(target)
        granules = (size + target - 1) // target
        assert len(bits) == granules
        expected = [any(dirty_bytes[g * target : (g + 1) * target]) for g in range(granules)]
        assert [bits[i] for i in range(granules)] == expected
        assert bits.count == sum(expected)


def test_merge_same_and_different_granularities() -> None:
    size = 4 << 20
    fine = DirtyBitmap("fine", size, G)
    fine.mark(1000, 10)
    fine.mark(3 << 20, 1)
    coarse = DirtyBitmap("coarse", size, 1 << 20, recording=False)
    coarse.merge_from(fine)  # a disabled target still takes merges (QEMU)
    assert coarse.count == 2 << 20
    other = DirtyBitmap("other", size, G)
    other.merge_from(coarse)
    assert other.count == 2 << 20 and other.dirty_runs(0, size) == [(1 << 20, True), (2 << 20, False), (1 << 20, True)]
    same = DirtyBitmap("same", size, G)
    same.mark(G, 1)
    same.merge_from(fine)
    assert same.count == 3 * G


def test_merge_refuses_different_sizes_and_leaves_the_target() -> None:
    a, b = DirtyBitmap("a", 4 << 20), DirtyBitmap("b", 8 << 20)
    b.mark(0, 1)
    with pytest.raises(
        InvalidArgument, match=r"different sizes \(destination size is 4194304, source size is 8388608\)"
    ):
        a.merge_from(b)
    assert a.count == 0


@pytest.mark.parametrize("granularity", [0, 256, 511, 1000, 3 * 4096, MAX_GRANULARITY * 2])
def test_granularity_limits(granularity: int) -> None:
    with pytest.raises(InvalidArgument, match="Granularity must be power of 2 and at least 512"):
        DirtyBitmap("b", SIZE, granularity)


def test_extreme_granularities_and_names() -> None:
    assert DirtyBitmap("b", SIZE, 512).granularity == 512
    huge = DirtyBitmap("b", 1 << 40, MAX_GRANULARITY)
    huge.mark((1 << 40) - 1, 1)
    assert huge.count == MAX_GRANULARITY
    DirtyBitmap("x" * 1023, SIZE)
    with pytest.raises(InvalidArgument, match="Bitmap name too long"):
        DirtyBitmap("x" * 1024, SIZE)
    with pytest.raises(InvalidArgument, match="Bitmap name cannot be empty"):
        DirtyBitmap("", SIZE)


def test_default_granularity_follows_the_cluster_size_within_4k_and_64k() -> None:
    assert default_granularity(None) == DEFAULT_GRANULARITY == 65536
    assert default_granularity(512) == 4096
    assert default_granularity(32768) == 32768
    assert default_granularity(2 << 20) == 65536


def test_bytes_round_trip_lsb_first() -> None:
    b = DirtyBitmap("b", 20 * G, G)
    b.mark(0, 1)
    b.mark(9 * G, 1)
    assert b.to_bytes() == bytes([0b1, 0b10, 0])
    back = DirtyBitmap.from_bytes("b", 20 * G, G, b.to_bytes() + b"\xff", persistent=True)
    assert back.count == 2 * G and back.persistent and back.to_bytes() == b.to_bytes()
    assert ClusterBitmap.from_bytes(12, b"\xff\xff").count == 12  # bits past the size are dropped


def test_busy_and_inconsistent_are_refused_with_qemu_texts() -> None:
    b = DirtyBitmap("b", SIZE, G)
    b.busy = True
    with pytest.raises(InvalidArgument, match="Bitmap 'b' is currently in use by another operation and cannot be used"):
        b.check_usable()
    b.busy, b.inconsistent = False, True
    with pytest.raises(InvalidArgument, match="Bitmap 'b' is inconsistent and cannot be used"):
        b.check_usable()
    b.check_usable(inconsistent=False)
    assert b.info() == {
        "name": "b",
        "recording": True,
        "persistent": False,
        "busy": False,
        "granularity": G,
        "count": 0,
        "inconsistent": True,
    }


# --- marking through the node ----------------------------------------------------------------------


class Passing(BlockFilter):
    """A filter that forwards everything (stands for copy-before-write's pass-through)."""


async def test_node_marks_writes_zeroes_and_trims_in_recording_bitmaps_only() -> None:
    node = BlockNode("n", MemoryDevice(SIZE))
    on, off = DirtyBitmap("on", SIZE, G), DirtyBitmap("off", SIZE, G, recording=False)
    node.add_bitmap(on)
    node.add_bitmap(off)
    assert list(node.bitmaps) == ["off", "on"]  # newest first, as QEMU lists them
    node.insert_filter(Passing)
    await node.pwrite(G - 1, b"ab")
    await node.zero(5 * G, 1)
    await node.trim(9 * G, G)
    await node.pwrite(20 * G, memoryview(b"x" * 8).cast("Q"))  # a view of 8-byte items: 8 bytes, not 1 item
    await node.pwrite(21 * G - 4, memoryview(b"x" * 8).cast("Q"))
    assert on.dirty_runs(0, 22 * G) == [
        (2 * G, True),
        (3 * G, False),
        (G, True),
        (3 * G, False),
        (G, True),
        (10 * G, False),
        (2 * G, True),
    ]
    assert off.count == 0


async def test_node_bitmap_crud_refusals() -> None:
    node = BlockNode("n", MemoryDevice(SIZE))
    node.add_bitmap(DirtyBitmap("a", SIZE))
    with pytest.raises(InvalidArgument, match="Bitmap already exists: a"):
        node.add_bitmap(DirtyBitmap("a", SIZE))
    with pytest.raises(InvalidArgument, match="Dirty bitmap 'x' not found"):
        node.bitmap("x")
    node.bitmaps["a"].busy = True
    with pytest.raises(InvalidArgument, match="in use"):
        node.remove_bitmap("a")
    node.bitmaps["a"].busy, node.bitmaps["a"].inconsistent = False, True
    node.remove_bitmap("a")  # an inconsistent bitmap may be removed (QEMU's hint says so)
    assert node.bitmaps == {}


async def test_a_job_writing_into_a_node_marks_its_bitmaps_and_the_source_s_guest_writes_too() -> None:
    size = 16 * 65536
    source = BlockNode("src", MemoryDevice(size))
    await source.pwrite(0, b"\x01" * size)
    target = BlockNode("tgt", MemoryDevice(size))
    on_target = DirtyBitmap("t", size, 65536)
    on_source = DirtyBitmap("s", size, 65536)
    target.add_bitmap(on_target)
    source.add_bitmap(on_source)
    job = BackupJob("j", source, target, BackupOptions(), events=EventBus(), target_zero_init=True)
    await job.attach()  # copy-before-write sits on the source now
    await source.pwrite(3 * 65536 + 7, b"guest")  # through the filter: copied to the target first
    job.start()
    await asyncio.wait_for(job.wait(), 30)
    assert on_source.dirty_runs(0, size) == [(3 * 65536, False), (65536, True), (12 * 65536, False)]
    assert on_target.count == size  # every cluster was data: the job wrote all of them


def test_frozen_bitmap_keeps_its_bits_and_records_into_the_successor() -> None:
    b = DirtyBitmap("b", SIZE, G)
    b.mark(0, 1)
    b.freeze()
    assert b.frozen and b.busy
    with pytest.raises(InvalidArgument, match="in use"):
        b.freeze()
    b.mark(5 * G, 1)
    assert b.count == G  # what the job reads does not move
    b.reclaim()  # the job failed: old and new bits
    assert not b.frozen and not b.busy and b.count == 2 * G
    b.freeze()
    b.mark(9 * G, 1)
    b.abdicate()  # the job succeeded: only what came after the freeze
    assert b.dirty_runs(0, 10 * G) == [(9 * G, False), (G, True)]
    disabled = DirtyBitmap("d", SIZE, G, recording=False)
    disabled.freeze()
    disabled.mark(0, 1)
    disabled.reclaim()
    assert disabled.count == 0
    with pytest.raises(InvalidArgument, match="not frozen"):
        disabled.abdicate()


async def test_a_nodes_marking_plan_follows_every_change_of_its_bitmaps() -> None:
    """The node caches what a write marks; every change that moves a bitmap's sink or bits, or the
    node's set of bitmaps, must reach the next write (enable, disable, freeze, abdicate, reclaim,
    remove, forget, a bitmap loaded from bytes)."""
    node = BlockNode("n", MemoryDevice(SIZE))
    b = DirtyBitmap("b", SIZE, G)
    node.add_bitmap(b)

    async def write(granule: int) -> None:
        await node.pwrite(granule * G + 1, b"x")

    await write(1)
    assert b.is_dirty(1 * G)
    b.recording = False
    await write(2)
    assert not b.is_dirty(2 * G)
    b.recording = True
    await write(3)
    assert b.is_dirty(3 * G)
    b.freeze()  # writes go to the successor now; the frozen bits stay as they are
    await write(4)
    assert not b.is_dirty(4 * G) and b.successor is not None and b.successor.is_dirty(4 * G)
    b.abdicate()  # the bitmap takes the successor's bits: the plan must follow the new bits object
    await write(5)
    assert [b.is_dirty(g * G) for g in (1, 3, 4, 5)] == [False, False, True, True]
    b.freeze()
    await write(6)
    b.reclaim()
    await write(7)
    assert [b.is_dirty(g * G) for g in (4, 5, 6, 7)] == [True, True, True, True]
    loaded = DirtyBitmap.from_bytes("loaded", SIZE, G, b"\x01")
    node.add_bitmap(loaded)
    await write(8)
    assert loaded.is_dirty(0) and loaded.is_dirty(8 * G) and b.is_dirty(8 * G)
    node.remove_bitmap("b")
    await write(9)
    assert not b.is_dirty(9 * G) and loaded.is_dirty(9 * G)
    node.forget_bitmap(loaded)
    await write(10)
    assert not loaded.is_dirty(10 * G) and not node.bitmaps
