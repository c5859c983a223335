"""RawFileDevice against real files in a tmp dir: holes, zeroing, trimming, the unaligned tail, limits;
and ``backup.images`` refusing a qcow2 image opened as raw."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from backup.errors import ImageFormatError
from backup.images import open_image, probe_format
from backup.rawfile import (
    SLOW_INLINE_WRITE,
    THREADED_AFTER_SLOW,
    THREADED_IO_MIN,
    RawFileDevice,
    voluntary_switches,
)
from nbd.device import BlockDevice, Extent

MiB = 1 << 20


async def test_create_is_sparse_and_rounded(tmp_path: Path) -> None:
    dev = await RawFileDevice.create(tmp_path / "a.raw", 1000)
    assert isinstance(dev, BlockDevice)
    assert dev.size == 1024 and (tmp_path / "a.raw").stat().st_size == 1024
    assert await dev.pread(0, 1024) == bytes(1024)
    assert dev.capabilities.can_multi_conn
    await dev.close()
    with pytest.raises(FileExistsError):
        await RawFileDevice.create(tmp_path / "a.raw", 1000)
    dev = await RawFileDevice.create(tmp_path / "a.raw", 2048, exist_ok=True)
    assert dev.size == 2048
    await dev.close()


async def test_unaligned_file_is_served_like_qemu_nbd(tmp_path: Path) -> None:
    path = tmp_path / "odd.raw"
    path.write_bytes(b"\x01" * 1000)
    dev = await RawFileDevice.open(path)
    assert dev.size == 1024
    assert await dev.pread(512, 512) == b"\x01" * 488 + bytes(24)
    extents = await dev.block_status(0, 1024)
    assert sum(e.length for e in extents) == 1024
    assert extents[-1].is_zero  # the tail past the end of the file reads as zeroes
    await dev.pwrite(1000, b"\x02" * 24)
    assert path.stat().st_size == 1024
    assert await dev.pread(992, 32) == b"\x01" * 8 + b"\x02" * 24
    with pytest.raises(OSError) as info:
        await dev.pwrite(1020, b"x" * 8)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as info:
        await dev.pread(1020, 8)
    assert info.value.errno == errno.EINVAL
    await dev.close()


async def test_block_status_holes_and_data(tmp_path: Path) -> None:
    dev = await RawFileDevice.create(tmp_path / "s.raw", 4 * MiB)
    await dev.pwrite(MiB, b"\xaa" * 65536)
    extents = await dev.block_status(0, 4 * MiB)
    assert sum(e.length for e in extents) == 4 * MiB
    data = [e for e in extents if not e.is_hole]
    assert data and all(not e.is_zero for e in data)
    # The data extent covers what was written (file systems may allocate more around it).
    pos = 0
    for extent in extents:
        if not extent.is_hole:
            assert pos <= MiB and pos + extent.length >= MiB + 65536
        pos += extent.length
    assert extents[0] == Extent(extents[0].length, 3) and extents[0].length <= MiB
    # A range inside the hole.
    assert await dev.block_status(3 * MiB, 4096) == [Extent(4096, 3)]
    await dev.close()


async def test_zero_trim_and_fast_zero(tmp_path: Path) -> None:
    dev = await RawFileDevice.create(tmp_path / "z.raw", 2 * MiB)
    await dev.pwrite(0, b"\xff" * (2 * MiB))
    await dev.zero(0, 65536, may_trim=True)
    assert await dev.pread(0, 65536) == bytes(65536)
    assert (await dev.block_status(0, 65536))[0].is_zero  # punched
    await dev.zero(65536, 65536, fua=True)  # NO_HOLE: reads as zeroes, stays allocated
    assert await dev.pread(65536, 65536) == bytes(65536)
    await dev.zero(4096 * 40, 100, fast=True)  # unaligned: still zeroes the bytes asked
    assert await dev.pread(4096 * 40 - 1, 102) == b"\xff" + bytes(100) + b"\xff"
    await dev.trim(MiB, MiB, fua=True)
    await dev.flush()
    await dev.cache(0, MiB)
    assert await dev.pread(131072, 4) == b"\xff" * 4
    await dev.close()


async def test_read_only_and_closed(tmp_path: Path) -> None:
    path = tmp_path / "r.raw"
    path.write_bytes(bytes(4096))
    dev = await RawFileDevice.open(path, read_only=True)
    assert dev.read_only
    for call in (dev.pwrite(0, b"x"), dev.zero(0, 1), dev.trim(0, 1)):
        with pytest.raises(OSError) as info:
            await call
        assert info.value.errno == errno.EPERM
    await dev.flush()  # nothing to flush, no error
    await dev.close()
    with pytest.raises(OSError) as info:
        await dev.pread(0, 1)
    assert info.value.errno == errno.EBADF
    await dev.close()  # twice is fine


async def test_refuses_directories(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        await RawFileDevice.open(tmp_path)


async def test_images_probe_and_refuse_qcow2_as_raw(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(4096))
    qcow = tmp_path / "d.qcow2"
    qcow.write_bytes(b"QFI\xfb" + bytes(4092))
    assert probe_format(raw) == "raw" and probe_format(qcow) == "qcow2"
    dev = await open_image(raw, read_only=True)
    assert isinstance(dev, RawFileDevice) and dev.size == 4096
    await dev.close()
    dev = await open_image(raw)  # writable and probed: guarded (tests/test_probed_images.py)
    assert isinstance(getattr(dev, "next", None), RawFileDevice) and dev.size == 4096
    await dev.close()
    with pytest.raises(ImageFormatError, match="qcow2 image"):
        await open_image(qcow, format="raw")
    with pytest.raises(ImageFormatError, match="not a qcow2 image"):
        await open_image(raw, format="qcow2")
    with pytest.raises(ImageFormatError, match="unknown image format"):
        await open_image(raw, format="vmdk")
    with pytest.raises(ImageFormatError, match="cannot open"):
        await open_image(tmp_path / "missing.raw")


@pytest.mark.parametrize("length", [4096, THREADED_IO_MIN, THREADED_IO_MIN * 2])
async def test_pread_into_and_large_pwrite(tmp_path: Path, length: int) -> None:
    """Reused-buffer reads and large (threaded) writes give the same bytes as the plain verbs."""
    dev = await RawFileDevice.create(tmp_path / "f.img", 3 * length)
    try:
        data = bytes(range(256)) * (length // 256)
        await dev.pwrite(length, data)
        buffer = bytearray(b"\xff" * length)
        await dev.pread_into(length, buffer)
        assert buffer == data == await dev.pread(length, length)
        await dev.pread_into(0, memoryview(buffer))  # a hole reads as zeroes
        assert buffer == bytes(length)
        with pytest.raises(OSError) as exc:
            await dev.pread_into(3 * length - 512, bytearray(1024))
        assert exc.value.errno == errno.EINVAL
    finally:
        await dev.close()


async def test_pread_into_past_the_unaligned_end(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(b"\x07" * 1000)
    dev = await RawFileDevice.open(path)
    try:
        buffer = bytearray(b"\xff" * 1024)
        await dev.pread_into(0, buffer)
        assert buffer == b"\x07" * 1000 + bytes(24)
    finally:
        await dev.close()


async def test_close_waits_for_threaded_io_before_freeing_the_descriptor(tmp_path: Path) -> None:
    """A big read queued in the thread pool holds the descriptor *number*: if close() freed it at
    once, a file opened meanwhile would get that number and the read would return its bytes."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(1)
    loop.set_default_executor(pool)
    gate = threading.Event()
    blocker = loop.run_in_executor(None, gate.wait, 30)  # the only worker is busy: the read queues
    path = tmp_path / "t.raw"
    path.write_bytes(b"r" * THREADED_IO_MIN)
    dev = await RawFileDevice.open(path)
    read = asyncio.ensure_future(dev.pread(0, THREADED_IO_MIN))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(dev.close())
    await asyncio.sleep(0)
    fd = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"o" * THREADED_IO_MIN)
        gate.set()
        await asyncio.wait_for(blocker, 30)
        assert await asyncio.wait_for(read, 30) == b"r" * THREADED_IO_MIN  # not the other file's bytes
        await asyncio.wait_for(closing, 30)
    finally:
        gate.set()
        os.close(fd)


