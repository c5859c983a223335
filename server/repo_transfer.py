"""``repo backup`` and ``repo restore``: the one copy engine between a file or NBD export and a repository
snapshot (``SnapshotWriter`` / ``SnapshotReader``), with the copy command's sides and progress bar. A raw
file on either side skips the engine: its chunks go between the file and the repository in worker threads
(``backup.repo.backup_file``, ``backup.repo.restore``).

A backup never publishes half a snapshot: the writer commits (manifest last) only after the whole copy
succeeded, and is aborted on any failure, Ctrl-C included. A restore to a file writes a temporary file
next to the target and renames it into place only once it is complete and durable; its chunks go
straight from the repository into the file in worker threads (``backup.repo.restore``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from backup.copy_engine import CopyFailed, copy_device
from backup.errors import BackupError
from backup.rawfile import RawFileDevice
from backup.repo.backup_device import backup_device_snapshot
from backup.repo.backup_file import backup_file
from backup.repo.device import SnapshotReader, SnapshotWriter
from backup.repo.errors import RepoError
from backup.repo.manifest import Manifest
from backup.repo.repository import Repository
from backup.repo.restore import restore_file
from nbd.device import BlockDevice, read_into, remote_uri
from nbd.errors import NbdError
from nbd.uri import looks_like_uri
from server.copy_sides import (
    close_endpoint,
    connect,
    describe,
    dirty_ranges,
    open_side,
    open_source,
)
from server.progress import Progress

MiB = 1 << 20
#: What the writer may hold in chunk buffers (being filled or being encoded and stored) at most.
BUFFER_BUDGET = 64 * MiB
#: NBD requests the clients allow in flight; the copy engine decides within it.
NBD_REQUESTS = 16

#: Source reads of a backup in flight: two keep the encoders busy from a file or a local server (measured:
#: more gain nothing on 2 CPUs); a server across a network needs more to cover the round trip.
LOCAL_REQUESTS = 2
REMOTE_REQUESTS = 8
#: Reads of a restore in flight: the reader decodes ahead in its threads while the target writes.
RESTORE_REQUESTS = 4

MakeProgress = Callable[[int], Progress | None]
_T = TypeVar("_T")


def request_size(chunk_size: int) -> int:
    """Copy requests of whole chunks (so the writer never merges with the parent), 1 to 4 MiB."""
    return max(MiB, min(chunk_size, 4 * MiB))


def writer_buffers(chunk_size: int, window: int) -> int:
    """Chunk buffers for a writer fed ``window`` bytes at a time: enough that the copy never waits for the
    encoders while they have work (twice the window, plus the chunks the window straddles), at least 4,
    at most ``BUFFER_BUDGET`` worth unless that is fewer than 4."""
    wanted = max(8, 2 * window // chunk_size + 2)
    return max(4, min(wanted, BUFFER_BUDGET // chunk_size))


def whole_chunks(ranges: Iterable[tuple[int, int]], chunk_size: int, size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` ranges widened to whole chunks and merged: a dirty chunk is read whole from the
    source, so the writer never needs the parent's copy of it."""
    merged: list[tuple[int, int]] = []
    for offset, length in ranges:
        if length <= 0:
            continue
        start = offset // chunk_size * chunk_size
        end = min(size, -(-(offset + length) // chunk_size) * chunk_size)
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return [(start, end - start) for start, end in merged]


def _parent(repo: Repository, disk: str, ref: str) -> Manifest | None:
    """The parent snapshot ``ref`` names (``latest``, an id, ``none``); None for none or no snapshots yet."""
    if ref == "none":
        return None
    if ref == "latest" and not repo.snapshot_ids(disk):
        return None
    return repo.resolve(disk, ref)


async def run_backup(
    repo: Repository,
    disk: str,
    source: str,
    *,
    parent: str = "latest",
    fmt: str | None = None,
    dirty_bitmap: str | None = None,
    make_progress: MakeProgress = lambda total: None,
) -> Manifest:
    """Copy ``source`` into a new snapshot of ``disk`` and publish it; nothing is published on failure."""
    src = await open_side(
        "source", open_source(source, fmt=fmt, connections=None, requests=NBD_REQUESTS, dirty_bitmap=dirty_bitmap)
    )
    try:
        size = src.device.size
        base = _parent(repo, disk, parent)
        fd = src.device.direct_read_fd() if isinstance(src.device, RawFileDevice) else None
        if fd is not None:  # a raw file or block device: worker threads read it straight into the repository
            return await _backup_file(repo, disk, fd, size, base, make_progress)
        reader = read_into(src.device) if dirty_bitmap is None else None
        if reader is not None:  # a full backup of an NBD export: chunks read into the buffers they are stored from
            uri = remote_uri(src.device)
            reads = LOCAL_REQUESTS if uri is None or uri.is_local else REMOTE_REQUESTS
            progress = make_progress(size)
            ok = False
            try:
                manifest = await backup_device_snapshot(
                    repo,
                    disk,
                    src.device,
                    reader,
                    parent=base.id if base is not None else "none",
                    reads=reads,
                    on_progress=progress.advance if progress is not None else None,
                )
                ok = True
                return manifest
            finally:
                if progress is not None:
                    progress.finish(ok=ok)
        if dirty_bitmap is not None:
            if base is None:
                why = "not --parent none" if parent == "none" else f"disk {disk} has none to start from"
                raise CopyFailed(f"--dirty-bitmap needs a parent snapshot ({why})")
            if base.size != size:
                raise CopyFailed(f"--dirty-bitmap: the source is {size} bytes, the parent {base.ref} {base.size}")
        cs = repo.chunk_size
        step = request_size(cs)
        uri = remote_uri(src.device)  # a server across a network needs a window that covers the round trip
        requests = LOCAL_REQUESTS if uri is None or uri.is_local else REMOTE_REQUESTS
        writer = SnapshotWriter(
            repo,
            disk,
            size,
            parent=base.id if base is not None else "none",
            max_chunks_in_flight=writer_buffers(cs, step * requests),
        )
        try:
            ranges = whole_chunks(await dirty_ranges(src.device), cs, size) if dirty_bitmap is not None else None
            progress = make_progress(size if ranges is None else sum(n for _, n in ranges))
            ok = False
            try:
                await copy_device(
                    src.device,
                    writer,
                    dst_is_zero=base is None,
                    request_size=step,
                    requests=requests,
                    progress=progress,
                    ranges=ranges,
                )
                manifest = await writer.commit()
                ok = True
            finally:
                if progress is not None:
                    progress.finish(ok=ok)
            return manifest
        except BaseException:
            await writer.abort()
            raise
    finally:
        await close_endpoint(src)


async def _backup_file(
    repo: Repository, disk: str, fd: int, size: int, base: Manifest | None, make_progress: MakeProgress
) -> Manifest:
    """``backup_file`` in worker threads, with the progress bar; Ctrl-C stops them and publishes nothing."""
    progress = make_progress(size)
    ok = False
    try:
        holes = not stat.S_ISBLK(os.fstat(fd).st_mode)
        manifest = await _in_threads(
            lambda on_progress, stop: backup_file(
                repo,
                disk,
                fd,
                size,
                parent=base.id if base is not None else "none",
                holes=holes,
                on_progress=on_progress,
                stop=stop,
            ),
            progress,
        )
        assert manifest is not None  # only a stop from outside ends it early, and that is a cancellation
        ok = True
        return manifest
    finally:
        if progress is not None:
            progress.finish(ok=ok)


async def run_restore(
    repo: Repository,
    manifest: Manifest,
    target: str,
    *,
    force: bool = False,
    make_progress: MakeProgress = lambda total: None,
) -> None:
    """Write snapshot ``manifest`` to ``target`` (a file or an NBD URI); every chunk verified as it is read."""
    if not looks_like_uri(target):
        await _restore_to_file(repo, manifest, Path(target), force, make_progress)
        return
    reader = SnapshotReader(repo, manifest)
    try:
        await _restore_to_nbd(reader, target, make_progress)
    finally:
        await reader.close()


async def _copy(reader: SnapshotReader, dst: BlockDevice, *, dst_is_zero: bool, make_progress: MakeProgress) -> None:
    progress = make_progress(reader.size)
    ok = False
    try:
        await copy_device(
            reader,
            dst,
            dst_is_zero=dst_is_zero,
            request_size=request_size(reader.manifest.chunk_size),
            requests=RESTORE_REQUESTS,
            progress=progress,
        )
        ok = True
    finally:
        if progress is not None:
            progress.finish(ok=ok)


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, (RepoError, BackupError)) else describe(exc)


async def _restore_to_nbd(reader: SnapshotReader, target: str, make_progress: MakeProgress) -> None:
    """Into an export at least as large as the disk (the rest is left alone); zero chunks are zeroed."""
    dst = await open_side("target", connect(target, connections=None, requests=NBD_REQUESTS))
    try:
        size = reader.size
        if dst.device.size < size:
            raise CopyFailed(f"the target export is {dst.device.size} bytes, smaller than the disk ({size} bytes)")
        if dst.device.read_only:
            raise CopyFailed("the target export is read-only")
        try:
            await _copy(reader, dst.device, dst_is_zero=False, make_progress=make_progress)
        except (OSError, NbdError, BackupError, TimeoutError) as exc:
            raise CopyFailed(f"restore failed, the target {target} is partial: {_reason(exc)}") from exc
    finally:
        await close_endpoint(dst)


async def _restore_to_file(
    repo: Repository, manifest: Manifest, path: Path, force: bool, make_progress: MakeProgress
) -> None:
    """``restore_file`` in worker threads, with the progress bar; Ctrl-C stops them and leaves no file."""
    progress = make_progress(manifest.size)
    done = False
    try:
        await _in_threads(
            lambda on_progress, stop: restore_file(
                repo, manifest, path, force=force, on_progress=on_progress, stop=stop
            ),
            progress,
        )
        done = True
    finally:
        if progress is not None:
            progress.finish(ok=done)


async def _in_threads(
    work: Callable[[Callable[[int], None] | None, threading.Event], _T], progress: Progress | None
) -> _T:
    """``work(on_progress, stop)`` — worker threads of a restore or a backup — off the event loop;
    cancelled (Ctrl-C), it stops the workers and waits for them, so that no thread still writes into a
    file about to be removed or stores chunks for a snapshot being aborted."""
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    on_progress = None
    if progress is not None:
        advance = progress.advance

        def on_progress(nbytes: int) -> None:
            loop.call_soon_threadsafe(advance, nbytes)

    task = asyncio.ensure_future(asyncio.to_thread(work, on_progress, stop))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(BaseException):
            await task
        raise
