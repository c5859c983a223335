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

import argparse
import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from nbd.uri import looks_like_uri
from server.commands.copy import (
    DEFAULT_REQUESTS,
    CopyError,
    CopyStats,
    Endpoint,
    ProgressSink,
    _side,
    close_endpoint,
    copy_device,
    failure_message,
)

log = logging.getLogger(__name__)

MAX_STRIPE = 32 << 20  # small enough to balance the copiers' ends, large enough for few block-status calls
PROGRESS_BATCH = 4 << 20  # a child reports progress after this many bytes (and at its end)
STOP_TIMEOUT = 5.0  # seconds a terminated child gets before SIGKILL
_PR_SET_PDEATHSIG = 1

Range = tuple[int, int]


@dataclass(frozen=True)
class Stripes:
    """``[0, size)`` in ``stripe``-byte pieces, handed out once each through a counter shared by processes."""

    size: int
    stripe: int
    counter: Any  # multiprocessing.Value("q"): the index of the next unclaimed stripe

    @classmethod
    def plan(cls, size: int, workers: int, align: int, context: Any = None) -> Stripes:
        """About eight stripes per copier, ``align``-aligned, at most ``MAX_STRIPE``."""
        per = -(-size // (workers * 8))
        stripe = max(align, min(MAX_STRIPE, -(-per // align) * align))
        return cls(size, stripe, (context or multiprocessing.get_context("spawn")).Value("q", 0))

    def claim(self) -> Iterator[Range]:
        """The stripes this copier gets, claimed lazily (the copy asks for the next when it needs it)."""
        while True:
            with self.counter.get_lock():
                index = self.counter.value
                self.counter.value = index + 1
            offset = index * self.stripe
            if offset >= self.size:
                return
            yield offset, min(self.stripe, self.size - offset)


@dataclass(frozen=True)
class WorkerJob:
    """Everything a child needs to open both sides and copy its stripes (picklable)."""

    source: str
    destination: str
    source_is_file: bool
    destination_is_file: bool
    size: int
    stripes: Stripes
    connections: int | None
    requests: int | None  # None: copy_device's default for the pair of devices
    request_size: int
    detect_zeroes: bool
    dst_is_zero: bool
    parent_pid: int


# --- the parent -------------------------------------------------------------------------------------


async def copy_in_parallel(
    args: argparse.Namespace, src: Endpoint, dst: Endpoint, workers: int, progress: Any
) -> CopyStats:
    """Copy with ``workers`` copiers (this process is one); ``progress`` (a ``Progress`` or None) sums them."""
    size = src.device.size
    if dst.device.size < size:
        raise CopyError(f"the destination ({dst.device.size} bytes) is smaller than the source ({size} bytes)")
    if dst.device.read_only:
        raise CopyError("the destination is read-only")
    context = multiprocessing.get_context("spawn")  # no fork of a process running an event loop
    stripes = Stripes.plan(size, workers, args.request_size, context)
    jobs = [
        WorkerJob(
            source=args.source,
            destination=args.destination,
            source_is_file=not looks_like_uri(args.source),
            destination_is_file=not looks_like_uri(args.destination),
            size=size,
            stripes=stripes,
            connections=args.connections,
            requests=args.requests,
            request_size=args.request_size,
            detect_zeroes=not args.no_detect_zeroes,
            dst_is_zero=dst.is_zero,
            parent_pid=os.getpid(),
        )
        for _ in range(workers - 1)
    ]
    log.info("copying with %d processes (stripes of %d bytes)", workers, stripes.stripe)
    ok = False
    crew = Crew(progress)
    try:
        crew.start(jobs, context)
        own = asyncio.ensure_future(
            copy_device(
                src.device,
                dst.device,
                dst_is_zero=dst.is_zero,
                request_size=args.request_size,
                requests=args.requests,
                detect_zeroes=not args.no_detect_zeroes,
                progress=progress,
                ranges=stripes.claim(),
            )
        )
        try:
            waiters: list[asyncio.Future[Any]] = [own, crew.finished]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_EXCEPTION)
            if crew.finished.done() and crew.finished.exception() is not None:
                raise crew.finished.exception()  # type: ignore[misc]
            stats = await own
            children = await crew.finished
        finally:
            own.cancel()
            await asyncio.gather(own, return_exceptions=True)
        ok = True
    finally:
        crew.stop()
        if progress is not None:
            progress.finish(ok=ok)
    total = CopyStats(size=size)
    for part in [stats, *children]:
        total.data_bytes += part.data_bytes
        total.zero_bytes += part.zero_bytes
        total.skipped_bytes += part.skipped_bytes
    return total


class Crew:
    """The child processes of one copy: started, listened to through their pipes, and always stopped."""

    def __init__(self, progress: Any) -> None:
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
                    self._fail(CopyError(message[1]))
        except (EOFError, OSError):
            self._loop.remove_reader(reader.fileno())
            self._open -= 1
            if index not in self._results:
                process.join(STOP_TIMEOUT)
                self._fail(CopyError(f"copy worker {index + 1} died (exit status {process.exitcode})"))
            elif self._open == 0 and not self.finished.done():
                self.finished.set_result([self._results[i] for i in sorted(self._results)])

    def _fail(self, exc: CopyError) -> None:
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
    src = await _side("source", _open(job.source, job.source_is_file, job, read_only=True))
    try:
        dst = await _side("destination", _open(job.destination, job.destination_is_file, job, read_only=False))
        try:
            if src.device.size != job.size:
                raise CopyError(f"the source changed size while copying ({src.device.size} != {job.size} bytes)")
            return await copy_device(
                src.device,
                dst.device,
                dst_is_zero=job.dst_is_zero,
                request_size=job.request_size,
                requests=job.requests,
                detect_zeroes=job.detect_zeroes,
                progress=progress,
                ranges=job.stripes.claim(),
            )
        finally:
            await close_endpoint(dst)
    finally:
        await close_endpoint(src)


async def _open(spec: str, is_file: bool, job: WorkerJob, *, read_only: bool) -> Endpoint:
    """Open an existing side; files as raw without probing (the parent decided the format, and a raw disk
    whose first bytes were just copied may well start with the qcow2 magic)."""
    if is_file:
        from backup.rawfile import RawFileDevice

        return Endpoint(await RawFileDevice.open(spec, read_only=read_only), spec)
    from nbd.client import NbdClient
    from nbd.uri import parse_uri

    in_flight = job.requests or DEFAULT_REQUESTS
    client = await NbdClient.connect(parse_uri(spec), connections=job.connections or 1, max_in_flight=in_flight)
    return Endpoint(client, str(client.uri))
