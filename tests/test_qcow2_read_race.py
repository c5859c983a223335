"""qcow2 reads take no lock: a read that suspends (on its backing file) between mapping the range and
reading the data clusters must never return bytes of a cluster that was freed and reused meanwhile,
nor read through a descriptor number that ``close`` gave back to the system."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import TypeVar

import pytest

from backup.memory import MemoryDevice
from backup.qcow2 import Qcow2Device
from backup.qcow2.check import check_image
from nbd.constants import State
from nbd.device import Extent

CS = 65536
T = TypeVar("T")


class GatedBacking(MemoryDevice):
    """A backing device whose reads wait until the test opens the gate (a slow live source)."""

    def __init__(self, size: int, data: bytes) -> None:
        super().__init__(size, data=data)
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def pread(self, offset: int, length: int) -> bytes:
        if not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()
        return await super().pread(offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()
        return await super().block_status(offset, length)


async def _image(tmp_path: Path, *, compress: bool = False) -> tuple[Qcow2Device, GatedBacking]:
    (tmp_path / "base.raw").write_bytes(b"")
    backing = GatedBacking(8 * CS, b"b" * (8 * CS))
    backing.gate.set()
    dev = await Qcow2Device.create(
        tmp_path / "top.qcow2",
        8 * CS,
        backing_file="base.raw",
        backing_format="raw",
        backing_device=backing,
        compress=compress,
    )
    return dev, backing


async def _start_read(dev: Qcow2Device, backing: GatedBacking, offset: int, length: int) -> asyncio.Task[bytes]:
    """A read that has mapped its range and now waits in the backing file."""
    backing.gate.clear()
    backing.waiting.clear()
    read = asyncio.create_task(dev.pread(offset, length))
    await asyncio.wait_for(backing.waiting.wait(), 10)
    return read


async def _finish_in_reused_descriptor(
    tmp_path: Path, old_fd: int, backing: GatedBacking, task: asyncio.Task[T], contents: bytes
) -> T | None:
    """The image is closed while ``task`` waits in the backing file: let another file (holding
    ``contents``) take the descriptor number, then let the task go on. Its result, or None when it
    failed with EBADF (the other acceptable outcome)."""
    other = tmp_path / "other"
    other.write_bytes(contents)
    fd = os.open(other, os.O_RDONLY)
    try:
        if fd != old_fd:
            pytest.skip("the descriptor number was not reused")
        backing.gate.set()
        try:
            return await asyncio.wait_for(task, 10)
        except OSError as exc:
            assert exc.errno == errno.EBADF
            return None
    finally:
        os.close(fd)
        backing.gate.set()


@pytest.mark.parametrize("free", ["trim", "zero"])
async def test_read_never_returns_a_freed_and_reused_cluster(tmp_path: Path, free: str) -> None:
    """Cluster 1 is allocated (host cluster H), cluster 0 reads from the backing file. A read of both
    waits in the backing file; meanwhile cluster 1 is discarded (H freed) and a one-cluster write of
    cluster 3 takes H. The read may return cluster 1's old data or its new zeroes — never cluster 3's."""
    dev, backing = await _image(tmp_path)
    await dev.pwrite(CS, b"A" * CS)
    read = await _start_read(dev, backing, 0, 2 * CS)
    if free == "trim":
        await dev.trim(CS, CS)
    else:
        await dev.zero(CS, CS, may_trim=True)
    await dev.pwrite(3 * CS, b"X" * CS)  # fits the freed cluster exactly: the allocator reuses it
    backing.gate.set()
    data = await asyncio.wait_for(read, 10)
    assert data[:CS] == b"b" * CS
    assert data[CS:] in (b"A" * CS, bytes(CS))
    assert await dev.pread(3 * CS, CS) == b"X" * CS
    await dev.close()
    assert check_image(str(tmp_path / "top.qcow2")).clean


async def test_read_of_a_compressed_cluster_rewritten_meanwhile(tmp_path: Path) -> None:
    """The same window for a compressed cluster: it is rewritten (its old host cluster freed) and the
    freed cluster is reused by incompressible data before the waiting read decompresses it."""
    dev, backing = await _image(tmp_path, compress=True)
    await dev.pwrite(CS, b"A" * CS)  # compresses to a few bytes, alone in its host cluster
    read = await _start_read(dev, backing, 0, 2 * CS)
    await dev.pwrite(CS, b"B" * CS)  # the new blob is packed after the old one, which is released...
    await dev.trim(CS, CS)  # ...then the new one too: the host cluster is free
    await dev.pwrite(5 * CS, os.urandom(CS))  # incompressible, stored as one plain cluster: reuses it
    backing.gate.set()
    data = await asyncio.wait_for(read, 10)
    assert data[:CS] == b"b" * CS
    assert data[CS:] in (b"A" * CS, b"B" * CS, bytes(CS))
    await dev.close()
    assert check_image(str(tmp_path / "top.qcow2")).clean


async def test_read_racing_close_never_reads_a_reused_descriptor(tmp_path: Path) -> None:
    """A read waits in the backing file while the image is closed and its descriptor number is
    reused by another file: the read must not return that file's bytes."""
    dev, backing = await _image(tmp_path)
    await dev.pwrite(CS, b"A" * CS)
    old_fd = dev._fd
    read = await _start_read(dev, backing, 0, 2 * CS)
    await dev.close()
    data = await _finish_in_reused_descriptor(tmp_path, old_fd, backing, read, b"Z" * (4 * 1024 * 1024))
    assert data in (None, b"b" * CS + b"A" * CS)


