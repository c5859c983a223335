"""Backing up a device that reads into a caller's buffer (an NBD export, ``pread_into``) into a snapshot.

A full backup reads every chunk whole, once, so it needs neither the copy engine nor ``SnapshotWriter``
(requests of any size merged into chunk buffers: a copy of every byte on the event loop, the GIL held).
Here each chunk is read straight into a buffer of a small pool (the NBD client receives into it: no
copy), and a worker thread stores it from there (``Repository.store_chunk``: SHA-256, dedup, zstd or raw
blocks, one ``writev``) while the next chunks are read. Runs the source reports as zeroes
(``block_status``) are zero chunks, not read. Memory: the pool, a few chunks.

The guarantees are the store's, as for a file (``backup_file``): every chunk recorded in the writer's
lease before it is looked for and durable before it is used; the snapshot published by
``DiskWriter.commit`` only after every chunk is stored, aborted on any failure or cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from nbd.constants import State
from nbd.device import BlockDevice

from .manifest import Manifest, chunk_count, chunk_stats
from .repository import DiskWriter, Repository

#: How much of the device one ``block_status`` query covers.
ZERO_MAP_SPAN = 1 << 30

ReadInto = Callable[[int, memoryview], Awaitable[None]]


class _Zeroes:
    """Which chunks the device reports as zeroes, asked a span at a time as the backup goes forward."""

    def __init__(self, device: BlockDevice) -> None:
        self._device = device
        self._runs: list[tuple[int, int]] = []  # zero runs (start, end), merged, from the current span on
        self._known = 0  # block status is known up to here

    async def covers(self, offset: int, end: int) -> bool:
        size = self._device.size
        while self._known < end:
            ask = min(ZERO_MAP_SPAN, size - self._known)
            pos = self._known
            for extent in await self._device.block_status(pos, ask):
                if extent.flags & State.ZERO:
                    if self._runs and self._runs[-1][1] == pos:
                        self._runs[-1] = (self._runs[-1][0], pos + extent.length)
                    else:
                        self._runs.append((pos, pos + extent.length))
                pos += extent.length
            self._known = pos if pos > self._known else self._known + ask  # no answer: data
        while self._runs and self._runs[0][1] <= offset:
            self._runs.pop(0)
        return bool(self._runs) and self._runs[0][0] <= offset and self._runs[0][1] >= end


async def backup_device(
    repo: Repository,
    writer: DiskWriter,
    device: BlockDevice,
    read_into: ReadInto,
    *,
    reads: int = 2,
    threads: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[list[str | None], dict[str, int]]:
    """Store every chunk of ``device`` for ``writer``'s snapshot: the chunk list and its stats for
    ``writer.commit``. ``reads``: chunks being read at once beyond those being stored (a server across
    a network needs more to cover the round trip). Raises the first error (the rest are waited for);
    a cancellation stops it the same way."""
    cs, size = repo.chunk_size, device.size
    chunks: list[str | None] = [None] * chunk_count(size, cs)
    stored_new: set[str] = set()
    zeroes = _Zeroes(device)
    free: asyncio.Queue[bytearray] = asyncio.Queue()
    threads = threads or repo.store.worker_threads
    for _ in range(threads + reads):
        free.put_nowait(bytearray(cs))
    running: set[asyncio.Task[None]] = set()
    failed: list[BaseException] = []
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="repo-backup")

    async def one(index: int, buffer: bytearray, length: int) -> None:
        try:
            view = memoryview(buffer)[:length]
            await read_into(index * cs, view)
            digest, new = await loop.run_in_executor(pool, repo.store_chunk, view, writer.lease)
            chunks[index] = digest
            if new and digest is not None:
                stored_new.add(digest)
            if on_progress is not None:
                on_progress(length)
        except BaseException as exc:
            failed.append(exc)
        finally:
            free.put_nowait(buffer)

    try:
        for index in range(len(chunks)):
            if failed:
                break
            offset = index * cs
            length = min(cs, size - offset)
            if await zeroes.covers(offset, offset + length):
                writer.lease.count(zero=length)
                if on_progress is not None:
                    on_progress(length)
                continue
            buffer = await free.get()
            task = asyncio.ensure_future(one(index, buffer, length))
            running.add(task)
            task.add_done_callback(running.discard)
        while running:
            await asyncio.wait(set(running))
    except BaseException:
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(set(running))
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if failed:
        raise failed[0]
    return chunks, chunk_stats(chunks, size, cs, stored_new)


async def backup_device_snapshot(
    repo: Repository,
    disk: str,
    device: BlockDevice,
    read_into: ReadInto,
    *,
    parent: str = "latest",
    reads: int = 2,
    on_progress: Callable[[int], None] | None = None,
) -> Manifest:
    """A new snapshot of ``disk`` from all of ``device`` on top of ``parent`` (``latest``, an id or
    ``none``), published once every chunk is stored; nothing is published on any failure."""
    writer = await asyncio.to_thread(repo.begin_write, disk)
    try:
        base = await asyncio.to_thread(writer.parent, parent)
        chunks, stats = await backup_device(repo, writer, device, read_into, reads=reads, on_progress=on_progress)
        parent_id = base.id if base is not None else None
        return await asyncio.to_thread(writer.commit, device.size, chunks, parent_id, dict(stats))
    finally:
        await asyncio.to_thread(writer.abort)  # a no-op after the commit
