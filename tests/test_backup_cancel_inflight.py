"""Cancelling a backup while a guest write is half-way through its copy-before-write.

As in QEMU, where the filter comes out in a drained section: a guest write already inside the filter
finishes its copy (or, the job being over, is let through) and is never failed because of the
cancel, and the job releases the target — flushes and closes one it owns — only once no copy is
in flight, so the old data the copy carried reaches the target before it is closed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from backup_faults import pattern
from jobkit import until

from backup import backup_job
from backup.backup_job import BackupJob, BackupOptions
from backup.events import EventBus
from backup.filter import BlockFilter
from backup.memory import MemoryDevice
from backup.node import BlockNode
from backup.qcow2 import Qcow2Device
from backup.qcow2.check import check_image

CS = 65536


class SlowTarget(BlockFilter):
    """A target owned by the job (``close`` closes the image below) whose writes wait for ``gate``;
    it records whether it was ever flushed or closed while a write was still in flight."""

    def __init__(self, image: Qcow2Device) -> None:
        super().__init__(image)
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = 0
        self.waiting = asyncio.Event()
        self.released_under_io: list[str] = []
        self.closed = False

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        self.in_flight += 1
        try:
            if not self.gate.is_set():
                self.waiting.set()
                await self.gate.wait()
            await self.next.pwrite(offset, data, fua=fua)
        finally:
            self.in_flight -= 1

    async def flush(self) -> None:
        if self.in_flight:
            self.released_under_io.append("flush")
        await self.next.flush()

    async def close(self) -> None:
        if self.in_flight:
            self.released_under_io.append("close")
        self.closed = True
        await self.next.close()


async def _cancel_mid_copy(tmp_path: Path) -> tuple[MemoryDevice, SlowTarget, BackupJob, asyncio.Task[None]]:
    """A running ``sync=none`` job owning a qcow2 target (``target.qcow2``) behind a ``SlowTarget``,
    cancelled while a guest write's copy of cluster 3 waits in the target (the guest write task)."""
    size = 8 * CS
    source = MemoryDevice(size, data=pattern(size))
    node = BlockNode("disk", source)
    target = SlowTarget(await Qcow2Device.create(tmp_path / "target.qcow2", size))
    job = BackupJob(
        "job0", node, target, BackupOptions(sync="none"), events=EventBus(), target_zero_init=True, close_target=True
    )
    await job.attach()
    job.start()
    await node.pwrite(0, b"first" * 100)  # one copy that completes normally
    target.gate.clear()
    guest = asyncio.create_task(node.pwrite(3 * CS + 10, b"N" * 100))
    await asyncio.wait_for(target.waiting.wait(), 10)  # its old data is on the way to the target
    job.cancel()
    return source, target, job, guest


async def test_cancel_waits_for_a_guest_copy_in_flight_before_closing_the_target(tmp_path: Path) -> None:
    old = pattern(8 * CS)
    source, target, job, guest = await _cancel_mid_copy(tmp_path)
    path = tmp_path / "target.qcow2"
    await until(lambda: job.status != "running")
    for _ in range(20):  # let the cancelled job get as far as it goes while the copy is stuck
        await asyncio.sleep(0)
    target.gate.set()
    await asyncio.wait_for(job.wait(), 30)
    await asyncio.wait_for(guest, 10)  # never failed because the job went away under it
    assert target.closed
    assert target.released_under_io == []
    assert job.source.filters == []
    assert source.data[3 * CS + 10 : 3 * CS + 110] == b"N" * 100
    check = check_image(str(path))
    assert check.clean, check
    image = await Qcow2Device.open(path, read_only=True)
    try:
        assert await image.pread(0, CS) == old[:CS]
        assert await image.pread(3 * CS, CS) == old[3 * CS : 4 * CS]  # the copy in flight at cancel
    finally:
        await image.close()


async def test_cancel_with_a_guest_copy_stuck_on_a_dead_target_stays_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy never finishes (the target stopped answering): after its grace the job still ends and
    closes the target; when the copy finally arrives it meets a closed image (EBADF), which is no
    longer the guest's concern — the write goes through, and the closed image stays untouched."""
    monkeypatch.setattr(backup_job, "CLOSE_TIMEOUT", 0.05)
    source, target, job, guest = await _cancel_mid_copy(tmp_path)
    path = tmp_path / "target.qcow2"
    await asyncio.wait_for(job.wait(), 30)  # the gate is still shut: the copy is stuck
    assert target.closed and not guest.done()
    before = path.read_bytes()
    target.gate.set()
    await asyncio.wait_for(guest, 10)
    assert source.data[3 * CS + 10 : 3 * CS + 110] == b"N" * 100
    assert path.read_bytes() == before
    check = check_image(str(path))
    assert check.clean, check
