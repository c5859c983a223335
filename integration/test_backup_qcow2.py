"""Backups with qcow2 on either side: ``sync=top`` of an overlay copies only what the top image
allocates; a qcow2 target (plain and compressed) holds the point in time, checked by qemu-img."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from backup_rig import CLUSTER, MiB, qemu_io, served_source, start_backup, tool, write_random_image
from conftest import require

from backup.backup_job import BackupOptions
from backup.targets import open_target

SIZE = 4 * MiB


async def test_sync_top_copies_only_the_top_image(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    base = tmp_path / "base.qcow2"
    overlay = tmp_path / "overlay.qcow2"
    await tool("qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE))
    await tool("qemu-io", "-f", "qcow2", "-c", f"write -P 0x11 0 {SIZE}", base)
    await tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay)
    await tool(
        "qemu-io", "-f", "qcow2", "-c", f"write -P 0x22 {MiB} {CLUSTER}", "-c", "write -P 0x23 3000000 1000", overlay
    )
    _, out = await tool("qemu-img", "map", "--output=json", "-f", "qcow2", overlay)
    top = [(int(e["start"]), int(e["length"])) for e in json.loads(out) if e["depth"] == 0 and e["data"]]
    async with served_source(tmp_path, overlay, format="qcow2") as source:
        target = await open_target(str(tmp_path / "top.img"), size=SIZE)
        backup = await start_backup(source, target, BackupOptions(sync="top"))
        # a guest write into a cluster only the backing file has: its old data is not "top"
        await qemu_io(source.uri, ["write -P 0x33 2097152 4096", f"write -P 0x34 {MiB} 4096"])
        await backup.finish()
        assert backup.job.error is None
    snapshot = backup.snapshot  # the overlay file as it was: read through qemu-img for the guest view
    flat = tmp_path / "snapshot-flat.raw"
    await tool("qemu-img", "convert", "-f", "qcow2", "-O", "raw", snapshot, flat)
    expected = bytearray(SIZE)
    full = flat.read_bytes()
    for start, length in top:
        expected[start : start + length] = full[start : start + length]
    assert (tmp_path / "top.img").read_bytes() == bytes(expected)


@pytest.mark.parametrize("compress", [False, True])
async def test_qcow2_target_holds_the_point_in_time(tmp_path: Path, compress: bool) -> None:
    require("qemu-img", "qemu-io")
    image = tmp_path / "disk.img"
    if compress:  # compressible data: qcow2 keeps a cluster uncompressed when that is no bigger
        image.write_bytes(b"".join(bytes([i % 251]) * 4096 for i in range(SIZE // 4096)))
    else:
        write_random_image(image, SIZE, seed=21)
    target_path = tmp_path / "backup.qcow2"
    async with served_source(tmp_path, image) as source:
        target = await open_target(str(target_path), size=SIZE, format="qcow2", compress=compress)
        backup = await start_backup(source, target, BackupOptions(speed=8 * MiB, compress=compress))
        await qemu_io(source.uri, ["write -P 0x55 0 1M", "write -z 2M 512k"])
        await backup.finish()
        assert backup.job.error is None
    await tool("qemu-img", "check", "-q", "-f", "qcow2", target_path)
    await tool("qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", backup.snapshot, target_path)
    if compress:
        _, out = await tool("qemu-img", "check", "--output=json", "-f", "qcow2", target_path)
        assert json.loads(out).get("compressed-clusters", 0) > 0
