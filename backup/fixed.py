"""``FixedSizeDevice``: what the in-process devices of a fixed size share — ``size``, ``read_only``,
default capabilities and limits, the bounds/read-only/closed check every request makes, and ``close``."""

from __future__ import annotations

import errno

from nbd.device import BlockLimits, Capabilities


class FixedSizeDevice:
    #: errno of a write beyond the end: EINVAL like a block device, or ENOSPC like a file that cannot grow.
    write_beyond_end_errno = errno.EINVAL

    def __init__(self, size: int, *, read_only: bool = False) -> None:
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
            raise OSError(
                self.write_beyond_end_errno if write else errno.EINVAL, "request beyond the end of the device"
            )

    async def close(self) -> None:
        self._closed = True
