"""A repository's snapshots as block devices: ``SnapshotReader`` (one published snapshot, read-only: instant
restore) and ``SnapshotWriter`` (a new snapshot that starts as its parent or as zeroes: the target of our
backup jobs and, exported over NBD, of QEMU's ``blockdev-backup``).

Both sit on the hot path, so the CPU work — SHA-256 and zstd, which release the GIL — and the chunk
files' I/O run in a few worker threads while the event loop goes on receiving requests. Memory is bounded
whatever the disk size: the reader keeps ``cache_chunks`` decoded chunks, the writer ``max_chunks_in_flight``
chunk buffers (being filled or being stored); a writer that needs one more waits for one to come back.

The writer never reads a chunk of the parent that is written whole (however many requests fill it); a chunk
written in part is merged with the parent's chunk, read once, when its buffer is stored.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from backup.fixed import FixedSizeDevice
from nbd.align import div_up
from nbd.constants import State
from nbd.device import BlockLimits, Capabilities, Extent

from .errors import RepoError
from .manifest import Manifest, chunk_stats
from .repository import DiskWriter, Repository

_T = TypeVar("_T")
_ZERO_FLAGS = State.HOLE | State.ZERO
#: Chunks read ahead of a sequential reader (decoded in the worker threads while it consumes the current one).
READ_AHEAD = 2


def _pieces(offset: int, length: int, chunk_size: int) -> Iterator[tuple[int, int, int, int]]:
    """Split a request into (chunk index, start and end inside the chunk, position in the request)."""
    pos = 0
    while pos < length:
        index, start = divmod(offset + pos, chunk_size)
        n = min(chunk_size - start, length - pos)
        yield index, start, start + n, pos
        pos += n


def _fit(data: bytes, start: int, end: int) -> bytes:
    """``data[start:end]`` zero-padded past the end of ``data`` (a parent chunk shorter than ours)."""
    if end <= len(data):
        return data if start == 0 and end == len(data) else data[start:end]
    return data[start:end] + bytes(end - max(start, len(data)))


class _Workers:
    """A small thread pool for blocking repository calls, started on first use."""

    def __init__(self, name: str, threads: int) -> None:
        self._name = name
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def run(self, func: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix=self._name)
        return asyncio.get_running_loop().run_in_executor(self._pool, func, *args)

    def stop(self) -> None:
        """Drop queued calls; running ones finish in the background (nobody waits for them any more)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class _ChunkCache:
    """Decoded chunks by (digest, length), least recently used first out. A chunk being decoded is in the
    cache as its future, so concurrent readers of one chunk share one decode; only decoded entries are
    evicted (the cache exceeds ``capacity`` by at most the decodes in flight)."""

    def __init__(self, repo: Repository, workers: _Workers, capacity: int) -> None:
        self._repo = repo
        self._workers = workers
        self._capacity = max(1, capacity)
        self._entries: OrderedDict[tuple[str, int], asyncio.Future[bytes]] = OrderedDict()

    def get(self, digest: str, length: int) -> asyncio.Future[bytes]:
        key = (digest, length)
        future = self._entries.get(key)
        if future is not None:
            self._entries.move_to_end(key)
            return future
        future = self._workers.run(self._repo.load_chunk, digest, length)
        future.add_done_callback(lambda f: self._settled(key, f))
        self._entries[key] = future
        if len(self._entries) > self._capacity:
            for old_key, old in list(self._entries.items()):
                if len(self._entries) <= self._capacity:
                    break
                if old.done() and old is not future:
                    del self._entries[old_key]
        return future

    def _settled(self, key: tuple[str, int], future: asyncio.Future[bytes]) -> None:
        # a failed decode is not kept (the next read tries again and names the chunk in the log again);
        # retrieving the exception spares read-ahead futures nobody awaits the "never retrieved" warning
        if (future.cancelled() or future.exception() is not None) and self._entries.get(key) is future:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()


async def _wait(future: asyncio.Future[_T]) -> _T:
    """Await a future shared with others: a cancelled waiter must not cancel it for everybody."""
    return await asyncio.shield(future)