async def test_close_waits_for_the_writer_thread_before_freeing_the_descriptor(tmp_path: Path) -> None:
    """Large writes after a slow one go to the device's own writer thread: one queued there also holds
    the descriptor number, so close() waits for it too, and then stops the thread."""
    dev = await RawFileDevice.create(tmp_path / "t.raw", 4 * THREADED_IO_MIN)
    dev._threaded_writes_left = THREADED_AFTER_SLOW  # as after a slow inline write
    gate = threading.Event()
    writer = dev._writer_thread()
    blocker = writer.submit(gate.wait, 30)  # the writer thread is busy: the write queues behind it
    write = asyncio.ensure_future(dev.pwrite(0, b"w" * THREADED_IO_MIN))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(dev.close())
    await asyncio.sleep(0)
    fd = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert not write.done() and not closing.done()
        gate.set()
        await asyncio.wait_for(blocker, 30)
        await asyncio.wait_for(write, 30)
        await asyncio.wait_for(closing, 30)
        assert os.fstat(fd).st_size == 0  # the write did not land in the other file
    finally:
        gate.set()
        os.close(fd)
    assert (tmp_path / "t.raw").read_bytes()[:THREADED_IO_MIN] == b"w" * THREADED_IO_MIN
    assert writer.stopped and dev._writer is None
    with pytest.raises(OSError) as exc:  # no new writer thread for a closed device
        await dev.pwrite(0, b"w" * THREADED_IO_MIN)
    assert exc.value.errno == errno.EBADF


