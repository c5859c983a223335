"""The ``BlockDevice`` protocol: the verbs NBD carries, as an asyncio interface.

Everything that holds blocks implements it — raw files, qcow2 images, the memory device of the tests,
filters such as copy-before-write, and ``NbdClient`` (a remote NBD export is just another device).
The NBD server exports any ``BlockDevice``; the backup job copies from one to another.

Beyond the verbs a device may offer optional capabilities, each declared here as a protocol
(``DirectReadFd``, ``DirectWriteFd``, ``ReadInto``, ``WriteFromFd``, ``TopAllocation``,
``AllocationDepth``, ``Layered``, ``Backed``, ``ImageFile``, ``Formatted``, ``Clustered``,
``RemoteExport``, ``Compressing``, ``Holdable``) with one function that asks a device for it
(``direct_read_fd``, ``read_into``, ``allocation_depth``, ``backing_of``, ``hold``, …).
Callers use those functions, never ``getattr``: this module is the one place that looks at what a
device offers.

Conventions: offsets and lengths are bytes; ``offset`` comes first. Failures raise ``OSError``
with an errno (``NbdRequestError`` is one), which ``nbd.errors.errno_to_nbd`` maps for the wire.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast, runtime_checkable

from nbd.constants import State
from nbd.uri import NbdUri


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of ``length`` bytes sharing ``base:allocation`` flags (``State.HOLE``/``State.ZERO``)."""

    length: int
    flags: int = 0

    @property
    def is_hole(self) -> bool:
        return bool(self.flags & State.HOLE)

    @property
    def is_zero(self) -> bool:
        return bool(self.flags & State.ZERO)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a device can do; the NBD server turns these into transmission flags."""

    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = False
    can_cache: bool = False
    can_multi_conn: bool = False
    can_extents: bool = True
    rotational: bool = False


@dataclass(frozen=True, slots=True)
class BlockLimits:
    """Block size constraints (NBD_INFO_BLOCK_SIZE): the minimum and preferred sizes are powers of two."""

    minimum: int = 1
    preferred: int = 4096
    maximum: int = 32 * 1024 * 1024


@runtime_checkable
class BlockDevice(Protocol):
    """An addressable array of ``size`` bytes with NBD's verbs."""

    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def block_limits(self) -> BlockLimits: ...

    async def pread(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes; holes read as zeroes."""
        ...

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        """Write all of ``data``; with ``fua`` it is durable before this returns."""
        ...

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        """Make the range read as zeroes; ``may_trim`` allows a hole; ``fast`` fails with ENOTSUP
        instead of falling back to writing zero buffers."""
        ...

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Hint that the range is unused (the contents afterwards are unspecified)."""
        ...

    async def flush(self) -> None:
        """Make every completed write durable."""
        ...

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Describe the allocation of the range: contiguous extents starting at ``offset``, covering
        at least one byte and at most ``length`` bytes."""
        ...

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch the range (advisory)."""
        ...

    async def close(self) -> None:
        """Release resources; further calls fail."""
        ...


# --- optional capabilities -----------------------------------------------------------------------


@runtime_checkable
class DirectReadFd(Protocol):
    """Reads may be served from a file descriptor (``sendfile`` by the NBD server and the copier)."""

    def direct_read_fd(self) -> int | None:
        """A descriptor whose bytes are exactly what ``pread`` returns now (past its end: zeroes),
        or None when reads must go through ``pread`` (closed; a filter that changes reads)."""
        ...


@runtime_checkable
class DirectWriteFd(Protocol):
    """Writes inside the device's size may be a plain ``os.pwrite`` on a descriptor (raw files)."""

    def direct_write_fd(self) -> int | None:
        """The descriptor, or None when read-only or closed."""
        ...


@runtime_checkable
class WriteMany(Protocol):
    """Takes several writes at scattered offsets as one request (an image whose metadata lives in this
    process: one lock hold, one allocation, one ``pwritev``)."""

    async def pwrite_many(self, pieces: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None: ...


@runtime_checkable
class ReadInto(Protocol):
    """Reads into the caller's reused buffer (no fresh ``bytes`` per read)."""

    async def pread_into(self, offset: int, buffer: bytearray | memoryview) -> None: ...


@runtime_checkable
class WriteFromFd(Protocol):
    """Writes whose payload is taken from a file (``sendfile`` into an NBD socket)."""

    async def pwrite_from_fd(
        self, offset: int, fd: int, file_offset: int, length: int, *, fua: bool = False
    ) -> None: ...


@runtime_checkable
class WritesBehind(Protocol):
    """A device that can hand big writes to a thread of its own while the caller goes on (raw files):
    what a whole-device copy wants, whose event loop has the next request to receive meanwhile."""

    def write_behind(self, enabled: bool) -> None: ...


@runtime_checkable
class TopAllocation(Protocol):
    """Which ranges the top layer itself holds (not its backing file): ``sync=top`` copies only those."""

    async def top_allocation(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """Runs ``(length, allocated_in_top)`` covering the range."""
        ...


@runtime_checkable
class AllocationDepth(Protocol):
    """At which layer of its backing chain each byte is allocated (NBD's ``qemu:allocation-depth``)."""

    async def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Runs ``(length, depth)`` covering the range: 0 allocated nowhere (reads as zeroes), 1 in
        this image (zero clusters count), 2 in its backing file, and so on down the chain."""
        ...


@runtime_checkable
class Layered(Protocol):
    """A device over an opened image that answers layout questions for it (a block node: its
    filters change neither allocation nor backing chains)."""

    @property
    def image(self) -> BlockDevice: ...


@runtime_checkable
class Holdable(Protocol):
    """Something exports, jobs and parent nodes hold while they use it (a block node), so that it is
    not deleted under them."""

    def hold(self, user: object) -> None: ...

    def release(self, user: object) -> None: ...


@runtime_checkable
class Backed(Protocol):
    """An image over a backing file (qcow2): reads of what it does not hold come from ``backing``."""

    @property
    def backing(self) -> BlockDevice | None: ...


@runtime_checkable
class ImageFile(Protocol):
    """A device that is one file on the host."""

    @property
    def path(self) -> str | os.PathLike[str]: ...


@runtime_checkable
class Formatted(Protocol):
    """An image in a named format other than raw."""

    @property
    def format_name(self) -> str: ...


@runtime_checkable
class Clustered(Protocol):
    """An image allocated in clusters."""

    @property
    def cluster_size(self) -> int: ...


@runtime_checkable
class RemoteExport(Protocol):
    """A device that is an NBD export somewhere else (``NbdClient``): where it is decides how many
    requests a copy keeps in flight."""

    @property
    def uri(self) -> NbdUri: ...


@runtime_checkable
class Compressing(Protocol):
    """An image that can store written clusters compressed; whether it does is chosen when it is
    created or opened (``compress=True``)."""

    compress: bool


def _class_check(capability: type) -> Callable[[object], bool]:
    """Whether a device offers the method capability ``capability``, answered once per class: methods
    belong to the class, and ``isinstance`` on a runtime-checkable protocol costs tens of
    microseconds while ``direct_read_fd`` is asked on every big read."""
    offered: dict[type, bool] = {}

    def offers(device: object) -> bool:
        found = offered.get(type(device))
        if found is None:
            found = offered[type(device)] = isinstance(device, capability)
        return found

    return offers


_reads_by_fd = _class_check(DirectReadFd)
_writes_by_fd = _class_check(DirectWriteFd)
_reads_into = _class_check(ReadInto)
_writes_many = _class_check(WriteMany)
_writes_from_fd = _class_check(WriteFromFd)
_writes_behind = _class_check(WritesBehind)
_knows_top = _class_check(TopAllocation)
_holdable = _class_check(Holdable)
_knows_depth = _class_check(AllocationDepth)


def direct_read_fd(device: Any) -> int | None:
    """The one answer to "may this read go straight to a file descriptor": the fd whose bytes are
    what ``device.pread`` returns, or None. Nodes answer for the top of their stack and filters for
    the device under them when they pass reads (``BlockFilter.passes_reads``), so the NBD server's
    ``sendfile`` and the copier's take the same decision."""
    if not _reads_by_fd(device):
        return None
    fd = device.direct_read_fd()
    return fd if isinstance(fd, int) else None


def direct_write_fd(device: object) -> int | None:
    """The descriptor a plain ``os.pwrite`` may write ``device`` through, or None."""
    if not _writes_by_fd(device):
        return None
    fd = cast(DirectWriteFd, device).direct_write_fd()
    return fd if isinstance(fd, int) else None


def write_many(
    device: object,
) -> Callable[[Sequence[tuple[int, bytes | bytearray | memoryview]]], Awaitable[None]] | None:
    """``device.pwrite_many`` when the device takes scattered writes as one request, else None."""
    return cast(WriteMany, device).pwrite_many if _writes_many(device) else None


def read_into(device: object) -> Callable[[int, bytearray | memoryview], Awaitable[None]] | None:
    """``device.pread_into`` when the device reads into a caller's buffer, else None."""
    return cast(ReadInto, device).pread_into if _reads_into(device) else None


def write_from_fd(device: object) -> Callable[..., Awaitable[None]] | None:
    """``device.pwrite_from_fd`` when the device takes a write's payload from a file, else None."""
    return cast(WriteFromFd, device).pwrite_from_fd if _writes_from_fd(device) else None


def write_behind(device: object, enabled: bool) -> None:
    """Ask ``device`` to write big payloads on a thread of its own (or to stop); a no-op for devices
    that cannot (see ``WritesBehind``)."""
    if _writes_behind(device):
        cast(WritesBehind, device).write_behind(enabled)


def top_allocation(device: object) -> Callable[[int, int], Awaitable[list[tuple[int, bool]]]] | None:
    """``device.top_allocation`` when the device can tell its own clusters from its backing's, else None."""
    return cast(TopAllocation, device).top_allocation if _knows_top(device) else None


def allocation_depth(device: object) -> Callable[[int, int], Awaitable[list[tuple[int, int]]]] | None:
    """``allocation_depth`` of the device (of the image under a block node), or None when it cannot
    tell layers apart."""
    if not _knows_depth(device) and isinstance(device, Layered):
        device = device.image
    return cast(AllocationDepth, device).allocation_depth if _knows_depth(device) else None


def hold(device: object, user: object) -> None:
    """Mark ``device`` as used by ``user`` (a no-op for devices nobody can delete, such as files)."""
    if _holdable(device):
        cast(Holdable, device).hold(user)


def release(device: object, user: object) -> None:
    """Undo ``hold``."""
    if _holdable(device):
        cast(Holdable, device).release(user)


# The data protocols above are checked with ``getattr``, which is what ``isinstance`` on a runtime-checkable
# protocol with data members does (a ``hasattr`` per member), without its machinery: the copier asks
# ``compresses`` on every batch, and ``isinstance`` cost ~15 µs per question there.
_ABSENT: Any = object()


def backing_of(device: object) -> BlockDevice | None:
    """The backing device of an image over one, else None."""
    backing = getattr(device, "backing", None)
    return cast("BlockDevice | None", backing)


def file_path(device: object) -> str | None:
    """The host file a device is, else None (NBD exports, memory, filters)."""
    path = getattr(device, "path", None)
    return None if path is None else os.fspath(path)


def format_name(device: object) -> str | None:
    """The image format of a device in one (``qcow2``), else None (raw and everything else)."""
    name = getattr(device, "format_name", None)
    return cast("str | None", name)


def cluster_size(device: object) -> int | None:
    """The cluster size of a clustered image, else None."""
    size = getattr(device, "cluster_size", None)
    return cast("int | None", size)


def remote_uri(device: object) -> NbdUri | None:
    """The URI of the NBD export a device is, else None (local files and images)."""
    uri = getattr(device, "uri", None)
    return cast("NbdUri | None", uri)


def can_compress(device: object) -> bool:
    """Whether the device can store compressed clusters (see ``Compressing``)."""
    return getattr(device, "compress", _ABSENT) is not _ABSENT


def compresses(device: object) -> bool:
    """Whether the device stores what is written to it compressed (then only in whole clusters)."""
    return bool(getattr(device, "compress", False))


class FlushLatch:
    """The first failed flush of a device, remembered for as long as the device is open.

    Linux reports a writeback error to one ``fdatasync`` and then marks the pages clean, so the next
    one succeeds although the data never reached the disk; a remote server may do the same. As QEMU's
    file driver does, a device whose flush failed fails every later flush and FUA write with EIO, so
    no caller (a backup job, a client retrying) mistakes lost data for durable data.
    """

    __slots__ = ("_what", "error")

    def __init__(self, what: str) -> None:
        self._what = what
        self.error: str | None = None

    def check(self) -> None:
        """Raise EIO once a flush has failed."""
        if self.error is not None:
            raise OSError(errno.EIO, f"{self._what}: an earlier flush failed ({self.error}); written data may be lost")

    def failed(self, exc: BaseException) -> None:
        """Record a failed flush (the first cause is kept)."""
        if self.error is None:
            self.error = str(exc) or type(exc).__name__


def pread_padded(fd: int, offset: int, length: int) -> bytes:
    """``length`` bytes of the file ``fd`` at ``offset``; past its end they read as zeroes (a raw image
    whose size was rounded up, or a file that ends before the range a request names)."""
    parts, got = [], 0
    while got < length:
        part = os.pread(fd, length - got, offset + got)
        if not part:
            parts.append(bytes(length - got))
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)
