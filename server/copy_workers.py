"""Parallel ``nbd-backup copy``: worker processes each copy their own aligned stripes of the range.

One event loop tops out at about one core of socket and copy work, and threads do not help under the GIL,
so the range is cut into aligned stripes that N copiers claim one at a time from a shared counter: this
process starts at once on the devices it already has open, N-1 spawned processes join as soon as they have
started (so their start-up time is not idle time) and open their own connections / file descriptors to the
same endpoints (the parent created a new destination before any starts, so they only open it).
This is only used when writers in different processes are coherent — raw files and NBD exports advertising
multi-conn (``Endpoint.parallel_safe``) — and each copier flushes its own writes at the end.

Children report progress and their result over a pipe; the first failure anywhere stops everything (the
others are terminated) and is raised here with the failing child's one-line message. Children ignore
SIGINT (the parent decides) and die with the parent (``PR_SET_PDEATHSIG``), so none is left behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from backup.copy_engine import (
    DEFAULT_REQUESTS,
    CopyFailed,
    CopyStats,
    ProgressSink,
    Stripes,
    check_destination,
    run_together,
)
from nbd.uri import looks_like_uri
from server.copy_sides import (
    CopyRequest,
    Endpoint,
    close_endpoint,
    connect,
    copy_between,
    failure_message,
    open_side,
)

log = logging.getLogger(__name__)

PROGRESS_BATCH = 4 << 20  # a child reports progress after this many bytes (and at its end)
STOP_TIMEOUT = 5.0  # seconds a terminated child gets before SIGKILL
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerJob:
    """Everything a child needs to open both sides and copy its stripes (picklable)."""

    request: CopyRequest
    source_is_file: bool
    destination_is_file: bool
    size: int
    stripes: Stripes
    dst_is_zero: bool
    parent_pid: int


# --- the parent -------------------------------------------------------------------------------------


async def copy_in_parallel(
    request: CopyRequest, src: Endpoint, dst: Endpoint, workers: int, progress: ProgressSink | None
) -> CopyStats:
    """Copy with ``workers`` copiers (this process is one); ``progress`` sums them."""
    size = src.device.size
    check_destination(size, dst.device)
    context = multiprocessing.get_context("spawn")  # no fork of a process running an event loop
    stripes = Stripes.plan(size, workers, request.request_size, context)
    jobs = [
        WorkerJob(
            request=request,
            source_is_file=not looks_like_uri(request.source),
            destination_is_file=not looks_like_uri(request.destination),
            size=size,
            stripes=stripes,
            dst_is_zero=dst.is_zero,
            parent_pid=os.getpid(),
        )
        for _ in range(workers - 1)
    ]
    log.info("copying with %d processes (stripes of %d bytes)", workers, stripes.stripe)
    crew = Crew(progress)
    try:
        crew.start(jobs, context)
        own = asyncio.ensure_future(copy_between(request, src.device, dst, progress, stripes.claim()))
        await run_together([own, crew.finished])
        total, children = own.result(), crew.finished.result()
    finally:
        crew.stop()
    for part in children:
        total.add(part)
    return total


class Crew:
    """The child processes of one copy: started, listened to through their pipes, and always stopped."""

    def __init__(self, progress: ProgressSink | None) -> None:
        self._progress = progress
        self._loop = asyncio.get_running_loop()
        self._children: list[tuple[BaseProcess, Connection]] = []
        self._results: dict[int, CopyStats] = {}
        self._open = 0
        self.finished: asyncio.Future[list[CopyStats]] = self._loop.create_future()

    def start(self, jobs: list[WorkerJob], context: Any) -> None:
        for index, job in enumerate(jobs):
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=worker_main, args=(writer, job), name=f"copy-worker-{index + 1}")
            process.daemon = True
            self._children.append((process, reader))
            process.start()
            writer.close()
            self._open += 1
            self._loop.add_reader(reader.fileno(), self._readable, index)
        if not jobs:
            self.finished.set_result([])

    def _readable(self, index: int) -> None:
        process, reader = self._children[index]
        try:
            while reader.poll():
                message = reader.recv()
                if message[0] == "progress":
                    if self._progress is not None:
                        self._progress.advance(message[1])
                elif message[0] == "done":
                    self._results[index] = CopyStats(0, *message[1:])
                else:
                    self._fail(CopyFailed(message[1]))
        except (EOFError, OSError):
            self._loop.remove_reader(reader.fileno())
            self._open -= 1
            if index not in self._results:
                process.join(STOP_TIMEOUT)
                self._fail(CopyFailed(f"copy worker {index + 1} died (exit status {process.exitcode})"))
            elif self._open == 0 and not self.finished.done():
                self.finished.set_result([self._results[i] for i in sorted(self._results)])

    def _fail(self, exc: CopyFailed) -> None:
        if not self.finished.done():
            self.finished.set_exception(exc)

    def stop(self) -> None:
        """Terminate whatever still runs, reap every child, close the pipes (idempotent)."""
        for process, _ in self._children:
            if process.is_alive():
                process.terminate()
        for process, reader in self._children:
            process.join(STOP_TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join()
            if not reader.closed:
                try:
                    self._loop.remove_reader(reader.fileno())
                except (OSError, ValueError):
                    pass
                reader.close()
        self._children.clear()
        if not self.finished.done():
            self.finished.cancel()
        elif not self.finished.cancelled():
            self.finished.exception()  # retrieved: no "exception was never retrieved" noise


# --- a child ----------------------------------------------------------------------------------------


class PipeProgress:
    """Progress of a child, sent to the parent in batches (one pipe message per ``PROGRESS_BATCH`` bytes)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._pending = 0

    def advance(self, nbytes: int) -> None:
        self._pending += nbytes
        if self._pending >= PROGRESS_BATCH:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._conn.send(("progress", self._pending))
            self._pending = 0


