"""``BackupJob``: a point-in-time copy of a block node to a target while the guest keeps writing.

The point in time is the moment ``install_filter`` puts a ``CopyBeforeWriteFilter`` on the source
node (the caller holds the node drained, so no guest write is half-way through). From then on the
filter and the job share one ``BlockCopier``: the filter copies a cluster's old data before a guest
overwrites it, the job's workers copy everything else in the background, and neither copies a cluster
twice. ``sync``: ``full`` copies every cluster, ``top`` only what the top image allocates (a device
without ``top_allocation`` — a raw file — has no backing, so that is a full copy), ``none`` copies
nothing in the background and keeps only the old data of what the guest overwrites, running until
cancelled like QEMU's.

Bounded memory and parallelism: ``max_workers`` tasks each claim at most ``max_chunk`` bytes and
copy them in 1 MiB pieces (two in flight: one read, one written), so a job holds at most
2 MiB per worker (from a raw file into an NBD target nothing is held: the data goes by sendfile);
a run that the source reports as zeroes is claimed whole (up to 1 GiB) since it costs nothing (or
one write-zeroes) to copy. Background errors go through the job's error policies
(``on_source_error`` / ``on_target_error``); copy-before-write errors through ``on_cbw_error``
(``break-snapshot`` fails the job). The target is flushed at the end — a failed flush fails the job
whatever its policy, since the target may have lost acknowledged writes. A target the job owns
(``owner``) is closed in ``prepare`` — a failure there fails the job — and, when it was written under
a temporary name, renamed into place in ``commit``; a cancelled or failed job discards it (see
``backup.targets``), except ``sync=none``, whose cancel is its normal end: its target is flushed
(best effort, after the guest copies still in flight have finished) and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from backup.bitmap import ClusterBitmap
from backup.block_copy import BATCH_BYTES, BATCH_TASKS, BlockCopier, CopyError, CopyTask, TopAllocation
from backup.cbw import CopyBeforeWriteFilter, OnCbwError, cbw_stats
from backup.copy_engine import MAX_ZERO_REQUEST, run_together
from backup.dirty_bitmap import DirtyBitmap
from backup.errors import InvalidArgument, JobStateError, different_sizes, same_source_and_target
from backup.events import EventBus
from backup.job import THROTTLE_SLICE, Job
from backup.node import BlockNode
from backup.policy import ErrorAction, OnError
from backup.targets import BackupTarget
from nbd.align import div_up
from nbd.constants import State
from nbd.device import BlockDevice, compresses, file_path
from nbd.device import top_allocation as top_allocation_of

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB

#: QEMU's backup cluster size floor.
MIN_CLUSTER_SIZE = 64 * KiB
#: What a guest write copies at least before it goes down, and the copier's bit: where the guest
#: waits for the whole copy (targets other than plain files, or no capture slot free after failures),
#: a 4 KiB write that copied a whole 64 KiB cluster paid for 60 KiB the job would have copied anyway.
#: Chosen by measuring the guest, not the backup (bench/guest_cost.py: fio 4 KiB random writes QD16
#: during a throttled backup, before the capture writer): the guest kept the most IOPS with 4 KiB
#: granules, lost a fifth of them with 16 KiB and about half with 64 KiB.
GUEST_COPY_GRANULARITY = 4 * KiB
#: How much old data a guest write into a not yet copied part of the disk reads, when source and target
#: are plain files: the granules still to copy in the aligned window around its own, read into memory
#: and written to the target behind the guest (``backup.capture``) — the guest waits for the read only.
#: Chosen by measuring the guest and the backup together against qemu-storage-daemon
#: (bench/guest_cost.py, 6 GiB, fio 4 KiB random writes QD16, backup at 32 MiB/s): with 32 KiB the
#: guest kept 0.36-0.39 of its IOPS (QEMU's 0.31-0.38) while the backup copied 722-759 MiB/s (QEMU's
#: 708-773); 64 KiB copied more (871) but the guest fell to 0.29 of its IOPS after 3 s; 16 KiB copied
#: half as much as QEMU.
GUEST_CAPTURE_WINDOW = 32 * KiB
#: The copier keeps one bit per granule: at most 2**27 bits (16 MiB), a bigger disk gets coarser ones.
MAX_COPY_BITS = 1 << 27
SYNC_MODES = ("full", "top", "none", "bitmap")
BITMAP_MODES = ("on-success", "never", "always")
#: How long closing a target may take before the job gives up on it (a dead NBD server).
CLOSE_TIMEOUT = 2.0
FLUSH_ON_CLOSE_TIMEOUT = 1.0
#: The close that completes a backup (qcow2: the clean header, synced) may wait for a busy disk; only
#: a dead target takes this long — and then the backup is not complete.
FINAL_CLOSE_TIMEOUT = 60.0


@dataclass
class BackupOptions:
    """What ``drive-backup`` / ``blockdev-backup`` ask for (QEMU's ``BackupCommon`` + ``x-perf``)."""

    sync: str = "full"
    speed: int = 0
    on_source_error: OnError | str = OnError.REPORT
    on_target_error: OnError | str = OnError.REPORT
    on_cbw_error: OnCbwError | str = OnCbwError.BREAK_GUEST_WRITE
    cbw_timeout: float = 0.0  # seconds, 0 = no limit
    compress: bool = False  # honoured by the target (a qcow2 created with compression)
    cluster_size: int | None = None  # a floor (QEMU's min-cluster-size); None = max(64 KiB, target's)
    max_workers: int = 4
    max_chunk: int = 4 * MiB
    auto_finalize: bool = True
    auto_dismiss: bool = True
    retry_delay: float = 0.1  # pause between retries of a cluster whose error the policy ignores
    #: QEMU's ``bitmap``: ``sync=bitmap`` copies only its dirty granules; with any sync it is frozen
    #: for the job and, by ``bitmap_mode``, cleared of what the backup copied (see ``BackupJob``).
    bitmap: DirtyBitmap | None = None
    bitmap_mode: str = "on-success"

    def __post_init__(self) -> None:
        if self.sync not in SYNC_MODES:
            raise InvalidArgument(f"Invalid parameter 'sync': '{self.sync}' (expected one of {', '.join(SYNC_MODES)})")
        try:
            self.on_source_error = OnError(self.on_source_error)
            self.on_target_error = OnError(self.on_target_error)
            self.on_cbw_error = OnCbwError(self.on_cbw_error)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if self.speed < 0:
            raise InvalidArgument("Invalid parameter 'speed'")
        if self.cbw_timeout < 0:
            raise InvalidArgument("Invalid parameter 'cbw-timeout'")
        if self.cluster_size is not None and (self.cluster_size <= 0 or self.cluster_size & (self.cluster_size - 1)):
            raise InvalidArgument("Invalid parameter 'cluster-size': must be a power of 2")
        if self.max_workers < 1:
            raise InvalidArgument("Invalid parameter 'max-workers': must be at least 1")
        if self.max_chunk < 0:
            raise InvalidArgument("Invalid parameter 'max-chunk': must not be negative")
        if self.retry_delay < 0:
            raise InvalidArgument("Invalid parameter 'retry-delay'")
        if self.bitmap_mode not in BITMAP_MODES:
            raise InvalidArgument(f"Invalid parameter 'bitmap-mode': '{self.bitmap_mode}'")


def backup_cluster_size(target: BlockDevice, floor: int | None = None) -> int:
    """max(64 KiB, the target's preferred block size, ``floor``) — a power of two."""
    size = max(MIN_CLUSTER_SIZE, target.block_limits.preferred, floor or 0)
    return 1 << (size - 1).bit_length()


def copy_granularity(size: int, cluster_size: int, target: BlockDevice, options: BackupOptions) -> int:
    """The copier's granularity (``BlockCopier``'s cluster): ``GUEST_COPY_GRANULARITY``, no finer than
    the target accepts nor than ``MAX_COPY_BITS`` allows, never coarser than the backup's cluster. The
    whole cluster where that is the contract: ``sync=none`` (its target holds exactly the clusters guests
    overwrote, as QEMU's), a compressing target (it stores whole compressed clusters), or a cluster size
    the caller asked for (``min-cluster-size``)."""
    if options.sync == "none" or options.cluster_size is not None or compresses(target):
        return cluster_size
    grain = max(GUEST_COPY_GRANULARITY, target.block_limits.minimum, div_up(size, MAX_COPY_BITS))
    return min(1 << (grain - 1).bit_length(), cluster_size)


def capture_window(granularity: int, cluster_size: int, options: BackupOptions) -> int:
    """The copier's capture window: ``GUEST_CAPTURE_WINDOW`` within the backup's cluster, at least a
    granule; none for ``sync=none``, whose target is read (image fleecing) while the job runs."""
    if options.sync == "none":
        return 0
    return max(granularity, min(GUEST_CAPTURE_WINDOW, cluster_size))


def _is_same_device(source: BlockNode, target: BlockDevice) -> bool:
    if target is source or target is source.device or target is source.top or any(f is target for f in source.filters):
        return True
    target_path = file_path(target)
    source_path = source.filename or file_path(source.device)
    if target_path is None or source_path is None:
        return False
    try:
        return os.path.samefile(target_path, source_path)
    except OSError:
        return False


class BackupJob(Job):
    """QEMU's backup block job over a ``BlockNode`` source and any ``BlockDevice`` target."""

    job_type: ClassVar[str] = "backup"

    def __init__(
        self,
        job_id: str,
        source: BlockNode,
        target: BlockDevice,
        options: BackupOptions | None = None,
        *,
        events: EventBus,
        target_zero_init: bool,
        close_target: bool = False,
        owner: BackupTarget | None = None,
    ) -> None:
        options = options or BackupOptions()
        if options.sync == "bitmap" and options.bitmap is None:
            raise InvalidArgument("must provide a valid bitmap name for 'bitmap' sync mode")
        if _is_same_device(source, target):
            raise same_source_and_target()
        if target.read_only:
            raise InvalidArgument("Target is read-only")
        if target.size < source.size:
            raise different_sizes("target", target.size, source.size)
        super().__init__(
            job_id,
            events=events,
            auto_finalize=options.auto_finalize,
            auto_dismiss=options.auto_dismiss,
            speed=options.speed,
        )
        self.source = source
        self.target = target
        self.options = options
        self.target_zero_init = target_zero_init
        if owner is None and close_target:
            owner = BackupTarget(target, target_zero_init)
        self.owner = owner  # the target is ours: closed (and put in place, or discarded) at the end
        self.cluster_size = backup_cluster_size(target, options.cluster_size)
        self.granularity = copy_granularity(source.size, self.cluster_size, target, options)
        self.max_chunk = max(self.cluster_size, options.max_chunk - options.max_chunk % self.cluster_size)
        self.copier: BlockCopier | None = None
        self.filter: CopyBeforeWriteFilter | None = None
        self.snapshot_error: OSError | None = None
        self._broken = asyncio.Event()
        self._cursor = 0
        #: The last data extent the source reported, ``[start, end)``: claims inside it skip the
        #: block-status query (scattered incremental clusters of a dense disk asked once, not each).
        self._data_extent = (0, 0)
        self._data_window = 0  # what ``_zero_run_hint`` asks about first; 0: one chunk
        self._source_extents: bool | None = None  # whether the source answers block status
        self._detached = False
        self._flushed = False
        #: QEMU's sync bitmap: frozen from now on (busy; new writes go to its successor) until the job
        #: ends, then kept, cleared of what was copied, or merged back by ``bitmap_mode``.
        self.sync_bitmap = options.bitmap
        self._listed_at_freeze = {id(b) for b in source.bitmaps.values()}
        if self.sync_bitmap is not None:
            self.sync_bitmap.freeze()

    # --- setting the point in time ----------------------------------------------------------------

    def install_filter(self) -> CopyBeforeWriteFilter:
        """Fix the point in time: put the copy-before-write filter on the source node.

        Synchronous on purpose: the caller holds ``source.drained()`` (for a transaction, every
        source's) so no guest write is in flight while the filter goes in.
        """
        if self.filter is not None:
            raise JobStateError(f"Job '{self.id}' already has its copy-before-write filter")
        if self._detached:
            raise JobStateError(f"Job '{self.id}' has already ended")
        options = self.options
        top_allocation: TopAllocation | None = None
        if options.sync == "top":
            top_allocation = top_allocation_of(self.source.device)
        copier = BlockCopier(
            self.source,  # replaced by the filter itself: the copier reads through it
            self.target,
            size=self.source.size,
            cluster_size=self.granularity,
            zero_unit=self.cluster_size,
            target_zero_init=self.target_zero_init,
            max_chunk=self.max_chunk,
            top_allocation=top_allocation,
            bitmap=self._initial_copy_bits(),
            capture_window=capture_window(self.granularity, self.cluster_size, options),
        )
        copier.on_progress = self.progress_done
        copier.on_skip = self._progress_skipped

        def make(below: BlockDevice) -> CopyBeforeWriteFilter:
            return CopyBeforeWriteFilter(
                below,
                copier,
                on_cbw_error=options.on_cbw_error,
                cbw_timeout=options.cbw_timeout,
                on_snapshot_broken=self._snapshot_broken,
                stats=cbw_stats(self.source.name),
            )

        installed = self.source.insert_filter(make)
        assert isinstance(installed, CopyBeforeWriteFilter)
        self.copier, self.filter = copier, installed
        self.source.hold(self)
        self.progress_set_remaining(copier.remaining)
        return installed

    def _initial_copy_bits(self) -> ClusterBitmap | None:
        """At the point in time: what to copy. ``sync=bitmap``: every copier granule that overlaps a
        dirty granule of the sync bitmap (whole dirty granules are copied); otherwise everything.

        Writes between the job's creation (the freeze) and now went to the successor, yet they are part
        of this point in time: they move back into the frozen bits, so this backup copies them."""
        bitmap = self.sync_bitmap
        if bitmap is None:
            return None
        successor = bitmap.successor
        if successor is not None and successor.count:
            bitmap.merge_from(successor)
            successor.clear()
        if self.options.sync != "bitmap":
            return None
        return bitmap.at_granularity(self.granularity)

    def _sync_bitmap(self, ok: bool) -> None:
        """QEMU's ``backup_cleanup_sync_bitmap`` (idempotent): on success (or always with ``always``)
        the bitmap keeps only what was written since the point in time (``abdicate``), with
        ``always`` plus what a failed job did not copy; on failure with ``on-success``, and always with
        ``never``, the old bits and the new writes together (``reclaim``). A job that never reached
        its point in time copied nothing: its bitmap is reclaimed whatever the mode."""
        bitmap, self.sync_bitmap = self.sync_bitmap, None
        if bitmap is None or not bitmap.frozen:
            return
        mode, copier = self.options.bitmap_mode, self.copier
        if mode == "never" or copier is None or (not ok and mode == "on-success"):
            bitmap.reclaim()
            return
        bitmap.abdicate()
        self._list_as_successor(bitmap)
        if ok:
            return
        uncopied = [copier.bytes_of(first, last) for first, last in copier.bitmap.runs()]
        uncopied += [copier.bytes_of(task.start, task.end) for task in copier.in_flight]
        for offset, length in uncopied:
            bitmap.set_range(offset, length)

    def _list_as_successor(self, bitmap: DirtyBitmap) -> None:
        """QEMU's successor takes the name: the bitmap is listed where the successor was, i.e. as if
        added when the job froze it (after the bitmaps added since, before all the others)."""
        listed = self.source.bitmaps
        if listed.get(bitmap.name) is not bitmap:
            return
        newer = {name: b for name, b in listed.items() if id(b) not in self._listed_at_freeze}
        older = {name: b for name, b in listed.items() if id(b) in self._listed_at_freeze and b is not bitmap}
        listed.clear()  # in place, as BlockNode.add_bitmap does
        listed.update({**newer, bitmap.name: bitmap, **older})

    async def attach(self) -> CopyBeforeWriteFilter:
        """Drain the source and install the filter (a single backup; transactions drain themselves)."""
        async with self.source.drained():
            return self.install_filter()

    def detach(self) -> None:
        """Stop copying and take the filter out (idempotent). Safe without draining: a guest request
        still inside the filter holds it and, the copier being inactive, just passes through."""
        if self._detached:
            return
        self._detached = True
        if self.copier is not None:
            self.copier.deactivate()
        if self.filter is not None:
            with contextlib.suppress(InvalidArgument):
                self.source.remove_filter(self.filter)
        self.source.release(self)

    def _snapshot_broken(self, error: OSError) -> None:
        self.snapshot_error = error
        self._broken.set()

    # --- the work -----------------------------------------------------------------------------------

    async def run(self) -> None:
        if self.copier is None:
            raise JobStateError(f"Job '{self.id}' was started without its copy-before-write filter")
        broken = asyncio.ensure_future(self._broken.wait())
        try:
            if self.options.sync == "none":
                await broken  # only cancel (or a broken snapshot) ends it
            else:
                if self.copier.top_allocation is not None:
                    await self._drop_unallocated()
                await self._copy_all(broken)
                await self._flush_captured()
            self._check_snapshot()
            await self._flush_target()
            self._check_snapshot()
        finally:
            broken.cancel()

    def _check_snapshot(self) -> None:
        if self.snapshot_error is not None:
            raise OSError(self.snapshot_error.errno or errno.EIO, f"copy-before-write failed: {self.snapshot_error}")

    async def _copy_all(self, broken: asyncio.Future[Any]) -> None:
        copier = self.copier
        assert copier is not None
        while True:
            workers = [asyncio.ensure_future(self._worker()) for _ in range(max(1, min(self.options.max_workers, 64)))]
            if not await run_together(workers, until=broken):
                return
            # Guest copies may still be in flight, and a failed one gives its clusters back.
            await copier.wait_idle()
            if copier.bitmap.count == 0:
                return

    async def _flush_captured(self) -> None:
        """Until the old data guest writes captured is on the target; a write that fails is retried
        under ``on-target-error`` (its data is held meanwhile), or fails the job (``report``)."""
        copier = self.copier
        assert copier is not None
        while True:
            epoch = self.run_epoch
            try:
                await copier.flush_captured()
                return
            except CopyError as exc:
                await self._before_retry(exc.cause, is_read=False, epoch=epoch, wrapper=exc)

    async def _drop_unallocated(self) -> None:
        """``sync=top``, like QEMU's ``backup_run``: first take the clusters the top image does not
        allocate out of the copy, shrinking ``len`` rather than counting them as done; the guest's
        copy-before-write then skips them too. Source errors here go through ``on-source-error``."""
        copier = self.copier
        assert copier is not None and copier.top_allocation is not None
        cs, pos = copier.cluster_size, 0
        while pos < copier.size:
            await self.pause_point()
            if not copier.active:
                return
            epoch = self.run_epoch
            try:
                runs = await copier.top_allocation(pos, min(copier.size - pos, MAX_ZERO_REQUEST))
            except OSError as exc:
                await self._before_retry(exc, is_read=True, epoch=epoch)
                continue
            if not runs or runs[0][0] <= 0:
                return  # no answer: copy everything, the copier asks again per claim
            for length, allocated in runs:
                end = min(pos + length, copier.size)
                if not allocated:
                    # Whole clusters only: a cluster partly allocated is copied (its allocated part).
                    first = div_up(pos, cs)
                    last = copier.clusters if end >= copier.size else end // cs
                    if last > first:
                        self._progress_skipped(copier.drop(first, last))
                pos = end
                if pos >= copier.size:
                    break

    def _progress_skipped(self, nbytes: int) -> None:
        self.total_progress -= nbytes

    def _claim_limit(self) -> int:
        """Granules per claim: ``max_chunk``, or under a speed limit about one throttle slice per
        worker (at least a backup cluster), so progress and the limit advance by small steps instead
        of every worker copying a whole chunk before the first sleep."""
        copier = self.copier
        assert copier is not None
        bits = copier.cluster_bits
        limit = self.max_chunk >> bits
        if self.speed > 0:
            workers = max(1, min(self.options.max_workers, 64))
            limit = min(limit, max(self.cluster_size >> bits, int(self.speed * THROTTLE_SLICE / workers) >> bits))
        return limit

    async def _worker(self) -> None:
        copier = self.copier
        assert copier is not None
        while True:
            await self.pause_point()
            if not copier.active:
                return
            if copier.capture_failed:  # the target failed a captured write: the policy decides now
                await self._flush_captured()
                continue
            epoch = self.run_epoch  # before the claim: whatever the claim starts belongs to this run
            task = await self._claim_next()
            if task is None:
                busy = copier.in_flight
                if not busy:
                    if copier.bitmap.count == 0:
                        return
                    await asyncio.sleep(0)
                    continue  # a claim vanished under us; look again
                await busy[0].done.wait()
                continue
            try:
                written = await self._copy(task)
            except CopyError as exc:
                await self._before_retry(exc.cause, is_read=exc.is_read, epoch=epoch, wrapper=exc)
                continue
            await self.throttle(written)
            # Devices with inline syscalls never suspend: yield so guest requests get their turn.
            await asyncio.sleep(0)

    async def _copy(self, task: CopyTask) -> int:
        """Copy a claim; a small one together with the next small claims when the copier batches
        (``BlockCopier.run_batch``: an incremental's scattered clusters into a qcow2 image). Big claims
        met on the way are copied after the batch, or given back if the batch fails."""
        copier = self.copier
        assert copier is not None
        if not copier.batches or not copier.batchable(task):
            return await copier.run(task)
        tasks, size = [task], task.end - task.start
        after: list[CopyTask] = []  # claims too big for a batch, copied after it
        room = BATCH_BYTES >> copier.cluster_bits
        if self._claim_limit() >= room:
            # Nothing but the room bounds a claim here (a source's zero run only lengthens a claim
            # past the claim limit): the rest of the batch is claimed in one pass over the bitmap.
            for more in copier.claim_runs(self._cursor, room - size, BATCH_TASKS - 1):
                (tasks if copier.batchable(more) else after).append(more)
                self._cursor = more.end
        else:
            try:
                while size < room and len(tasks) < BATCH_TASKS:
                    claimed = await self._claim_next(room - size)
                    if claimed is None:
                        break
                    if not copier.batchable(claimed):
                        after.append(claimed)
                        break
                    tasks.append(claimed)
                    size += claimed.end - claimed.start
            except BaseException:  # cancelled while asking the source: nothing was copied
                for claimed in tasks:
                    copier.give_back(claimed)
                raise
        try:
            written = await copier.run_batch(tasks)
        except BaseException:
            for claimed in after:
                copier.give_back(claimed)
            raise
        for index, claimed in enumerate(after):  # too big for a batch: piped by ``run``, one by one
            try:
                written += await copier.run(claimed)
            except BaseException:
                for rest in after[index + 1 :]:
                    copier.give_back(rest)
                raise
        return written

    def _find_next(self) -> int | None:
        copier = self.copier
        assert copier is not None
        found = copier.bitmap.next_set(self._cursor)
        if found is None and self._cursor:
            found = copier.bitmap.next_set(0)
        return found

    async def _claim_next(self, most: int | None = None) -> CopyTask | None:
        """Claim the next run of clusters: up to ``max_chunk``, or a whole zero run (it costs nothing);
        never more than ``most`` clusters when given (what a batch has room for)."""
        copier = self.copier
        assert copier is not None
        first = self._find_next()
        if first is None:
            return None
        limit = self._claim_limit()
        zero_limit = await self._zero_run_hint(first)
        if not copier.bitmap[first]:  # another worker or a guest took it while we asked
            first = self._find_next()
            if first is None:
                return None
            zero_limit = 0
        span = max(limit, zero_limit) if most is None else min(max(limit, zero_limit), most)
        end = copier.bitmap.run_end(first, first + span)
        self._cursor = end
        return copier.claim(first, end)

    async def _zero_run_hint(self, first: int) -> int:
        """How many clusters from ``first`` the source reports as reading zeroes (a hint only: the
        copier re-checks what it claims, and a cluster whose bit is still set was never written).

        Asks about a chunk-sized window first and widens it only while it is all zeroes, because a
        device may walk every extent of the range it is asked about."""
        copier = self.copier
        assert copier is not None
        if self._source_extents is None:  # the filter stack under the job stays as it is while it runs
            self._source_extents = copier.source.capabilities.can_extents
        if not self._source_extents:
            return 0
        start, _ = copier.bytes_of(first, first + 1)
        known_from, known_to = self._data_extent
        if known_from <= start < known_to:
            return 0
        pos, window = start, self._data_window or self.max_chunk
        limit = min(copier.size, start + MAX_ZERO_REQUEST)
        while pos < limit:
            asked = min(window, limit - pos)
            try:
                extents = await copier.source.block_status(pos, asked)
            except OSError:
                break  # the copy itself will meet (and report) the error
            if not extents or not extents[0].flags & State.ZERO:
                if extents and pos == start:
                    self._data_extent = (start, start + extents[0].length)
                    # Data to the end of the window: the extent likely goes on, so ask about four
                    # times as much next time (an incremental's claims, megabytes apart in a dense
                    # disk, then ask a handful of times, not once per claim).
                    whole = extents[0].length >= asked
                    self._data_window = min(window * 4, MAX_ZERO_REQUEST) if whole else 0
                break
            pos += min(extents[0].length, asked)
            if extents[0].length < asked:
                break
            window = min(window * 4, MAX_ZERO_REQUEST)
        if pos >= copier.size:
            return copier.clusters - first
        return (pos >> copier.cluster_bits) - first

    async def _flush_target(self) -> None:
        """Make the copy durable. A failed flush ends the job whatever ``on-target-error`` says: the
        target may have dropped writes it had acknowledged (Linux reports a writeback error once,
        then marks the pages clean), so a retry that succeeds proves nothing about the copy."""
        try:
            await self.target.flush()
        except OSError as exc:
            await self._before_retry(exc, is_read=False, policy=OnError.REPORT)
            raise  # report raised it already: never retried
        self._flushed = True

    async def _before_retry(
        self,
        exc: OSError,
        *,
        is_read: bool,
        epoch: int | None = None,
        policy: OnError | None = None,
        wrapper: BaseException | None = None,
    ) -> None:
        """The one error-policy rule of the job's own requests (``policy``: by default ``on-source-error``
        for reads, ``on-target-error`` for writes), called in the ``except`` of a failed request issued
        in run ``epoch``: ``report`` raises ``exc`` (from ``wrapper``, the copier's error around it),
        ``ignore`` waits ``retry_delay`` (never spin without yielding), ``stop`` returns after the resume
        (or at once for a request from an earlier run); the caller then retries."""
        if policy is None:
            policy = OnError(self.options.on_source_error if is_read else self.options.on_target_error)
        action = await self.handle_error(exc, policy, is_read=is_read, epoch=epoch)
        if action is ErrorAction.REPORT:
            if wrapper is not None:
                raise exc from wrapper
            raise exc
        if action is ErrorAction.IGNORE:
            await asyncio.sleep(self.options.retry_delay)

    # --- lifecycle hooks ----------------------------------------------------------------------------

    async def _wait_for_guest_copies(self) -> None:
        """What QEMU's drained section around removing the filter gives: guest writes already in the
        filter finish the copy they started (``detach`` stops any further one), so the old data they
        carry reaches the target before it is flushed and closed, and no copy writes to a closed
        target. A copy stuck on a dead target gets a short grace only, so cancel stays prompt; it
        then fails on the closed target and its guest write goes through (the copier is inactive).
        Then the copier's file-copy thread stops."""
        copier = self.copier
        if copier is None:
            return
        if copier.in_flight:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await copier.wait_idle()
            except TimeoutError:
                log.warning("job %s: %d copy-before-write copies still in flight", self.id, len(copier.in_flight))
        await copier.close()

    def early_fail(self) -> None:
        self.detach()
        self._sync_bitmap(False)
        super().early_fail()

    async def prepare(self) -> None:
        """The copy is complete and flushed: stop copying and close a target we own. A close that
        fails (the qcow2 metadata write, a dead NBD server) fails the job, which then aborts."""
        self.detach()
        await self._wait_for_guest_copies()
        if self.owner is None:
            return
        try:
            async with asyncio.timeout(FINAL_CLOSE_TIMEOUT):
                await self.owner.close()
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, f"closing the target timed out after {FINAL_CLOSE_TIMEOUT:g} s") from None
        except OSError as exc:
            log.error("job %s: closing the target failed: %s", self.id, exc)
            raise

    def commit(self) -> None:
        """Put a target file written under a temporary name in place (a failure fails the job)."""
        if self.owner is not None:
            self.owner.complete()
        self._sync_bitmap(True)

    def abort(self) -> None:
        """Failed, cancelled, or a group peer failed: the sync bitmap by ``bitmap_mode``'s failure rule."""
        self._sync_bitmap(False)

    async def clean(self) -> None:
        self.detach()
        self._sync_bitmap(False)  # only if neither commit nor abort ran (then nothing was committed)
        await self._wait_for_guest_copies()
        owner = self.owner
        if owner is None or owner.completed:
            return
        written = self.copier is not None and (self.copier.written_bytes > 0 or self.current_progress > 0)
        keep = self._keeps_target_on_cancel()
        durable = self._flushed or not written
        if written and not self._flushed and (keep or owner.partial is None):
            # What a cancelled job copied into a target that stays is made durable (sync=none ends so
            # and keeps its target); a dead target gets a short grace only, so cancel stays prompt.
            try:
                async with asyncio.timeout(FLUSH_ON_CLOSE_TIMEOUT):
                    await self.target.flush()
                durable = True
            except (OSError, TimeoutError) as exc:
                log.error("job %s: flushing the target failed: %s", self.id, exc)
        if keep and durable:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await owner.close()
                owner.complete()
                return
            except (OSError, TimeoutError) as exc:
                log.error("job %s: closing the target failed, discarding it: %s", self.id, exc)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await owner.discard(written=written)
        except (OSError, TimeoutError) as exc:
            log.error("job %s: closing the target failed: %s", self.id, exc)

    def _keeps_target_on_cancel(self) -> bool:
        """``sync=none`` ends with a cancel, normally: its target is the result, kept like QEMU's."""
        return self.options.sync == "none" and self.started and self.is_cancelled and self.snapshot_error is None


__all__ = [
    "GUEST_CAPTURE_WINDOW",
    "MIN_CLUSTER_SIZE",
    "BackupJob",
    "BackupOptions",
    "backup_cluster_size",
    "capture_window",
    "copy_granularity",
]