async def test_large_writes_run_one_at_a_time_in_one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent large writes after a slow one are serialised on the device's writer thread (never two
    pwrite calls on the file at once), and every one lands at its offset."""
    active, most, threads = 0, 0, set()
    lock = threading.Lock()
    real_pwrite = os.pwrite

    def counting_pwrite(fd: int, data: bytes, offset: int) -> int:
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
            threads.add(threading.get_ident())
        try:
            return real_pwrite(fd, data, offset)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr("backup.rawfile.os.pwrite", counting_pwrite)
    dev = await RawFileDevice.create(tmp_path / "w.raw", 8 * THREADED_IO_MIN)
    dev._threaded_writes_left = THREADED_AFTER_SLOW  # as after a slow inline write
    try:
        await asyncio.gather(*(dev.pwrite(i * THREADED_IO_MIN, bytes([i + 1]) * THREADED_IO_MIN) for i in range(8)))
    finally:
        await dev.close()
    assert most == 1 and len(threads) == 1 and threading.get_ident() not in threads
    data = (tmp_path / "w.raw").read_bytes()
    assert data == b"".join(bytes([i + 1]) * THREADED_IO_MIN for i in range(8))


async def test_large_writes_run_inline_until_one_is_slow_then_in_the_thread_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fast storage: big writes stay on the loop (a hop to the thread cost more than it overlapped).
    One that took longer than ``SLOW_INLINE_WRITE`` *and slept* would have stalled every other client:
    the next ``THREADED_AFTER_SLOW`` go to the writer thread, then inline is tried again. One that only
    took long (the thread was preempted on a busy machine: no voluntary switch) changes nothing."""
    where: list[bool] = []  # per big write: on the loop's thread?
    real_pwrite = os.pwrite
    stalls: list[str] = []  # how the next writes are slow: "sleeps" or "preempted"
    clock = [0.0]  # the device's clock: only a stalled write moves it (a loaded machine must not)
    switches = [0]  # the thread's voluntary context switches: a write that sleeps adds one

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        where.append(threading.current_thread() is threading.main_thread())
        if stalls:
            clock[0] += SLOW_INLINE_WRITE * 2
            if stalls.pop(0) == "sleeps":
                switches[0] += 1
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr("backup.rawfile.os.pwrite", pwrite)
    monkeypatch.setattr("backup.rawfile.time.perf_counter", lambda: clock[0])
    monkeypatch.setattr("backup.rawfile.voluntary_switches", lambda: switches[0])
    monkeypatch.setattr("backup.rawfile.THREADED_AFTER_SLOW", 3)
    dev = await RawFileDevice.create(tmp_path / "w.raw", 16 * THREADED_IO_MIN)
    try:
        for i in range(3):
            await dev.pwrite(i * THREADED_IO_MIN, bytes([i + 1]) * THREADED_IO_MIN)
        assert where == [True] * 3 and dev._writer is None  # no thread at all while fast
        stalls[:] = ["preempted", "preempted"]
        for i in range(3, 5):
            await dev.pwrite(i * THREADED_IO_MIN, bytes([i + 1]) * THREADED_IO_MIN)
        assert where[3:] == [True, True] and dev._writer is None  # slow, but the storage never made it wait
        stalls[:] = ["sleeps"]
        for i in range(5, 12):
            await dev.pwrite(i * THREADED_IO_MIN, bytes([i + 1]) * THREADED_IO_MIN)
        assert where[5:] == [True, False, False, False, True, True, True]
    finally:
        await dev.close()
    data = (tmp_path / "w.raw").read_bytes()
    assert data[: 12 * THREADED_IO_MIN] == b"".join(bytes([i + 1]) * THREADED_IO_MIN for i in range(12))