class SnapshotReader(FixedSizeDevice):
    """One published snapshot, read-only. Every chunk is verified as it is decoded (a bad one is EIO,
    named in the log); a sequential reader finds the next chunks decoded already."""

    def __init__(self, repo: Repository, manifest: Manifest, *, cache_chunks: int = 8) -> None:
        super().__init__(manifest.size, read_only=True)
        if manifest.chunk_size != repo.chunk_size:
            raise RepoError(f"snapshot {manifest.ref} has chunks of {manifest.chunk_size} bytes, not the repository's")
        #: Keeps the chunks from gc while this reader is open, even if the snapshot is pruned meanwhile.
        self._lease = repo.hold_snapshot(manifest)
        self.manifest = manifest
        self._chunk_size = manifest.chunk_size
        self._chunks = manifest.chunks
        self._workers = _Workers("repo-read", 2)
        self._cache = _ChunkCache(repo, self._workers, cache_chunks)
        self._read_ahead = min(READ_AHEAD, max(0, cache_chunks - 2))
        self._last_chunk = -2

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            can_flush=False, can_fua=False, can_trim=False, can_zero=False, can_cache=True, can_multi_conn=True
        )

    @property
    def block_limits(self) -> BlockLimits:
        return BlockLimits(preferred=4096)

    def _load(self, index: int) -> asyncio.Future[bytes] | None:
        digest = self._chunks[index]
        if digest is None:
            return None
        return self._cache.get(digest, self.manifest.chunk_length(index))

    def _start_loads(self, offset: int, length: int) -> list[tuple[int, int, int, asyncio.Future[bytes] | None]]:
        """(position in the request, start and end in the chunk, its decode or None for zero) of each chunk
        the range touches, every decode started; a sequential reader's next chunks are started too."""
        cs = self._chunk_size
        pieces = [(pos, start, end, self._load(index)) for index, start, end, pos in _pieces(offset, length, cs)]
        first, last = offset // cs, (offset + length - 1) // cs
        if first in (self._last_chunk, self._last_chunk + 1):  # sequential, also with requests out of order
            for index in range(last + 1, min(last + 1 + self._read_ahead, len(self._chunks))):
                self._load(index)
        self._last_chunk = last
        return pieces

    async def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if length == 0:
            return b""
        parts = [
            bytes(end - start) if load is None else _fit(await _wait(load), start, end)
            for _, start, end, load in self._start_loads(offset, length)
        ]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def pread_into(self, offset: int, buffer: bytearray | memoryview) -> None:
        """``pread`` into the caller's buffer: one copy out of the decoded chunk, no fresh ``bytes``."""
        view = memoryview(buffer).cast("B")
        self._check(offset, len(view))
        if not view:
            return
        for pos, start, end, load in self._start_loads(offset, len(view)):
            if load is None:
                view[pos : pos + end - start] = bytes(end - start)
                continue
            data: bytes = await _wait(load)  # decoded chunks are whole: no padding
            view[pos : pos + end - start] = memoryview(data)[start:end]

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        self._check(offset, len(data), write=True)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        self._check(offset, length, write=True)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check(offset, length, write=True)

    async def flush(self) -> None:
        self._check(0, 0)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check(offset, length)
        return _extents(offset, length, self._chunk_size, lambda i: self._chunks[i] is None)

    async def cache(self, offset: int, length: int) -> None:
        """Start decoding the range's chunks (as many as the cache holds)."""
        self._check(offset, length)
        if length:
            cs = self._chunk_size
            first, last = offset // cs, (offset + length - 1) // cs
            for index in range(first, min(last + 1, first + self._cache._capacity)):
                self._load(index)

    async def close(self) -> None:
        await super().close()
        self._cache.clear()
        self._workers.stop()
        self._lease.release()


