"""Space reserved ahead of an image that a writer says is about to grow, by a thread on the other core.

A qcow2 image grows at its end: every fresh cluster is appended. On tmpfs, writing into space the
file does not have yet costs the writer two and a half times as much as writing into allocated
space (29.6 against 11.7 µs per 64 KiB ``pwritev`` on this machine: the kernel allocates and clears
the pages first), and on other file systems it costs block allocation and fragmentation. QEMU's
``preallocate`` filter reserves space past the end for the same reason. Here a writer that knows how
much it is about to write (a backup job: its dirty clusters) announces it (``expect``), and a thread
reserves that space with ``fallocate(FALLOC_FL_KEEP_SIZE)`` in 1 MiB steps, at most 16 MiB ahead of
the image's end, while the event loop writes. The file's size (what readers and ``qemu-img`` see)
only changes by real writes.

- It is an optimisation only: any failure (``EOPNOTSUPP`` on file systems without it, ``ENOSPC``)
  stops it for good, silently; it never reserves when the file system has less than 64 times the
  step free, so it cannot take the last space a real write needs.
- ``close`` stops the thread and gives back what lies past the end of the file; a
  crash leaves that reservation past the end, as QEMU's filter leaves its own.
- Writes into the range being reserved are safe: ``fallocate`` without ``PUNCH`` or ``ZERO`` never
  changes data, and the kernel orders it against writes by the inode lock.

Measured on the incremental of ``bench/bench_incremental.py`` (10 MiB into a fresh qcow2 overlay on
tmpfs): see the README's benchmark section.
"""

from __future__ import annotations

import errno
import logging
import os
import threading

from backup.rawfile import FALLOC_FL_KEEP_SIZE, fallocate

log = logging.getLogger(__name__)

STEP = 1 << 20  # one fallocate: short enough that a write waiting on the inode lock hardly notices
WINDOW = 16 << 20  # reserved at most this far past the image's end
FREE_FACTOR = 64  # reserve a step only with this many times it free on the file system


class Preallocator:
    """Reserves space past a file's end for writes announced by ``expect``; ``grew_to`` (on the loop,
    cheap) follows the end as writes append, and a daemon thread, started on the first need, does
    the ``fallocate`` calls."""

    __slots__ = ("_cond", "_done", "_end", "_failed", "_fd", "_limit", "_stopped", "_thread", "_wanted")

    def __init__(self, fd: int, end: int) -> None:
        self._fd = fd
        self._end = end  # the image uses the file up to here
        self._done = end  # reserved up to here
        self._wanted = end  # the thread reserves up to here
        self._limit = end  # never past here: the end when writes were announced, plus their bytes
        self._failed = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()

    @property
    def reserved_end(self) -> int:
        """How far the reservation reaches now."""
        return self._done

    def expect(self, nbytes: int) -> None:
        """About ``nbytes`` of fresh data are to be appended soon: reserve room for them."""
        if nbytes <= 0 or self._failed or self._stopped:
            return
        self._limit = max(self._limit, self._end + nbytes)
        self._ask()

    def grew_to(self, end: int) -> None:
        """The image now uses the file up to ``end``: reserve further if that came close."""
        self._end = end
        if self._limit > self._wanted and end + WINDOW // 2 > self._wanted:
            self._ask()

    def _ask(self) -> None:
        wanted = min(self._limit, self._end + WINDOW)
        if wanted <= self._wanted or self._failed or self._stopped:
            return
        with self._cond:
            self._wanted = wanted
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="qcow2-preallocate", daemon=True)
                self._thread.start()
            else:
                self._cond.notify()

    def _run(self) -> None:
        fd = self._fd
        while True:
            with self._cond:
                while not self._stopped and max(self._done, self._end) >= self._wanted:
                    self._cond.wait()
                if self._stopped:
                    return
                start = max(self._done, self._end)  # writes may have overtaken it
                length = min(STEP, self._wanted - start)
            try:
                stat = os.fstatvfs(fd)
                if stat.f_bavail * stat.f_frsize < FREE_FACTOR * STEP:
                    raise OSError(errno.ENOSPC, "too little free space to reserve ahead")
                fallocate(fd, FALLOC_FL_KEEP_SIZE, start, length)
            except OSError as exc:
                log.debug("fd %d: no longer reserving space ahead of writes: %s", fd, exc)
                self._failed = True
                return
            with self._cond:
                self._done = start + length

    def stop(self) -> None:
        """Stop the thread and wait for it (at most one ``fallocate`` step): the descriptor may be
        closed after this returns."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def release(self) -> None:
        """Stop, then give back the reservation past the file's end (before ``close``): a truncation to
        the size it has frees the blocks past the end on every file system (ext4 ignores a hole
        punched past the end)."""
        self.stop()
        if self._thread is None:
            return
        end = os.lseek(self._fd, 0, os.SEEK_END)
        if self._done > end:
            try:
                os.ftruncate(self._fd, end)
            except OSError as exc:
                log.warning("fd %d: the space reserved past the end was not given back: %s", self._fd, exc)
