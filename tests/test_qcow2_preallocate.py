"""Space reserved past a growing qcow2 image (``backup/qcow2/preallocate.py``): reserved while a
writer streams in, given back at close, never in the way of the data or of a failing file system."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from pathlib import Path

import pytest

import backup.qcow2.preallocate as preallocate
from backup.qcow2 import Qcow2Device
from backup.qcow2.check import check_image
from backup.qcow2.preallocate import STEP, WINDOW, Preallocator
from backup.rawfile import FALLOC_FL_KEEP_SIZE, fallocate

MiB = 1 << 20
CLUSTER = 64 << 10


def keeps_size_supported(directory: Path) -> bool:
    """Whether this file system reserves space past the end (tmpfs, ext4, xfs, btrfs do)."""
    probe = directory / "probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, STEP)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def wait_reserved(prealloc: Preallocator, end: int) -> None:
    """Wait (bounded) until the thread has reserved up to ``end``; the reservation is asynchronous."""
    deadline = time.monotonic() + 30
    while prealloc.reserved_end < end and time.monotonic() < deadline:
        time.sleep(0.001)


def test_reserves_what_was_announced_within_the_window(tmp_path: Path) -> None:
    path = tmp_path / "file"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"x" * CLUSTER, 0)
        prealloc = Preallocator(fd, CLUSTER)
        if not keeps_size_supported(tmp_path):  # such a file system: it gives up at once, quietly
            prealloc.expect(40 * MiB)
            prealloc.release()
            assert prealloc.reserved_end == CLUSTER and os.fstat(fd).st_size == CLUSTER
            return
        prealloc.expect(40 * MiB)
        wait_reserved(prealloc, CLUSTER + WINDOW)
        assert prealloc.reserved_end == CLUSTER + WINDOW  # a window ahead, not all 40 MiB at once
        assert os.fstat(fd).st_size == CLUSTER  # the size readers see is untouched
        assert allocated(path) >= WINDOW
        prealloc.grew_to(CLUSTER + 20 * MiB)  # the writer caught up: the window moves on
        wait_reserved(prealloc, CLUSTER + 36 * MiB)
        assert prealloc.reserved_end == CLUSTER + 36 * MiB
        prealloc.grew_to(CLUSTER + 39 * MiB)
        wait_reserved(prealloc, CLUSTER + 40 * MiB)
        assert prealloc.reserved_end == CLUSTER + 40 * MiB  # never past what was announced
        prealloc.release()
        assert os.fstat(fd).st_size == CLUSTER
        assert allocated(path) < CLUSTER + STEP  # the reservation past the end is given back
        assert os.pread(fd, CLUSTER, 0) == b"x" * CLUSTER
    finally:
        os.close(fd)


def test_nothing_is_reserved_unless_announced(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        prealloc = Preallocator(fd, 0)
        prealloc.grew_to(8 * MiB)
        prealloc.release()
        assert prealloc.reserved_end == 0
        assert not any(t.name == "qcow2-preallocate" and t.is_alive() for t in threading.enumerate())
    finally:
        os.close(fd)


async def streamed_image(path: Path, clusters: int, seed: int) -> tuple[Qcow2Device, dict[int, bytes]]:
    """A new image into which ``clusters`` random clusters were written after announcing them."""
    dev = await Qcow2Device.create(path, 1 << 30)
    dev.expect_writes(clusters * CLUSTER)
    rnd = random.Random(seed)
    written = {c: rnd.randbytes(CLUSTER) for c in rnd.sample(range((1 << 30) // CLUSTER), clusters)}
    items = sorted(written.items())
    for i in range(0, len(items), 16):  # as a backup job writes: batches of scattered clusters
        await dev.pwrite_many([(c * CLUSTER, data) for c, data in items[i : i + 16]])
    return dev, written


async def test_a_backup_stream_into_qcow2_lands_and_closes_clean(tmp_path: Path) -> None:
    path = tmp_path / "inc.qcow2"
    dev, written = await streamed_image(path, 200, seed=1)
    assert dev._prealloc is not None
    assert dev._prealloc._thread is not None  # it was reserving meanwhile
    await dev.close()
    assert allocated(path) <= os.stat(path).st_size + STEP  # nothing reserved is left past the end
    check = await asyncio.create_subprocess_exec("qemu-img", "check", "-f", "qcow2", str(path))
    assert await check.wait() == 0
    result = check_image(str(path))
    assert result.clean and not result.dirty, (result.corruptions, result.leaks)
    dev = await Qcow2Device.open(path, read_only=True)
    try:
        for c, data in written.items():
            assert await dev.pread(c * CLUSTER, CLUSTER) == data
    finally:
        await dev.close()


async def test_a_failing_reservation_stops_silently_and_writes_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(preallocate, "fallocate", unsupported)
    path = tmp_path / "inc.qcow2"
    dev, written = await streamed_image(path, 64, seed=2)
    assert dev._prealloc is not None
    assert dev._prealloc.reserved_end == (dev._prealloc._limit - 64 * CLUSTER)  # nothing reserved
    await dev.close()
    dev = await Qcow2Device.open(path, read_only=True)
    try:
        for c, data in written.items():
            assert await dev.pread(c * CLUSTER, CLUSTER) == data
    finally:
        await dev.close()


async def test_no_reservation_on_a_nearly_full_file_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fstatvfs

    class NearlyFull:
        def __init__(self, fd: int) -> None:
            stat = real(fd)
            self.f_frsize = stat.f_frsize
            self.f_bavail = preallocate.FREE_FACTOR * STEP // stat.f_frsize - 1

    monkeypatch.setattr(preallocate.os, "fstatvfs", NearlyFull)
    path = tmp_path / "inc.qcow2"
    dev, _ = await streamed_image(path, 32, seed=3)
    assert dev._prealloc is not None
    end = os.fstat(dev._fd).st_size
    await dev.close()
    assert allocated(path) <= end + STEP


async def test_abandon_stops_the_thread_before_the_descriptor_closes(tmp_path: Path) -> None:
    dev, _ = await streamed_image(tmp_path / "inc.qcow2", 16, seed=4)
    assert dev._prealloc is not None
    dev.expect_writes(64 * MiB)
    dev.abandon()
    assert dev._prealloc._thread is None or not dev._prealloc._thread.is_alive()


async def test_a_compressing_or_read_only_image_reserves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    dev = await Qcow2Device.create(path, 1 << 30)
    await dev.close()
    ro = await Qcow2Device.open(path, read_only=True)
    assert ro._prealloc is None
    ro.expect_writes(MiB)
    await ro.close()
    rw = await Qcow2Device.open(path, compress=True)
    rw.expect_writes(64 * MiB)
    assert rw._prealloc is not None and rw._prealloc._thread is None
    await rw.close()
