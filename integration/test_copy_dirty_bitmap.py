"""``nbd-backup copy --dirty-bitmap NAME [--backing PREVIOUS]``: an incremental backup pulled over NBD.

The source is qemu-nbd publishing a qcow2's bitmap (``-B``), as libvirt's pull-mode backups export it;
the chain ``full ← incremental`` read through QEMU (``qemu-img compare``) must equal the disk, and the
incremental image must hold only the dirty clusters.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import ROOT, nbd_backup_argv, require, run
from peers import qemu_nbd

MiB = 1 << 20
CLUSTER = 64 << 10
SIZE = 8 * MiB


def make_disk(tmp: Path) -> Path:
    """A qcow2 disk full of data, then a bitmap ``b0``, then writes that the bitmap records."""
    disk = tmp / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", disk, str(SIZE), cwd="/")
    run("qemu-io", "-c", f"write -P 0x11 0 {SIZE}", disk, cwd="/")
    return disk


def guest_writes(disk: Path, seed: int) -> list[tuple[int, int]]:
    rnd = random.Random(seed)
    writes = [(rnd.randrange(0, SIZE - 70_000), rnd.choice([1, 512, 4096, CLUSTER + 3])) for _ in range(12)]
    commands = [
        arg for offset, length in writes for arg in ("-c", f"write -P {rnd.randrange(1, 255)} {offset} {length}")
    ]
    commands += ["-c", f"write -z {3 * MiB} {CLUSTER}"]  # a zeroed cluster is dirty too
    run("qemu-io", *commands, disk, cwd="/")
    return [*writes, (3 * MiB, CLUSTER)]


def copy(*args: str | Path) -> None:
    run(*nbd_backup_argv("copy", "--no-progress", *map(str, args)), cwd=str(ROOT))


def test_an_incremental_pulled_by_bitmap_restores_byte_exact_and_holds_only_dirty_clusters(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io", "qemu-nbd")
    disk = make_disk(tmp_path)
    full = tmp_path / "full.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", disk, full, cwd="/")  # the full backup at the bitmap's start
    run("qemu-img", "bitmap", "--add", disk, "b0", cwd="/")
    writes = guest_writes(disk, seed=4)
    incremental = tmp_path / "inc.qcow2"
    with qemu_nbd(tmp_path, disk, extra=("-f", "qcow2", "-r", "-B", "b0")) as peer:
        copy("--dirty-bitmap", "b0", "--backing", full, peer.uri, incremental)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", incremental, disk, cwd="/")
    info = json.loads(run("qemu-img", "info", "--output=json", incremental, cwd="/").stdout)
    assert info["backing-filename"] == str(full)
    top = json.loads(run("qemu-img", "map", "--output=json", incremental, cwd="/").stdout)
    allocated: set[int] = set()
    for extent in top:
        if extent["depth"] == 0:
            allocated.update(range(extent["start"] // CLUSTER, (extent["start"] + extent["length"]) // CLUSTER))
    dirty = {c for offset, length in writes for c in range(offset // CLUSTER, (offset + length - 1) // CLUSTER + 1)}
    assert allocated == dirty


def test_an_incremental_applied_in_place_to_a_raw_copy(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io", "qemu-nbd")
    disk = make_disk(tmp_path)
    mirror = tmp_path / "mirror.raw"
    run("qemu-img", "convert", "-O", "raw", disk, mirror, cwd="/")
    run("qemu-img", "bitmap", "--add", disk, "b0", cwd="/")
    guest_writes(disk, seed=9)
    with qemu_nbd(tmp_path, disk, extra=("-f", "qcow2", "-r", "-B", "b0")) as peer:
        copy("--dirty-bitmap", "b0", "-O", "raw", peer.uri, mirror)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", mirror, disk, cwd="/")


def test_a_bitmap_the_source_does_not_publish_is_a_clear_error(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io", "qemu-nbd")
    disk = make_disk(tmp_path)
    with qemu_nbd(tmp_path, disk, extra=("-f", "qcow2", "-r")) as peer:
        proc = run(
            *nbd_backup_argv("copy", "--dirty-bitmap", "b0", peer.uri, tmp_path / "x.raw"), cwd=str(ROOT), check=False
        )
    assert proc.returncode == 1
    assert "does not offer meta context 'qemu:dirty-bitmap:b0'" in proc.stderr
    assert not (tmp_path / "x.raw").exists()
