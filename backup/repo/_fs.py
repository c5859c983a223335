"""Durable file operations of the crash rules: write a temporary, fsync, rename into place, fsync the directory.

A temporary file is flock'd by its writer for as long as it exists under its temporary name, so gc
can tell a live writer's file (lock busy) from a dead one's (lock free) without any clock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

#: How often a write whose temporary gc removed in the instant between create and lock is retried.
_ATTEMPTS = 5


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Buffers one ``writev`` takes at most (Linux's IOV_MAX).
_IOV_MAX = 1024


Buffers = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]


def write_all(fd: int, data: Buffers) -> None:
    """Write ``data`` — one buffer, or several one after the other (one ``writev`` a call, no join)."""
    _write_views(fd, data, None)


def pwrite_all(fd: int, data: Buffers, offset: int) -> None:
    """``write_all`` at ``offset`` (``pwritev``): the file position is not used, threads may share ``fd``."""
    _write_views(fd, data, offset)


def _write_views(fd: int, data: Buffers, offset: int | None) -> None:
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = [data]
    views = [v for v in (memoryview(b).cast("B") for b in data) if v]
    while views:
        batch = views[:_IOV_MAX]
        n = os.writev(fd, batch) if offset is None else os.pwritev(fd, batch, offset)
        if offset is not None:
            offset += n
        while n and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]


@contextlib.contextmanager
def locked_temp(tmp_dir: Path, prefix: str) -> Iterator[tuple[int, Path]]:
    """A new file in ``tmp_dir``, flock'd for as long as the block runs; removed if the block fails."""
    path = tmp_dir / f"{prefix}.{uuid.uuid4().hex}.tmp"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield fd, path
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
    finally:
        os.close(fd)


def publish(
    tmp_dir: Path,
    target: Path,
    data: Buffers,
    prefix: str,
) -> None:
    """Make ``target`` hold ``data`` (one buffer or several in a row) durably and atomically (old
    content or new, never half)."""
    for attempt in range(_ATTEMPTS):
        with locked_temp(tmp_dir, prefix) as (fd, path):
            write_all(fd, data)
            os.fsync(fd)
            try:
                os.rename(path, target)
            except FileNotFoundError:
                if attempt + 1 < _ATTEMPTS and not path.exists() and target.parent.is_dir():
                    continue  # gc took our temporary before we locked it: write it again
                raise
            fsync_dir(target.parent)
            return
    raise OSError(errno.EIO, f"could not write {target}")


def try_lock(path: Path) -> int | None:
    """A descriptor holding ``path``'s flock if nobody else holds it, else None (also None if it vanished)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd
