"""Restoring a snapshot into a file: every chunk fetched, verified and written by a few worker threads.

A restore to a file needs none of a block device's generality (random reads, caching, read-ahead): each
chunk goes to one place, once. Worker threads take chunk indexes in order and each does the whole
journey — fetch the blob, decompress, check the SHA-256, ``pwritev`` — with the GIL released for the
heavy parts (file or network I/O, zstd, hashlib, the write), so the machine's cores share the work
without the event loop in the middle of every chunk. Each thread reads blobs into one buffer of its own,
and an incompressible chunk (raw zstd blocks, ``codec``) goes from that buffer into the file as it is: a
read, the SHA-256 and a write per chunk, no decompression, no fresh memory. Zero chunks are skipped: the
file is created sparse, so they read as zeroes and take no space. Memory is a buffer (and, for a
compressed chunk, its bytes) per thread.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

from . import _fs
from .codec import blob_room
from .errors import RepoError
from .manifest import Manifest
from .repository import Repository


def restore_to_fd(
    repo: Repository,
    manifest: Manifest,
    fd: int,
    *,
    threads: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> bool:
    """Write every data chunk of ``manifest`` into ``fd`` at its offset (``fd`` reads as zeroes already);
    True once all are written.

    Raises the first error any worker met (a corrupt or missing chunk is ``ChunkCorrupt``/``ChunkMissing``,
    named in the log); the other workers stop at their next chunk. ``stop`` set from outside ends the
    workers the same way, and this returns False; an interrupt of the calling thread (Ctrl-C) stops
    them too and is raised once they ended.
    ``on_progress`` is called from the worker threads with the bytes each chunk accounts for.
    """
    stop = stop if stop is not None else threading.Event()
    indexes = iter(range(len(manifest.chunks)))
    take = threading.Lock()
    errors: list[BaseException] = []

    def next_index() -> int | None:
        with take:
            return next(indexes, None)

    def work() -> None:
        cs = manifest.chunk_size
        scratch = bytearray(blob_room(cs))
        while not stop.is_set():
            index = next_index()
            if index is None:
                return
            length = manifest.chunk_length(index)
            digest = manifest.chunks[index]
            try:
                if digest is not None:
                    _fs.pwrite_all(fd, repo.load_chunk_into(digest, length, scratch), index * cs)
            except BaseException as exc:
                errors.append(exc)
                stop.set()
                return
            if on_progress is not None:
                on_progress(length)

    run_workers(work, threads or repo.store.worker_threads, "repo-restore", stop, errors)
    return next_index() is None


def run_workers(
    work: Callable[[], None], count: int, name: str, stop: threading.Event, errors: list[BaseException]
) -> None:
    """``count`` threads running ``work`` until all are done; then the first error any of them put in
    ``errors`` is raised. Interrupted (KeyboardInterrupt) at any point, also while the threads are still
    being started, it stops them and waits for every one that started first, so that none still writes
    into a file or a repository that the caller is about to clean up."""
    workers = [threading.Thread(target=work, name=f"{name}-{i}", daemon=True) for i in range(max(1, count))]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    except BaseException:
        stop.set()
        for worker in workers:
            if worker.ident is not None:  # started
                worker.join()
        raise
    if errors:
        raise errors[0]


def check_file_target(path: Path, force: bool) -> None:
    """A file target may exist only with ``force``, and then must be a regular file (it is replaced)."""
    if os.path.lexists(path):
        if not force:
            raise RepoError(f"{path} exists (--force replaces it)", errno.EEXIST)
        if not path.is_file():
            raise RepoError(f"{path} is not a regular file (restore to a device through an NBD URI)")


def restore_file(
    repo: Repository,
    manifest: Manifest,
    path: Path,
    *,
    force: bool = False,
    threads: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> bool:
    """Restore into a sparse raw file (zero chunks are holes), complete and durable before it takes
    ``path``'s name; False if ``stop`` ended it first. A failure, a stop or Ctrl-C leaves no file behind.
    The snapshot is leased meanwhile: a prune and gc cannot take its chunks."""
    check_file_target(path, force)
    lease = repo.hold_snapshot(manifest)
    temporary = path.with_name(f".{path.name}.restore-{os.getpid()}")
    done = False
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, manifest.size)
            if not restore_to_fd(repo, manifest, fd, threads=threads, on_progress=on_progress, stop=stop):
                return False
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        done = True
        _fs.fsync_dir(path.parent)
        return True
    finally:
        lease.release()
        if not done:
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass
