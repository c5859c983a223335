"""``NullDevice``: QEMU's ``null-co`` — reads zeroes, discards writes. A sink for benchmarks and for
``blockdev-backup`` runs that only measure the source side."""

from __future__ import annotations

import errno

from nbd.constants import State
from nbd.device import BlockLimits, Capabilities, Extent


class NullDevice:
    def __init__(self, size: int, *, read_only: bool = False) -> None:
        if size < 0:
            raise ValueError("size must be non-negative")
        self._size = size
        self._read_only = read_only
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(can_fast_zero=True, can_cache=True, can_multi_conn=True)

    @property
    def block_limits(self) -> BlockLimits:
        return BlockLimits()

    def _check(self, offset: int, length: int, *, write: bool = False) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "device is closed")
        if write and self._read_only:
            raise OSError(errno.EPERM, "device is read-only")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise OSError(errno.EINVAL, "request beyond the end of the device")

    async def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return bytes(length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        self._check(offset, len(data), write=True)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        self._check(offset, length, write=True)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check(offset, length, write=True)

    async def flush(self) -> None:
        self._check(0, 0)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check(offset, length)
        return [Extent(length, State.HOLE | State.ZERO)] if length else []

    async def cache(self, offset: int, length: int) -> None:
        self._check(offset, length)

    async def close(self) -> None:
        self._closed = True
