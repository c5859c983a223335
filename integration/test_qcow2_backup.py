"""Backups with qcow2 on either side, through the real backup engine, checked by qemu-img.

The oracle is the point-in-time image: ``qemu-img convert`` of the source taken before the job
starts; guests keep writing through the node while the job runs. Covers QEMU's schemes of
``drive-backup format=qcow2``: ``sync=full`` into a new image, ``sync=top`` into an image backed by
the source's backing file, and ``sync=none`` (fleecing) into an image backed by the source itself.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest
from conftest import require, run

from backup.backup_job import BackupJob, BackupOptions
from backup.events import EventBus
from backup.images import create_image, open_image
from backup.node import BlockNode
from backup.qcow2 import Qcow2Device
from backup.targets import open_target

MiB = 1024 * 1024
SIZE = 4 * MiB


@pytest.fixture(autouse=True)
def _peers() -> None:
    require("qemu-img", "qemu-io")


def _source_chain(tmp_path: Path, *, backing: bool) -> Path:
    """A QEMU-written qcow2 source (optionally over a qcow2 base) with data, zero and free clusters."""
    src = tmp_path / "disk.qcow2"
    if backing:
        base = tmp_path / "base.qcow2"
        run("qemu-img", "create", "-f", "qcow2", base, str(SIZE))
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x10 0 3M", base)
        run("qemu-img", "create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", src, cwd=str(tmp_path))
    else:
        run("qemu-img", "create", "-f", "qcow2", src, str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x20 512k 1M", "-c", "write -z 2M 128k", src)
    return src


def _snapshot(image: Path, tmp_path: Path) -> Path:
    out = tmp_path / "snapshot.raw"
    run("qemu-img", "convert", "-O", "raw", image, out)
    return out


async def _guest(node: BlockNode, seed: int, count: int) -> None:
    rnd = random.Random(seed)
    for _ in range(count):
        offset = rnd.randrange(node.size)
        length = min(node.size - offset, rnd.choice([512, 4096, 65536, 200_000]))
        if rnd.random() < 0.8:
            await node.pwrite(offset, bytes([rnd.randrange(1, 256)]) * length)
        else:
            await node.zero(offset, length, may_trim=rnd.random() < 0.5)
        await asyncio.sleep(0)


async def _run_job(node: BlockNode, target: Qcow2Device, sync: str, *, zero_init: bool) -> BackupJob:
    job = BackupJob(
        "job0",
        node,
        target,
        BackupOptions(sync=sync, max_chunk=128 * 1024, max_workers=2),
        events=EventBus(),
        target_zero_init=zero_init,
    )
    await job.attach()
    job.start()
    await _guest(node, 1, 60)
    if sync == "none":
        job.cancel()
    await asyncio.wait_for(job.wait(), 60)
    if sync != "none":  # a cancelled job reports "Operation canceled", as QEMU's does
        assert job.error is None, job.error
    return job


def _check_equal(image: Path, snapshot: Path) -> None:
    run("qemu-img", "check", image)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, snapshot)


@pytest.mark.parametrize("backing", [False, True])
async def test_full_backup_of_a_qcow2_disk_into_qcow2(tmp_path: Path, backing: bool) -> None:
    src = _source_chain(tmp_path, backing=backing)
    snapshot = _snapshot(src, tmp_path)
    device = await open_image(src, format="qcow2")
    node = BlockNode("disk", device, driver="qcow2", filename=str(src))
    target_path = tmp_path / "backup.qcow2"
    target = await open_target(str(target_path), size=device.size, format="qcow2", mode="absolute-paths")
    assert isinstance(target.device, Qcow2Device)
    await _run_job(node, target.device, "full", zero_init=target.zero_init)
    await target.close()
    target.complete()  # written under a temporary name until now
    await device.close()
    _check_equal(target_path, snapshot)
    run("qemu-img", "check", src)  # the guest's writes left the live qcow2 disk clean too
    entries = json.loads(run("qemu-img", "map", "--output=json", target_path).stdout)
    assert any(e["data"] is False and e["zero"] is True for e in entries)  # zeroes were not written as data


async def test_top_backup_over_the_sources_backing_file(tmp_path: Path) -> None:
    src = _source_chain(tmp_path, backing=True)
    snapshot = _snapshot(src, tmp_path)
    device = await Qcow2Device.open(src)
    assert device.backing_path == str(tmp_path / "base.qcow2")
    node = BlockNode("disk", device, driver="qcow2", filename=str(src))
    target_path = tmp_path / "top.qcow2"
    target = await create_image(
        target_path, device.size, format="qcow2", backing_file=device.backing_path, backing_format="qcow2"
    )
    assert isinstance(target, Qcow2Device)
    await _run_job(node, target, "top", zero_init=False)
    await target.close()
    await device.close()
    _check_equal(target_path, snapshot)
    full = tmp_path / "full.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", snapshot, full)
    assert target_path.stat().st_size < full.stat().st_size  # only the top's clusters (and CBW'd ones)


@pytest.mark.parametrize("source_format", ["raw", "qcow2"])
async def test_fleecing_sync_none_reads_the_point_in_time_image(tmp_path: Path, source_format: str) -> None:
    if source_format == "raw":
        src = tmp_path / "disk.raw"
        src.write_bytes(bytes(range(256)) * (SIZE // 256))
    else:
        src = _source_chain(tmp_path, backing=False)
    snapshot = _snapshot(src, tmp_path)
    device = await open_image(src, format=source_format)
    node = BlockNode("disk", device, driver=source_format, filename=str(src))
    target_path = tmp_path / "fleece.qcow2"
    target = await create_image(
        target_path, None, format="qcow2", backing_file=str(src), backing_format=source_format, backing_device=device
    )
    assert isinstance(target, Qcow2Device) and target.size == device.size
    await _run_job(node, target, "none", zero_init=False)
    assert await target.pread(0, SIZE) == snapshot.read_bytes()  # through the live backing device
    await target.close()
    await device.close()
    _check_equal(target_path, snapshot)  # and through the backing file, as QEMU reads it