async def test_unrelated_reads_and_writes_proceed_while_a_read_waits(tmp_path: Path) -> None:
    """The fix must not serialise I/O behind a slow read: other clusters stay readable and writable
    while a read waits in the backing file (no timing: the gate stays closed throughout)."""
    dev, backing = await _image(tmp_path)
    await dev.pwrite(CS, b"A" * CS)
    await dev.pwrite(4 * CS, b"C" * CS)
    read = await _start_read(dev, backing, 0, 2 * CS)
    await asyncio.wait_for(dev.pwrite(5 * CS, b"D" * CS), 10)
    assert await asyncio.wait_for(dev.pread(4 * CS, 2 * CS), 10) == b"C" * CS + b"D" * CS
    await asyncio.wait_for(dev.trim(4 * CS, CS), 10)
    assert not read.done()
    backing.gate.set()
    assert await asyncio.wait_for(read, 10) == b"b" * CS + b"A" * CS
    await dev.close()
    assert check_image(str(tmp_path / "top.qcow2")).clean


async def test_block_status_racing_close_never_reads_a_reused_descriptor(tmp_path: Path) -> None:
    """Block status walks the L2 tables and waits in the backing file between them. If the image is
    closed meanwhile and its descriptor number reused, the next L2 table must not be loaded from the
    other file: here that file's "entries" read as zero clusters, which would tell a backup to skip
    clusters that hold data."""
    cs = 512  # one L2 table maps 64 clusters: a small range spans two tables
    (tmp_path / "base.raw").write_bytes(b"")
    path = tmp_path / "top.qcow2"
    backing = GatedBacking(128 * cs, b"b" * (128 * cs))
    backing.gate.set()
    dev = await Qcow2Device.create(
        path, 128 * cs, cluster_size=cs, backing_file="base.raw", backing_format="raw", backing_device=backing
    )
    await dev.pwrite(cs, b"A" * cs)  # an L2 table for clusters 0-63, cluster 0 still unallocated
    await dev.pwrite(64 * cs, b"A" * 64 * cs)  # the second table: all data
    await dev.close()
    dev = await Qcow2Device.open(path, read_only=True, backing_device=backing)  # empty L2 cache
    old_fd = dev._fd
    backing.gate.clear()
    backing.waiting.clear()
    status = asyncio.create_task(dev.block_status(0, 128 * cs))
    await asyncio.wait_for(backing.waiting.wait(), 10)
    await dev.close()
    zero_entries = (1).to_bytes(8, "big") * (64 * 1024)  # every "L2 entry" a zero cluster
    extents = await _finish_in_reused_descriptor(tmp_path, old_fd, backing, status, zero_entries)
    pos = 0
    for e in extents or []:
        assert not (pos + e.length > 64 * cs and e.flags & State.ZERO), extents
        pos += e.length
        backing.gate.set()


async def test_cancelled_close_never_frees_the_descriptor_under_a_write(tmp_path: Path) -> None:
    """A write merging a partial cluster holds the lock while it waits in the backing file; a close
    waiting for that lock is cancelled (a caller's timeout). The descriptor must not be closed under
    the write — whose data, L2 and refcount updates would then land in whatever file reuses the
    number — and the image must still end up closed cleanly once the write is done."""
    dev, backing = await _image(tmp_path)
    await dev.pwrite(CS, b"A" * CS)
    backing.gate.clear()
    backing.waiting.clear()
    write = asyncio.create_task(dev.pwrite(2 * CS + 100, b"W" * 100))  # merges cluster 2's backing data
    await asyncio.wait_for(backing.waiting.wait(), 10)
    close = asyncio.create_task(dev.close())
    for _ in range(5):
        await asyncio.sleep(0)
    close.cancel()
    with pytest.raises(asyncio.CancelledError):
        await close
    other = tmp_path / "other"
    fd = os.open(other, os.O_RDWR | os.O_CREAT, 0o600)  # most likely takes the image's number, if freed
    try:
        backing.gate.set()
        await asyncio.wait_for(write, 10)  # the write finishes on the image (nothing asked it to stop)
        await asyncio.wait_for(dev.close(), 10)
        assert os.fstat(fd).st_size == 0, "the image's write went into another file"
    finally:
        os.close(fd)
    check = check_image(str(tmp_path / "top.qcow2"))
    assert check.clean, check
    image = await Qcow2Device.open(tmp_path / "top.qcow2", read_only=True, backing_device=backing)
    try:
        assert await image.pread(2 * CS, CS) == b"b" * 100 + b"W" * 100 + b"b" * (CS - 200)
    finally:
        await image.close()


async def test_fleecing_read_in_the_backing_file_finishes_before_the_write_returns(tmp_path: Path) -> None:
    """The fleecing scheme (``sync=none``): the image is backed by the live source and the
    copy-before-write puts a cluster's old data into it before the guest overwrites the source. A
    read of that cluster that is already in the backing file when the copy lands must finish before
    the copy's write returns — else the guest's write goes down meanwhile and the read, which a
    thread may run late, returns data from after the point in time."""
    dev, backing = await _image(tmp_path)
    old = b"b" * CS
    read = await _start_read(dev, backing, 2 * CS, CS)
    order: list[str] = []

    async def guest_write() -> None:
        await dev.pwrite(2 * CS, old)  # the copy-before-write of cluster 2
        order.append("copied")
        await MemoryDevice.pwrite(backing, 2 * CS, b"G" * CS)  # then the guest's write to the source
        order.append("guest")

    guest = asyncio.create_task(guest_write())
    for _ in range(20):
        await asyncio.sleep(0)
    backing.gate.set()
    assert await asyncio.wait_for(read, 10) == old
    await asyncio.wait_for(guest, 10)
    assert order == ["copied", "guest"]
    assert await dev.pread(2 * CS, CS) == old
    await dev.close()
    assert check_image(str(tmp_path / "top.qcow2")).clean
