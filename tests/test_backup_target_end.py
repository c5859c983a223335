"""How a backup leaves its target: in place only when it completed; a cancelled or failed one leaves
no file under the target's name (or, for an existing qcow2 image, one marked corrupt); a target whose
last flush or close failed fails the job."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest
from backup_faults import FaultyDevice, pattern

from backup.backup_job import BackupJob, BackupOptions
from backup.errors import ImageFormatError
from backup.events import Event, EventBus
from backup.images import create_image, open_image
from backup.memory import MemoryDevice
from backup.node import BlockNode
from backup.qcow2 import layout as q
from backup.targets import BackupTarget, open_target

CS = 65536
SIZE = 16 * CS


class Events:
    def __init__(self, bus: EventBus) -> None:
        self.all: list[Event] = []
        bus.subscribe(self.all.append)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e.data for e in self.all if e.name == name]


async def start(
    target: BackupTarget, *, gated: bool = False, **options: Any
) -> tuple[BlockNode, FaultyDevice, BackupJob, Events]:
    """A backup of a memory disk into ``target`` (through a fault wrapper), started."""
    node = BlockNode("disk", MemoryDevice(SIZE, data=pattern(SIZE)))
    faulty = FaultyDevice(target.device)
    if gated:
        faulty.gate.clear()
    bus = EventBus()
    events = Events(bus)
    options.setdefault("max_chunk", CS)
    job = BackupJob(
        "job0", node, faulty, BackupOptions(**options), events=bus, target_zero_init=target.zero_init, owner=target
    )
    await job.attach()
    job.start()
    return node, faulty, job, events


async def finish(job: BackupJob) -> None:
    async with asyncio.timeout(30):
        await job.wait()


async def cancel_after_some_progress(job: BackupJob, faulty: FaultyDevice) -> None:
    faulty.gate.set()
    for _ in range(10_000):
        if job.current_progress:
            break
        await asyncio.sleep(0)
    faulty.gate.clear()  # the copy cannot finish before the cancel
    job.cancel(force=True)
    faulty.gate.set()
    await finish(job)


async def test_a_completed_backup_is_renamed_into_place(tmp_path: Path) -> None:
    path = tmp_path / "full.img"
    target = await open_target(str(path), size=SIZE)
    _, _, job, events = await start(target)
    await finish(job)
    assert "error" not in events.named("BLOCK_JOB_COMPLETED")[0]
    assert os.listdir(tmp_path) == ["full.img"]
    assert path.read_bytes() == pattern(SIZE)


@pytest.mark.parametrize("existed", [False, True])
async def test_a_cancelled_backup_leaves_no_target_file(tmp_path: Path, existed: bool) -> None:
    path = tmp_path / "cancelled.img"
    if existed:
        path.write_bytes(b"old")
    target = await open_target(str(path), size=SIZE, mode="absolute-paths")
    _, faulty, job, events = await start(target, gated=True)
    await cancel_after_some_progress(job, faulty)
    assert events.named("BLOCK_JOB_CANCELLED")
    assert os.listdir(tmp_path) == (["cancelled.img"] if existed else [])
    if existed:
        assert path.read_bytes() == b"old"  # the old file, untouched


async def test_a_failed_backup_leaves_no_target_file(tmp_path: Path) -> None:
    target = await open_target(str(tmp_path / "failed.img"), size=SIZE)
    _, faulty, job, events = await start(target, gated=True)
    faulty.fail_writes = errno.EIO
    faulty.gate.set()
    await finish(job)
    assert events.named("BLOCK_JOB_COMPLETED")[0]["error"] == "Input/output error"
    assert os.listdir(tmp_path) == []


async def test_sync_none_keeps_its_target_when_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "fleece.img"
    target = await open_target(str(path), size=SIZE)
    node, _, job, events = await start(target, sync="none")
    await node.pwrite(CS, b"new")  # copies the old cluster first
    job.cancel(force=True)
    await finish(job)
    assert events.named("BLOCK_JOB_CANCELLED")
    assert os.listdir(tmp_path) == ["fleece.img"]
    assert path.read_bytes()[CS : 2 * CS] == pattern(SIZE)[CS : 2 * CS]


async def test_a_target_whose_close_fails_fails_the_job(tmp_path: Path) -> None:
    target = await open_target(str(tmp_path / "close.img"), size=SIZE)
    device_close = target.device.close

    async def failing_close() -> None:
        await device_close()
        raise OSError(errno.EIO, "close failed")

    target.device.close = failing_close  # type: ignore[method-assign]
    _, _, job, events = await start(target, auto_dismiss=False)
    await finish(job)
    assert events.named("BLOCK_JOB_COMPLETED")[0]["error"] == "Input/output error"
    assert job.query_job()["error"] == "Input/output error"
    assert os.listdir(tmp_path) == []


async def test_a_failed_fdatasync_of_a_file_target_fails_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The raw file's fdatasync fails once (then would succeed): with on-target-error=ignore the job
    still fails, and the incomplete file is not put in place."""
    failures = [OSError(errno.EIO, "Input/output error")]

    def fdatasync(fd: int) -> None:
        if failures:
            raise failures.pop()

    target = await open_target(str(tmp_path / "sync.img"), size=SIZE)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    _, _, job, events = await start(target, on_target_error="ignore", retry_delay=0)
    await finish(job)
    assert events.named("BLOCK_JOB_COMPLETED")[0]["error"] == "Input/output error"
    assert os.listdir(tmp_path) == []


