"""Errors while the daemon shuts down (an image that cannot be flushed or closed) are reported — the
daemon's ``run`` fails, so ``nbd-backup serve`` exits non-zero — instead of only being logged."""

from __future__ import annotations

import asyncio
import errno

import pytest
from backup_faults import FaultyDevice

from backup.memory import MemoryDevice
from backup.node import BlockNode
from server.daemon import Daemon
from server.errors import ShutdownError


class FailingClose(MemoryDevice):
    async def close(self) -> None:
        raise OSError(errno.EIO, "Input/output error")


async def stop(daemon: Daemon) -> None:
    daemon.request_stop()
    async with asyncio.timeout(30):
        await daemon.run()


async def test_a_failed_flush_at_shutdown_fails_the_run() -> None:
    daemon = Daemon()
    device = FaultyDevice(MemoryDevice(1 << 20))
    device.flush_failures = 1
    daemon.registry.add_node(BlockNode("d0", device))
    with pytest.raises(ShutdownError, match="flushing node 'd0' failed"):
        await stop(daemon)


async def test_a_failed_close_at_shutdown_fails_the_run() -> None:
    daemon = Daemon()
    daemon.registry.add_node(BlockNode("d1", FailingClose(1 << 20)))
    with pytest.raises(ShutdownError, match="closing node 'd1' failed"):
        await stop(daemon)


async def test_a_clean_shutdown_succeeds() -> None:
    daemon = Daemon()
    daemon.registry.add_node(BlockNode("d2", MemoryDevice(1 << 20)))
    await stop(daemon)
