"""``NullDevice``: QEMU's ``null-co`` — reads zeroes, discards writes. A sink for benchmarks and for
``blockdev-backup`` runs that only measure the source side."""

from __future__ import annotations

from backup.fixed import FixedSizeDevice
from nbd.constants import State
from nbd.device import Extent


class NullDevice(FixedSizeDevice):
    def __init__(self, size: int, *, read_only: bool = False) -> None:
        if size < 0:
            raise ValueError("size must be non-negative")
        super().__init__(size, read_only=read_only)

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