async def test_write_behind_sends_every_big_write_to_the_thread_until_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole-device copy asks for ``write_behind``: every big write goes to the writer thread, fast or
    not (small ones stay inline); turned off, big writes are inline again."""
    where: list[tuple[int, bool]] = []  # per write: its length, and whether it ran on the loop's thread
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        where.append((len(data), threading.current_thread() is threading.main_thread()))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr("backup.rawfile.os.pwrite", pwrite)
    dev = await RawFileDevice.create(tmp_path / "w.raw", 8 * THREADED_IO_MIN)
    try:
        dev.write_behind(True)
        await asyncio.gather(*(dev.pwrite(i * THREADED_IO_MIN, bytes([i + 1]) * THREADED_IO_MIN) for i in range(4)))
        await dev.pwrite(4 * THREADED_IO_MIN, b"s" * 4096)
        assert where == [(THREADED_IO_MIN, False)] * 4 + [(4096, True)]
        dev.write_behind(False)
        await dev.pwrite(5 * THREADED_IO_MIN, b"i" * THREADED_IO_MIN)
        assert where[-1] == (THREADED_IO_MIN, True)
    finally:
        await dev.close()
    data = (tmp_path / "w.raw").read_bytes()
    assert data[: 4 * THREADED_IO_MIN] == b"".join(bytes([i + 1]) * THREADED_IO_MIN for i in range(4))
    assert data[4 * THREADED_IO_MIN : 4 * THREADED_IO_MIN + 4096] == b"s" * 4096
    assert data[5 * THREADED_IO_MIN : 6 * THREADED_IO_MIN] == b"i" * THREADED_IO_MIN


def test_a_write_that_sleeps_counts_as_a_voluntary_switch(tmp_path: Path) -> None:
    """The discriminator itself, on the real kernel: waiting (here: a sleep) adds a voluntary switch."""
    before = voluntary_switches()
    time.sleep(0.01)
    assert voluntary_switches() > before


class _FailingSyncOnce:
    """``os.fdatasync`` as Linux behaves after a writeback error: it fails once, then succeeds (the
    dirty pages were marked clean although they never reached the disk)."""

    def __init__(self) -> None:
        self.failures_left = 1
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.failures_left:
            self.failures_left -= 1
            raise OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize("first", ["flush", "pwrite-fua", "zero-fua", "trim-fua"])
async def test_a_failed_fdatasync_latches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: str) -> None:
    dev = await RawFileDevice.create(tmp_path / "t.raw", 1 << 20)
    sync = _FailingSyncOnce()
    monkeypatch.setattr(os, "fdatasync", sync)
    calls = {
        "flush": dev.flush,
        "pwrite-fua": lambda: dev.pwrite(0, b"x" * 512, fua=True),
        "zero-fua": lambda: dev.zero(0, 4096, fua=True),
        "trim-fua": lambda: dev.trim(0, 4096, fua=True),
    }
    with pytest.raises(OSError) as info:
        await calls[first]()
    assert info.value.errno == errno.EIO
    # The kernel would now report success: the device must not.
    for name in ("flush", "pwrite-fua", "zero-fua", "trim-fua", "flush"):
        with pytest.raises(OSError) as info:
            await calls[name]()
        assert info.value.errno == errno.EIO, name
        assert "earlier flush failed" in str(info.value)
    await dev.pwrite(0, b"plain writes still work", fua=False)
    await dev.close()
    # A fresh open is a fresh start (as QEMU reopening the file).
    again = await RawFileDevice.open(tmp_path / "t.raw")
    await again.flush()
    await again.close()
