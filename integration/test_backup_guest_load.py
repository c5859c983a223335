"""What a running backup does to the guest, end to end through our NBD server.

1. The point in time holds under the heaviest guest load: fio random writes at full speed over the
   whole disk, together with unaligned writes, write-zeroes and trims from a second client, while a
   backup (slowed so that it outlives the guests) runs — into a raw file (where guest writes wait for
   the read of the old data only, the capture writer putting it on the target behind them), a qcow2
   file and a qemu-nbd export. The job is sped up once the guests are done; the target must equal the
   oracle.
2. A guest write to a cluster already copied never waits for a copy in flight elsewhere: with the
   target gated, the job's copy and another guest's copy hang, and a qemu-io write to a copied cluster
   completes.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from backup_rig import (
    MiB,
    Source,
    fio_randwrite,
    nbd_export_to_file,
    qemu_io,
    same_bytes,
    served_source,
    start_backup,
    tool,
    write_random_image,
)
from conftest import require, run
from peers import make_image, qemu_nbd

from backup.backup_job import BackupJob, BackupOptions
from backup.events import EventBus
from backup.filter import BlockFilter
from backup.memory import MemoryDevice
from backup.targets import open_target
from nbd.client import NbdClient

SIZE = 16 * MiB
CS = 65536


@dataclass
class Target:
    spec: str
    format: str | None
    file: Path | None  # raw bytes readable here (None: read back over NBD)
    uri: str | None


@asynccontextmanager
async def target_of_kind(kind: str, tmp: Path) -> AsyncIterator[Target]:
    async with AsyncExitStack() as stack:
        if kind == "raw-file":
            path = tmp / "target.img"
            yield Target(str(path), "raw", path, None)
        elif kind == "qcow2-file":
            yield Target(str(tmp / "target.qcow2"), "qcow2", None, None)
        else:
            path = make_image(tmp / "nbd-target.img", SIZE)
            peer = stack.enter_context(qemu_nbd(tmp, path))
            yield Target(peer.uri, None, path, peer.uri)


async def contents(target: Target, tmp: Path) -> Path:
    if target.format == "qcow2":
        raw = tmp / "target-as-raw.img"
        await tool("qemu-img", "convert", "-f", "qcow2", "-O", "raw", target.spec, raw)
        return raw
    if target.file is not None:
        return target.file
    assert target.uri is not None
    return await nbd_export_to_file(target.uri, tmp / "readback.img")


async def unaligned_guest(uri: str, seed: int, count: int = 300) -> None:
    """Writes at any byte offset and length (crossing clusters), write-zeroes and trims, from our
    client: the requests a guest's partial-sector writes and discards become."""
    rnd = random.Random(seed)
    client = await NbdClient.connect(uri, connections=1)
    try:
        for _ in range(count):
            length = rnd.choice([1, 511, 4097, CS - 3, CS + 700, 3 * CS + 1])
            offset = rnd.randrange(0, SIZE - length)
            verb = rnd.random()
            if verb < 0.6:
                await client.pwrite(offset, rnd.randbytes(length))
            elif verb < 0.8:
                await client.zero(offset, length, may_trim=rnd.random() < 0.5)
            else:
                await client.trim(offset, length)
    finally:
        await client.close()


@pytest.mark.parametrize("kind", ["raw-file", "qcow2-file", "qemu-nbd"])
async def test_the_point_in_time_holds_under_the_heaviest_guest_load(tmp_path: Path, kind: str) -> None:
    require("fio", "qemu-img", "qemu-nbd", "nbdcopy")
    image = write_random_image(tmp_path / "disk.img", SIZE, seed=31)
    async with served_source(tmp_path, image) as source, target_of_kind(kind, tmp_path) as spec:
        target = await open_target(spec.spec, size=SIZE, format=spec.format)
        # 64 KiB/s: the job cannot get far while the guests run, so nearly every guest write meets
        # clusters still to copy; it is sped up once they are done.
        backup = await start_backup(source, target, BackupOptions(speed=64 * 1024))
        await asyncio.gather(
            fio_randwrite(source.uri, io_size="48M", bs="4k", seed=5),
            fio_randwrite(source.uri, io_size="16M", bs="64k", seed=6),
            unaligned_guest(source.uri, seed=7),
        )
        assert backup.job.status == "running"  # the guests really wrote during the backup
        backup.job.set_speed(0)
        await backup.finish(timeout=120)
        assert backup.job.error is None, backup.job.error
        assert backup.job.filter is not None and backup.job.filter.guest_copies > 100
        capture = backup.job.copier._capture if backup.job.copier is not None else None
        if kind == "raw-file":  # file to file: the old data went through the capture writer
            assert capture is not None and capture.written > 0
        else:
            assert capture is None
        assert image.read_bytes() != backup.snapshot.read_bytes()
        same_bytes(backup.snapshot, await contents(spec, tmp_path))


