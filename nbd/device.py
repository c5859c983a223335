"""The ``BlockDevice`` protocol: the verbs NBD carries, as an asyncio interface.

Everything that holds blocks implements it — raw files, qcow2 images, the memory device of the tests,
filters such as copy-before-write, and ``NbdClient`` (a remote NBD export is just another device).
The NBD server exports any ``BlockDevice``; the backup job copies from one to another.

Conventions: offsets and lengths are bytes; ``offset`` comes first. Failures raise ``OSError``
with an errno (``NbdRequestError`` is one), which ``nbd.errors.errno_to_nbd`` maps for the wire.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from nbd.constants import State


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