def _incompatible(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(q.INCOMPAT_OFFSET)
        return int.from_bytes(f.read(8), "big")


async def test_an_existing_qcow2_target_that_did_not_complete_is_marked_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "existing.qcow2"
    await (await create_image(path, SIZE, format="qcow2")).close()
    target = await open_target(str(path), size=SIZE, mode="existing")
    assert target.mark_incomplete and target.partial is None
    _, faulty, job, _ = await start(target, gated=True)
    await cancel_after_some_progress(job, faulty)
    assert _incompatible(path) & q.INCOMPAT_CORRUPT
    with pytest.raises(ImageFormatError, match="corrupt"):
        await open_image(path, format="qcow2")
    await (await open_image(path, format="qcow2", read_only=True)).close()  # still readable

    # A backup that completes into an existing image leaves it clean; one never started leaves it alone.
    path2 = tmp_path / "existing2.qcow2"
    await (await create_image(path2, SIZE, format="qcow2")).close()
    target = await open_target(str(path2), size=SIZE, mode="existing")
    _, _, job, _ = await start(target)
    await finish(job)
    assert _incompatible(path2) & (q.INCOMPAT_CORRUPT | q.INCOMPAT_DIRTY) == 0
    target = await open_target(str(path2), size=SIZE, mode="existing")
    await target.discard(written=False)
    assert _incompatible(path2) & q.INCOMPAT_CORRUPT == 0


async def test_sync_none_keeps_its_target_when_cancelled_before_any_guest_write(tmp_path: Path) -> None:
    path = tmp_path / "idle.qcow2"
    target = await open_target(str(path), size=SIZE, format="qcow2", mode="absolute-paths")
    _, _, job, _ = await start(target, sync="none")
    job.cancel(force=True)
    await finish(job)
    assert os.listdir(tmp_path) == ["idle.qcow2"]


async def test_a_group_that_fails_leaves_none_of_its_files(tmp_path: Path) -> None:
    """``completion-mode: grouped``: one job finished, the other fails — neither file appears."""
    from backup.job import JobGroup

    done = await open_target(str(tmp_path / "done.img"), size=SIZE)
    failing = await open_target(str(tmp_path / "failing.img"), size=SIZE)
    node = BlockNode("disk", MemoryDevice(SIZE, data=pattern(SIZE)))
    bus = EventBus()
    events = Events(bus)
    faulty = FaultyDevice(failing.device)
    faulty.gate.clear()
    jobs = [
        BackupJob("a", node, done.device, BackupOptions(), events=bus, target_zero_init=True, owner=done),
        BackupJob("b", node, faulty, BackupOptions(), events=bus, target_zero_init=True, owner=failing),
    ]
    JobGroup(jobs)
    async with node.drained():
        for job in jobs:
            job.install_filter()
    for job in jobs:
        job.start()
    async with asyncio.timeout(30):
        while jobs[0].status != "waiting":
            await asyncio.sleep(0.001)
    faulty.fail_writes = errno.EIO
    faulty.gate.set()
    for job in jobs:
        await finish(job)
    assert {e["device"]: e.get("error") for e in events.named("BLOCK_JOB_COMPLETED")} == {"b": "Input/output error"}
    assert [e["device"] for e in events.named("BLOCK_JOB_CANCELLED")] == ["a"]
    assert os.listdir(tmp_path) == []
