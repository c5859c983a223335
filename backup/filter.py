"""``BlockFilter``: a device that forwards every verb to ``next``, like an nbdkit filter.

Subclasses override only the verbs they change (copy-before-write overrides the writes).
"""

from __future__ import annotations

from nbd.device import BlockDevice, BlockLimits, Capabilities, Extent, direct_read_fd


class BlockFilter:
    #: True when ``pread`` returns exactly what ``next`` returns (the filter only changes writes), so
    #: a reader may go straight to the device underneath (``direct_read_fd``).
    passes_reads = False

    def __init__(self, next_device: BlockDevice) -> None:
        self.next = next_device

    @property
    def size(self) -> int:
        return self.next.size

    @property
    def read_only(self) -> bool:
        return self.next.read_only

    @property
    def capabilities(self) -> Capabilities:
        return self.next.capabilities

    @property
    def block_limits(self) -> BlockLimits:
        return self.next.block_limits

    def direct_read_fd(self) -> int | None:
        """The descriptor of the device underneath when this filter passes reads, else None.

        Why looking through is safe, for the NBD server's ``sendfile`` as for the copier: such a filter's
        ``pread`` is ``next.pread``, so the descriptor's bytes are exactly what the read would return.
        Copy-before-write is one: it changes only the writes (old data goes to the target first, so a
        guest write reaches the source only after that copy), and a read through it reads the source as
        it is now; no read changes what the backup must copy. A read that races a guest write to the
        same range may see the old bytes, the new ones or a mix — with ``sendfile`` as with ``pread``
        (either may run while a thread writes the file), and NBD promises nothing else for overlapping
        requests in flight together; a read sent after the write's reply sees the new bytes.
        """
        return direct_read_fd(self.next) if self.passes_reads else None

    async def pread(self, offset: int, length: int) -> bytes:
        return await self.next.pread(offset, length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        await self.next.pwrite(offset, data, fua=fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        await self.next.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.next.trim(offset, length, fua=fua)

    async def flush(self) -> None:
        await self.next.flush()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.next.block_status(offset, length)

    async def cache(self, offset: int, length: int) -> None:
        await self.next.cache(offset, length)

    async def close(self) -> None:
        """Filters do not own ``next``; closing one releases only what the filter itself holds."""


__all__ = ["BlockFilter"]
