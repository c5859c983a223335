"""An in-memory ``BlockDevice`` for tests and scratch exports, sparse at page granularity."""

from __future__ import annotations

import errno

from backup.fixed import FixedSizeDevice
from nbd.align import div_up
from nbd.constants import State
from nbd.device import Extent

PAGE = 4096


class MemoryDevice(FixedSizeDevice):
    """A bytearray with an allocation map, so block status, trims and holes behave like a file's."""

    write_beyond_end_errno = errno.ENOSPC

    def __init__(self, size: int, *, read_only: bool = False, data: bytes | None = None) -> None:
        super().__init__(size, read_only=read_only)
        self._data = bytearray(size)
        self._allocated = bytearray(div_up(size, PAGE))  # 1 = page holds data
        self.flush_count = 0
        if data is not None:
            self._data[: len(data)] = data[:size]
            for page in range(0, div_up(min(len(data), size), PAGE)):
                self._allocated[page] = 1

    @property
    def data(self) -> bytes:
        """A snapshot of the whole contents (for assertions)."""
        return bytes(self._data)

    def _mark(self, offset: int, length: int, allocated: int) -> None:
        if length == 0:
            return
        if allocated:
            first, last = offset // PAGE, (offset + length - 1) // PAGE
            self._allocated[first : last + 1] = b"\x01" * (last - first + 1)
            return
        # Only whole pages become holes; partial pages keep their (now zeroed) data.
        first, end = div_up(offset, PAGE), (offset + length) // PAGE
        if offset + length == self._size:
            end = len(self._allocated)
        if end > first:
            self._allocated[first:end] = bytes(end - first)

    async def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return bytes(self._data[offset : offset + length])

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        length = len(data)
        self._check(offset, length, write=True)
        self._data[offset : offset + length] = data
        self._mark(offset, length, 1)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        self._check(offset, length, write=True)
        self._data[offset : offset + length] = bytes(length)
        self._mark(offset, length, 0 if may_trim else 1)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check(offset, length, write=True)
        self._data[offset : offset + length] = bytes(length)
        self._mark(offset, length, 0)

    async def flush(self) -> None:
        self._check(0, 0)
        self.flush_count += 1

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check(offset, length)
        extents: list[Extent] = []
        end = offset + length
        pos = offset
        while pos < end:
            allocated = self._allocated[pos // PAGE]
            run_end = min(end, (pos // PAGE + 1) * PAGE)
            while run_end < end and self._allocated[run_end // PAGE] == allocated:
                run_end = min(end, run_end + PAGE)
            # The loop above took every following page of the same kind: neighbours never share flags.
            extents.append(Extent(run_end - pos, 0 if allocated else State.HOLE | State.ZERO))
            pos = run_end
        return extents

    async def cache(self, offset: int, length: int) -> None:
        self._check(offset, length)
