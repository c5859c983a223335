"""``BlockCopier``: the state a backup shares between its job and its copy-before-write filter.

One bit per cluster says "the old data of this cluster still has to reach the target". Copying a
cluster *claims* it first: its bit is cleared and a ``CopyTask`` covering it is put in the in-flight
list, both without an ``await`` in between, so whoever comes next (the job's workers or a guest write
in the filter) either sees the bit set and claims it, or finds the task and waits for exactly that
task — never for unrelated clusters, and no cluster is ever copied twice. A failed or cancelled copy
sets its bits again so the cluster is retried. The invariant that makes the point in time hold: a
cluster's bit is only cleared by a claim, and a guest write reaches the source only after the claim
covering its clusters has finished successfully — so while a bit is set, the source still holds the
data of the instant the backup started. (A guest copy between two plain files that cannot suspend is
a claim nobody can see: the bits are cleared and the copy done with no ``await`` in between. With a
capture window, "done" means read into a buffer of the copier's ``CaptureWriter``: the old data is
held in memory until its writer thread has put it on the target, and the job drains the writer
before it flushes — see ``backup.capture``.)

The copier's cluster is its *copy granularity*: what a guest write copies at least. It may be finer
than the backup's cluster (QEMU's 64 KiB): the job chooses it (``backup_job.copy_granularity``) so that
a 4 KiB guest write copies a few KiB of old data, not a whole cluster.

Zero handling is the copy engine's (``backup.copy_engine``), for both paths: ranges the source reports
as reading zeroes (and clusters read back as all zeroes) are skipped when the target is known to read
as zeroes, and otherwise sent as write-zeroes with ``may_trim`` so the target stays sparse; clusters
read back are tested in ``zero_unit`` pieces (the backup's cluster), aligned.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Callable
from contextlib import aclosing, suppress

from backup.bitmap import ClusterBitmap
from backup.capture import CaptureWriter, Slot
from backup.copy_engine import extent_runs, file_reads_zero, write_zeroes, zero_runs
from backup.fileio import read_full
from backup.io_thread import IoThread
from nbd.device import BlockDevice, compresses, direct_read_fd, direct_write_fd, write_from_fd, write_many

MiB = 1024 * 1024

#: Largest single read/write of data: what one inline copy may hold the event loop for.
COPY_PIECE = 1 * MiB
#: Copies up to this size between two plain files go straight from fd to fd on the loop (``os.preadv``
#: into a reused buffer, ``os.pwrite``): no coroutine per layer, no fresh ``bytes``. Larger ones (the
#: job's chunks) go to the copier's file-copy thread, whole: one hand-off per chunk.
DIRECT_COPY_MAX = 256 * 1024
#: What the file-copy thread reads and writes at a time. A write holds the target file's lock (the
#: inode's) for as long as it takes, and a guest copy on the loop writing the same file waits for it:
#: measured under guest load, 256 KiB pieces kept the guest's p99 a third lower than 1 MiB pieces
#: for the same backup throughput.
FILE_COPY_PIECE = 256 * 1024

TopAllocation = Callable[[int, int], Awaitable[list[tuple[int, bool]]]]
#: A job batches claims of at most ``DIRECT_COPY_MAX`` each, up to this many bytes or ``BATCH_TASKS``
#: claims, into one ``pwrite_many`` when the target takes scattered writes as one request (qcow2):
#: an incremental backup's scattered clusters cost a lock hold, an allocation and a ``pwritev`` per
#: batch instead of per cluster (measured: a 1 % incremental of 1 GiB into qcow2 a fifth faster).
BATCH_BYTES = 1 * MiB
BATCH_TASKS = 64

#: ``NbdClient.pwrite_from_fd``: write ``length`` bytes of a file at ``offset`` with sendfile.
SendFromFd = Callable[[int, int, int, int], Awaitable[None]]


class CopyError(Exception):
    """A copy failed on the source (``is_read``) or the target; ``cause`` is the device's ``OSError``.

    Not an ``OSError`` itself so callers cannot confuse it with a failure of their own request: the
    job hands ``cause`` to its error policy, the filter applies ``on-cbw-error``.
    """

    def __init__(self, cause: OSError, *, is_read: bool) -> None:
        super().__init__(f"{'source read' if is_read else 'target write'} failed: {cause}")
        self.cause = cause
        self.is_read = is_read

    @property
    def errno(self) -> int:
        return self.cause.errno or errno.EIO


class CopyTask:
    """Clusters ``[start, end)`` being copied; ``done`` is set when the copy ended either way.

    The event is made only when someone waits for it (a guest write over the task, a worker with
    nothing left to claim): most tasks end unwatched, and an incremental makes one per cluster."""

    __slots__ = ("_done", "end", "finished", "ok", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.ok = False
        self.finished = False
        self._done: asyncio.Event | None = None

    @property
    def done(self) -> asyncio.Event:
        if self._done is None:
            self._done = asyncio.Event()
            if self.finished:
                self._done.set()
        return self._done

    def finish(self, ok: bool) -> None:
        self.ok = ok
        self.finished = True
        if self._done is not None:
            self._done.set()

    def overlaps(self, start: int, end: int) -> bool:
        return self.start < end and start < self.end

    def __repr__(self) -> str:
        return f"CopyTask([{self.start}, {self.end}), done={self.done.is_set()}, ok={self.ok})"


#: Told the bytes a copy finished (or found nothing to do for).
BytesDone = Callable[[int], None]


def _no_block_status(offset: int, exc: OSError | None) -> None:
    """A source without block status is copied as data; any other failure to ask is a read error."""
    if exc is not None and exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
        raise CopyError(exc, is_read=True) from exc


def _zero_progress(nbytes: int) -> None:
    """Default progress sink: nobody listens."""


class BlockCopier:
    """Copies clusters of ``source`` to ``target`` at most once each, for a job and a filter together."""

    def __init__(
        self,
        source: BlockDevice,
        target: BlockDevice,
        *,
        size: int,
        cluster_size: int,
        target_zero_init: bool,
        max_chunk: int = 4 * MiB,
        top_allocation: TopAllocation | None = None,
        bitmap: ClusterBitmap | None = None,
        zero_unit: int | None = None,
        capture_window: int = 0,
    ) -> None:
        if cluster_size <= 0 or cluster_size & (cluster_size - 1):
            raise ValueError(f"cluster size {cluster_size} is not a power of two")
        if capture_window and (capture_window < cluster_size or capture_window & (capture_window - 1)):
            raise ValueError(f"capture window {capture_window} is not a power of two of at least the cluster size")
        zero_unit = zero_unit or cluster_size
        if zero_unit < cluster_size or zero_unit & (zero_unit - 1):
            raise ValueError(f"zero unit {zero_unit} is not a power of two of at least the cluster size")
        self.source = source
        self.target = target
        self.size = size
        self.cluster_size = cluster_size
        self.cluster_bits = cluster_size.bit_length() - 1
        self.target_zero_init = target_zero_init
        self.max_chunk = max(cluster_size, max_chunk - max_chunk % cluster_size)
        self.top_allocation = top_allocation
        self.clusters = (size + cluster_size - 1) >> self.cluster_bits
        if bitmap is not None and bitmap.size != self.clusters:
            raise ValueError(f"bitmap has {bitmap.size} bits, the device {self.clusters} clusters")
        self.bitmap = bitmap if bitmap is not None else ClusterBitmap(self.clusters, fill=True)
        self.active = True
        self.on_progress: BytesDone = _zero_progress
        self.on_skip: BytesDone = _zero_progress  # bytes the top image does not allocate: nothing to do
        self.copied_bytes = 0  # bytes whose old data is on the target (or known to need nothing)
        self.written_bytes = 0  # bytes actually written as data to the target
        self._tasks: list[CopyTask] = []
        self._idle = asyncio.Event()
        self._idle.set()
        #: Zero detection works in these units, aligned: a zero piece smaller than the target's cluster
        #: would only fragment it (a guest copy smaller than one is tested whole).
        self.zero_unit = zero_unit
        self._zero_cluster = bytes(zero_unit)
        self._direct_buffer = bytearray(max(zero_unit, DIRECT_COPY_MAX))
        self._file_thread: IoThread | None = None  # the job's file-to-file chunks (created on first use)
        self._file_buffer = bytearray(0)  # the thread's own, sized on first use
        #: Guest copies between two plain files go through a ``CaptureWriter`` (made on first use) when
        #: this is set: the guest waits for the read of the old data only, of the whole window around it.
        self.capture_window = capture_window
        self._capture: CaptureWriter | None = None

    # --- geometry -------------------------------------------------------------------------------

    def bytes_of(self, first: int, end: int) -> tuple[int, int]:
        """Byte offset and length of clusters ``[first, end)``; the last cluster may be partial."""
        offset = first << self.cluster_bits
        return offset, min(end << self.cluster_bits, self.size) - offset

    # --- claims ---------------------------------------------------------------------------------

    @property
    def in_flight(self) -> tuple[CopyTask, ...]:
        return tuple(self._tasks)

    @property
    def remaining(self) -> int:
        """Bytes still to copy (clusters neither copied nor being copied)."""
        count = self.bitmap.count
        if count and self.bitmap[self.clusters - 1]:
            tail = self.size & (self.cluster_size - 1)
            return (count << self.cluster_bits) - (self.cluster_size - tail if tail else 0)
        return count << self.cluster_bits

    def overlapping(self, first: int, end: int) -> CopyTask | None:
        for task in self._tasks:
            if task.overlaps(first, end):
                return task
        return None

    def claim(self, first: int, end: int) -> CopyTask:
        """Take clusters ``[first, end)`` (all still to copy) for copying. Synchronous on purpose."""
        if first >= end or not self.bitmap.take(first, end):
            raise ValueError(f"clusters [{first}, {end}) are not all waiting to be copied")
        task = CopyTask(first, end)
        self._tasks.append(task)
        self._idle.clear()
        return task

    def claim_runs(self, start: int, budget: int, most: int) -> list[CopyTask]:
        """Claim up to ``most`` runs of clusters still to copy, from cluster ``start`` on (then from
        0), ``budget`` clusters in all: what a batch gathers, in one pass over the bitmap
        (``ClusterBitmap.take_runs``). Synchronous, like ``claim``."""
        bitmap = self.bitmap
        runs = bitmap.take_runs(start, self.clusters, budget, most)
        if start and len(runs) < most:
            budget -= sum(end - first for first, end in runs)
            if budget > 0:
                runs += bitmap.take_runs(0, start, budget, most - len(runs))
        tasks = [CopyTask(first, end) for first, end in runs]
        if tasks:
            self._tasks.extend(tasks)
            self._idle.clear()
        return tasks

    def _finish(self, task: CopyTask, ok: bool) -> None:
        if not ok:
            self.bitmap.set(task.start, task.end)
        self._tasks.remove(task)
        task.finish(ok)
        if not self._tasks:
            self._idle.set()

    def _finish_all(self, tasks: list[CopyTask], ok: bool) -> None:
        """``_finish`` for a batch: the in-flight list is rebuilt once, not searched per task."""
        ending = {id(task) for task in tasks}
        self._tasks[:] = [task for task in self._tasks if id(task) not in ending]
        for task in tasks:
            if not ok:
                self.bitmap.set(task.start, task.end)
            task.finish(ok)
        if not self._tasks:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Until no copy is in flight."""
        while self._tasks:
            await self._idle.wait()

    def deactivate(self) -> None:
        """The backup ended: guest writes stop copying. Bits stay as they are (for the record)."""
        self.active = False

    # --- copying --------------------------------------------------------------------------------

    async def run(self, task: CopyTask) -> int:
        """Copy a claimed task; on failure or cancellation its clusters become claimable again.

        Returns how many bytes of data were written to the target (what a speed limit charges)."""
        ok = False
        try:
            offset, length = self.bytes_of(task.start, task.end)
            written, skipped = await self._copy_bytes(offset, length)
            ok = True
        finally:
            self._finish(task, ok)
        self.copied_bytes += length
        if skipped:
            self.on_skip(skipped)  # QEMU shrinks ``len`` for these rather than counting them as done
        self.on_progress(length - skipped)
        return written

    @property
    def batches(self) -> bool:
        """Whether small claims should be copied together (``run_batch``): the target takes scattered
        writes as one request and does not compress (it compresses each write on every core), nothing
        but data and zeroes is to be decided (no ``sync=top``), and the two ends are not plain files
        (those copy fd to fd, a claim at a time, inline)."""
        return (
            self.top_allocation is None
            and write_many(self.target) is not None
            and not compresses(self.target)
            and self._direct_fds() is None
        )

    def batchable(self, task: CopyTask) -> bool:
        """A claim small enough to go into a batch (bigger ones are piped in pieces by ``run``)."""
        return self.bytes_of(task.start, task.end)[1] <= DIRECT_COPY_MAX

    def give_back(self, task: CopyTask) -> None:
        """A claim that will not be copied after all: its clusters are to copy again."""
        self._finish(task, False)

    async def run_batch(self, tasks: list[CopyTask]) -> int:
        """Copy several small claimed tasks (``batchable``) with one ``pwrite_many``: each is read (with
        ``preadv`` into its own buffer when the source is a plain file) and split into data and
        all-zero pieces; the data of all of them goes to the target as one request, the zero pieces
        after it. Every task ends together, and on failure or cancellation every one is to copy again.
        Returns the bytes written as data."""
        write = write_many(self.target)
        assert write is not None
        ok = False
        ranges = [self.bytes_of(task.start, task.end) for task in tasks]
        try:
            source_fd = direct_read_fd(self.source)
            if source_fd is not None:
                data, zeroes = read_batch(source_fd, ranges, self.zero_unit, self._zero_cluster)
            else:
                data, zeroes = [], []
                for offset, length in ranges:
                    buffer = await self._read(offset, length)
                    split_pieces(buffer, offset, self.zero_unit, self._zero_cluster, data, zeroes)
            try:
                await write(data)
            except OSError as exc:
                raise CopyError(exc, is_read=False) from exc
            written = sum(len(piece) for _, piece in data)
            self.written_bytes += written
            for zero_offset, zero_length in zeroes:
                await self._copy_zero(zero_offset, zero_length)
            ok = True
        finally:
            self._finish_all(tasks, ok)
        copied = sum(length for _, length in ranges)
        self.copied_bytes += copied
        self.on_progress(copied)
        return written

    def drop(self, first: int, end: int) -> int:
        """Mark every still-to-copy cluster of ``[first, end)`` as needing nothing (``sync=top``: not
        allocated in the top image); returns the bytes dropped. Synchronous, and done as claims that
        finish at once, so the invariant above holds: a bit still set means no guest write touched
        the cluster, so what the caller learnt about it is still true."""
        dropped = 0
        pos = first
        while pos < end:
            start = self.bitmap.next_set(pos, end)
            if start is None:
                break
            stop = self.bitmap.run_end(start, end)
            self._finish(self.claim(start, stop), True)
            dropped += self.bytes_of(start, stop)[1]
            pos = stop
        return dropped

    async def ensure_copied(self, first: int, end: int, *, chunk_clusters: int | None = None) -> None:
        """Guest path: return once every cluster of ``[first, end)`` has its old data on the target.

        Waits only for in-flight copies that overlap the range, copies the rest itself (in chunks,
        one at a time, so a huge guest request does not allocate a huge buffer). Raises ``CopyError``.
        """
        limit = chunk_clusters or max(1, self.max_chunk >> self.cluster_bits)
        while self.active:
            busy = self.overlapping(first, end)
            if busy is not None:
                await busy.done.wait()
                continue
            start = self.bitmap.next_set(first, end)
            if start is None:
                return
            stop = min(self.bitmap.run_end(start, end), start + limit)
            if self._copy_now(start, stop):
                continue
            if self._capture is not None and self._capture.starved:
                await self._capture.wait_for_slot()
                continue
            await self.run(self.claim(start, stop))

    def copy_now(self, first: int, end: int, *, chunk_clusters: int | None = None) -> bool:
        """The guest's fast path for clusters ``[first, end)``, without suspending: True when none is
        left to copy (every run still to copy was copied now, ``_copy_now``); False when the rest needs
        ``ensure_copied`` (a copy in flight overlaps, these devices cannot copy inline, or every capture
        slot is being written). Raises
        ``CopyError`` like ``ensure_copied``."""
        if not self.active:
            return True
        if self._tasks and self.overlapping(first, end) is not None:
            return False
        bitmap = self.bitmap
        if end - first == 1:  # the usual guest write: one granule
            return self._copy_now(first, end) if bitmap[first] else True
        limit = chunk_clusters or max(1, self.max_chunk >> self.cluster_bits)
        pos = first
        while (start := bitmap.next_set(pos, end)) is not None:
            stop = min(bitmap.run_end(start, end), start + limit)
            if not self._copy_now(start, stop):
                return False
            pos = stop
        return True

    def _copy_now(self, first: int, end: int) -> bool:
        """The guest's fast path: copy clusters ``[first, end)`` (all still to copy) from file to file
        without suspending, when both ends are plain files and nothing else needs a turn of the loop
        (``sync=top``'s allocation query, zero writes into a target that does not read as zeroes).

        No ``await`` between clearing the bits and the end of the copy, so nobody can see the clusters
        half-copied: this is a claim that finishes before anyone looks, without its task and event.
        Returns False (nothing done) when the slow path must take the range; raises ``CopyError``
        (the bits set again) when the copy fails."""
        if self.top_allocation is not None or not self.target_zero_init:
            return False
        offset, length = self.bytes_of(first, end)
        if length > DIRECT_COPY_MAX:
            return False
        fds = self._direct_fds()
        if fds is None:
            return False
        if self.capture_window:
            first = self._capture_windows(fds, first, end)
            if first >= end:
                return True
            if self._capture is not None and self._capture.starved:
                return False  # ensure_copied waits for a slot: an inline write would queue on the target's lock
            offset, length = self.bytes_of(first, end)
        self.bitmap.clear(first, end)
        try:
            _, zeroes = self._copy_direct_sync(*fds, offset, length)
        except BaseException:
            self.bitmap.set(first, end)
            raise
        assert not zeroes  # a zero-initialised target takes no zero writes
        self.copied_bytes += length
        self.on_progress(length)
        return True

    def _capture_windows(self, fds: tuple[int, int], first: int, end: int) -> int:
        """``_copy_now`` through the capture writer: for each capture window that clusters ``[first, end)``
        (all still to copy) touch, in order, read every cluster of the window still to copy into a slot,
        mark them copied and hand the slot to the writer — neighbours of the guest's clusters included,
        so the job does not copy them later at a cost to the guest again. Stops at the first window it
        finds no slot for (every slot in use, or the writer's descriptor is not the target's any more)
        and returns the first cluster not done; the caller waits for a slot (``starved``) or copies the
        rest inline. Raises ``CopyError`` for a failed read (the window's bits as they were)."""
        source_fd, target_fd = fds
        writer = self._capture
        if writer is None:
            writer = self._capture = CaptureWriter(target_fd, self.capture_window)
        elif writer.fd != target_fd:
            return first
        bitmap = self.bitmap
        bits = self.cluster_bits
        per = self.capture_window >> bits
        pos = first
        while pos < end:
            slot = writer.take()
            if slot is None:
                return pos
            window = pos & ~(per - 1)
            window_end = min(window + per, self.clusters)
            base, length = self.bytes_of(window, window_end)
            try:
                if bitmap.take(window, window_end):  # the window's first touch: one read
                    try:
                        read_file_into(source_fd, slot.view[:length], base)
                    except CopyError:
                        bitmap.set(window, window_end)
                        raise
                    slot.pieces = [(base, 0, length)]
                    captured = length
                else:
                    captured = self._capture_runs(source_fd, slot, window, window_end)
            except BaseException:
                writer.give_back(slot)
                raise
            writer.submit(slot)
            self.copied_bytes += captured  # (the writer counts what it writes: zero pieces it skips)
            self.on_progress(captured)
            pos = window_end
        return pos

    def _capture_runs(self, source_fd: int, slot: Slot, window: int, window_end: int) -> int:
        """Read the runs of a window still to copy into ``slot``, then clear their bits (no ``await``:
        nobody sees them half done); returns the bytes read."""
        bitmap = self.bitmap
        base = window << self.cluster_bits
        runs: list[tuple[int, int]] = []
        pieces: list[tuple[int, int, int]] = []
        pos = window
        captured = 0
        while (start := bitmap.next_set(pos, window_end)) is not None:
            stop = bitmap.run_end(start, window_end)
            offset, length = self.bytes_of(start, stop)
            read_file_into(source_fd, slot.view[offset - base : offset - base + length], offset)
            runs.append((start, stop))
            pieces.append((offset, offset - base, offset - base + length))
            captured += length
            pos = stop
        for start, stop in runs:
            bitmap.clear(start, stop)
        slot.pieces = pieces
        return captured

    @property
    def capture_failed(self) -> bool:
        """Whether captured old data failed to reach the target (``flush_captured`` writes it again)."""
        return self._capture is not None and self._capture.failed

    async def flush_captured(self) -> None:
        """Until every captured slot is on the target (failed ones written again); raises ``CopyError``
        when one still fails — its data stays held for the next call."""
        if self._capture is None:
            return
        try:
            await self._capture.flush()
        except OSError as exc:
            raise CopyError(exc, is_read=False) from exc

    def pending(self, offset: int, length: int) -> tuple[int, int] | None:
        """The guest fast path in one call: the clusters ``[first, end)`` of bytes
        ``[offset, offset+length)`` when any of them still needs copying, else None."""
        if not self.active:
            return None
        stop = min(offset + length, self.size)
        if length <= 0 or offset >= stop:
            return None
        bits = self.cluster_bits
        first = offset >> bits
        end = ((stop - 1) >> bits) + 1
        if self._tasks and self.overlapping(first, end) is not None:
            return first, end
        if end - first == 1:
            return (first, end) if self.bitmap[first] else None
        return (first, end) if self.bitmap.next_set(first, end) is not None else None

    async def _copy_bytes(self, offset: int, length: int) -> tuple[int, int]:
        """Copy one claimed byte range, deciding per extent between skip, write-zeroes and data.

        Returns (bytes written as data, bytes skipped as not allocated in the top image)."""
        end = offset + length
        if self.top_allocation is not None:
            try:
                runs = await self.top_allocation(offset, length)
            except OSError as exc:
                raise CopyError(exc, is_read=True) from exc
            pos = offset
            written = skipped = 0
            for run_length, allocated in runs:
                run_end = min(pos + run_length, end)
                if allocated and run_end > pos:
                    written += await self._copy_allocated(pos, run_end)
                elif run_end > pos:
                    skipped += run_end - pos
                pos = run_end
                if pos >= end:
                    break
            if pos < end:  # the allocation map stopped short: be safe and copy the rest
                written += await self._copy_allocated(pos, end)
            return written, skipped
        return await self._copy_allocated(offset, end), 0

    async def _copy_allocated(self, offset: int, end: int) -> int:
        # Within one zero unit (the usual guest copy): reading it and testing for zeroes costs less
        # than asking the source for its allocation first.
        if end - offset <= self.zero_unit or not self.source.capabilities.can_extents:
            return await self._copy_data(offset, end)
        written = 0
        runs = extent_runs(self.source, offset, end, span=end - offset, unknown=_no_block_status)
        async with aclosing(runs):
            async for pos, length, reads_zero in runs:
                if reads_zero:
                    await self._copy_zero(pos, length)
                else:
                    written += await self._copy_data(pos, pos + length)
        return written

    async def _copy_zero(self, offset: int, length: int) -> None:
        """A run of zeroes, as the engine decides for this target; its failure is a write error."""
        try:
            await write_zeroes(self.target, offset, length, target_is_zero=self.target_zero_init)
        except OSError as exc:
            raise CopyError(exc, is_read=False) from exc

    async def _copy_data(self, offset: int, end: int) -> int:
        """Copy data in pieces of at most ``COPY_PIECE``, reading the next piece while the previous
        one is being written; all-zero clusters inside the data go the zero path.

        Local files are read and written inline (no suspension), so the write of each piece runs as
        its own task and the loop gets a turn in between: a job chunk never holds guest requests back
        for the whole copy, and a remote target still has two pieces in flight per copy."""
        piece = min(self.max_chunk, COPY_PIECE)
        fds = self._direct_fds()
        if fds is not None:
            # While a capture writer fills the target, a write from the loop would wait for the
            # target's lock behind a batch of its writes: the job's chunks then go to the thread too.
            if end - offset <= DIRECT_COPY_MAX and self._capture is None:
                return await self._copy_direct(*fds, offset, end - offset)
            return await self._copy_in_thread(*fds, offset, end - offset)
        send_from_fd = write_from_fd(self.target)
        if send_from_fd is not None:
            source_fd = direct_read_fd(self.source)
            if source_fd is not None:
                return await self._copy_by_sendfile(send_from_fd, source_fd, offset, end)
        if end - offset <= piece:  # the common guest copy: no task, no extra loop turn
            return await self._write_nonzero(offset, await self._read(offset, end - offset))
        pos = offset
        written = 0
        writing: asyncio.Task[int] | None = None
        try:
            while pos < end:
                step = min(end - pos, piece)
                data = await self._read(pos, step)
                if writing is not None:
                    written += await writing  # raises the previous piece's CopyError
                writing = asyncio.ensure_future(self._write_nonzero(pos, data))
                pos += step
            last, writing = writing, None
            if last is not None:
                written += await last
        finally:
            if writing is not None and not writing.done():
                writing.cancel()
                await asyncio.wait([writing])
            if writing is not None and not writing.cancelled():
                writing.exception()  # retrieved: the error that matters is already propagating
        return written

    def _direct_fds(self) -> tuple[int, int] | None:
        """(source fd, target fd) when both ends are plain files read and written as they are; looked
        up per copy because the filter stack under the source changes as backups come and go."""
        source_fd = direct_read_fd(self.source)
        if source_fd is None:
            return None
        target_fd = direct_write_fd(self.target)
        return (source_fd, target_fd) if target_fd is not None else None

    async def _copy_direct(self, source_fd: int, target_fd: int, offset: int, length: int) -> int:
        """``_copy_data`` from fd to fd (``_copy_direct_sync``); only the zero pieces (targets that do
        not read as zeroes) may suspend, after the data is written."""
        written, zeroes = self._copy_direct_sync(source_fd, target_fd, offset, length)
        for zero_offset, zero_length in zeroes:
            await self._copy_zero(zero_offset, zero_length)
        return written

    def _copy_direct_sync(
        self, source_fd: int, target_fd: int, offset: int, length: int
    ) -> tuple[int, list[tuple[int, int]]]:
        """``copy_between_files`` through the shared buffer (it holds the whole copy), with no ``await``
        in between, so one buffer serves every copy. Returns (bytes written as data, the zero pieces
        still to write: none when the target reads as zeroes)."""
        written, zero_pieces = copy_between_files(
            source_fd,
            target_fd,
            offset,
            length,
            self._direct_buffer,
            self.zero_unit,
            self._zero_cluster,
            not self.target_zero_init,
        )
        self.written_bytes += written
        return written, zero_pieces

    async def _copy_in_thread(self, source_fd: int, target_fd: int, offset: int, length: int) -> int:
        """A job's chunk between two plain files, copied whole by the file-copy thread (read, zero test
        and write of every piece there: the loop hands it over once and hears back once, and the thread
        holds the GIL only between its system calls). The claim covering the chunk ends only when the
        thread is done with the descriptors, also when the waiting coroutine is cancelled: a target
        closed meanwhile could otherwise hand its descriptor number to a new file."""
        call = self._copy_thread().submit(
            copy_between_files,
            source_fd,
            target_fd,
            offset,
            length,
            self._file_buffer,
            self.zero_unit,
            self._zero_cluster,
            not self.target_zero_init,
        )
        try:
            written, zero_pieces = await asyncio.shield(call)
        except asyncio.CancelledError:
            while not call.done():
                with suppress(asyncio.CancelledError):
                    await asyncio.wait([call])
            raise
        self.written_bytes += written
        for zero_offset, zero_length in zero_pieces:
            await self._copy_zero(zero_offset, zero_length)
        return written

    def _copy_thread(self) -> IoThread:
        """The file-copy thread, and the buffer it copies between files through, made on first use."""
        if self._file_thread is None:
            self._file_thread = IoThread("nbd-backup-copy")
            self._file_buffer = bytearray(FILE_COPY_PIECE)
        return self._file_thread

    async def close(self) -> None:
        """Stop the file-copy thread once what it was given is done, and the capture writer (the job
        calls this at its end, after ``flush_captured`` when the backup completes)."""
        if self._capture is not None:
            await self._capture.close()
        if self._file_thread is not None:
            await self._file_thread.stop()

    async def _copy_by_sendfile(self, send_from_fd: SendFromFd, source_fd: int, offset: int, end: int) -> int:
        """``_copy_data`` from a plain file into an NBD target: runs of data clusters go out with
        ``sendfile`` straight from the page cache (``pwrite_from_fd``), never through Python buffers.

        Zero clusters still take the zero path: each cluster's first 4 KiB is read, and only a cluster
        that starts with zeroes is read whole to decide. The clusters are claimed, so no guest write
        changes them before the target has received every byte (its reply comes after the payload)."""
        cs = self.zero_unit
        written = 0
        run_start = pos = offset
        try:
            while pos < end:
                stop = min(end, (pos // cs + 1) * cs)
                if file_reads_zero(source_fd, pos, stop - pos, self._zero_cluster):
                    if run_start < pos:
                        written += await self._send_run(send_from_fd, source_fd, run_start, pos)
                    await self._copy_zero(pos, stop - pos)
                    run_start = stop
                pos = stop
            if run_start < end:
                written += await self._send_run(send_from_fd, source_fd, run_start, end)
        except OSError as exc:  # a sample read (the device paths raise CopyError, not OSError)
            raise CopyError(exc, is_read=True) from exc
        return written

    async def _send_run(self, send_from_fd: SendFromFd, source_fd: int, offset: int, end: int) -> int:
        try:
            await send_from_fd(offset, source_fd, offset, end - offset)
        except OSError as exc:
            raise CopyError(exc, is_read=False) from exc
        self.written_bytes += end - offset
        return end - offset

    async def _read(self, offset: int, length: int) -> bytes:
        try:
            data = await self.source.pread(offset, length)
        except OSError as exc:
            raise CopyError(exc, is_read=True) from exc
        if len(data) != length:
            raise CopyError(OSError(errno.EIO, f"short read: {len(data)} of {length} bytes"), is_read=True)
        return data

    def _pieces(self, data: bytes | bytearray, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``zero_runs`` of ``data`` by the zero unit."""
        return zero_runs(data, offset, length, self.zero_unit, self._zero_cluster)

    async def _write_nonzero(self, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset``, splitting out cluster-aligned all-zero pieces; returns the
        bytes written as data."""
        view = memoryview(data)
        written = 0
        for start, stop, is_zero in self._pieces(data, offset, len(data)):
            if is_zero:
                await self._copy_zero(offset + start, stop - start)
                continue
            try:
                await self.target.pwrite(offset + start, view[start:stop])
            except OSError as exc:
                raise CopyError(exc, is_read=False) from exc
            self.written_bytes += stop - start
            written += stop - start
        return written


def split_pieces(
    buffer: bytes | bytearray,
    offset: int,
    zero_unit: int,
    zero_cluster: bytes,
    data: list[tuple[int, memoryview]],
    zeroes: list[tuple[int, int]],
) -> None:
    """Append the data pieces of ``buffer`` (read at ``offset``) to ``data`` as views, and its
    all-zero pieces (whole zero units) to ``zeroes`` as (offset, length)."""
    view = memoryview(buffer)
    for start, stop, is_zero in zero_runs(buffer, offset, len(buffer), zero_unit, zero_cluster):
        if is_zero:
            zeroes.append((offset + start, stop - start))
        else:
            data.append((offset + start, view[start:stop]))


def read_batch(
    fd: int, ranges: list[tuple[int, int]], zero_unit: int, zero_cluster: bytes
) -> tuple[list[tuple[int, memoryview]], list[tuple[int, int]]]:
    """Read each (offset, length) of a plain file into its own buffer and split it (``split_pieces``):
    the data pieces as views, the zero pieces as ranges. Raises ``CopyError``."""
    data: list[tuple[int, memoryview]] = []
    zeroes: list[tuple[int, int]] = []
    preadv = os.preadv
    unit_mask = zero_unit - 1
    for offset, length in ranges:
        buffer = bytearray(length)
        view = memoryview(buffer)
        try:
            got = preadv(fd, [view], offset)
            if got != length:  # short: the rest, or zeroes past the end of the file
                read_full(fd, view, offset, got)
        except OSError as exc:
            raise CopyError(exc, is_read=True) from exc
        if length == zero_unit and not offset & unit_mask:  # one whole unit: an incremental's usual claim
            if buffer == zero_cluster:
                zeroes.append((offset, length))
            else:
                data.append((offset, view))
        else:
            split_pieces(buffer, offset, zero_unit, zero_cluster, data, zeroes)
    return data, zeroes


def read_file_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from the file at ``offset`` (zeroes past its end); raises ``CopyError``."""
    try:
        read_full(fd, view, offset)
    except OSError as exc:
        raise CopyError(exc, is_read=True) from exc


def copy_between_files(
    source_fd: int,
    target_fd: int,
    offset: int,
    length: int,
    buffer: bytearray,
    zero_unit: int,
    zero_cluster: bytes,
    keep_zeroes: bool,
) -> tuple[int, list[tuple[int, int]]]:
    """Copy ``length`` bytes at ``offset`` from one file to the other through ``buffer``, a piece at a
    time, leaving out the aligned all-zero ``zero_unit`` pieces (past the source's end it reads zeroes).
    No I/O but the two descriptors' and no event loop: guest copies run it on the loop, job chunks in
    the file-copy thread. Returns (bytes written, the zero pieces: listed only when ``keep_zeroes``, for
    the caller to write as zeroes); raises ``CopyError``."""
    piece = len(buffer)
    written = 0
    zero_pieces: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    while pos < end:
        size = min(piece, end - pos)
        view = memoryview(buffer)[:size]
        read_file_into(source_fd, view, pos)
        for start, stop, is_zero in zero_runs(buffer, pos, size, zero_unit, zero_cluster):
            if is_zero:
                if keep_zeroes:
                    zero_pieces.append((pos + start, stop - start))
                continue
            try:
                done = 0
                while done < stop - start:
                    more = os.pwrite(target_fd, view[start + done : stop], pos + start + done)
                    if more <= 0:
                        raise OSError(errno.EIO, "short write")
                    done += more
            except OSError as exc:
                raise CopyError(exc, is_read=False) from exc
            written += stop - start
        pos += size
    return written, zero_pieces


__all__ = ["BlockCopier", "CopyError", "CopyTask", "TopAllocation", "copy_between_files", "read_file_into"]
