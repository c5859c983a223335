"""End to end through our NBD server: real guests overwrite the export while a backup runs.

The target must equal, byte for byte, the copy of the source taken at the backup's point in time —
for a raw file, a qemu-nbd export and an ``nbdkit memory`` export. ``sync=none`` keeps exactly the
old data of what the guests overwrote; a sparse source gives a sparse target.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from backup_rig import (
    CLUSTER,
    MiB,
    fio_randwrite,
    nbd_export_to_file,
    nbdinfo_map,
    qemu_img_map,
    qemu_io,
    qemu_io_commands,
    same_bytes,
    served_source,
    start_backup,
    write_random_image,
    write_sparse_image,
)
from conftest import require
from peers import make_image, nbdkit, qemu_nbd

from backup.backup_job import BackupOptions
from backup.targets import open_target

SIZE = 8 * MiB


@dataclass
class TargetSpec:
    spec: str  # what open_target gets: a path or an NBD URI
    file: Path | None  # where the bytes can be read directly, if anywhere
    uri: str | None


@asynccontextmanager
async def target_of_kind(kind: str, tmp: Path, size: int) -> AsyncIterator[TargetSpec]:
    async with AsyncExitStack() as stack:
        if kind == "raw-file":
            path = tmp / "target.img"
            yield TargetSpec(str(path), path, None)
        elif kind == "qemu-nbd":
            path = make_image(tmp / "qemu-target.img", size)
            peer = stack.enter_context(qemu_nbd(tmp, path))
            yield TargetSpec(peer.uri, path, peer.uri)
        elif kind == "nbdkit-memory":
            peer = stack.enter_context(nbdkit(tmp, "memory", f"size={size}"))
            yield TargetSpec(peer.uri, None, peer.uri)
        else:
            raise AssertionError(kind)


async def target_contents(spec: TargetSpec, tmp: Path) -> Path:
    if spec.file is not None:
        return spec.file
    assert spec.uri is not None
    return await nbd_export_to_file(spec.uri, tmp / "readback.img")


@pytest.mark.parametrize("kind", ["raw-file", "qemu-nbd", "nbdkit-memory"])
async def test_throttled_backup_under_guest_writes_equals_the_point_in_time(tmp_path: Path, kind: str) -> None:
    require("qemu-io", "fio", "nbdcopy")
    image = write_random_image(tmp_path / "disk.img", SIZE, seed=7)
    async with served_source(tmp_path, image) as source, target_of_kind(kind, tmp_path, SIZE) as spec:
        target = await open_target(spec.spec, size=SIZE, source_filename=str(image))
        assert target.zero_init
        backup = await start_backup(source, target, BackupOptions(speed=4 * MiB, max_chunk=256 * 1024))
        await asyncio.gather(
            qemu_io(source.uri, qemu_io_commands(SIZE, 80, seed=3)),
            fio_randwrite(source.uri, io_size="1M", offset="4M", size="2M"),
        )
        await backup.finish()
        assert backup.job.error is None, backup.job.error
        assert backup.job.filter is not None and backup.job.filter.guest_copies > 0  # CBW really happened
        assert image.read_bytes() != backup.snapshot.read_bytes()  # the guests really changed the disk
        same_bytes(backup.snapshot, await target_contents(spec, tmp_path))
        completed = backup.named("BLOCK_JOB_COMPLETED")
        assert completed and completed[0]["offset"] == completed[0]["len"] == SIZE


async def test_sync_none_keeps_old_data_exactly_where_the_guest_wrote(tmp_path: Path) -> None:
    require("qemu-io", "qemu-img")
    image = write_random_image(tmp_path / "disk.img", SIZE, seed=11)
    writes = [(CLUSTER * 3 + 100, 1000), (CLUSTER * 10 - 512, 1024), (SIZE - 4096, 4096), (2 * MiB, 3 * CLUSTER)]
    async with served_source(tmp_path, image) as source:
        target = await open_target(str(tmp_path / "none.img"), size=SIZE)
        backup = await start_backup(source, target, BackupOptions(sync="none"))
        await qemu_io(source.uri, [f"write -P 0x77 {offset} {length}" for offset, length in writes])
        assert backup.job.status == "running"  # sync=none runs until cancelled
        backup.job.cancel()
        await backup.finish()
        assert backup.named("BLOCK_JOB_CANCELLED")
    touched: set[int] = set()
    for offset, length in writes:
        touched.update(range(offset // CLUSTER, (offset + length - 1) // CLUSTER + 1))
    result = (tmp_path / "none.img").read_bytes()
    snapshot = backup.snapshot.read_bytes()
    for cluster in range(SIZE // CLUSTER):
        lo, hi = cluster * CLUSTER, (cluster + 1) * CLUSTER
        expected = snapshot[lo:hi] if cluster in touched else bytes(CLUSTER)
        assert result[lo:hi] == expected, f"cluster {cluster}"
    allocated: set[int] = set()
    for offset, length, is_data in await qemu_img_map(tmp_path / "none.img"):
        if is_data:
            allocated.update(range(offset // CLUSTER, (offset + length - 1) // CLUSTER + 1))
    assert allocated == touched


@pytest.mark.parametrize("kind", ["raw-file", "nbdkit-memory"])
async def test_sparse_source_gives_sparse_target(tmp_path: Path, kind: str) -> None:
    require("qemu-img", "nbdinfo", "nbdcopy")
    size = 16 * MiB
    pieces = [(1 * MiB, b"\x11" * CLUSTER), (9 * MiB + 4096, b"\x22" * 8192), (size - 512, b"\x33" * 512)]
    image = write_sparse_image(tmp_path / "sparse.img", size, pieces)
    async with served_source(tmp_path, image) as source, target_of_kind(kind, tmp_path, size) as spec:
        target = await open_target(spec.spec, size=size)
        backup = await start_backup(source, target, BackupOptions())
        await backup.finish()
        assert backup.job.error is None
        same_bytes(backup.snapshot, await target_contents(spec, tmp_path))
        if spec.file is not None:
            extents = await qemu_img_map(spec.file)
        else:
            assert spec.uri is not None
            extents = await nbdinfo_map(spec.uri)
        data_bytes = sum(length for _, length, is_data in extents if is_data)
    assert 0 < data_bytes <= 3 * CLUSTER  # only the clusters holding data


async def test_two_backups_of_one_disk_keep_their_own_points_in_time(tmp_path: Path) -> None:
    require("qemu-io")
    image = write_random_image(tmp_path / "disk.img", SIZE, seed=17)
    async with served_source(tmp_path, image) as source:
        first = await start_backup(
            source, await open_target(str(tmp_path / "a.img"), size=SIZE), BackupOptions(speed=8 * MiB), "a"
        )
        await qemu_io(source.uri, qemu_io_commands(SIZE, 30, seed=5))
        second = await start_backup(
            source, await open_target(str(tmp_path / "b.img"), size=SIZE), BackupOptions(speed=8 * MiB), "b"
        )
        assert len(source.node.filters) == 2  # stacked, each with its own point in time
        await qemu_io(source.uri, qemu_io_commands(SIZE, 30, seed=6))
        await first.finish()
        await second.finish()
        assert first.job.error is None and second.job.error is None
        assert source.node.filters == []
    assert first.snapshot.read_bytes() != second.snapshot.read_bytes()
    same_bytes(first.snapshot, tmp_path / "a.img")
    same_bytes(second.snapshot, tmp_path / "b.img")
