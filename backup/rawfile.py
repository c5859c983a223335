"""``RawFileDevice``: a raw image file (or block device) as a ``BlockDevice``.

Reads and writes are inline ``os.pread``/``os.pwrite``: on this machine page-cache hits cost less than
a hop to a thread pool, and the NBD server's per-request tasks keep other clients going. Only large
reads (``THREADED_IO_MIN``, 256 KiB) go to a thread, so a copy overlaps file I/O with network I/O;
64 KiB copy-before-write copies in a thread cost guest IOPS (GIL hand-offs). Large
reads run in the default executor, in parallel. Large writes stay inline while they are fast, and go
to one writer thread per device for a while after one was slow because it had to wait (``SLOW_INLINE_WRITE``,
a voluntary context switch during it: a busy CPU alone does not count): concurrent
``pwrite`` calls on one file only spin and sleep on its inode lock (``rwsem_spin_on_owner`` in the
profile of several writers; one writer copies faster). Holes come
from ``SEEK_DATA``/``SEEK_HOLE``; zeroing and trimming use ``fallocate`` (zero range, punch hole);
flush and FUA are ``fdatasync``, which covers every connection at once — so ``CAN_MULTI_CONN`` holds;
once one failed, every later flush and FUA write fails too (``FlushLatch``: Linux reports a writeback
error only once).

A file whose size is not a multiple of 512 bytes is presented the way qemu-nbd presents it (QEMU
clients count in 512-byte sectors): the size is rounded up, the tail past the end of the file reads as
zeroes, and writing into it extends the file.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import resource
import stat
import time
from collections.abc import Callable
from typing import Any, TypeVar

from backup.fileio import read_full
from backup.io_thread import IoThread
from nbd.align import SECTOR, round_up
from nbd.constants import State
from nbd.device import BlockLimits, Capabilities, Extent, FlushLatch, pread_padded
from nbd.runs import append_run

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = 1 << 20
MAX_EXTENTS = 1024  # per block_status call: the caller asks again for the rest
_T = TypeVar("_T")
_CAPABILITIES = Capabilities(
    can_flush=True,
    can_fua=True,
    can_trim=True,
    can_zero=True,
    can_fast_zero=True,
    can_cache=True,
    can_multi_conn=True,  # one fd, fdatasync flushes what every connection wrote
    can_extents=True,
)
THREADED_IO_MIN = 256 * 1024  # reads and writes this big run in a thread: the loop keeps the socket busy meanwhile
# ... except writes, which run inline while they are fast: a 1 MiB ``pwrite`` into the page cache takes
# ~0.3 ms, and handing it to the writer thread cost more in GIL hand-offs than it overlapped (fio 1 MiB
# sequential writes QD8: 1.9-2.5 GiB/s through the thread, 3.0-4.1 GiB/s inline). One that took longer
# than this (writeback throttling, slow storage) would stall every other client on the loop: the next
# ``THREADED_AFTER_SLOW`` big writes go to the thread, then inline is tried again. Only a write that
# slept counts (a voluntary context switch of this thread during it: the storage or a lock made it wait);
# one that was only preempted, on a machine whose cores are all busy, says nothing about the storage, and
# the thread would only add hand-offs to a loop short of CPU (measured: nbdcopy's four connections into
# an export on tmpfs, 1.13x the throughput and a third less user CPU when such writes stay inline).
# A whole-device copy asks for the opposite (``write_behind``): its loop has nothing to do but receive
# the next request while this one is written, so the thread overlaps the two copies of every payload
# (socket -> buffer, buffer -> page cache) on two cores: ``nbd-backup copy`` of 1 GiB from nbdkit into a
# tmpfs file 0.94 -> 0.66 s, as fast as nbdcopy.
SLOW_INLINE_WRITE = 0.002
THREADED_AFTER_SLOW = 256


def voluntary_switches() -> int:
    """How often this thread has given up the CPU to wait (``ru_nvcsw``): a system call that slept."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