def worker_main(conn: Connection, job: WorkerJob) -> None:
    """A child's entry point: copy the stripes of ``job``, report ``done`` or one ``error`` line, exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(job.parent_pid)
    from nbd.loop import run

    progress = PipeProgress(conn)
    try:
        stats = run(_copy_share(job, progress))
    except Exception as exc:
        message = failure_message(exc) or f"copy failed: {type(exc).__name__}: {exc}"
        conn.send(("error", message))
        conn.close()
        raise SystemExit(1) from None
    progress.flush()
    conn.send(("done", stats.data_bytes, stats.zero_bytes, stats.skipped_bytes))
    conn.close()


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this child when the parent dies, even by SIGKILL (no orphan keeps copying)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)


async def _copy_share(job: WorkerJob, progress: ProgressSink) -> CopyStats:
    request = job.request
    src = await open_side("source", _open(request.source, job.source_is_file, request, read_only=True))
    try:
        dst = await open_side(
            "destination", _open(request.destination, job.destination_is_file, request, read_only=False)
        )
        dst.is_zero = job.dst_is_zero
        try:
            if src.device.size != job.size:
                raise CopyFailed(f"the source changed size while copying ({src.device.size} != {job.size} bytes)")
            return await copy_between(request, src.device, dst, progress, job.stripes.claim())
        finally:
            await close_endpoint(dst)
    finally:
        await close_endpoint(src)


async def _open(spec: str, is_file: bool, request: CopyRequest, *, read_only: bool) -> Endpoint:
    """Open an existing side; files as raw without probing (the parent decided the format, and a raw disk
    whose first bytes were just copied may well start with the qcow2 magic)."""
    if is_file:
        from backup.rawfile import RawFileDevice

        return Endpoint(await RawFileDevice.open(spec, read_only=read_only), spec)
    return await connect(spec, connections=request.connections or 1, requests=request.requests or DEFAULT_REQUESTS)
