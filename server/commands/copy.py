"""``nbd-backup copy SRC DST``: copy a disk between files and NBD exports — also the restore path.

Each side is a file (opened through ``backup.images``, so every image format it knows works) or an NBD
URI. The copy is sparse-aware: the source's block status says where the data is; zero and hole ranges
become ``zero`` requests on the destination (or nothing at all when the destination was just created
and so reads as zeroes), and data chunks that turn out to be all zeroes are zeroed rather than written.
Memory stays bounded: at most ``--requests`` chunks of ``--request-size`` bytes are in flight (per worker;
by default 4 MiB worth from a local source, 16 requests from an NBD server across a network).
When both sides allow it (raw files, NBD exports advertising multi-conn) the range is split into aligned
stripes copied by ``--workers`` processes, since one event loop is the limit; qcow2 images (a single
metadata writer) and servers without multi-conn are always copied by one process.
The exit status is non-zero on any error, with a one-line message saying what failed.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from backup.errors import BackupError
from nbd.constants import State
from nbd.device import BlockDevice, Extent
from nbd.errors import NbdError, NbdRequestError
from nbd.uri import looks_like_uri, parse_uri
from server.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_REQUEST_SIZE = 1 << 20
DEFAULT_REQUESTS = 16
# Copies through our buffers from a nearby source keep at most this much in flight: the buffers stay in
# the CPU caches (measured into tmpfs: 4 x 1 MiB in flight takes ~12 % less CPU than 16 x 1 MiB, at the
# same speed). A raw file sent to NBD holds no buffers (sendfile), and reads from an NBD server across a
# network need a window that covers the round trip: both keep DEFAULT_REQUESTS in flight.
BUFFER_BUDGET = 4 << 20
STATUS_SPAN = 1 << 30  # block status is asked for at most this much at a time
_MIN_REQUEST = 4096


class ProgressSink(Protocol):
    """Where a copy reports the bytes it finished (a ``Progress`` bar, or a worker's pipe to its parent)."""

    def advance(self, nbytes: int) -> None: ...


class CopyError(Exception):
    """A copy failed for a reason the user can act on (the message says which side and why)."""


@dataclass
class CopyStats:
    size: int = 0
    data_bytes: int = 0  # written as data
    zero_bytes: int = 0  # zeroed on the destination
    skipped_bytes: int = 0  # zero ranges left alone (the destination reads as zeroes already)


@dataclass
class Endpoint:
    """One side of a copy: the device, how to name it in messages, and whether it reads as zeroes."""

    device: BlockDevice
    name: str
    is_zero: bool = False
    created_path: str | None = None
    closed: bool = False

    @property
    def parallel_safe(self) -> bool:
        """Several processes may each open this side and write disjoint ranges: a raw file (one page cache),
        or an NBD export advertising multi-conn (a flush on one connection covers them all)."""
        from backup.rawfile import RawFileDevice
        from nbd.client import NbdClient

        if isinstance(self.device, NbdClient):
            return self.device.capabilities.can_multi_conn
        return isinstance(self.device, RawFileDevice)


# --- opening the two sides --------------------------------------------------------------------------


async def open_source(spec: str, *, fmt: str | None, connections: int | None, requests: int) -> Endpoint:
    if looks_like_uri(spec):
        from nbd.client import NbdClient

        client = await NbdClient.connect(parse_uri(spec), connections=connections, max_in_flight=requests)
        return Endpoint(client, str(client.uri))
    from backup.images import open_image

    # the user's own files, trusted as qemu-img trusts them: a probed image's backing file is followed
    return Endpoint(await open_image(spec, format=fmt, read_only=True, guard_probed=False), spec)


async def create_destination_file(path: str, size: int, *, fmt: str | None) -> BlockDevice:
    """The one place a destination file is created (``backup.images`` decides what each format needs)."""
    from backup.images import create_image

    return await create_image(path, size, format=fmt or "raw")


async def open_destination(
    spec: str, size: int, *, fmt: str | None, connections: int | None, requests: int, target_is_zero: bool
) -> Endpoint:
    if looks_like_uri(spec):
        from nbd.client import NbdClient

        client = await NbdClient.connect(parse_uri(spec), connections=connections, max_in_flight=requests)
        return Endpoint(client, str(client.uri), is_zero=target_is_zero)
    if _exists(spec):
        from backup.images import open_image

        device = await open_image(spec, format=fmt, guard_probed=False)  # qemu-img convert writes raw unprobed
        return Endpoint(device, spec, is_zero=target_is_zero)
    device = await create_destination_file(spec, size, fmt=fmt)
    return Endpoint(device, spec, is_zero=True, created_path=spec)


def _exists(path: str) -> bool:
    return os.path.lexists(path)


# --- the copy ---------------------------------------------------------------------------------------


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
    the same offsets of ``dst``; the first failure cancels the rest and is raised. ``requests`` in flight:
    by default as many as ``default_requests`` says for this pair of devices."""
    size = src.size
    if dst.size < size:
        raise CopyError(f"the destination ({dst.size} bytes) is smaller than the source ({size} bytes)")
    if dst.read_only:
        raise CopyError("the destination is read-only")
    read_into = getattr(src, "pread_into", None)  # optional: reads into our reused buffers
    # A raw file into an NBD export: payloads go from the page cache into the socket (sendfile).
    source_fd = getattr(src, "direct_read_fd", None)
    write_from_fd = getattr(dst, "pwrite_from_fd", None) if source_fd is not None else None
    if requests is None:
        uri = getattr(src, "uri", None)  # an NBD source; files and images are local
        nearby = uri is None or uri.is_local
        requests = default_requests(request_size, buffered=write_from_fd is None, nearby=nearby)
    stats = CopyStats(size=size)
    zero_buffer = bytes(request_size)
    zero_view = memoryview(zero_buffer)
    queue: asyncio.Queue[tuple[int, int, bool] | None] = asyncio.Queue(maxsize=requests * 2)

    def account(nbytes: int) -> None:
        if progress is not None:
            progress.advance(nbytes)

    async def zero_range(offset: int, length: int) -> None:
        if dst_is_zero:
            stats.skipped_bytes += length
        else:
            await dst.zero(offset, length, may_trim=True)
            stats.zero_bytes += length
        account(length)

    async def produce() -> None:
        for start, length in ranges if ranges is not None else [(0, size)]:
            await produce_range(start, min(start + length, size))
        for _ in range(requests):
            await queue.put(None)

    async def produce_range(offset: int, end: int) -> None:
        while offset < end:
            span = min(end - offset, STATUS_SPAN)
            try:
                extents = await src.block_status(offset, span)
            except NbdRequestError as exc:
                # Block status is an optimisation: without it, everything is data (the reads decide).
                log.warning("block status failed at offset %d (%s): copying as data", offset, exc)
                extents = [Extent(span, 0)]
            if not extents:
                raise CopyError(f"the source reported no block status at offset {offset}")
            for extent in extents:
                length = min(extent.length, end - offset)
                if length <= 0:
                    break
                is_zero = bool(extent.flags & State.ZERO)
                step = length if is_zero else request_size
                for pos in range(0, length, step):
                    await queue.put((offset + pos, min(step, length - pos), is_zero))
                offset += length

    sample = bytearray(_ZERO_SAMPLE)

    async def work() -> None:
        buffer = bytearray(request_size) if read_into is not None else None
        view = memoryview(buffer) if buffer is not None else None
        while True:
            item = await queue.get()
            if item is None:
                return
            offset, length, is_zero = item
            if is_zero:
                await zero_range(offset, length)
                continue
            if write_from_fd is not None and source_fd is not None:
                fd = source_fd()
                # A chunk is all zeroes only if its first bytes are: most data chunks are told by a tiny
                # read, and a chunk that starts with zeroes takes the ordinary path (which checks it all).
                if fd is not None and not (detect_zeroes and _starts_with_zeroes(fd, offset, sample)):
                    await write_from_fd(offset, fd, offset, length)
                    stats.data_bytes += length
                    account(length)
                    continue
            data: bytes | bytearray | memoryview
            if read_into is not None and buffer is not None and view is not None:
                data = buffer if length == request_size else view[:length]
                await read_into(offset, data)
                all_zero = detect_zeroes and buffer.startswith(zero_view[:length])
            else:
                data = await src.pread(offset, length)
                all_zero = detect_zeroes and _is_zero(data, zero_view)
            if all_zero:
                await zero_range(offset, length)
                continue
            await dst.pwrite(offset, data)
            stats.data_bytes += length
            account(length)

    tasks = [asyncio.ensure_future(produce())] + [asyncio.ensure_future(work()) for _ in range(requests)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await dst.flush()
    return stats


def default_requests(request_size: int, *, buffered: bool, nearby: bool = True) -> int:
    """Requests in flight when the user did not say: ``BUFFER_BUDGET`` worth of buffers (at least two,
    so one transfer always overlaps another), or ``DEFAULT_REQUESTS`` when the copy holds no buffers or
    reads from an NBD server that is not ``nearby`` (see ``BUFFER_BUDGET``)."""
    if not buffered or not nearby:
        return DEFAULT_REQUESTS
    return max(2, min(DEFAULT_REQUESTS, BUFFER_BUDGET // request_size))


_ZERO_SAMPLE = 4096
_SAMPLE_ZEROES = bytes(_ZERO_SAMPLE)


def _starts_with_zeroes(fd: int, offset: int, sample: bytearray) -> bool:
    """True when the file's bytes at ``offset`` (up to ``len(sample)``, fewer at its end) are all zero."""
    got = os.preadv(fd, [sample], offset)
    return _SAMPLE_ZEROES.startswith(memoryview(sample)[:got])  # a memcmp


def _is_zero(data: bytes | bytearray | memoryview, zeroes: memoryview) -> bool:
    """memcmp against a zero buffer (a memoryview comparison goes item by item: 100 times slower)."""
    if isinstance(data, memoryview):
        data = bytes(data)  # rare: devices return bytes or bytearray
    return len(data) <= len(zeroes) and data.startswith(zeroes[: len(data)])


# --- command line -----------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "copy",
        help="copy a disk between files and NBD exports (also: restore a backup)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SRC", help="image file or NBD URI (nbd://HOST[:PORT]/EXPORT …)")
    parser.add_argument("destination", metavar="DST", help="image file (created when missing) or NBD URI")
    parser.add_argument("-f", "--src-format", choices=("raw", "qcow2"), help="source image format (default: probe)")
    parser.add_argument("-O", "--dst-format", choices=("raw", "qcow2"), help="destination image format")
    parser.add_argument(
        "--progress",
        nargs="?",
        const="tty",
        default=None,
        metavar="FD",
        help="show a progress bar; --progress=FD writes 'N/100' lines to file descriptor FD instead",
    )
    parser.add_argument("--no-progress", action="store_true", help="never show progress, even on a terminal")
    parser.add_argument(
        "--requests",
        type=_positive,
        default=None,
        help="requests in flight (default: 4 MiB worth of requests, 4 at the default size; 16 when a raw file "
        "is sent to an NBD export, which holds no buffers, or when the source is an NBD server across a network)",
    )
    parser.add_argument(
        "--request-size", type=_size, default=DEFAULT_REQUEST_SIZE, help="bytes per request (1M; K/M suffixes)"
    )
    parser.add_argument("--connections", type=_positive, default=None, help="NBD connections (multi-conn servers)")
    parser.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="processes copying disjoint stripes in parallel (default: half the CPUs, at most 4, for copies of 256 MiB "
        "or more when both sides are raw files or multi-conn NBD exports; always 1 for qcow2 and other servers)",
    )
    parser.add_argument(
        "--target-is-zero", action="store_true", help="the existing destination already reads as zeroes"
    )
    parser.add_argument(
        "--no-detect-zeroes", action="store_true", help="write all-zero data chunks instead of zeroing them"
    )
    parser.set_defaults(func=main)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = text[-1] if text and text[-1] in units else ""
    try:
        value = int(text[: len(text) - len(suffix)] if suffix else text) * units[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < _MIN_REQUEST or value > 32 << 20 or value & (value - 1):
        raise argparse.ArgumentTypeError("must be a power of two between 4K and 32M")
    return value


def _make_progress(args: argparse.Namespace, total: int) -> Progress | None:
    if args.no_progress:
        return None
    if args.progress not in (None, "tty"):
        try:
            fd = int(args.progress)
        except ValueError:
            raise CopyError(f"--progress=FD needs a file descriptor number, not {args.progress!r}") from None
        return Progress(total, fd=fd)
    return Progress(total, label="copy", enabled=True if args.progress == "tty" else None)


@asynccontextmanager
async def _closing(endpoint: Endpoint) -> AsyncIterator[Endpoint]:
    try:
        yield endpoint
    finally:
        await close_endpoint(endpoint)


async def close_endpoint(endpoint: Endpoint) -> None:
    """Close once (a parallel copy closes its sides before the end of the ``_closing`` block)."""
    if endpoint.closed:
        return
    endpoint.closed = True
    try:
        await endpoint.device.close()
    except (OSError, NbdError) as exc:
        log.debug("closing %s: %s", endpoint.name, exc)


async def run_copy(args: argparse.Namespace) -> CopyStats:
    in_flight = args.requests or DEFAULT_REQUESTS  # what the NBD clients allow; the copy decides within it
    opening = open_source(args.source, fmt=args.src_format, connections=args.connections, requests=in_flight)
    src_ep = await _side("source", opening)
    async with _closing(src_ep) as src:
        opening = open_destination(
            args.destination,
            src.device.size,
            fmt=args.dst_format,
            connections=args.connections,
            requests=in_flight,
            target_is_zero=args.target_is_zero,
        )
        dst_ep = await _side("destination", opening)
        # What start-up built (modules, classes, the two sides) lives until exit: the collector need not
        # walk it again every time the copy's short-lived futures trigger a collection (~4 % of the CPU).
        gc.freeze()
        try:
            async with _closing(dst_ep) as dst:
                workers = choose_workers(args.workers, src, dst, request_size=args.request_size)
                if workers > 1:
                    from server.copy_workers import copy_in_parallel

                    return await copy_in_parallel(args, src, dst, workers, _make_progress(args, src.device.size))
                return await _copy_with_progress(args, src, dst)
        except BaseException:
            if dst_ep.created_path is not None:
                _remove(dst_ep.created_path)
            raise


AUTO_PARALLEL_MIN = 256 << 20  # below this, starting worker processes costs more than it saves
AUTO_MAX_WORKERS = 4


def auto_workers() -> int:
    """Half the CPUs (at most 4): the other side — the NBD server, the kernel's copies — needs about as much
    CPU as the copy itself (measured: ~0.45 s of nbdkit per GiB next to ~1.1 s of ours), so on 2 CPUs a
    second copier only competes with the server (measured up to 10 % slower) and one process is best."""
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
    return max(1, min(requested, -(-size // request_size)))


async def _copy_with_progress(args: argparse.Namespace, src: Endpoint, dst: Endpoint) -> CopyStats:
    progress = _make_progress(args, src.device.size)
    ok = False
    try:
        stats = await copy_device(
            src.device,
            dst.device,
            dst_is_zero=dst.is_zero,
            request_size=args.request_size,
            requests=args.requests,
            detect_zeroes=not args.no_detect_zeroes,
            progress=progress,
        )
        ok = True
    finally:
        if progress is not None:
            progress.finish(ok=ok)
    return stats


def _remove(path: str) -> None:
    """A destination file we created for a copy that failed is not left behind looking like a disk."""
    try:
        os.unlink(path)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)


async def _side(which: str, opening: Any) -> Endpoint:
    try:
        endpoint: Endpoint = await opening
    except (OSError, NbdError, BackupError, TimeoutError) as exc:
        raise CopyError(f"cannot open the {which}: {_describe(exc)}") from exc
    return endpoint


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        filename = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{filename} [{name}]"
    return str(exc) or type(exc).__name__


def failure_message(exc: BaseException) -> str | None:
    """The one-line message for a failure the user can act on; None for anything else (a bug)."""
    if isinstance(exc, CopyError):
        return str(exc)
    if isinstance(exc, (OSError, NbdError, BackupError, TimeoutError)):
        return f"copy failed: {_describe(exc)}"
    return None


def main(args: argparse.Namespace) -> int:
    from nbd.loop import run

    try:
        stats = run(run_copy(args))
    except (CopyError, OSError, NbdError, BackupError, TimeoutError) as exc:
        print(f"nbd-backup copy: {failure_message(exc)}", file=sys.stderr)
        return 1
    log.info(
        "copied %d bytes: %d data, %d zeroed, %d skipped",
        stats.size,
        stats.data_bytes,
        stats.zero_bytes,
        stats.skipped_bytes,
    )
    return 0
