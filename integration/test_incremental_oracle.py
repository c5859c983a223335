"""The incremental oracle: a chain of a full backup and incrementals, each taken while guests write
through the source's NBD export, every image of the chain restored byte-exact.

As a ``transaction`` of ``drive-backup sync=full`` and ``block-dirty-bitmap-add`` does, the full
backup and the bitmap start at one instant (both inside one drained section); each incremental is a
``sync=incremental`` backup (``bitmap``, ``on-success``) into a qcow2 overlay whose backing file is
the previous backup (``qemu-img create -b prev -F qcow2``, opened as ``mode: existing``). At every
point in time the source image is copied (``backup_rig``'s oracle, inside the drained section that
installs the copy-before-write filter); after each backup ``qemu-img compare`` of the chain's top
against that copy must find them identical, and ``qemu-img map`` of the overlay must show exactly the
clusters of the bitmap's dirty granules as allocated in it (the incremental holds nothing else).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from backup_rig import (
    CLUSTER,
    MiB,
    Source,
    fio_randwrite,
    qemu_io,
    qemu_io_commands,
    served_source,
    tool,
    write_random_image,
)
from conftest import require

from backup.backup_job import BackupJob, BackupOptions
from backup.dirty_bitmap import DirtyBitmap
from backup.events import EventBus
from backup.targets import open_target

SIZE = 8 * MiB
SPEED = 16 * MiB  # bytes/s: each backup lasts long enough for the guests to write while it runs


async def qcow2_target(path: Path, backing: Path | None) -> object:
    argv: list[str | Path] = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-b", backing, "-F", "qcow2"]
    await tool(*argv, path, str(SIZE))
    return await open_target(str(path), size=SIZE, format="qcow2", mode="existing")


async def backup_at_one_instant(
    source: Source, target_path: Path, backing: Path | None, options: BackupOptions, snapshot: Path, *, add: str = ""
) -> tuple[BackupJob, set[int]]:
    """Start a backup; inside its drained point in time: add bitmap ``add`` (the transaction's
    ``block-dirty-bitmap-add``), copy the source image (the oracle) and note which granules of the
    sync bitmap are dirty. Returns the running job and those granules' byte offsets."""
    target = await qcow2_target(target_path, backing)
    job = BackupJob(
        target_path.stem,
        source.node,
        target.device,  # type: ignore[attr-defined]
        options,
        events=EventBus(),
        target_zero_init=target.zero_init,  # type: ignore[attr-defined]
        owner=target if target.owned else None,  # type: ignore[attr-defined,arg-type]
    )
    dirty: set[int] = set()
    async with source.node.drained():
        if add:
            source.node.add_bitmap(DirtyBitmap(add, SIZE, granularity=GRANULARITY[0]))
        shutil.copyfile(source.image, snapshot)
        job.install_filter()
        bitmap = options.bitmap
        if bitmap is not None:
            pos = 0
            for length, is_dirty in bitmap.dirty_runs(0, SIZE):
                if is_dirty:
                    dirty.update(range(pos, pos + length, CLUSTER))
                pos += length
    job.start()
    return job, dirty


GRANULARITY = [CLUSTER]  # set per test run (a list: the helper above reads it)


async def top_clusters(image: Path) -> set[int]:
    """Byte offsets of the clusters ``image`` itself allocates (depth 0), data or zero."""
    _, out = await tool("qemu-img", "map", "--output=json", "-f", "qcow2", image)
    found: set[int] = set()
    for extent in json.loads(out):
        if extent["depth"] == 0 and (extent["data"] or extent["zero"]):
            found.update(range(int(extent["start"]), int(extent["start"]) + int(extent["length"]), CLUSTER))
    return found


@pytest.mark.parametrize(("granularity", "seed"), [(CLUSTER, 1), (2 * CLUSTER, 2)])
async def test_full_then_incrementals_restore_byte_exact(tmp_path: Path, granularity: int, seed: int) -> None:
    require("qemu-img", "qemu-io", "fio")
    GRANULARITY[0] = granularity
    image = write_random_image(tmp_path / "disk.raw", SIZE, seed=seed)
    chain: list[Path] = []
    async with served_source(tmp_path, image) as source:
        for step in range(4):
            target_path = tmp_path / f"backup{step}.qcow2"
            snapshot = tmp_path / f"snapshot{step}.raw"
            if step == 0:
                options = BackupOptions(sync="full", speed=SPEED)
                job, _ = await backup_at_one_instant(source, target_path, None, options, snapshot, add="b")
            else:
                bitmap = source.node.bitmaps["b"]
                options = BackupOptions(sync="bitmap", bitmap=bitmap, bitmap_mode="on-success", speed=SPEED)
                job, dirty = await backup_at_one_instant(source, target_path, chain[-1], options, snapshot)
            # guests write while the backup runs: qemu-io (unaligned, zeroes, discards) and fio
            await asyncio.gather(
                qemu_io(source.uri, qemu_io_commands(SIZE, 30, seed * 100 + step)),
                fio_randwrite(source.uri, io_size="256k", seed=seed * 10 + step, offset="4M", size="2M"),
            )
            await asyncio.wait_for(job.wait(), 60)
            assert job.error is None, job.error
            chain.append(target_path)
            await tool("qemu-img", "check", "-q", "-f", "qcow2", target_path)
            code, out = await tool(
                "qemu-img", "compare", "-f", "raw", "-F", "qcow2", snapshot, target_path, check=False
            )
            assert code == 0, f"backup {step}: {out}"
            if step:
                written = await top_clusters(target_path)
                assert written == dirty, f"backup {step}: allocated {sorted(written)} != dirty {sorted(dirty)}"
                assert dirty, "the guests wrote between backups: an incremental has something to copy"
            # and between backups, more writes (recorded in the bitmap for the next incremental)
            await qemu_io(source.uri, qemu_io_commands(SIZE, 10, seed * 1000 + step))
    # every image of the chain still restores its own point in time
    for step, top in enumerate(chain):
        code, out = await tool(
            "qemu-img", "compare", "-f", "raw", "-F", "qcow2", tmp_path / f"snapshot{step}.raw", top, check=False
        )
        assert code == 0, f"chain up to backup {step}: {out}"
