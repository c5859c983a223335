"""Test helpers for the backup engine: a device wrapper that counts, stalls and fails on demand."""

from __future__ import annotations

import asyncio
import errno

from backup.filter import BlockFilter
from nbd.device import BlockDevice


class FaultyDevice(BlockFilter):
    """Forwards to ``next`` but can fail (``fail_*`` = an errno) or stall (``gate`` cleared) writes/reads.

    Records every write-type request as ``(verb, offset, length)`` so tests can prove a cluster was
    written exactly once.
    """

    def __init__(self, next_device: BlockDevice) -> None:
        super().__init__(next_device)
        self.fail_reads: int | None = None
        self.fail_writes: int | None = None
        self.fail_writes_times = -1  # with fail_writes: how many more failures (-1: until cleared)
        self.flush_failures = 0  # the next N flushes fail with EIO, then flushes succeed again (Linux)
        self.flushes = 0
        self.failed_flushes = 0  # flushes that raised (a job must fail after any of them)
        self.gate = asyncio.Event()
        self.gate.set()
        #: When a list: a write that fails (decided as it arrives, like a server answering at once) keeps
        #: its reply back until the test resolves the future it appends — a failure that arrives late.
        self.held_failures: list[asyncio.Future[None]] | None = None
        self.writes: list[tuple[str, int, int]] = []
        self.reads = 0
        self.stalled = 0

    async def _maybe_stall(self) -> None:
        await asyncio.sleep(0)  # a real device suspends: let the other side interleave
        if not self.gate.is_set():
            self.stalled += 1
            try:
                await self.gate.wait()
            finally:
                self.stalled -= 1

    async def pread(self, offset: int, length: int) -> bytes:
        await self._maybe_stall()
        if self.fail_reads is not None:
            raise OSError(self.fail_reads, "injected read failure")
        self.reads += 1
        return await self.next.pread(offset, length)

    async def _write(self, verb: str, offset: int, length: int) -> None:
        await self._maybe_stall()
        if self.fail_writes is not None and self.fail_writes_times != 0:
            self.fail_writes_times -= self.fail_writes_times > 0
            failure = OSError(self.fail_writes, "injected write failure")
            if self.held_failures is not None:
                reply = asyncio.get_running_loop().create_future()
                self.held_failures.append(reply)
                await reply
            raise failure
        self.writes.append((verb, offset, length))

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        await self._write("write", offset, len(data))
        await self.next.pwrite(offset, data, fua=fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        await self._write("zero", offset, length)
        await self.next.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._write("trim", offset, length)
        await self.next.trim(offset, length, fua=fua)

    async def flush(self) -> None:
        await self._maybe_stall()
        if self.flush_failures:
            self.flush_failures -= 1
            self.failed_flushes += 1
            raise OSError(errno.EIO, "injected flush failure (once)")
        self.flushes += 1
        if self.fail_writes is not None and self.fail_writes_times != 0:
            self.fail_writes_times -= self.fail_writes_times > 0
            self.failed_flushes += 1
            raise OSError(self.fail_writes, "injected flush failure")
        await self.next.flush()


def pattern(size: int, seed: int = 1) -> bytes:
    """Deterministic non-zero-looking data, different per 512-byte block."""
    block = bytes((seed * 131 + i * 7) % 251 + 1 for i in range(509))
    out = (block * (size // len(block) + 1))[:size]
    return out


ENOSPC = errno.ENOSPC
EIO = errno.EIO
