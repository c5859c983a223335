"""``CopyBeforeWriteFilter``: old data goes to the backup target before a guest overwrites it.

Sits between an export and the source device (in a ``BlockNode``'s filter stack). Reads pass
through untouched. A write, write-zeroes or trim first makes sure every cluster it touches has its
point-in-time data on the target (``BlockCopier.ensure_copied``: waits only for overlapping in-flight
copies, copies the rest itself), then goes down. Unaligned and cluster-crossing requests simply touch
more clusters; the partial last cluster of the device is copied as far as the device goes.

When the copy fails or takes longer than ``cbw_timeout`` seconds, ``on_cbw_error`` decides, as in
QEMU's copy-before-write driver: ``break-guest-write`` (default) fails the guest request with the
copy's errno (``ETIMEDOUT`` for a timeout) and no data reaches the source, so the snapshot stays
valid and the job copies that cluster later; ``break-snapshot`` lets the guest write proceed,
marks the snapshot broken (``snapshot_error``), stops all further copying and tells the job, which
then fails. Two backups of one device each insert their own filter: they stack, and a write passes
both, each copying the old data its own backup needs.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from bisect import bisect_right
from collections.abc import Callable
from enum import StrEnum

from backup.block_copy import BlockCopier, CopyError
from backup.filter import BlockFilter
from nbd.device import BlockDevice
from nbd.stats import LATENCY_BOUNDS

log = logging.getLogger(__name__)

#: How much old data one guest request copies at a time: guest requests are many and each holds its
#: buffer, so they copy in smaller pieces than the job's workers.
GUEST_COPY_CHUNK = 1024 * 1024


#: Upper bounds (seconds) of the buckets of the delay copy-before-write adds to a guest write: the NBD
#: request latency's buckets from 100 µs, and two more for copies behind a slow target.
DELAY_BOUNDS: tuple[float, ...] = (*LATENCY_BOUNDS[1:], 5.0, 10.0)


class CbwStats:
    """Guest requests that had to copy old data (or wait for its copy) before going down, and how long
    that held them: what a backup costs the guest. Counted only on that path (never for a write whose
    clusters are copied already), in plain ints read at scrape time."""

    __slots__ = ("buckets", "copies", "seconds")

    def __init__(self) -> None:
        self.copies = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(DELAY_BOUNDS) + 1)  # the last one: beyond DELAY_BOUNDS[-1]

    def observe(self, elapsed: float) -> None:
        self.copies += 1
        self.seconds += elapsed
        self.buckets[bisect_right(DELAY_BOUNDS, elapsed)] += 1


#: Per source node name, for the whole process: counters outlive the jobs that fed them.
CBW_STATS: dict[str, CbwStats] = {}


def cbw_stats(node_name: str) -> CbwStats:
    """The counts of the backups of node ``node_name`` (made on first use)."""
    stats = CBW_STATS.get(node_name)
    if stats is None:
        stats = CBW_STATS[node_name] = CbwStats()
    return stats


class OnCbwError(StrEnum):
    """QEMU's ``OnCbwError``."""

    BREAK_GUEST_WRITE = "break-guest-write"
    BREAK_SNAPSHOT = "break-snapshot"


