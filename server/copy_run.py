"""One ``nbd-backup copy``: open both sides, decide how many processes copy, run the copy engine, and leave
no half-written new file behind.

When both sides allow it (raw files, NBD exports advertising multi-conn) the range is split into aligned
stripes copied by several processes (``server.copy_workers``), since one event loop is the limit; qcow2
images (a single metadata writer) and servers without multi-conn are always copied by one process.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from backup.copy_engine import DEFAULT_REQUESTS, CopyStats
from nbd.align import div_up
from server.copy_sides import (
    CopyRequest,
    Endpoint,
    close_endpoint,
    copy_between,
    dirty_ranges,
    open_destination,
    open_side,
    open_source,
)
from server.progress import Progress

log = logging.getLogger(__name__)

AUTO_PARALLEL_MIN = 256 << 20  # below this, starting worker processes costs more than it saves
AUTO_MAX_WORKERS = 4

#: Makes the progress display for a copy of so many bytes (None: no display).
MakeProgress = Callable[[int], Progress | None]


async def run_copy(request: CopyRequest, make_progress: MakeProgress) -> CopyStats:
    in_flight = request.requests or DEFAULT_REQUESTS  # what the NBD clients allow; the copy decides within it
    opening = open_source(
        request.source,
        fmt=request.src_format,
        connections=request.connections,
        requests=in_flight,
        dirty_bitmap=request.dirty_bitmap,
    )
    src_ep = await open_side("source", opening)
    async with _closing(src_ep) as src:
        opening = open_destination(
            request.destination,
            src.device.size,
            fmt=request.dst_format,
            connections=request.connections,
            requests=in_flight,
            target_is_zero=request.target_is_zero,
            backing=request.backing,
        )
        dst_ep = await open_side("destination", opening)
        # What start-up built (modules, classes, the two sides) lives until exit: the collector need not
        # walk it again every time the copy's short-lived futures trigger a collection.
        gc.freeze()
        try:
            async with _closing(dst_ep) as dst:
                ranges = await dirty_ranges(src.device) if request.dirty_bitmap is not None else None
                workers = (
                    1
                    if ranges is not None
                    else choose_workers(request.workers, src, dst, request_size=request.request_size)
                )
                progress = make_progress(src.device.size if ranges is None else sum(n for _, n in ranges))
                ok = False
                try:
                    if ranges is not None:
                        stats = await copy_between(request, src.device, dst, progress, ranges)
                    elif workers > 1:
                        from server.copy_workers import copy_in_parallel  # processes: only when they copy

                        stats = await copy_in_parallel(request, src, dst, workers, progress)
                    else:
                        stats = await copy_between(request, src.device, dst, progress)
                    ok = True
                finally:
                    if progress is not None:
                        progress.finish(ok=ok)
                return stats
        except BaseException:
            if dst_ep.created_path is not None:
                _remove(dst_ep.created_path)
            raise


def auto_workers() -> int:
    """Half the CPUs (at most 4): the other side — the NBD server, the kernel's copies — needs about as much
    CPU as the copy itself, so on 2 CPUs a second copier only competes with the server and one process is
    best."""
    return max(1, min((os.cpu_count() or 1) // 2, AUTO_MAX_WORKERS))


def choose_workers(requested: int | None, src: Endpoint, dst: Endpoint, *, request_size: int) -> int:
    """How many processes copy (1: this one alone); more only when both sides are ``parallel_safe``."""
    size = src.device.size
    if not (src.parallel_safe and dst.parallel_safe):
        if requested is not None and requested > 1:
            log.info("copying with one process: %s or %s allows no writers in parallel", src.name, dst.name)
        return 1
    if requested is None:
        requested = auto_workers() if size >= AUTO_PARALLEL_MIN else 1
    return max(1, min(requested, div_up(size, request_size)))


@asynccontextmanager
async def _closing(endpoint: Endpoint) -> AsyncIterator[Endpoint]:
    try:
        yield endpoint
    finally:
        await close_endpoint(endpoint)


def _remove(path: str) -> None:
    """A destination file we created for a copy that failed is not left behind looking like a disk."""
    try:
        os.unlink(path)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)
