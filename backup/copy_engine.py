"""The copy engine: ranges of one block device copied to the same offsets of another.

Every copy in the tree decides the same things here, once: what reads as zeroes (``is_zero``,
``zero_runs``, ``file_reads_zero`` — a memcmp against a zero buffer), what a run of zeroes costs the
target (``write_zeroes``: nothing when the target reads as zeroes, else write-zeroes with ``may_trim`` so
it stays sparse), where the source's data is (``extent_runs``, from its block status), how tasks copying
together end (``run_together``: the first failure cancels the rest), and how a whole-device copy is cut
into stripes for several processes (``Stripes``).

Two copiers use them: ``copy_device`` streams ranges through a bounded window of requests (``nbd-backup
copy``, one per process), and ``backup.block_copy.BlockCopier`` copies the clusters a backup job or a
copy-before-write filter claims.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

from backup.errors import BackupError
from nbd.align import div_up, round_up
from nbd.constants import State
from nbd.device import BlockDevice, Extent, direct_read_fd, read_into, remote_uri, write_behind, write_from_fd
from nbd.errors import NbdRequestError

log = logging.getLogger(__name__)

MiB = 1 << 20

#: Largest single write-zeroes request sent to a target (NBD lengths are 32-bit).
MAX_ZERO_REQUEST = 1024 * MiB
#: How much of a file is read to tell data from a range that may be all zeroes (sendfile paths).
ZERO_SAMPLE = 4096
_SAMPLE_ZEROES = bytes(ZERO_SAMPLE)

DEFAULT_REQUEST_SIZE = 1 * MiB
DEFAULT_REQUESTS = 16
# Copies through our buffers from a nearby source keep at most this much in flight: the buffers stay in
# the CPU caches (fewer, cache-warm buffers cost less CPU at the same speed). A raw file sent to NBD holds
# no buffers (sendfile), and reads from an NBD server across a network need a window that covers the round
# trip: both keep DEFAULT_REQUESTS in flight.
BUFFER_BUDGET = 4 * MiB
STATUS_SPAN = 1024 * MiB  # block status is asked for at most this much at a time
MAX_STRIPE = 32 * MiB  # small enough to balance the copiers' ends, large enough for few block-status calls


class ProgressSink(Protocol):
    """Where a copy reports the bytes it finished (a progress bar, or a worker's pipe to its parent)."""

    def advance(self, nbytes: int) -> None: ...


class CopyFailed(BackupError):
    """A whole-device copy cannot go on for a reason the user can act on (the message says which side and why)."""


@dataclass
class CopyStats:
    size: int = 0
    data_bytes: int = 0  # written as data
    zero_bytes: int = 0  # zeroed on the destination
    skipped_bytes: int = 0  # zero ranges left alone (the destination reads as zeroes already)

    def add(self, other: CopyStats) -> None:
        """Count what another copier of the same copy did (a stripe worker)."""
        self.data_bytes += other.data_bytes
        self.zero_bytes += other.zero_bytes
        self.skipped_bytes += other.skipped_bytes


# --- zeroes -----------------------------------------------------------------------------------------


def is_zero(data: bytes | bytearray | memoryview, zeroes: bytes) -> bool:
    """Whether ``data`` is all zeroes, as a memcmp against ``zeroes`` (at least as long, or the answer is
    no). ``bytes.startswith`` takes any buffer; comparing memoryviews would go item by item."""
    return zeroes.startswith(data)


def file_starts_with_zeroes(fd: int, offset: int, length: int = ZERO_SAMPLE) -> bool:
    """Whether the file's first ``min(length, ZERO_SAMPLE)`` bytes at ``offset`` read as zeroes (past its
    end they do): most data is told by this tiny read."""
    return _SAMPLE_ZEROES.startswith(os.pread(fd, min(length, ZERO_SAMPLE), offset))


def file_reads_zero(fd: int, offset: int, length: int, zeroes: bytes) -> bool:
    """Whether bytes ``[offset, offset+length)`` of the file read as zeroes; ``zeroes`` is at least
    ``length`` long. Only a range that starts with zeroes is read whole."""
    if not file_starts_with_zeroes(fd, offset, length):
        return False
    if length <= ZERO_SAMPLE:
        return True
    return zeroes.startswith(os.pread(fd, length - ZERO_SAMPLE, offset + ZERO_SAMPLE))


def zero_runs(
    data: bytes | bytearray, offset: int, length: int, cluster_size: int, zero_cluster: bytes
) -> list[tuple[int, int, bool]]:
    """Split the first ``length`` bytes of ``data`` (at ``offset``) into runs ``(start, stop, is_zero)``
    of whole all-zero clusters and the rest; boundaries follow absolute cluster boundaries so sparseness
    matches the cluster map. ``zero_cluster`` is ``cluster_size`` zero bytes."""
    cs = cluster_size
    runs: list[tuple[int, int, bool]] = []
    pos = 0
    while pos < length:
        stop = min(length, (offset + pos) // cs * cs + cs - offset)
        size = stop - pos
        zero = data.startswith(zero_cluster if size == cs else zero_cluster[:size], pos)
        if runs and runs[-1][2] == zero:
            runs[-1] = (runs[-1][0], stop, zero)
        else:
            runs.append((pos, stop, zero))
        pos = stop
    return runs


async def write_zeroes(target: BlockDevice, offset: int, length: int, *, target_is_zero: bool) -> bool:
    """The one place that decides what a run of zeroes costs the target: nothing when it reads as zeroes
    already (``target_is_zero``: returns False), else write-zeroes with ``may_trim`` so it stays sparse (a
    device that cannot zero writes zero buffers itself: an NBD client without WRITE_ZEROES keeps a window
    of them in flight)."""
    if target_is_zero or length <= 0:
        return False
    pos, end = offset, offset + length
    while pos < end:
        step = min(end - pos, MAX_ZERO_REQUEST)
        await target.zero(pos, step, may_trim=True)
        pos += step
    return True


# --- where the data is ------------------------------------------------------------------------------


async def extent_runs(
    source: BlockDevice,
    offset: int,
    end: int,
    *,
    span: int = STATUS_SPAN,
    unknown: Callable[[int, OSError | None], None],
) -> AsyncGenerator[tuple[int, int, bool], None]:
    """Runs ``(offset, length, reads_zero)`` covering ``[offset, end)``, from the source's block status,
    asked ``span`` bytes at a time. Where the source cannot say (the request fails, or it answers nothing),
    ``unknown(offset, error)`` is told: it raises to give up, or returns and the span is data (the reads
    decide — block status is an optimisation)."""
    while offset < end:
        asked = min(end - offset, span)
        try:
            extents = await source.block_status(offset, asked)
        except OSError as exc:
            unknown(offset, exc)
            extents = []
        else:
            if not extents:
                unknown(offset, None)
        if not extents:
            extents = [Extent(asked, 0)]
        for extent in extents:
            length = min(extent.length, end - offset)
            if length <= 0:
                break
            yield offset, length, bool(extent.flags & State.ZERO)
            offset += length


# --- tasks copying together -------------------------------------------------------------------------


async def run_together(tasks: Sequence[asyncio.Future[Any]], *, until: asyncio.Future[Any] | None = None) -> bool:
    """Wait for ``tasks`` to finish; the first that fails cancels the others and its error is raised.
    When ``until`` completes first the others are cancelled and False is returned. Nothing of ``tasks``
    is left running whichever way this ends."""
    try:
        pending: set[asyncio.Future[Any]] = set(tasks)
        while pending:
            waiting = pending if until is None else pending | {until}
            done, pending = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if until is not None:
                if until in done:
                    return False
                pending.discard(until)
            for task in done:
                if task.cancelled():
                    raise asyncio.CancelledError
                exc = task.exception()
                if exc is not None:
                    raise exc
        return True
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- a whole-device copy ----------------------------------------------------------------------------


def default_requests(request_size: int, *, buffered: bool, nearby: bool = True) -> int:
    """Requests in flight when the user did not say: ``BUFFER_BUDGET`` worth of buffers (at least two,
    so one transfer always overlaps another), or ``DEFAULT_REQUESTS`` when the copy holds no buffers or
    reads from an NBD server that is not ``nearby`` (see ``BUFFER_BUDGET``)."""
    if not buffered or not nearby:
        return DEFAULT_REQUESTS
    return max(2, min(DEFAULT_REQUESTS, BUFFER_BUDGET // request_size))


def check_destination(source_size: int, dst: BlockDevice) -> None:
    """A destination a whole-device copy can write: as large as the source, writable."""
    if dst.size < source_size:
        raise CopyFailed(f"the destination ({dst.size} bytes) is smaller than the source ({source_size} bytes)")
    if dst.read_only:
        raise CopyFailed("the destination is read-only")


async def copy_device(
    src: BlockDevice,
    dst: BlockDevice,
    *,
    dst_is_zero: bool = False,
    request_size: int = DEFAULT_REQUEST_SIZE,
    requests: int | None = None,
    detect_zeroes: bool = True,
    progress: ProgressSink | None = None,
    ranges: Iterable[tuple[int, int]] | None = None,
) -> CopyStats:
    """Copy all of ``src`` (or only its ``(offset, length)`` ``ranges``, taken lazily from the iterable) to
    the same offsets of ``dst`` with ``requests`` in flight (by default as many as ``default_requests``
    says for this pair of devices); the first failure cancels the rest and is raised. ``dst_is_zero``:
    the destination reads as zeroes already, so zero ranges need nothing."""
    size = src.size
    check_destination(size, dst)
    reader = read_into(src)  # optional: reads into our reused buffers
    # A raw file into an NBD export: payloads go from the page cache into the socket (sendfile).
    sender = write_from_fd(dst) if direct_read_fd(src) is not None else None
    if requests is None:
        uri = remote_uri(src)  # an NBD source; files and images are local
        nearby = uri is None or uri.is_local
        requests = default_requests(request_size, buffered=sender is None, nearby=nearby)
    stats = CopyStats(size=size)
    zeroes = bytes(request_size)
    queue: asyncio.Queue[tuple[int, int, bool] | None] = asyncio.Queue(maxsize=requests * 2)

    def account(nbytes: int) -> None:
        if progress is not None:
            progress.advance(nbytes)

    async def zero_range(offset: int, length: int) -> None:
        if await write_zeroes(dst, offset, length, target_is_zero=dst_is_zero):
            stats.zero_bytes += length
        else:
            stats.skipped_bytes += length
        account(length)

    def unknown(offset: int, exc: OSError | None) -> None:
        if exc is None:
            raise CopyFailed(f"the source reported no block status at offset {offset}")
        if not isinstance(exc, NbdRequestError):
            raise exc  # a dead connection, a failing disk: the copy fails
        log.warning("block status failed at offset %d (%s): copying as data", offset, exc)

    async def produce() -> None:
        for start, length in ranges if ranges is not None else [(0, size)]:
            runs = extent_runs(src, start, min(start + length, size), unknown=unknown)
            async with aclosing(runs):
                async for offset, run, reads_zero in runs:
                    step = run if reads_zero else request_size
                    for pos in range(0, run, step):
                        await queue.put((offset + pos, min(step, run - pos), reads_zero))
        for _ in range(requests):
            await queue.put(None)

    async def work() -> None:
        buffer = bytearray(request_size) if reader is not None else None
        view = memoryview(buffer) if buffer is not None else None
        while True:
            item = await queue.get()
            if item is None:
                return
            offset, length, reads_zero = item
            if reads_zero:
                await zero_range(offset, length)
                continue
            if sender is not None:
                fd = direct_read_fd(src)
                # A chunk that starts with zeroes takes the ordinary path (which checks it all).
                if fd is not None and not (detect_zeroes and file_starts_with_zeroes(fd, offset)):
                    await sender(offset, fd, offset, length)
                    stats.data_bytes += length
                    account(length)
                    continue
            data: bytes | bytearray | memoryview
            if reader is not None and buffer is not None and view is not None:
                data = buffer if length == request_size else view[:length]
                await reader(offset, data)
            else:
                data = await src.pread(offset, length)
            if detect_zeroes and is_zero(data, zeroes):
                await zero_range(offset, length)
                continue
            await dst.pwrite(offset, data)
            stats.data_bytes += length
            account(length)

    tasks = [asyncio.ensure_future(produce())] + [asyncio.ensure_future(work()) for _ in range(requests)]
    write_behind(dst, True)  # a raw file is written on its own thread while the next request arrives
    try:
        await run_together(tasks)
    finally:
        write_behind(dst, False)
    await dst.flush()
    return stats


# --- stripes for several processes ------------------------------------------------------------------


@dataclass(frozen=True)
class Stripes:
    """``[0, size)`` in ``stripe``-byte pieces, handed out once each through a counter shared by processes."""

    size: int
    stripe: int
    counter: Any  # multiprocessing.Value("q"): the index of the next unclaimed stripe

    @classmethod
    def plan(cls, size: int, workers: int, align: int, context: Any = None) -> Stripes:
        """About eight stripes per copier, ``align``-aligned, at most ``MAX_STRIPE``."""
        if context is None:
            import multiprocessing  # only a copy by several processes needs it

            context = multiprocessing.get_context("spawn")
        per = div_up(size, workers * 8)
        stripe = max(align, min(MAX_STRIPE, round_up(per, align)))
        return cls(size, stripe, context.Value("q", 0))

    def claim(self) -> Iterator[tuple[int, int]]:
        """The stripes this copier gets, claimed lazily (the copy asks for the next when it needs it)."""
        while True:
            with self.counter.get_lock():
                index = self.counter.value
                self.counter.value = index + 1
            offset = index * self.stripe
            if offset >= self.size:
                return
            yield offset, min(self.stripe, self.size - offset)


__all__ = [
    "DEFAULT_REQUESTS",
    "DEFAULT_REQUEST_SIZE",
    "MAX_ZERO_REQUEST",
    "CopyFailed",
    "CopyStats",
    "ProgressSink",
    "Stripes",
    "copy_device",
    "extent_runs",
    "file_reads_zero",
    "is_zero",
    "run_together",
    "write_zeroes",
    "zero_runs",
]