class CopyBeforeWriteFilter(BlockFilter):
    """A ``BlockFilter`` whose write verbs copy the old data of not-yet-copied clusters first."""

    passes_reads = True

    def __init__(
        self,
        next_device: BlockDevice,
        copier: BlockCopier,
        *,
        on_cbw_error: OnCbwError | str = OnCbwError.BREAK_GUEST_WRITE,
        cbw_timeout: float = 0.0,
        on_snapshot_broken: Callable[[OSError], None] | None = None,
        stats: CbwStats | None = None,
    ) -> None:
        super().__init__(next_device)
        if cbw_timeout < 0:
            raise ValueError("cbw-timeout must not be negative")
        self.copier = copier
        # The copier reads the old data through this filter: reads pass through to whatever sits
        # below it *now*, which stays right when a lower filter (another backup) is removed.
        copier.source = self
        self.on_cbw_error = OnCbwError(on_cbw_error)
        self.cbw_timeout = cbw_timeout
        self.on_snapshot_broken = on_snapshot_broken
        self.snapshot_error: OSError | None = None
        self.guest_copies = 0  # how many guest requests had to copy (or wait for a copy) first
        self.refused = 0  # guest requests failed by break-guest-write
        self.stats = stats if stats is not None else CbwStats()
        self._chunk_clusters = max(1, GUEST_COPY_CHUNK // copier.cluster_size)

    # Every guest write passes here, so the test "is anything left to copy" is inlined in each verb:
    # an extra coroutine per request is a visible share of a guest request's cost.

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        pending = self.copier.pending(offset, len(data))
        if pending is not None:
            started = time.perf_counter()
            if not self._copied_now(offset, len(data), *pending):
                await self._copy_first(offset, len(data), *pending)
            self.stats.observe(time.perf_counter() - started)
        await self.next.pwrite(offset, data, fua=fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        pending = self.copier.pending(offset, length)
        if pending is not None:
            started = time.perf_counter()
            if not self._copied_now(offset, length, *pending):
                await self._copy_first(offset, length, *pending)
            self.stats.observe(time.perf_counter() - started)
        await self.next.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        pending = self.copier.pending(offset, length)
        if pending is not None:
            started = time.perf_counter()
            if not self._copied_now(offset, length, *pending):
                await self._copy_first(offset, length, *pending)
            self.stats.observe(time.perf_counter() - started)
        await self.next.trim(offset, length, fua=fua)

    def _copied_now(self, offset: int, length: int, first: int, end: int) -> bool:
        """The fast path (``BlockCopier.copy_now``: file to file, no suspension, no task): True when
        clusters ``[first, end)`` need nothing more. A failure here goes through ``on-cbw-error`` as
        the slow path's does (no timeout: an inline copy cannot stall)."""
        self.guest_copies += 1
        try:
            return self.copier.copy_now(first, end, chunk_clusters=self._chunk_clusters)
        except CopyError as exc:
            self._failed(offset, length, OSError(exc.errno, f"copy-before-write failed: {exc}"))
            return True

    async def _copy_first(self, offset: int, length: int, first: int, end: int) -> None:
        """The slow path: clusters ``[first, end)`` still need their old data on the target, and the
        copy may suspend (it waits for an overlapping copy in flight, or its devices are not files)."""
        try:
            copy = self.copier.ensure_copied(first, end, chunk_clusters=self._chunk_clusters)
            if self.cbw_timeout > 0:
                await asyncio.wait_for(copy, self.cbw_timeout)
            else:
                await copy
            return
        except TimeoutError:
            failure = OSError(errno.ETIMEDOUT, f"copy-before-write timed out after {self.cbw_timeout:g} s")
        except CopyError as exc:
            failure = OSError(exc.errno, f"copy-before-write failed: {exc}")
        self._failed(offset, length, failure)

    def _failed(self, offset: int, length: int, failure: OSError) -> None:
        """``on-cbw-error`` for a failed copy: raise ``failure`` for the guest request (break-guest-write)
        or let it through with the snapshot broken; nothing when the backup ended meanwhile."""
        if not self.copier.active:
            return  # the backup ended while we waited: nothing left to protect
        if self.on_cbw_error is OnCbwError.BREAK_SNAPSHOT:
            self.break_snapshot(failure)
            return
        # A dead target refuses every guest write: say it loudly once, then quietly.
        level = logging.DEBUG if self.refused else logging.WARNING
        log.log(level, "guest write at %d+%d refused: %s", offset, length, failure)
        self.refused += 1
        raise failure

    def break_snapshot(self, error: OSError) -> None:
        """Give up the point in time: guest writes pass straight through from now on."""
        if self.snapshot_error is not None:
            return
        log.error("copy-before-write snapshot broken: %s", error)
        self.snapshot_error = error
        self.copier.deactivate()
        if self.on_snapshot_broken is not None:
            self.on_snapshot_broken(error)


__all__ = ["CBW_STATS", "CbwStats", "CopyBeforeWriteFilter", "OnCbwError", "cbw_stats"]