_HOLE = int(State.HOLE | State.ZERO)

# The process's own symbols include libc's: ``find_library`` would run ``ldconfig -p`` (a fork) at
# every start-up of the CLI and the daemon.
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate64 if hasattr(_libc, "fallocate64") else _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENODEV)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (``os.posix_fallocate`` has none); raises OSError."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class RawFileDevice:
    """A file as an array of bytes; see the module docstring for the conventions."""

    def __init__(self, path: str, fd: int, *, read_only: bool, is_block: bool) -> None:
        self.path = path
        self._fd = fd
        self._read_only = read_only
        self._is_block = is_block
        file_size = self._file_size()
        self._size = round_up(file_size, SECTOR)
        self._seek_works = not is_block
        # Block status must stay cheap: on tmpfs SEEK_HOLE walks every page up to the next hole.
        # A file with no hole at all reports data without any syscall until a hole may appear
        # (trim/zero), and the last data run found is remembered (writes never turn data into holes).
        self._may_have_holes = self._seek_works and (file_size != self._size or self._find_hole(0) < file_size)
        self._data_run = (0, 0)
        self._threaded: set[asyncio.Future[Any]] = set()  # I/O running in threads, holding ``_fd``
        self._writer: IoThread | None = None  # large writes, one at a time (created on first use)
        self._threaded_writes_left = 0  # after a slow inline write: big writes to go to the writer thread
        self._writes_queued = 0  # big writes in the writer thread now: the next big one queues behind them
        self._write_behind = False  # every big write to the writer thread (a whole-device copy asked)
        self._flush_latch = FlushLatch(path)

    # --- opening -----------------------------------------------------------------------------------

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, read_only: bool = False) -> RawFileDevice:
        path = os.fspath(path)
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise OSError(errno.EINVAL, f"'{path}' is neither a regular file nor a block device")
            return cls(path, fd, read_only=read_only, is_block=stat.S_ISBLK(mode))
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    async def create(cls, path: str | os.PathLike[str], size: int, *, exist_ok: bool = False) -> RawFileDevice:
        """Create a sparse, all-zero file of ``size`` rounded up to 512 bytes and open it.

        With ``exist_ok`` an existing file is emptied and resized (like ``qemu-img create``)."""
        if size < 0:
            raise OSError(errno.EINVAL, "negative size")
        path = os.fspath(path)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if exist_ok else os.O_EXCL)
        fd = os.open(path, flags, 0o644)
        try:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, round_up(size, SECTOR))
            return cls(path, fd, read_only=False, is_block=False)
        except BaseException:
            os.close(fd)
            raise

    def refresh_size(self) -> None:
        """Take the file's size again: ``blockdev-create`` wrote an image format into the file this
        node has open (QEMU's file node asks the OS each time; ours caches it)."""
        self._size = round_up(self._file_size(), SECTOR)
        self._holes_may_appear()

    def _find_hole(self, pos: int) -> int:
        try:
            return os.lseek(self._fd, pos, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED and exc.errno != errno.ENXIO:
                raise
            self._seek_works = exc.errno == errno.ENXIO
            return self._file_size()

    def _holes_may_appear(self) -> None:
        self._may_have_holes = self._seek_works
        self._data_run = (0, 0)

    def _file_size(self) -> int:
        if self._is_block:
            return os.lseek(self._fd, 0, os.SEEK_END)
        return os.fstat(self._fd).st_size

    # --- properties --------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def capabilities(self) -> Capabilities:
        return _CAPABILITIES  # asked at every copy: one frozen instance, not a new one each time

    @property
    def block_limits(self) -> BlockLimits:
        return BlockLimits()

    def __repr__(self) -> str:
        return f"RawFileDevice({self.path!r}, size={self._size}, read_only={self._read_only})"

    # --- checks ------------------------------------------------------------------------------------

    def _check_read(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise OSError(errno.EINVAL, f"read of {length} bytes at {offset} is beyond the end ({self._size})")

    def _check_write(self, offset: int, length: int) -> None:
        if self._read_only:
            raise OSError(errno.EPERM, f"'{self.path}' is open read-only")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise OSError(errno.ENOSPC, f"write of {length} bytes at {offset} is beyond the end ({self._size})")

    # --- verbs -------------------------------------------------------------------------------------

    def direct_read_fd(self) -> int | None:
        """A file descriptor whose bytes are this device's (past its end: zeroes), for zero-copy
        ``sendfile`` reads by the NBD server; None once closed."""
        return self._fd if self._fd >= 0 else None

    def direct_write_fd(self) -> int | None:
        """A file descriptor that a plain ``os.pwrite`` inside this device's size may write through
        (the copy-before-write fast path copies a cluster without a coroutine per layer); None when
        read-only or closed."""
        return self._fd if self._fd >= 0 and not self._read_only else None

    async def pread(self, offset: int, length: int) -> bytes:
        self._check_read(offset, length)
        if length >= THREADED_IO_MIN:
            data = await self._in_thread(os.pread, self._fd, length, offset)
        else:
            data = os.pread(self._fd, length, offset)
        if len(data) < length:
            # Past the end of the file (the unaligned tail, or a file shrunk under us): zeroes.
            data += pread_padded(self._fd, offset + len(data), length - len(data))
        return data

    async def pread_into(self, offset: int, buffer: bytearray | memoryview) -> None:
        """Read ``len(buffer)`` bytes into the caller's reused buffer (``nbd-backup copy``): a fresh
        1 MiB ``bytes`` per read costs an mmap and 256 page faults; a reused buffer costs neither."""
        length = len(buffer)
        self._check_read(offset, length)
        if length >= THREADED_IO_MIN:
            got = await self._in_thread(os.preadv, self._fd, [buffer], offset)
        else:
            got = os.preadv(self._fd, [buffer], offset)
        if got < length:
            read_full(self._fd, memoryview(buffer).cast("B"), offset, got)  # past the end of the file: zeroes

    def write_behind(self, enabled: bool) -> None:
        """While ``enabled``, every big write goes to the writer thread (see ``SLOW_INLINE_WRITE``):
        for a whole-device copy, never for a served export, whose clients keep both cores busy."""
        self._write_behind = enabled

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        length = len(data)
        self._check_write(offset, length)
        if fua:
            self._flush_latch.check()
        if length >= THREADED_IO_MIN and (self._write_behind or self._threaded_writes_left or self._writes_queued):
            # A copy that asked for it, or storage that was slow: the loop goes on meanwhile. The writer
            # thread finishes every queued write before close() frees the descriptor.
            self._threaded_writes_left = max(0, self._threaded_writes_left - 1)
            self._writes_queued += 1
            try:
                written = await self._writer_thread().submit(os.pwrite, self._fd, data, offset)
            finally:
                self._writes_queued -= 1
        elif length >= THREADED_IO_MIN:
            started, waits = time.perf_counter(), voluntary_switches()
            written = os.pwrite(self._fd, data, offset)
            if time.perf_counter() - started > SLOW_INLINE_WRITE and voluntary_switches() != waits:
                self._threaded_writes_left = THREADED_AFTER_SLOW
        else:
            written = os.pwrite(self._fd, data, offset)
        if written < length:
            view = memoryview(data)
            while written < length:
                n = os.pwrite(self._fd, view[written:], offset + written)
                if n <= 0:
                    raise OSError(errno.EIO, "short write")
                written += n
        if fua:
            self._datasync()

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        self._check_write(offset, length)
        if fua:
            self._flush_latch.check()
        if length == 0:
            return
        self._holes_may_appear()
        done = False
        if may_trim:
            done = self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        if not done:
            done = self._try_fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        # tmpfs and others: punch a hole, then allocate it again (NO_HOLE wants it provisioned).
        if (
            not done
            and not self._is_block
            and self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        ):
            self._try_fallocate(FALLOC_FL_KEEP_SIZE, offset, length)
            done = True
        if not done:
            if fast:
                raise OSError(errno.ENOTSUP, "zeroing would not be faster than writing zeroes")
            self._write_zeroes(offset, length)
        if fua:
            self._datasync()

    def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        try:
            fallocate(self._fd, mode, offset, length)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                return False
            raise
        return True

    def _write_zeroes(self, offset: int, length: int) -> None:
        zeroes = bytes(min(length, _ZERO_CHUNK))
        view = memoryview(zeroes)
        end = offset + length
        while offset < end:
            n = os.pwrite(self._fd, view[: min(len(zeroes), end - offset)], offset)
            offset += n

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check_write(offset, length)
        if fua:
            self._flush_latch.check()
        if length:
            # Advisory: a file system that cannot punch holes simply keeps the data.
            self._holes_may_appear()
            self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        if fua:
            self._datasync()

    async def flush(self) -> None:
        if not self._read_only:
            self._datasync()

    def _datasync(self) -> None:
        """``fdatasync``, latched: once it failed, it fails for good (see ``FlushLatch``)."""
        self._flush_latch.check()
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._flush_latch.failed(exc)
            raise

    async def cache(self, offset: int, length: int) -> None:
        self._check_read(offset, length)
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    async def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int]]:
        """One layer holding every byte, holes included (what ``qemu-nbd -A`` says of a raw file)."""
        self._check_read(offset, length)
        return [(length, 1)] if length else []

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check_read(offset, length)
        if length == 0:
            return []
        if not self._may_have_holes:
            return [Extent(length, 0)]
        start, end = self._data_run
        if start <= offset < end:
            return [Extent(min(length, end - offset), 0)]
        try:
            return self._extents(offset, offset + length)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            self._seek_works = self._may_have_holes = False  # no SEEK_DATA here: everything is data
            return [Extent(length, 0)]

    def _extents(self, pos: int, end: int) -> list[Extent]:
        fd = self._fd
        runs: list[tuple[int, int]] = []
        while pos < end and len(runs) < MAX_EXTENTS:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = end  # no data after pos: a hole up to the end (the unaligned tail included)
            if data > pos:
                run_end = min(data, end)
                flags = _HOLE
            else:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
                self._data_run = (pos, hole)
                run_end = min(hole, end)
                flags = 0
            append_run(runs, run_end - pos, flags)
            pos = run_end
        return [Extent(length, flags) for length, flags in runs]

    def _writer_thread(self) -> IoThread:
        if self._fd < 0:
            raise OSError(errno.EBADF, f"'{self.path}' is closed")
        if self._writer is None:
            self._writer = IoThread("rawfile-writer")
        return self._writer

    def _in_thread(self, func: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run a syscall on ``_fd`` in the loop's default executor, remembered until it is done."""
        future = asyncio.get_running_loop().run_in_executor(None, func, *args)
        self._threaded.add(future)
        future.add_done_callback(self._threaded.discard)
        return future

    async def close(self) -> None:
        fd, self._fd = self._fd, -1
        writer, self._writer = self._writer, None
        if fd >= 0 and (self._threaded or writer is not None):
            # A thread may still be queued with the descriptor number: freeing it now would let the
            # next open() reuse it and receive that thread's write. Shielded, so a cancelled close
            # still closes, once the threads are done.
            await asyncio.shield(self._close_after(fd, set(self._threaded), writer))
        elif fd >= 0:
            os.close(fd)

    @staticmethod
    async def _close_after(fd: int, pending: set[asyncio.Future[Any]], writer: IoThread | None) -> None:
        try:
            if pending:
                await asyncio.wait(pending)
            if writer is not None:
                await writer.stop()  # every write queued before this close has run
        finally:
            os.close(fd)
