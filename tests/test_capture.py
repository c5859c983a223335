"""Copy-before-write through the capture writer: the guest waits for the read of the old data only.

The writer's own rules (slots land on the target, all-zero pieces stay holes, the pool is bounded,
a batch takes all that queued while the thread was busy, failed slots are parked with their data and
written by ``flush``), the batch writers it uses (kernel AIO and the ``pwrite`` fallback give the same
file), and the copier and job around it: a guest write completes while its old data is still held
back from the target, a window's neighbours come along, a full pool copies inline, and a failed
captured write goes through ``on-target-error`` with its data kept until the resumed job writes it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import platform
import random
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import backup.batch_write as batch_write
import backup.block_copy as block_copy
from backup.backup_job import BackupJob, BackupOptions, capture_window
from backup.batch_write import AioWriter, BatchWriter, Piece, PwriteWriter, batch_writer, buffer_address
from backup.block_copy import BlockCopier
from backup.capture import CaptureWriter, Slot
from backup.cbw import CopyBeforeWriteFilter
from backup.events import EventBus
from backup.node import BlockNode
from backup.rawfile import RawFileDevice

GRANULE = 4096
WINDOW = 32768


class ScriptedWriter:
    """A ``BatchWriter`` over ``pwrite`` that records its batches, can be held (``gate``) and can fail
    every piece with ``fail`` (an errno)."""

    def __init__(self, fd: int, depth: int) -> None:
        self.inner = PwriteWriter(fd, depth)
        self.depth = depth
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail: int | None = None

    def write(self, pieces: list[Piece]) -> list[int]:
        self.batches.append(len(pieces))
        self.entered.set()
        assert self.gate.wait(30)
        if self.fail is not None:
            return [-self.fail] * len(pieces)
        return self.inner.write(pieces)

    def close(self) -> None:
        pass


def recording(
    kind: type[ScriptedWriter] = ScriptedWriter, *, held: bool = False, fail: int | None = None
) -> tuple[list[ScriptedWriter], Callable[[int, int], ScriptedWriter]]:
    """A writer factory for ``CaptureWriter(writer=...)`` and the list of the writers it made."""
    made: list[ScriptedWriter] = []

    def factory(fd: int, depth: int) -> ScriptedWriter:
        writer = kind(fd, depth)
        if held:
            writer.gate.clear()
        writer.fail = fail
        made.append(writer)
        return writer

    return made, factory


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Callable[..., ScriptedWriter]:
    """Every capture writer made from now on writes through one ``ScriptedWriter`` (returned by the
    fixture's function once the writer's thread has made it); ``slots`` sets their pool size."""
    made: list[ScriptedWriter] = []
    settings = {"slots": 256}
    template = ScriptedWriter(-1, 1)  # scripted before the thread makes the real one

    def factory(fd: int, depth: int) -> ScriptedWriter:
        writer = ScriptedWriter(fd, depth)
        writer.gate = template.gate
        writer.fail = template.fail
        made.append(writer)
        return writer

    class Scripted(CaptureWriter):
        def __init__(self, fd: int, window: int, slots: int = 256, **kwargs: object) -> None:
            super().__init__(fd, window, settings["slots"], gather=0.0, writer=factory)

    monkeypatch.setattr(block_copy, "CaptureWriter", Scripted)

    def get(slots: int | None = None) -> ScriptedWriter:
        if slots is not None:
            settings["slots"] = slots
        return made[-1] if made else template

    return get


# --- the batch writers ------------------------------------------------------------------------------


def pieces_of(buffer: bytearray, count: int, seed: int) -> list[Piece]:
    rng = random.Random(seed)
    base = buffer_address(buffer)
    pieces = []
    for index in range(count):
        start = index * 4096
        pieces.append((base + start, rng.randrange(1, 4097), rng.randrange(0, 1 << 20)))
    return pieces


@pytest.mark.skipif(platform.machine() not in batch_write._SYSCALLS, reason="no AIO system call numbers here")
def test_kernel_aio_and_pwrite_write_the_same_file(tmp_path: Path) -> None:
    buffer = bytearray(random.Random(1).randbytes(16 * 4096))
    pinned = memoryview(buffer)
    pieces = pieces_of(buffer, 16, seed=2)
    files = []
    for name, make in (("aio", batch_writer), ("pwrite", PwriteWriter)):
        fd = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT, 0o600)
        writer = make(fd, 16)
        if name == "aio":
            assert isinstance(writer, AioWriter)  # the kernel gives an AIO context here
        assert writer.write(pieces) == [length for _, length, _ in pieces]
        writer.close()
        os.close(fd)
        files.append((tmp_path / name).read_bytes())
    assert files[0] == files[1] and files[0] != b""
    pinned.release()


@pytest.mark.skipif(platform.machine() not in batch_write._SYSCALLS, reason="no AIO system call numbers here")
def test_kernel_aio_reports_each_failed_piece(tmp_path: Path) -> None:
    (tmp_path / "ro").write_bytes(b"x")
    fd = os.open(tmp_path / "ro", os.O_RDONLY)
    try:
        writer = batch_writer(fd, 4)
        buffer = bytearray(8192)
        results = writer.write([(buffer_address(buffer), 4096, 0), (buffer_address(buffer) + 4096, 4096, 4096)])
        writer.close()
    finally:
        os.close(fd)
    assert results == [-errno.EBADF, -errno.EBADF]


def test_without_kernel_aio_the_writer_falls_back_to_pwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        monkeypatch.setattr(batch_write, "_SYSCALLS", {})
        assert isinstance(batch_writer(fd, 4), PwriteWriter)  # unknown architecture
        monkeypatch.setattr(batch_write, "_SYSCALLS", {platform.machine(): (206, 207, 208, 209)})

        def refused(*args: object) -> None:
            raise OSError(errno.EAGAIN, "fs.aio-max-nr reached")

        monkeypatch.setattr(AioWriter, "__init__", refused)
        assert isinstance(batch_writer(fd, 4), PwriteWriter)
    finally:
        os.close(fd)


# --- the capture writer -----------------------------------------------------------------------------


@pytest.fixture
async def target_file(tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    path = tmp_path / "target.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 1 << 20)
    yield fd, path
    os.close(fd)


def fill(writer: CaptureWriter, offset: int, data: bytes) -> None:
    slot = writer.take()
    assert slot is not None
    slot.view[: len(data)] = data
    slot.pieces = [(offset, 0, len(data))]
    writer.submit(slot)


def is_hole(path: Path, offset: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) != offset
    except OSError as exc:
        return exc.errno == errno.ENXIO
    finally:
        os.close(fd)


async def test_slots_reach_the_target_and_zero_pieces_stay_holes(target_file: tuple[int, Path]) -> None:
    fd, path = target_file
    writer = CaptureWriter(fd, WINDOW, 8)
    data = random.Random(3).randbytes(WINDOW)
    fill(writer, 0, data)
    fill(writer, 5 * WINDOW, bytes(WINDOW))  # old data that was zeroes: the target reads zeroes already
    await writer.flush()
    assert writer.in_use == 0 and not writer.failed
    assert os.pread(fd, WINDOW, 0) == data
    assert is_hole(path, 5 * WINDOW)
    assert writer.written == WINDOW
    await writer.close()


async def test_the_pool_is_bounded(target_file: tuple[int, Path]) -> None:
    writer = CaptureWriter(target_file[0], WINDOW, 3)
    taken = [writer.take() for _ in range(3)]
    assert all(slot is not None for slot in taken)
    assert writer.take() is None  # the caller copies inline
    writer.give_back(taken[0])  # type: ignore[arg-type]
    assert writer.take() is taken[0]
    await writer.close()


async def test_a_batch_takes_all_that_queued_while_the_thread_was_writing(target_file: tuple[int, Path]) -> None:
    fd, _ = target_file
    made, factory = recording(held=True)
    writer = CaptureWriter(fd, WINDOW, 16, gather=0.0, writer=factory)
    fill(writer, 0, b"a" * WINDOW)
    while not made:  # the thread makes its writer when the first slot comes
        await asyncio.sleep(0.001)
    assert await asyncio.to_thread(made[0].entered.wait, 30)
    for index in range(1, 11):
        fill(writer, index * WINDOW, bytes([index]) * WINDOW)
    made[0].gate.set()
    await writer.drain()
    assert made[0].batches == [1, 10]  # one system call for the ten that queued meanwhile
    assert os.pread(fd, WINDOW, 10 * WINDOW) == bytes([10]) * WINDOW
    await writer.close()


async def test_a_failed_write_is_parked_with_its_data_and_written_by_the_next_flush(
    target_file: tuple[int, Path],
) -> None:
    fd, _ = target_file
    made, factory = recording(fail=errno.ENOSPC)
    writer = CaptureWriter(fd, WINDOW, 2, gather=0.0, writer=factory)
    data = random.Random(4).randbytes(WINDOW)
    fill(writer, WINDOW, data)
    await writer.drain()
    assert writer.failed and writer.in_use == 1  # parked: its slot is not free
    with pytest.raises(OSError) as info:
        await writer.flush()
    assert info.value.errno == errno.ENOSPC
    assert os.pread(fd, WINDOW, WINDOW) == bytes(WINDOW)
    made[0].fail = None  # space again
    await writer.flush()
    assert not writer.failed and writer.in_use == 0
    assert os.pread(fd, WINDOW, WINDOW) == data
    await writer.close()


async def test_close_stops_the_thread_and_refuses_more(target_file: tuple[int, Path]) -> None:
    writer = CaptureWriter(target_file[0], WINDOW, 2)
    fill(writer, 0, b"z" * WINDOW)
    await writer.flush()
    await writer.close()
    assert not [t for t in threading.enumerate() if t.name == "nbd-backup-capture"]
    assert writer.take() is None  # the pool is released: a guest copy after the end goes inline
    with pytest.raises(RuntimeError):
        fill_slot = Slot(WINDOW)
        fill_slot.pieces = [(0, 0, 1)]
        writer.submit(fill_slot)


# --- the copier and the filter ----------------------------------------------------------------------


@dataclass
class Rig:
    node: BlockNode
    copier: BlockCopier
    target_fd: int
    snapshot: bytes


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    size = 16 * WINDOW
    data = random.Random(5).randbytes(size)
    (tmp_path / "source.img").write_bytes(data)
    source = await RawFileDevice.open(tmp_path / "source.img")
    target = await RawFileDevice.create(tmp_path / "target.img", size)
    node = BlockNode("src", source)
    copier = BlockCopier(
        node,
        target,
        size=size,
        cluster_size=GRANULE,
        zero_unit=65536,
        target_zero_init=True,
        capture_window=WINDOW,
    )
    node.insert_filter(lambda below: CopyBeforeWriteFilter(below, copier))
    fd = target.direct_write_fd()
    assert fd is not None
    yield Rig(node, copier, fd, data)
    await copier.close()
    await node.close()
    await target.close()


def granules_copied(rig: Rig) -> set[int]:
    return {g for g in range(rig.copier.clusters) if not rig.copier.bitmap[g]}


async def test_a_guest_write_waits_for_the_read_of_the_old_data_only(
    rig: Rig, scripted: Callable[..., ScriptedWriter]
) -> None:
    scripted().gate.clear()  # the target write of the captured data is held
    await asyncio.wait_for(rig.node.pwrite(WINDOW + 5 * GRANULE + 100, b"new"), 10)  # completes anyway
    assert granules_copied(rig) == set(range(8, 16))  # its whole window is copied as far as anyone can see
    assert os.pread(rig.target_fd, WINDOW, WINDOW) == bytes(WINDOW)  # not on the target yet
    scripted().gate.set()
    await rig.copier.flush_captured()
    assert os.pread(rig.target_fd, WINDOW, WINDOW) == rig.snapshot[WINDOW : 2 * WINDOW]  # the old data
    assert rig.copier.copied_bytes == WINDOW


async def test_a_window_partly_copied_captures_only_what_is_left(
    rig: Rig, scripted: Callable[..., ScriptedWriter]
) -> None:
    await rig.node.pwrite(3 * GRANULE, b"first")  # window 0, whole
    await rig.copier.flush_captured()
    rig.copier.bitmap.clear(8 + 2, 8 + 4)  # as if the job had copied granules 10-11 of window 1
    os.pwrite(rig.target_fd, rig.snapshot[10 * GRANULE : 12 * GRANULE], 10 * GRANULE)
    await rig.node.pwrite(8 * GRANULE, b"second")
    await rig.copier.flush_captured()
    assert scripted().batches[-1] == 2  # granules 8-9 and 12-15: two pieces, the copied ones left out
    assert os.pread(rig.target_fd, 2 * WINDOW, 0)[: 2 * WINDOW] == rig.snapshot[: 2 * WINDOW]
    assert rig.copier.copied_bytes == 2 * WINDOW - 2 * GRANULE


async def test_with_every_slot_being_written_a_guest_write_waits_for_one(
    rig: Rig, scripted: Callable[..., ScriptedWriter]
) -> None:
    scripted(slots=1).gate.clear()
    await rig.node.pwrite(0, b"a")  # takes the only slot, whose write is held
    waiting = asyncio.create_task(rig.node.pwrite(4 * WINDOW, b"b"))
    for _ in range(100):
        await asyncio.sleep(0)
    assert not waiting.done()  # no inline write queued behind the writer's on the target's lock
    await asyncio.wait_for(rig.node.pwrite(100, b"c"), 10)  # a window already copied: never waits
    scripted().gate.set()
    await asyncio.wait_for(waiting, 10)
    await rig.copier.flush_captured()
    assert os.pread(rig.target_fd, WINDOW, 0) == rig.snapshot[:WINDOW]
    assert os.pread(rig.target_fd, WINDOW, 4 * WINDOW) == rig.snapshot[4 * WINDOW : 5 * WINDOW]


async def test_with_every_slot_parked_the_guest_copies_inline(
    rig: Rig, scripted: Callable[..., ScriptedWriter]
) -> None:
    scripted(slots=1).fail = errno.ENOSPC
    await rig.node.pwrite(0, b"a")  # takes the only slot; its write fails and it is parked
    await rig.copier._capture.drain()  # type: ignore[union-attr]
    assert rig.copier.capture_failed
    await asyncio.wait_for(rig.node.pwrite(4 * WINDOW, b"b"), 10)  # nothing will free a slot: inline
    assert os.pread(rig.target_fd, GRANULE, 4 * WINDOW) == rig.snapshot[4 * WINDOW : 4 * WINDOW + GRANULE]
    assert granules_copied(rig) == set(range(8)) | {32}  # the inline copy takes the guest's granule only
    scripted().fail = None
    await rig.copier.flush_captured()
    assert os.pread(rig.target_fd, WINDOW, 0) == rig.snapshot[:WINDOW]


# --- the job ----------------------------------------------------------------------------------------


def test_the_capture_window_is_none_for_fleecing_and_within_the_cluster() -> None:
    assert capture_window(4096, 65536, BackupOptions(sync="full")) == 32768
    assert capture_window(4096, 16384, BackupOptions(sync="full")) == 16384  # never past the cluster
    assert capture_window(65536, 65536, BackupOptions(sync="full")) == 65536  # at least a granule
    assert capture_window(65536, 65536, BackupOptions(sync="none")) == 0  # its target is read meanwhile


async def job_rig(tmp_path: Path, **options: object) -> tuple[BlockNode, RawFileDevice, BackupJob, bytes]:
    size = 64 * WINDOW
    data = random.Random(6).randbytes(size)
    (tmp_path / "source.img").write_bytes(data)
    source = await RawFileDevice.open(tmp_path / "source.img")
    target = await RawFileDevice.create(tmp_path / "target.img", size)
    node = BlockNode("src", source)
    job = BackupJob("j", node, target, BackupOptions(**options), events=EventBus(), target_zero_init=True)  # type: ignore[arg-type]
    await job.attach()
    return node, target, job, data


async def test_a_backup_keeps_its_point_in_time_while_guests_write_through_captures(tmp_path: Path) -> None:
    node, target, job, snapshot = await job_rig(tmp_path, speed=1 << 20)
    rng = random.Random(7)
    try:
        job.start()
        for _ in range(300):  # aligned, unaligned and crossing writes, zeroes and trims, while the job runs
            offset = rng.randrange(0, node.size - 9000)
            kind = rng.randrange(4)
            if kind == 0:
                await node.pwrite(offset, rng.randbytes(rng.randrange(1, 9000)))
            elif kind == 1:
                await node.pwrite(offset & ~4095, rng.randbytes(4096))
            elif kind == 2:
                await node.zero(offset, rng.randrange(1, 9000))
            else:
                await node.trim(offset & ~4095, 8192)
        job.set_speed(0)
        await asyncio.wait_for(job.wait(), 60)
        assert job.error is None
        assert job.copier is not None and job.copier._capture is not None and job.copier._capture.written > 0
    finally:
        await node.close()
        await target.close()
    assert (tmp_path / "target.img").read_bytes()[: len(snapshot)] == snapshot


async def test_a_failed_captured_write_stops_the_job_and_the_resumed_job_writes_it(
    tmp_path: Path, scripted: Callable[..., ScriptedWriter]
) -> None:
    scripted().fail = errno.ENOSPC
    node, target, job, snapshot = await job_rig(tmp_path, on_target_error="enospc")
    try:
        await node.pwrite(7 * WINDOW + 10, b"guest")  # captured before the job runs; its write will fail
        job.start()
        for _ in range(10_000):
            if job.status == "paused":
                break
            await asyncio.sleep(0.001)
        assert job.status == "paused" and job.io_status == "nospace"
        scripted().fail = None  # space again
        job.resume()
        await asyncio.wait_for(job.wait(), 60)
        assert job.error is None
    finally:
        await node.close()
        await target.close()
    assert (tmp_path / "target.img").read_bytes()[: len(snapshot)] == snapshot


async def test_a_failed_captured_write_fails_a_job_that_reports(
    tmp_path: Path, scripted: Callable[..., ScriptedWriter]
) -> None:
    scripted().fail = errno.ENOSPC
    node, target, job, _ = await job_rig(tmp_path)
    try:
        await node.pwrite(3 * WINDOW, b"guest")
        job.start()
        await asyncio.wait_for(job.wait(), 60)
        assert job.error is not None and "No space" in job.error
    finally:
        await node.close()
        await target.close()


async def test_a_writer_that_breaks_parks_its_batch_instead_of_passing_it_off(target_file: tuple[int, Path]) -> None:
    fd, _ = target_file

    class Broken(ScriptedWriter):
        def write(self, pieces: list[Piece]) -> list[int]:
            raise ValueError("a bug in the writer")

    _, factory = recording(Broken)
    writer = CaptureWriter(fd, WINDOW, 2, gather=0.0, writer=factory)
    data = random.Random(9).randbytes(WINDOW)
    fill(writer, 0, data)
    with pytest.raises(OSError) as info:
        await writer.flush()
    assert info.value.errno == errno.EIO and writer.failed  # held, never reported as written
    assert os.pread(fd, WINDOW, 0) == bytes(WINDOW)
    await writer.close()


async def test_a_thread_that_died_parks_what_it_held_and_the_next_flush_starts_another(
    target_file: tuple[int, Path],
) -> None:
    fd, _ = target_file

    class DiesOnce(CaptureWriter):
        died = False

        def _next_batch(self, writer: BatchWriter) -> bool:
            if not self.died:
                self.died = True
                raise RuntimeError("a bug in the thread")
            return super()._next_batch(writer)

    writer = DiesOnce(fd, WINDOW, 2, gather=0.0)
    data = random.Random(10).randbytes(WINDOW)
    fill(writer, WINDOW, data)
    await writer.drain()  # returns: the dying thread parked the slot and woke the drainers
    assert writer.failed and writer.error is not None and writer.error.errno == errno.EIO
    await asyncio.wait_for(writer.flush(), 10)  # a new thread writes it: nothing waits on the dead one
    assert not writer.failed and os.pread(fd, WINDOW, WINDOW) == data
    await writer.close()


async def test_a_cancelled_backup_stops_the_writer_with_slots_still_queued(
    tmp_path: Path, scripted: Callable[..., ScriptedWriter]
) -> None:
    scripted().gate.clear()  # the first batch is held inside the writer
    node, target, job, _ = await job_rig(tmp_path, speed=1 << 16)
    try:
        job.start()
        await node.pwrite(0, b"first")  # its slot's batch is held
        while not scripted().entered.is_set():
            await asyncio.sleep(0.001)
        for window in range(1, 6):
            await node.pwrite(window * WINDOW, b"more")  # queued behind it
        capture = job.copier._capture if job.copier is not None else None
        assert capture is not None and capture.in_use == 6
        job.cancel(force=True)
        for _ in range(200):
            await asyncio.sleep(0)
        assert job.status == "aborting"  # the batch in the writer is waited for, never abandoned mid-write
        scripted().gate.set()
        await asyncio.wait_for(job.wait(), 30)
        assert job.status == "null"
        assert not [t for t in threading.enumerate() if t.name == "nbd-backup-capture"]
        assert scripted().batches == [1]  # the queued slots were dropped, not written to a cancelled target
    finally:
        await node.close()
        await target.close()
