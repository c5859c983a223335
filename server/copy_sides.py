"""What every process of an ``nbd-backup copy`` shares: the request the user made, opening and closing the
two sides, running the copy engine between them, and the one-line message a failure gets.

Each side is a file (opened through ``backup.images``, so every image format it knows works) or an NBD URI.
A destination file that does not exist is created (and so reads as zeroes).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass

from backup.copy_engine import DEFAULT_REQUEST_SIZE, CopyFailed, CopyStats, ProgressSink, copy_device
from backup.errors import BackupError
from nbd.device import BlockDevice
from nbd.errors import NbdError
from nbd.meta import DIRTY_BITMAP_PREFIX
from nbd.uri import looks_like_uri, parse_uri

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CopyRequest:
    """One ``nbd-backup copy``, as parsed from its command line (picklable: worker processes get it)."""

    source: str
    destination: str
    src_format: str | None = None
    dst_format: str | None = None
    requests: int | None = None  # None: the copy engine's default for the pair of devices
    request_size: int = DEFAULT_REQUEST_SIZE
    connections: int | None = None
    workers: int | None = None  # None: decided from the sides and the size
    target_is_zero: bool = False
    detect_zeroes: bool = True
    dirty_bitmap: str | None = None  # copy only what the source's qemu:dirty-bitmap:NAME marks dirty
    backing: str | None = None  # the new qcow2 destination's backing file (the previous backup)


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


async def connect(spec: str, *, connections: int | None, requests: int, map_context: str | None = None) -> Endpoint:
    """An NBD side, with at most ``requests`` in flight (what the client allows; the copy decides within it)
    and, for a source, a second meta context to map (a dirty bitmap)."""
    from nbd.client import NbdClient

    client = await NbdClient.connect(
        parse_uri(spec), connections=connections, max_in_flight=requests, map_context=map_context
    )
    return Endpoint(client, str(client.uri))


async def open_source(
    spec: str, *, fmt: str | None, connections: int | None, requests: int, dirty_bitmap: str | None = None
) -> Endpoint:
    if dirty_bitmap is not None:
        if not looks_like_uri(spec):
            raise CopyFailed(f"--dirty-bitmap needs an NBD source that publishes the bitmap, not {spec!r}")
        context = DIRTY_BITMAP_PREFIX + dirty_bitmap
        return await connect(spec, connections=connections, requests=requests, map_context=context)
    if looks_like_uri(spec):
        return await connect(spec, connections=connections, requests=requests)
    from backup.images import open_image

    # the user's own files, trusted as qemu-img trusts them: a probed image's backing file is followed
    return Endpoint(await open_image(spec, format=fmt, read_only=True, guard_probed=False), spec)


async def create_destination_file(path: str, size: int, *, fmt: str | None) -> BlockDevice:
    """The one place a destination file is created (``backup.images`` decides what each format needs)."""
    from backup.images import create_image

    return await create_image(path, size, format=fmt or "raw")


async def open_destination(
    spec: str,
    size: int,
    *,
    fmt: str | None,
    connections: int | None,
    requests: int,
    target_is_zero: bool,
    backing: str | None = None,
) -> Endpoint:
    if backing is not None:
        return await create_overlay(spec, size, fmt=fmt, backing=backing)
    if looks_like_uri(spec):
        endpoint = await connect(spec, connections=connections, requests=requests)
        endpoint.is_zero = target_is_zero
        return endpoint
    if _exists(spec):
        from backup.images import open_image

        device = await open_image(spec, format=fmt, guard_probed=False)  # qemu-img convert writes raw unprobed
        return Endpoint(device, spec, is_zero=target_is_zero)
    device = await create_destination_file(spec, size, fmt=fmt)
    return Endpoint(device, spec, is_zero=True, created_path=spec)


async def create_overlay(path: str, size: int, *, fmt: str | None, backing: str) -> Endpoint:
    """A new qcow2 image over ``backing`` (the previous backup of a chain): it reads as the backing file,
    not as zeroes, so every copied range is written, zeroes included."""
    from backup.images import create_image, probe_format

    if looks_like_uri(path) or _exists(path):
        raise CopyFailed(f"--backing creates a new qcow2 image; {path!r} is not a new file")
    if fmt not in (None, "qcow2"):
        raise CopyFailed("--backing needs a qcow2 destination (-O qcow2)")
    backing_format = probe_format(backing)
    device = await create_image(path, size, format="qcow2", backing_file=backing, backing_format=backing_format)
    if device.size != size:
        await device.close()
        os.unlink(path)
        raise CopyFailed(f"the backing file {backing!r} is {device.size} bytes, the source {size}")
    return Endpoint(device, path, is_zero=False, created_path=path)


def _exists(path: str) -> bool:
    return os.path.lexists(path)


async def open_side(which: str, opening: Awaitable[Endpoint]) -> Endpoint:
    """``opening``'s endpoint, or a ``CopyFailed`` naming ``which`` side could not be opened and why."""
    try:
        return await opening
    except (OSError, NbdError, BackupError, TimeoutError) as exc:
        raise CopyFailed(f"cannot open the {which}: {describe(exc)}") from exc


async def close_endpoint(endpoint: Endpoint) -> None:
    """Close once (a parallel copy closes its sides before the end of the copy)."""
    if endpoint.closed:
        return
    endpoint.closed = True
    try:
        await endpoint.device.close()
    except (OSError, NbdError) as exc:
        log.debug("closing %s: %s", endpoint.name, exc)


async def copy_between(
    request: CopyRequest,
    src: BlockDevice,
    dst: Endpoint,
    progress: ProgressSink | None,
    ranges: Iterable[tuple[int, int]] | None = None,
) -> CopyStats:
    """The copy engine as ``request`` asks for it: all of ``src``, or the ``ranges`` this copier claims."""
    return await copy_device(
        src,
        dst.device,
        dst_is_zero=dst.is_zero,
        request_size=request.request_size,
        requests=request.requests,
        detect_zeroes=request.detect_zeroes,
        progress=progress,
        ranges=ranges,
    )


#: How much of the export one dirty-bitmap query covers.
DIRTY_MAP_SPAN = 1 << 30


async def dirty_ranges(src: BlockDevice) -> list[tuple[int, int]]:
    """``(offset, length)`` of every run the source's dirty bitmap marks (the client was connected with
    that bitmap's context), merged where they touch."""
    from nbd.client import NbdClient

    assert isinstance(src, NbdClient)
    ranges: list[tuple[int, int]] = []
    offset, size = 0, src.size
    while offset < size:
        for length, flags in await src.context_map(offset, min(size - offset, DIRTY_MAP_SPAN)):
            if flags & 1:
                if ranges and ranges[-1][0] + ranges[-1][1] == offset:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
                else:
                    ranges.append((offset, length))
            offset += length
    return ranges


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        filename = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{filename} [{name}]"
    return str(exc) or type(exc).__name__


def failure_message(exc: BaseException) -> str | None:
    """The one-line message for a failure the user can act on; None for anything else (a bug)."""
    if isinstance(exc, CopyFailed):
        return str(exc)
    if isinstance(exc, (OSError, NbdError, BackupError, TimeoutError)):
        return f"copy failed: {describe(exc)}"
    return None