def _extents(offset: int, length: int, chunk_size: int, is_zero: Callable[[int], bool]) -> list[Extent]:
    """Runs of zero chunks (HOLE|ZERO) and data chunks over the range; neighbours never share flags."""
    extents: list[Extent] = []
    pos, end = offset, offset + length
    while pos < end:
        index = pos // chunk_size
        zero = is_zero(index)
        run_end = min(end, (index + 1) * chunk_size)
        while run_end < end and is_zero(run_end // chunk_size) == zero:
            run_end = min(end, run_end + chunk_size)
        extents.append(Extent(run_end - pos, _ZERO_FLAGS if zero else 0))
        pos = run_end
    return extents


class _Buffer:
    """One chunk being written: its bytes and which ranges of them were written (sorted, disjoint,
    non-adjacent intervals). Bytes outside those ranges are stale and come from the base chunk."""

    __slots__ = ("data", "ends", "index", "length", "starts")

    def __init__(self, index: int, data: bytearray, length: int) -> None:
        self.index = index
        self.data = data
        self.length = length
        self.starts: list[int] = []
        self.ends: list[int] = []

    def cover(self, start: int, end: int) -> None:
        if self.ends and self.ends[-1] == start:  # the sequential case: the last range grows
            self.ends[-1] = end
            return
        lo = bisect_left(self.ends, start)  # first range ending at or after start (touching counts)
        hi = bisect_right(self.starts, end)  # ranges starting at or before end
        if lo < hi:
            start = min(start, self.starts[lo])
            end = max(end, self.ends[hi - 1])
        self.starts[lo:hi] = [start]
        self.ends[lo:hi] = [end]

    @property
    def complete(self) -> bool:
        return len(self.starts) == 1 and self.starts[0] == 0 and self.ends[0] == self.length

    def gaps(self) -> list[tuple[int, int]]:
        out, pos = [], 0
        for start, end in zip(self.starts, self.ends, strict=True):
            if start > pos:
                out.append((pos, start))
            pos = end
        if pos < self.length:
            out.append((pos, self.length))
        return out


class _Sealed:
    """A buffer handed to a worker to be merged with its base, encoded and stored; frozen meanwhile."""

    __slots__ = ("buffer", "complete", "task")

    def __init__(self, buffer: _Buffer, complete: bool) -> None:
        self.buffer = buffer
        self.complete = complete  # every byte was written: readers may read the buffer while it is stored
        self.task: asyncio.Task[None] | None = None


class SnapshotWriter(FixedSizeDevice):
    """A snapshot being written; reads as its parent (or zeroes) where nothing was written.

    Holds the disk's writer lock (``DiskBusy`` otherwise) and a lease until ``commit`` or ``abort``;
    afterwards every verb fails with EIO. A chunk that cannot be stored (ENOSPC, a corrupt parent chunk
    that a partial write needed) fails the snapshot: every later verb, flush and commit report that error.
    """

    write_beyond_end_errno = errno.ENOSPC

    def __init__(
        self, repo: Repository, disk: str, size: int, parent: str = "latest", *, max_chunks_in_flight: int = 8
    ) -> None:
        if size < 0:
            raise RepoError(f"invalid disk size {size}")
        super().__init__(size)
        self._repo = repo
        self._chunk_size = cs = repo.chunk_size
        self._max_buffers = max(1, max_chunks_in_flight)
        self._writer: DiskWriter = repo.begin_write(disk)
        try:
            base = self._writer.parent(parent)
        except BaseException:
            self._writer.abort()
            raise
        self.disk = self._writer.disk
        self.parent_id = base.id if base is not None else None
        self._started = time.monotonic()
        count = div_up(size, cs)
        #: The digest each chunk has when its buffer is not in the way (the parent's, then what we stored).
        self._chunks: list[str | None] = [None] * count
        #: Chunks whose digest is of another length than the chunk (the parent's disk had another size).
        self._base_length: dict[int, int] = {}
        if base is not None:
            if base.chunk_size != cs:
                self._writer.abort()
                raise RepoError(f"snapshot {base.ref} has chunks of {base.chunk_size} bytes, not the repository's")
            for index, digest in enumerate(base.chunks[:count]):
                self._chunks[index] = digest
                if digest is not None and base.chunk_length(index) != self._chunk_length(index):
                    self._base_length[index] = base.chunk_length(index)
        self._dirty: OrderedDict[int, _Buffer] = OrderedDict()  # being filled; least recently written first
        self._sealed: dict[int, _Sealed] = {}  # being stored
        self._free: list[bytearray] = []
        self._allocated = 0
        self._released: asyncio.Future[None] | None = None
        self._stored_new: set[str] = set()
        self._error: OSError | None = None
        self._state = "open"  # -> "committing" | "aborting" -> "committed" | "aborted"
        # a thread per core encodes; two more keep the cores busy while others wait in a chunk's fsync — or,
        # into object storage, a thread per buffer: each waits on a HEAD or PUT most of the time
        threads = self._max_buffers if repo.store.latency_bound else min(self._max_buffers, (os.cpu_count() or 1) + 2)
        self._workers = _Workers("repo-write", threads)
        self._cache = _ChunkCache(repo, self._workers, 2)

    # -- what the device is

    @property
    def capabilities(self) -> Capabilities:
        # flush stores every connection's writes: consistent across connections
        return Capabilities(can_fast_zero=False, can_cache=False, can_multi_conn=True)

    @property
    def block_limits(self) -> BlockLimits:
        """Writes of whole aligned chunks never read the parent: that is the efficient size."""
        return BlockLimits(preferred=self._chunk_size)

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @property
    def stats(self) -> dict[str, int | float]:
        """The manifest's stats of the chunks as they are now (``new-bytes`` counts each chunk stored new
        that the snapshot still names, once)."""
        pending = self._dirty.keys() | self._sealed.keys()
        stats: dict[str, int | float] = {
            **chunk_stats(self._chunks, self._size, self._chunk_size, self._stored_new, pending)
        }
        stats["seconds"] = round(time.monotonic() - self._started, 6)
        return stats

    def _chunk_length(self, index: int) -> int:
        return min(self._chunk_size, self._size - index * self._chunk_size)

    def _check(self, offset: int, length: int, *, write: bool = False) -> None:
        if self._state != "open":
            raise OSError(errno.EIO, f"snapshot of disk {self.disk} is {self._state}")
        if self._error is not None:
            raise self._failure()
        super()._check(offset, length, write=write)

    def _failure(self) -> OSError:
        assert self._error is not None
        return OSError(self._error.errno or errno.EIO, f"snapshot of disk {self.disk} failed: {self._error}")

    # -- buffers

    def _new_buffer(self, size: int) -> bytearray:
        """Allocate one chunk buffer (the one place that does: tests count them)."""
        return bytearray(size)

    def _take_memory(self) -> bytearray | None:
        if self._free:
            return self._free.pop()
        if self._allocated < self._max_buffers:
            self._allocated += 1
            return self._new_buffer(self._chunk_size)
        return None

    def _give_back(self, data: bytearray) -> None:
        self._free.append(data)
        if self._released is not None and not self._released.done():
            self._released.set_result(None)

    async def _memory_back(self) -> None:
        if self._released is None or self._released.done():
            self._released = asyncio.get_running_loop().create_future()
        await _wait(self._released)

    async def _buffer(self, index: int) -> _Buffer:
        """The buffer of chunk ``index``; waits for one while all of them are taken.

        Chunks being stored give their buffers back soon: while any is, a writer waits for it rather than
        store a chunk still being filled — that one would be stored half from the parent (or zeroes) and,
        once the rest arrives, stored again, leaving an orphan chunk and doing the work twice (several
        writers each filling its own chunks, as a backup job's workers do, hit exactly that). Only when
        every buffer is being filled is the least recently written one stored to make room."""
        while True:
            self._check(0, 0)
            buffer = self._dirty.get(index)
            if buffer is not None:
                self._dirty.move_to_end(index)
                return buffer
            sealed = self._sealed.get(index)
            if sealed is not None:  # rewriting a chunk being stored: after it is, merge with what was stored
                await self._settle(sealed)
                continue
            data = self._take_memory()
            if data is not None:
                buffer = self._dirty[index] = _Buffer(index, data, self._chunk_length(index))
                return buffer
            if self._dirty and not self._sealed:
                self._seal(next(iter(self._dirty)))
            await self._memory_back()

    async def _settle(self, sealed: _Sealed) -> None:
        assert sealed.task is not None
        await asyncio.wait([sealed.task])

    def _seal(self, index: int) -> _Sealed:
        """Hand chunk ``index``'s buffer to a worker: merge with the base chunk, encode, store."""
        buffer = self._dirty.pop(index)
        sealed = self._sealed[index] = _Sealed(buffer, buffer.complete)
        sealed.task = asyncio.get_running_loop().create_task(self._store(sealed))
        return sealed

    async def _store(self, sealed: _Sealed) -> None:
        buffer = sealed.buffer
        index = buffer.index
        base = self._chunks[index]
        base_length = self._base_length.get(index, buffer.length)
        try:
            digest, new = await self._workers.run(self._store_chunk, buffer, buffer.gaps(), base, base_length)
        except OSError as exc:
            self._fail(exc)
        except BaseException as exc:
            self._fail(OSError(errno.EIO, f"storing chunk {index} failed: {exc!r}"))
            raise
        else:
            self._chunks[index] = digest
            self._base_length.pop(index, None)
            if new and digest is not None:
                self._stored_new.add(digest)
        finally:
            del self._sealed[index]
            self._give_back(buffer.data)

    def _store_chunk(
        self, buffer: _Buffer, gaps: list[tuple[int, int]], base: str | None, base_length: int
    ) -> tuple[str | None, bool]:
        """Worker thread: fill what was not written from the base chunk (read once) or with zeroes, store."""
        view = memoryview(buffer.data)[: buffer.length]
        if gaps:
            source = self._repo.load_chunk(base, base_length) if base is not None else b""
            for start, end in gaps:
                view[start:end] = _fit(source, start, end) if source else bytes(end - start)
        return self._repo.store_chunk(view, self._writer.lease)

    def _fail(self, exc: OSError) -> None:
        if self._error is None:
            self._error = exc

    async def _drain(self, indices: list[int] | None = None) -> None:
        """Store the given chunks' buffers (every buffer by default) and wait until they are stored."""
        if indices is None:
            while self._dirty or self._sealed:
                for index in list(self._dirty):
                    self._seal(index)
                tasks = [s.task for s in self._sealed.values() if s.task is not None]
                if tasks:
                    await asyncio.wait(tasks)
            return
        for index in indices:
            if index in self._dirty:
                self._seal(index)
        tasks = [s.task for i in indices if (s := self._sealed.get(i)) is not None and s.task is not None]
        if tasks:
            await asyncio.wait(tasks)

    # -- the verbs

    async def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        parts = [
            await self._read(index, start, end) for index, start, end, _ in _pieces(offset, length, self._chunk_size)
        ]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read(self, index: int, start: int, end: int) -> bytes:
        while True:
            self._check(0, 0)
            buffer = self._dirty.get(index)
            sealed = self._sealed.get(index)
            if sealed is not None:
                if sealed.complete:
                    return bytes(sealed.buffer.data[start:end])
                await self._settle(sealed)
                continue
            digest = self._chunks[index]
            if buffer is not None and buffer.complete:
                return bytes(buffer.data[start:end])
            if digest is None:
                if buffer is None:
                    return bytes(end - start)
                source = b""
            else:
                length = self._base_length.get(index, self._chunk_length(index))
                source = await _wait(self._cache.get(digest, length))
                if self._dirty.get(index) is not buffer or self._chunks[index] != digest:
                    continue  # the chunk changed meanwhile
            if buffer is None:
                return _fit(source, start, end)
            for gap_start, gap_end in buffer.gaps():  # merged once; later writes need no parent any more
                buffer.data[gap_start:gap_end] = (
                    _fit(source, gap_start, gap_end) if source else bytes(gap_end - gap_start)
                )
            buffer.cover(0, buffer.length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        self._check(offset, len(view), write=True)
        touched = []
        for index, start, end, pos in _pieces(offset, len(view), self._chunk_size):
            buffer = await self._buffer(index)
            was_complete = buffer.complete
            buffer.data[start:end] = view[pos : pos + end - start]
            buffer.cover(start, end)
            if buffer.complete and not was_complete:  # just filled (one merged by a read stays for more writes)
                self._seal(index)
            touched.append(index)
        if fua:
            await self._durable(touched)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        self._check(offset, length, write=True)
        touched = []
        for index, start, end, _ in _pieces(offset, length, self._chunk_size):
            if start == 0 and end == self._chunk_length(index):
                await self._forget(index)
                continue
            if self._chunks[index] is None and index not in self._dirty and index not in self._sealed:
                continue  # zero already
            buffer = await self._buffer(index)
            was_complete = buffer.complete
            buffer.data[start:end] = bytes(end - start)
            buffer.cover(start, end)
            if buffer.complete and not was_complete:
                self._seal(index)
            touched.append(index)
        if fua:
            await self._durable(touched)

    async def _forget(self, index: int) -> None:
        """Make a whole chunk zero: nothing to store."""
        while (sealed := self._sealed.get(index)) is not None:
            await self._settle(sealed)
            self._check(0, 0)
        buffer = self._dirty.pop(index, None)
        if buffer is not None:
            self._give_back(buffer.data)
        self._chunks[index] = None
        self._base_length.pop(index, None)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.zero(offset, length, may_trim=True, fua=fua)

    async def _durable(self, indices: list[int]) -> None:
        await self._drain(indices)
        self._check(0, 0)

    async def flush(self) -> None:
        """Store every chunk written so far (durable; the snapshot is published only by ``commit``)."""
        self._check(0, 0)
        await self._drain()
        self._check(0, 0)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check(offset, length)

        def is_zero(index: int) -> bool:
            return self._chunks[index] is None and index not in self._dirty and index not in self._sealed

        return _extents(offset, length, self._chunk_size, is_zero)

    async def cache(self, offset: int, length: int) -> None:
        self._check(offset, length)

    # -- the end

    async def commit(self) -> Manifest:
        """Store every chunk, then publish the snapshot (manifest last). A failed commit publishes nothing
        and ends the snapshot like ``abort``."""
        if self._state != "open":
            self._check(0, 0)
        self._state = "committing"
        try:
            await self._drain()
            if self._error is not None:
                raise self._failure()
            for index in sorted(self._base_length):  # the parent's disk was of another size
                await self._refit(index)
            manifest = await self._workers.run(
                self._writer.commit, self._size, list(self._chunks), self.parent_id, self.stats
            )
        except BaseException:
            await self._end("aborted")
            raise
        await self._end("committed")
        return manifest

    async def _refit(self, index: int) -> None:
        data = self._take_memory()
        assert data is not None  # every buffer is back after _drain
        buffer = _Buffer(index, data, self._chunk_length(index))
        self._sealed[index] = sealed = _Sealed(buffer, False)
        await self._store(sealed)
        if self._error is not None:
            raise self._failure()

    async def abort(self) -> None:
        """Publish nothing; the chunks stored so far are left for gc. A no-op once the snapshot is done."""
        if self._state in ("committed", "aborted"):
            return
        self._state = "aborting"
        await self._end("aborted")

    async def _end(self, state: str) -> None:
        tasks = [s.task for s in self._sealed.values() if s.task is not None]
        if tasks:
            await asyncio.wait(tasks)
        for buffer in self._dirty.values():
            self._give_back(buffer.data)
        self._dirty.clear()
        self._free.clear()
        self._cache.clear()
        if not self._writer.done:
            await self._workers.run(self._writer.abort)
        self._workers.stop()
        self._state = state
        self._closed = True

    async def close(self) -> None:
        """Without ``commit`` this is ``abort``."""
        await self.abort()
