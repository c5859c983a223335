"""``CaptureWriter``: the old data a guest write displaces, held in memory and written to the target behind it.

Copy-before-write makes a guest write wait for the copy of the clusters it overwrites. Between two plain
files that copy is a read of the source and a write of the target, and the write (fresh pages of the
target) costs several times the read. With a capture writer the guest waits for the read only: the
copier reads the old data into one of a fixed pool of buffers (a *slot*), marks the clusters copied,
and this writer's thread puts the slot on the target while the guest write goes on.

Why the point in time still holds: a slot *is* the old data, and nobody reads the target for it before
the job has drained the writer (the job drains, then flushes, then completes; ``sync=none``, whose
target is read while the job runs, does not capture). A slot whose write fails is *parked* with its
data; ``flush`` writes the parked slots again, and the job calls it under its ``on-target-error``
policy (report, ignore, stop and resume), so a full disk that is cleared loses nothing.

Memory is bounded by the pool (``slots`` times ``window``): when every slot is in use — written, queued or
parked — the copier copies inline as it would without a writer, and the guest waits for that copy.

Why a thread with batches: the thread writes all that the loop queued in one ``io_submit`` (see
``backup.batch_write``), after gathering for ``gather`` seconds while the queue is short. Each time the
thread takes the GIL back while the loop runs Python, the loop waits for it: a ``pwrite`` per slot
(one GIL round trip each) cost the guest more than the copies it saved (measured: 0.26 / 0.20 of its
IOPS in the first seconds / the rest of a backup, against 0.36 / 0.38 with batches gathered for 1 ms).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from collections import deque
from collections.abc import Callable

from backup.batch_write import BatchWriter, Piece, PwriteWriter, batch_writer, buffer_address

log = logging.getLogger(__name__)

#: How long the thread lets a short queue grow before writing it (seconds): one GIL round trip per
#: batch instead of per slot; the guest never waits for it (its copy is the read, done already).
GATHER_SECONDS = 0.001
#: A queue this long is written at once, without gathering.
GATHER_ENOUGH = 16
#: Pieces the thread writes in one batch (the AIO context's size); a slot holds at most this many.
BATCH_PIECES = 64


#: A coroutine waiting for the thread: its loop and the future the thread resolves.
_Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]


class Slot:
    """One buffer of the pool and what it holds: ``pieces`` as (file offset, start, stop in the buffer)."""

    __slots__ = ("address", "buffer", "pieces", "view")

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)  # also pins the buffer: a bytearray with exports never moves
        self.address = buffer_address(self.buffer)
        self.pieces: list[tuple[int, int, int]] = []


class CaptureWriter:
    """A pool of ``slots`` buffers of ``window`` bytes and the thread that writes them to ``fd``."""

    def __init__(
        self,
        fd: int,
        window: int,
        slots: int = 256,
        *,
        gather: float = GATHER_SECONDS,
        writer: Callable[[int, int], BatchWriter] = batch_writer,
    ) -> None:
        if window <= 0 or slots <= 0:
            raise ValueError("a capture writer needs a window and at least one slot")
        self.fd = fd
        self.window = window
        self.gather = gather
        self._make_writer = writer
        self._free: list[Slot] = [Slot(window) for _ in range(slots)]
        self._queue: deque[Slot] = deque()
        self._parked: list[Slot] = []
        self._zeroes = memoryview(bytes(window))
        self._cond = threading.Condition(threading.Lock())
        self._sleeping = False  # the thread waits for work: a submit must wake it
        self._busy = 0  # slots submitted and neither written nor parked yet
        self._drainers: list[_Waiter] = []
        self._slot_waiters: list[_Waiter] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: OSError | None = None  # why the parked slots failed (the latest failure)
        self.written = 0  # bytes written to the target (all-zero pieces are left out: the target reads zeroes)

    # --- the loop's side -------------------------------------------------------------------------

    def take(self) -> Slot | None:
        """A free slot, or None when every one is in use (the caller copies inline)."""
        free = self._free
        return free.pop() if free else None

    def give_back(self, slot: Slot) -> None:
        """An unused slot (the read into it failed)."""
        self._free.append(slot)

    def submit(self, slot: Slot) -> None:
        """Write ``slot.pieces`` to the target behind the caller."""
        if len(slot.pieces) > BATCH_PIECES:
            raise ValueError(f"a slot of {len(slot.pieces)} pieces (at most {BATCH_PIECES})")
        if self._stopping:
            raise RuntimeError("the capture writer is closed")
        with self._cond:
            self._busy += 1
            self._queue.append(slot)
            if self._sleeping:
                self._cond.notify()
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        """Start the thread on first use, and again if it ended without ``close`` (it parked what it held:
        queued slots must never wait for a thread that is gone)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nbd-backup-capture", daemon=True)
            self._thread.start()

    @property
    def failed(self) -> bool:
        """Whether slots are parked after a failed write (``flush`` retries them)."""
        return bool(self._parked)

    @property
    def in_use(self) -> int:
        """Slots holding data not yet on the target (queued, being written or parked)."""
        return self._busy + len(self._parked)

    @property
    def starved(self) -> bool:
        """No slot is free but some are being written: one will be free soon (``wait_for_slot``). With
        every slot parked after failures nothing frees one, and the caller copies inline instead."""
        return not self._free and self._busy > 0

    async def wait_for_slot(self) -> None:
        """Until a slot is free or none is being written any more (the writer wakes every waiter once
        per batch, not per slot)."""
        await self._wait(self._slot_waiters, lambda: bool(self._free) or self._busy == 0)

    async def drain(self) -> None:
        """Until every submitted slot is written or parked."""
        await self._wait(self._drainers, lambda: self._busy == 0)

    async def _wait(self, waiters: list[_Waiter], done: Callable[[], bool]) -> None:
        """Until ``done()`` (tested under the lock), woken by the thread through ``waiters``."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if done():
                return
            future: asyncio.Future[None] = loop.create_future()
            waiters.append((loop, future))
            self._cond.notify()  # no gathering while someone waits
        await asyncio.shield(future)

    async def flush(self) -> None:
        """Drain, then write the parked slots again; raises the ``OSError`` of a write that still fails
        (its slot stays parked for the next ``flush``)."""
        await self.drain()
        if not self._parked:
            return
        with self._cond:
            parked, self._parked = self._parked, []
            self._busy += len(parked)
            self._queue.extend(parked)
            self._cond.notify()
        self._ensure_thread()
        await self.drain()
        if self._parked:
            error = self.error or OSError(errno.EIO, "write behind failed")
            raise OSError(error.errno or errno.EIO, error.strerror or str(error))

    async def close(self) -> None:
        """Stop the thread once its batch in progress is written; what is still queued is dropped (the
        job flushed first when the backup completes; a cancelled backup has no use for it). The pool is
        released: ``take`` finds no slot any more."""
        with self._cond:
            self._stopping = True
            self._queue.clear()
            self._cond.notify()
        thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.to_thread(thread.join)
        self._free, self._parked = [], []  # the pool's memory goes now, whoever still holds the writer

    # --- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            writer = self._make_writer(self.fd, BATCH_PIECES)
        except Exception:  # no AIO for whatever reason: the fallback always works
            writer = PwriteWriter(self.fd, BATCH_PIECES)
        try:
            while self._next_batch(writer):
                pass
        except Exception:
            log.exception("the capture writer's thread failed")
        finally:
            writer.close()
            with self._cond:
                if not self._stopping:  # the thread is dying: what it still holds must not pass for written
                    self.error = OSError(errno.EIO, "the capture writer's thread ended")
                    self._parked += self._queue
                    self._queue.clear()
                self._thread = None  # the next submit or flush starts another
                self._busy = 0
                _wake(self._slot_waiters)
                _wake(self._drainers)

    def _next_batch(self, writer: BatchWriter) -> bool:
        cond, queue = self._cond, self._queue
        with cond:
            while not queue and not self._stopping:
                self._sleeping = True
                cond.wait()
                self._sleeping = False
            if self._stopping:
                return False
            if len(queue) < GATHER_ENOUGH and not self._drainers and self.gather > 0:
                cond.wait(self.gather)  # a drainer or close wakes it early
                if self._stopping:
                    return False
            batch: list[Slot] = []
            pieces = 0
            while queue and pieces + len(queue[0].pieces) <= writer.depth:
                slot = queue.popleft()
                pieces += len(slot.pieces)
                batch.append(slot)
        try:
            failed = self._write(writer, batch)
        except Exception as exc:  # a bug must not pass the batch off as written
            self.error = OSError(errno.EIO, f"write behind failed: {exc!r}")
            failed = {id(slot) for slot in batch}
        with cond:
            if failed:
                self._parked += [slot for slot in batch if id(slot) in failed]
                self._free += [slot for slot in batch if id(slot) not in failed]
            else:
                self._free += batch
            self._busy -= len(batch)
            _wake(self._slot_waiters)
            if self._busy == 0:
                _wake(self._drainers)
        return True

    def _write(self, writer: BatchWriter, batch: list[Slot]) -> set[int]:
        """Write the batch's data pieces (all-zero ones are skipped); returns the ids of failed slots."""
        zeroes = self._zeroes
        todo: list[Piece] = []
        owners: list[Slot] = []
        for slot in batch:
            buffer, address = slot.buffer, slot.address
            for offset, start, stop in slot.pieces:
                if not buffer.startswith(zeroes[: stop - start], start):
                    todo.append((address + start, stop - start, offset))
                    owners.append(slot)
        if not todo:
            return set()
        lengths = [length for _, length, _ in todo]
        try:
            results = writer.write(todo)
        except OSError as exc:
            results = [-(exc.errno or errno.EIO)] * len(todo)
        if results == lengths:  # the usual batch: everything written
            self.written += sum(lengths)
            return set()
        failed: set[int] = set()
        for (_address, length, offset), result, slot in zip(todo, results, owners, strict=True):
            if result == length:
                self.written += length
                continue
            if result < 0:
                self.error = OSError(-result, f"write behind at {offset}+{length}: {os.strerror(-result)}")
            else:
                self.error = OSError(errno.ENOSPC, f"write behind at {offset}+{length}: short write ({result})")
            failed.add(id(slot))
        return failed


def _wake(waiters: list[_Waiter]) -> None:
    """(With the lock held.) Resolve every waiter of the list and empty it."""
    for loop, future in waiters:
        try:
            loop.call_soon_threadsafe(_resolve, future)
        except RuntimeError:
            pass  # that loop is closed: nobody waits any more
    waiters.clear()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


__all__ = ["BATCH_PIECES", "GATHER_ENOUGH", "GATHER_SECONDS", "CaptureWriter", "Slot"]