class GatedTarget(BlockFilter):
    """A memory target whose writes wait while ``gate`` is cleared (``stalled`` counts them)."""

    def __init__(self, size: int) -> None:
        self.memory = MemoryDevice(size)
        super().__init__(self.memory)
        self.gate = asyncio.Event()
        self.gate.set()
        self.stalled = 0

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        await asyncio.sleep(0)  # a real target suspends
        if not self.gate.is_set():
            self.stalled += 1
            try:
                await self.gate.wait()
            finally:
                self.stalled -= 1
        await self.memory.pwrite(offset, data, fua=fua)


async def _gated_backup(source: Source, target: GatedTarget) -> BackupJob:
    job = BackupJob(
        "gated",
        source.node,
        target,
        BackupOptions(max_workers=1, max_chunk=2 * CS),
        events=EventBus(),
        target_zero_init=True,
    )
    await job.attach()
    return job


async def test_a_write_to_a_copied_cluster_never_waits_for_a_copy_in_flight(tmp_path: Path) -> None:
    require("qemu-io")
    size = 32 * CS
    image = write_random_image(tmp_path / "disk.img", size, seed=3)
    snapshot = image.read_bytes()
    gated = GatedTarget(size)
    async with served_source(tmp_path, image) as source:
        job = await _gated_backup(source, gated)
        client = await NbdClient.connect(source.uri, connections=1)
        try:
            await client.pwrite(20 * CS + 5, b"first")  # cluster 20: copied now, the gate is open
            gated.gate.clear()
            job.start()  # the job's first copy hangs at the gate
            hung = asyncio.ensure_future(client.pwrite(10 * CS, b"hangs"))  # cluster 10: its copy hangs too
            while gated.stalled < 2:
                await asyncio.sleep(0.01)
            await qemu_io(source.uri, [f"write -P 0x5a {20 * CS} 4096"], timeout=30)
            assert not hung.done()  # still waiting for its own copy ...
            assert gated.stalled == 2  # ... as is the job: the write above waited for neither
            gated.gate.set()
            await hung
            await asyncio.wait_for(job.wait(), 60)
        finally:
            await client.close()
    assert job.error is None, job.error
    assert gated.memory.data == snapshot
    after = image.read_bytes()
    assert after[20 * CS : 20 * CS + 4096] == b"\x5a" * 4096
    assert after[10 * CS : 10 * CS + 5] == b"hangs"


async def test_a_full_target_holds_the_captured_old_data_until_there_is_room(tmp_path: Path) -> None:
    """A raw target on a file system that fills up (a 2 MiB tmpfs for an 8 MiB disk) while guests write:
    the old data their writes displaced was captured in memory and its writes to the target fail with
    ENOSPC; the job (``on-target-error=enospc``) stops with it still held; the file system grows, the
    job is resumed, and the target is the disk as it was when the backup started."""
    require("fio")
    size = 8 * MiB
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt))
    try:
        image = write_random_image(tmp_path / "disk.img", size, seed=41)
        async with served_source(tmp_path, image) as source:
            target = await open_target(str(mnt / "target.img"), size=size, format="raw")
            backup = await start_backup(
                source, target, BackupOptions(speed=64 * 1024, on_target_error="enospc"), job_id="full"
            )
            await fio_randwrite(source.uri, io_size="4M", bs="4k", seed=8)  # every slot fits: no guest error
            event = await backup.wait_event("BLOCK_JOB_ERROR")
            assert event["action"] == "stop"
            job = backup.job
            assert job.status == "paused" and job.io_status == "nospace"
            capture = job.copier._capture if job.copier is not None else None
            assert capture is not None and capture.failed  # old data held, not on the target
            run("mount", "-o", "remount,size=64m", str(mnt))
            job.set_speed(0)
            job.resume()
            await backup.finish(timeout=120)
            assert job.error is None, job.error
            assert not capture.failed and capture.written > 0
            assert image.read_bytes() != backup.snapshot.read_bytes()
            same_bytes(backup.snapshot, mnt / "target.img")
    finally:
        run("umount", str(mnt))
