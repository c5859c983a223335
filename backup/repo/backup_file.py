"""Backing up a raw file (or block device) into a snapshot: worker threads read chunks straight from the file.

A full backup of a file needs none of a block device's generality (requests of any size, partial chunks
merged with the parent, reads of what was written): every chunk is read whole, once. So, like a restore
(``restore``), worker threads take chunk indexes in order and each does the whole journey — ``preadv``
into a buffer of its own (reused: no fresh memory, no page faults), SHA-256, the dedup check, zstd or raw
blocks (``codec``), the chunk file written in one ``writev`` — with the GIL released for the heavy parts,
and no event loop, copy engine or device buffers between the file and the repository. A chunk that the
file has as a hole (``SEEK_DATA``) is zero without being read.

The guarantees are the store's: every chunk goes through ``Repository.store_chunk`` (recorded in the
writer's lease before it is looked for, durable before it is used), and the caller publishes with
``DiskWriter.commit`` only after every worker succeeded.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable

from backup.fileio import read_full

from .manifest import Manifest, chunk_count, chunk_stats
from .repository import DiskWriter, Repository
from .restore import run_workers

#: What a qcow2 image starts with (``backup.images`` probes the same way).
_QCOW2_MAGIC = b"QFI\xfb"
_SECTOR = 512


class RawSource:
    """A raw file or block device opened for a backup: its descriptor, its size as its block device has
    it (rounded up to 512 bytes, the tail reading as zeroes) and whether ``SEEK_DATA`` finds its holes."""

    def __init__(self, fd: int, size: int, holes: bool) -> None:
        self.fd = fd
        self.size = size
        self.holes = holes

    @classmethod
    def open(cls, path: str, fmt: str | None) -> RawSource | None:
        """The file at ``path`` if it is plainly raw — a regular file or block device that does not start
        with the qcow2 magic, ``fmt`` raw or unset; None for anything else (and for a file that cannot be
        opened: the block-device path opens it again and says why)."""
        if fmt not in (None, "raw"):
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)) or os.pread(fd, 4, 0) == _QCOW2_MAGIC:
                os.close(fd)
                return None
            size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(mode) else os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, -(-size // _SECTOR) * _SECTOR, stat.S_ISREG(mode))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def backup_file(
    repo: Repository,
    disk: str,
    fd: int,
    size: int,
    *,
    parent: str = "latest",
    holes: bool = True,
    threads: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> Manifest | None:
    """A new snapshot of ``disk`` from the first ``size`` bytes of ``fd`` on top of ``parent`` (``latest``,
    an id or ``none``; chunks equal to the parent's are reused), published once every chunk is stored;
    None if ``stop`` ended it first. Nothing is published on any failure (the writer is aborted)."""
    writer = repo.begin_write(disk)
    try:
        base = writer.parent(parent)
        result = backup_fd(repo, writer, fd, size, holes=holes, threads=threads, on_progress=on_progress, stop=stop)
        if result is None:
            return None
        chunks, stats = result
        return writer.commit(size, chunks, base.id if base is not None else None, dict(stats))
    finally:
        writer.abort()  # a no-op after the commit


class _Holes:
    """Where the file's next data is, per worker (each takes increasing offsets): one ``SEEK_DATA`` per
    run of holes, not one per chunk (on tmpfs a seek walks the hole page by page)."""

    def __init__(self, fd: int, enabled: bool) -> None:
        self._fd = fd
        self._enabled = enabled
        self._data_at = -1  # the next data at or after the last offset asked; -1: unknown

    def is_hole(self, offset: int, length: int) -> bool:
        if not self._enabled:
            return False
        if self._data_at < offset:
            try:
                self._data_at = os.lseek(self._fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data from here to the end of the file
                    self._data_at = 1 << 63
                else:  # the file system cannot tell: read everything
                    self._enabled = False
                    return False
        return self._data_at >= offset + length


def backup_fd(
    repo: Repository,
    writer: DiskWriter,
    fd: int,
    size: int,
    *,
    holes: bool = True,
    threads: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> tuple[list[str | None], dict[str, int]] | None:
    """Store every chunk of the first ``size`` bytes of ``fd`` for ``writer``'s snapshot: the chunk list
    and its stats (``chunk_stats``) for ``writer.commit``. ``holes``: the file reports holes with
    ``SEEK_DATA`` (not a block device).

    Raises the first error any worker met (ENOSPC, a read error); the others stop at their next chunk.
    ``stop`` set from outside (Ctrl-C) ends the workers the same way and this returns None. ``on_progress``
    is called from the worker threads with the bytes each chunk accounts for."""
    stop = stop if stop is not None else threading.Event()
    cs = repo.chunk_size
    chunks: list[str | None] = [None] * chunk_count(size, cs)
    indexes = iter(range(len(chunks)))
    take = threading.Lock()
    stored_new: set[str] = set()
    errors: list[BaseException] = []

    def next_index() -> int | None:
        with take:
            return next(indexes, None)

    def work() -> None:
        view = memoryview(bytearray(cs))
        hole = _Holes(fd, holes)
        while not stop.is_set():
            index = next_index()
            if index is None:
                return
            offset = index * cs
            length = min(cs, size - offset)
            try:
                if hole.is_hole(offset, length):
                    writer.lease.count(zero=length)
                else:
                    chunk = view[:length]
                    read_full(fd, chunk, offset)
                    digest, new = repo.store_chunk(chunk, writer.lease)  # written before it returns
                    chunks[index] = digest
                    if new and digest is not None:
                        with take:
                            stored_new.add(digest)
            except BaseException as exc:
                errors.append(exc)
                stop.set()
                return
            if on_progress is not None:
                on_progress(length)

    run_workers(work, threads or repo.store.worker_threads, "repo-backup", stop, errors)
    if next_index() is not None:
        return None  # stopped from outside before the last chunk
    return chunks, chunk_stats(chunks, size, cs, stored_new)
