"""Backup error handling against real faulty targets: nbdkit's error filter (faults switched on and
off mid-job with its ``error-file`` trigger), nbdkit's ``full`` plugin (ENOSPC), and a target process
that is stopped or killed — a guest write never hangs past ``cbw-timeout`` and cancel is prompt."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from backup_rig import (
    Backup,
    MiB,
    Source,
    nbd_export_to_file,
    qemu_io,
    same_bytes,
    served_source,
    start_backup,
    tool,
    write_random_image,
)
from conftest import require
from peers import Peer, nbdkit

from backup.backup_job import BackupOptions
from backup.targets import open_target
from nbd.client import NbdClient

SIZE = 4 * MiB
BOUND = 30.0  # generous bound on anything that must not hang


async def until(predicate: object, timeout: float = BOUND) -> None:
    async def poll() -> None:
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


@contextmanager
def stoppable_target(tmp_path: Path) -> Iterator[Peer]:
    """An nbdkit memory target a test may SIGSTOP or SIGKILL; a stopped one is continued before it is stopped."""
    with nbdkit(tmp_path, "memory", f"size={SIZE}") as peer:
        try:
            yield peer
        finally:
            if peer.procs[0].poll() is None:
                peer.procs[0].send_signal(signal.SIGCONT)


def statuses(backup: Backup) -> list[str]:
    return [str(e.data["status"]) for e in backup.events if e.name == "JOB_STATUS_CHANGE"]


@pytest.mark.parametrize(
    ("policy", "errname", "action"),
    [
        ("report", "EIO", "report"),
        ("ignore", "EIO", "ignore"),
        ("stop", "EIO", "stop"),
        ("enospc", "ENOSPC", "stop"),
        ("enospc", "EIO", "report"),
    ],
)
async def test_target_error_policies_with_faults_switched_mid_job(
    tmp_path: Path, policy: str, errname: str, action: str
) -> None:
    require("nbdkit", "nbdcopy", "qemu-io")
    image = write_random_image(tmp_path / "disk.img", SIZE, seed=5)
    trigger = tmp_path / "fault"
    filter_args = [f"error-pwrite={errname}", "error-pwrite-rate=100%", f"error-file={trigger}"]
    with nbdkit(tmp_path, "--filter=error", "memory", f"size={SIZE}", *filter_args) as peer:
        async with served_source(tmp_path, image) as source:
            target = await open_target(peer.uri, size=SIZE)
            options = BackupOptions(speed=4 * MiB, max_chunk=128 * 1024, on_target_error=policy, retry_delay=0.05)
            backup = await start_backup(source, target, options)
            job = backup.job
            await until(lambda: job.current_progress > 0)
            trigger.touch()  # fault on
            error = await backup.wait_event("BLOCK_JOB_ERROR")
            assert error == {"device": "b0", "operation": "write", "action": action}
            if action == "report":
                await backup.finish()
                expected = "Input/output error" if errname == "EIO" else "No space left on device"
                assert backup.named("BLOCK_JOB_COMPLETED")[0]["error"] == expected
                assert "aborting" in statuses(backup)
                assert source.node.filters == []
                return
            if action == "stop":
                await until(lambda: job.status == "paused")
                assert job.io_status == ("nospace" if errname == "ENOSPC" else "failed")
                assert job.paused
            trigger.unlink()  # fault off
            # the guest keeps writing; copy-before-write still protects the point in time
            await qemu_io(source.uri, ["write -P 0x5c 0 1M", f"write -P 0x5d {SIZE - 65536} 65536"])
            if action == "stop":
                job.resume()
            await backup.finish()
            assert job.error is None, job.error
            assert job.io_status == "ok"
            same_bytes(backup.snapshot, await nbd_export_to_file(peer.uri, tmp_path / "readback.img"))
            if action == "stop":
                tail = statuses(backup)
                assert tail[tail.index("paused") + 1] == "running"


@pytest.mark.parametrize("policy", ["report", "enospc"])
async def test_full_target_is_enospc(tmp_path: Path, policy: str) -> None:
    require("nbdkit")
    image = write_random_image(tmp_path / "disk.img", SIZE, seed=9)
    with nbdkit(tmp_path, "full", f"size={SIZE}") as peer:
        async with served_source(tmp_path, image) as source:
            target = await open_target(peer.uri, size=SIZE)
            backup = await start_backup(source, target, BackupOptions(on_target_error=policy))
            error = await backup.wait_event("BLOCK_JOB_ERROR")
            assert error["action"] == ("report" if policy == "report" else "stop")
            if policy == "enospc":
                await until(lambda: backup.job.status == "paused")
                assert backup.job.io_status == "nospace"
                backup.job.cancel()
                await backup.finish(BOUND)
                assert backup.named("BLOCK_JOB_CANCELLED")
            else:
                await backup.finish(BOUND)
                assert backup.named("BLOCK_JOB_COMPLETED")[0]["error"] == "No space left on device"
            assert source.node.filters == []


@pytest.mark.parametrize("how", ["stopped", "killed"])
async def test_dead_target_never_hangs_a_guest_write(tmp_path: Path, how: str) -> None:
    require("nbdkit", "qemu-io")
    image = write_random_image(tmp_path / "disk.img", SIZE, seed=13)
    with stoppable_target(tmp_path) as peer:
        proc = peer.procs[0]
        async with served_source(tmp_path, image) as source:
            target = await open_target(peer.uri, size=SIZE)
            options = BackupOptions(speed=1 * MiB, max_chunk=65536, cbw_timeout=1.0)
            backup = await start_backup(source, target, options)
            job = backup.job
            await until(lambda: job.current_progress > 0)
            proc.send_signal(signal.SIGSTOP if how == "stopped" else signal.SIGKILL)
            # the last cluster is still to copy: its old data cannot reach the dead target
            _rc, out = await qemu_io(source.uri, [f"write -P 0x42 {SIZE - 4096} 4096"], timeout=BOUND, check=False)
            assert "write failed" in out, out
            assert (await source.node.pread(SIZE - 4096, 4096)) == backup.snapshot.read_bytes()[-4096:]
            if not job.is_completed:
                job.cancel()
            await backup.finish(BOUND)
            assert job.status in ("concluded", "null")
            assert job.error is not None
            assert source.node.filters == []
            # without the filter the guest writes freely again
            await qemu_io(source.uri, [f"write -P 0x43 {SIZE - 4096} 4096"], timeout=BOUND)


async def test_source_read_errors_stop_and_resume(tmp_path: Path) -> None:
    """The source itself is remote (an nbdkit export behind our node): its read faults go through
    ``on-source-error``."""
    require("nbdkit", "nbdcopy")
    image = write_random_image(tmp_path / "disk.img", SIZE, seed=23)
    trigger = tmp_path / "read-fault"
    filter_args = ["error-pread=EIO", "error-pread-rate=100%", f"error-file={trigger}"]
    with nbdkit(tmp_path, "--filter=error", "memory", f"size={SIZE}", *filter_args) as peer:
        await tool("nbdcopy", image, peer.uri)
        remote = await NbdClient.connect(peer.uri)
        async with served_source(tmp_path, image, device=remote) as source:
            target = await open_target(str(tmp_path / "target.img"), size=SIZE)
            options = BackupOptions(speed=4 * MiB, max_chunk=128 * 1024, on_source_error="stop")
            backup = await start_backup(source, target, options)  # the image file is the oracle
            job = backup.job
            await until(lambda: job.current_progress > 0)
            trigger.touch()
            assert await backup.wait_event("BLOCK_JOB_ERROR") == {"device": "b0", "operation": "read", "action": "stop"}
            await until(lambda: job.status == "paused")
            assert job.io_status == "failed"
            trigger.unlink()
            job.resume()
            await backup.finish()
            assert job.error is None, job.error
        same_bytes(image, tmp_path / "target.img")


async def test_break_snapshot_lets_the_guest_write_and_fails_the_backup(tmp_path: Path) -> None:
    require("nbdkit", "qemu-io")
    image = write_random_image(tmp_path / "disk.img", SIZE, seed=29)
    with stoppable_target(tmp_path) as peer:
        proc = peer.procs[0]
        async with served_source(tmp_path, image) as source:
            target = await open_target(peer.uri, size=SIZE)
            options = BackupOptions(speed=1 * MiB, max_chunk=65536, cbw_timeout=0.5, on_cbw_error="break-snapshot")
            backup = await start_backup(source, target, options)
            job = backup.job
            await until(lambda: job.current_progress > 0)
            proc.send_signal(signal.SIGSTOP)
            await qemu_io(source.uri, [f"write -P 0x42 {SIZE - 4096} 4096"], timeout=BOUND)  # succeeds
            assert (await source.node.pread(SIZE - 4096, 4096)) == b"\x42" * 4096
            await backup.finish(BOUND)
            completed = backup.named("BLOCK_JOB_COMPLETED")
            assert completed and completed[0]["error"] == "Connection timed out"
            assert source.node.filters == []


LOOP_SIZE = 4 * MiB


async def stop_then_resume_at_once(tmp_path: Path, source: Source, run: int) -> None:
    """One backup onto a fresh nbdkit target whose writes fail with ENOSPC while a trigger file exists:
    at the first ``BLOCK_JOB_ERROR`` remove the trigger and resume, then check the job completes
    without stopping again and the target holds the point in time."""
    trigger = tmp_path / "fault"
    trigger.touch()
    filter_args = ["error-pwrite=ENOSPC", "error-pwrite-rate=1", f"error-file={trigger}"]
    with nbdkit(tmp_path, "--filter=error", "memory", f"size={LOOP_SIZE}", *filter_args, name=f"t{run}") as peer:
        target = await open_target(peer.uri, size=LOOP_SIZE)
        # one cluster per claim, 64 workers: every write of the disk is in flight at once
        options = BackupOptions(on_target_error="stop", max_workers=64, max_chunk=65536)
        first_error = asyncio.Event()
        backup = await start_backup(source, target, options, job_id=f"b{run}")
        job = backup.job
        # subscribed before the job ran: no event is missed
        job.events.subscribe(lambda event: first_error.set() if event.name == "BLOCK_JOB_ERROR" else None)
        async with asyncio.timeout(BOUND):
            await first_error.wait()
        assert job.user_paused and job.io_status == "nospace"
        trigger.unlink()
        job.resume()  # the failures of the other writes may not have been seen yet
        errors_before_resume = len(backup.named("BLOCK_JOB_ERROR"))
        await until(lambda: job.status == "null" or job.user_paused)
        assert not job.user_paused, f"run {run}: stopped again after the resume"
        await backup.finish(BOUND)
        assert len(backup.named("BLOCK_JOB_ERROR")) == errors_before_resume, f"run {run}"
        assert job.error is None, (run, job.error)
        assert job.io_status == "ok"
        same_bytes(backup.snapshot, await nbd_export_to_file(peer.uri, tmp_path / f"readback{run}.img"))


async def test_stop_resume_loop_ignores_late_failures_from_before_the_pause(tmp_path: Path) -> None:
    """on-target-error=stop, the trigger removed and the job resumed as soon as the first failure
    stops it, five times: the other writes in flight failed before the stop and their replies may
    arrive after the resume. Those failures belong to the run before the stop: they must not stop the
    job again (no ``BLOCK_JOB_ERROR`` after the resume), and every run must complete with the target
    equal to the point in time."""
    require("nbdkit", "nbdcopy")
    image = write_random_image(tmp_path / "disk.img", LOOP_SIZE, seed=31)
    async with served_source(tmp_path, image) as source:
        for run in range(5):
            await stop_then_resume_at_once(tmp_path, source, run)
