"""``nbd-backup repo``: round trips through a repository against real peers (design §3.6).

Sources: a raw file, a qcow2 made by qemu-img, qemu-nbd and nbdkit exports; targets: a file and a qemu-nbd
export; every restore byte-exact. Deduplication and sparseness are measured on the repository's files;
an incremental pulled by dirty bitmap from qemu-storage-daemon equals the source.
"""

from __future__ import annotations

import filecmp
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import require, run
from peers import nbdkit, qemu_nbd
from qmp_daemon import our_daemon
from qsd import QmpSync, Qsd
from repo_cli_kit import CS, MiB, chunk_bytes, chunk_files, init, one_line_error, random_disk, repo, snapshots

SIZE = 4 * MiB


def test_a_raw_file_round_trips_to_a_file_and_to_an_nbd_export(tmp_path: Path) -> None:
    require("qemu-nbd")
    r = init(tmp_path / "r")
    disk = random_disk(tmp_path / "disk.raw", SIZE, seed=1)
    out = repo("backup", r, "vm1/disk0", disk).stdout
    [snap] = snapshots(r)
    assert out.split()[0] == f"vm1/disk0@{snap['id']}"
    assert snap["size"] == SIZE and snap["parent"] is None and snap["disk"] == "vm1/disk0"
    restored = tmp_path / "restored.raw"
    repo("restore", r, f"vm1/disk0@{snap['id']}", restored)
    assert filecmp.cmp(disk, restored, shallow=False)
    assert restored.stat().st_blocks * 512 < SIZE  # zero chunks are holes
    # an export larger than the disk, full of garbage: the disk's part equals it, the rest is left alone
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xaa" * (SIZE + MiB))
    with qemu_nbd(tmp_path, target) as peer:
        repo("restore", r, "vm1/disk0", peer.uri)
    data = target.read_bytes()
    assert data[:SIZE] == disk.read_bytes()
    assert data[SIZE:] == b"\xaa" * MiB


def test_a_qcow2_source_round_trips(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    r = init(tmp_path / "r")
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, str(SIZE), cwd="/")
    run(
        "qemu-io",
        *("-c", f"write -P 0x5a 0 {CS + 512}"),
        *("-c", f"write -P 0x33 {2 * MiB - 4096} {CS}"),
        *("-c", f"write -z {2 * MiB} 4096"),
        *("-c", f"write -P 0x01 {SIZE - 512} 512"),
        image,
        cwd="/",
    )
    repo("backup", r, "q", image)
    restored = tmp_path / "restored.raw"
    repo("restore", r, "q@latest", restored)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", restored, image, cwd="/")


def test_nbd_sources_qemu_nbd_and_nbdkit_round_trip(tmp_path: Path) -> None:
    require("qemu-nbd", "nbdkit", "qemu-img")
    r = init(tmp_path / "r")
    disk = random_disk(tmp_path / "disk.raw", SIZE, seed=2)
    with qemu_nbd(tmp_path, disk, extra=("-r",)) as peer:
        repo("backup", r, "from-qemu-nbd", peer.uri)
    repo("restore", r, "from-qemu-nbd", tmp_path / "a.raw")
    assert filecmp.cmp(disk, tmp_path / "a.raw", shallow=False)
    with nbdkit(tmp_path, "sparse-random", f"{SIZE}", "seed=7", "percent=20") as peer:
        repo("backup", r, "from-nbdkit", peer.uri)
        repo("restore", r, "from-nbdkit", tmp_path / "b.raw")
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", tmp_path / "b.raw", peer.uri, cwd="/")


def test_a_sparse_gigabyte_stores_its_data_only_and_dedups_and_increments(tmp_path: Path) -> None:
    require("qemu-img")
    size = 1 << 30
    r = init(tmp_path / "r")
    data = [(offset, MiB) for offset in (0, 300 * MiB + 12345, 1000 * MiB)]  # 3 MiB of data (4 MiB of chunks)
    disk = random_disk(tmp_path / "big.raw", size, seed=3, data=data)
    repo("backup", r, "big", disk)
    stored = chunk_bytes(r)
    assert 3 * MiB <= stored <= 4 * MiB + 64 * 4096  # compressed random data plus file-system slack
    chunks = chunk_files(r)
    assert len(chunks) == 3 * MiB // CS + 1  # the unaligned MiB straddles one chunk more

    # the same disk under another name adds no chunk
    repo("backup", r, "copy-of-big", disk)
    assert chunk_files(r) == chunks
    [twin] = snapshots(r, "copy-of-big")
    assert twin["new-bytes"] == 0

    # change three chunks: the incremental stores those three only
    with open(disk, "r+b") as f:
        for offset in (5 * CS, 300 * MiB, 900 * MiB + 7):
            f.seek(offset)
            f.write(b"changed!" * 8)
    repo("backup", r, "big", disk)
    latest = snapshots(r, "big")[-1]
    assert latest["new-bytes"] == 3 * CS and latest["parent"] == snapshots(r, "big")[0]["id"]
    assert len(chunk_files(r) - chunks) == 3
    restored = tmp_path / "restored.raw"
    repo("restore", r, "big", restored)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", restored, disk, cwd="/")  # reads data extents only


def _export_with_bitmap(q: QmpSync, image: Path, socket: Path) -> str:
    """The qcow2 ``image`` exported read-only with its persistent bitmap ``b0`` published, as a pull-mode
    backup asks a daemon over QMP."""
    q.ok("blockdev-add", driver="file", filename=str(image), **{"node-name": "f"})
    q.ok("blockdev-add", driver="qcow2", file="f", **{"node-name": "d"})
    q.ok("block-dirty-bitmap-disable", node="d", name="b0")  # a read-only export publishes a frozen bitmap
    q.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(socket)}})
    q.ok("block-export-add", type="nbd", id="e", **{"node-name": "d"}, name="disk", bitmaps=["b0"])
    return f"nbd+unix:///disk?socket={socket}"


@contextmanager
def _daemon(kind: str, workdir: Path) -> Iterator[QmpSync]:
    """qemu-storage-daemon or ours, connected over QMP."""
    if kind == "qemu-storage-daemon":
        require("qemu-storage-daemon")
        with Qsd.start(workdir) as qsd, qsd.connect() as q:
            yield q
    else:
        with our_daemon(workdir) as daemon, daemon.connect() as q:
            yield q


@pytest.mark.parametrize("kind", ["qemu-storage-daemon", "ours"])
def test_a_dirty_bitmap_pull_from_a_daemon_equals_the_source(tmp_path: Path, kind: str) -> None:
    require("qemu-img", "qemu-io")
    r = init(tmp_path / "r")
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, str(SIZE), cwd="/")
    run("qemu-io", "-c", f"write -P 0x11 0 {SIZE}", "-c", f"write -z {MiB} {CS}", image, cwd="/")
    repo("backup", r, "d", image)  # the full backup, taken where the bitmap starts
    run("qemu-img", "bitmap", "--add", image, "b0", cwd="/")
    writes = [(100, 1), (CS + 7, 4096), (3 * MiB - 10, 20), (MiB, 512)]
    run("qemu-io", *[a for o, n in writes for a in ("-c", f"write -P 0x77 {o} {n}")], image, cwd="/")
    dirty_chunks = {c for o, n in writes for c in range(o // CS, (o + n - 1) // CS + 1)}
    with _daemon(kind, tmp_path / "daemon") as q:
        uri = _export_with_bitmap(q, image, tmp_path / "daemon-nbd.sock")
        repo("backup", r, "d", uri, "--dirty-bitmap", "b0")
    full, incremental = snapshots(r, "d")
    assert incremental["parent"] == full["id"]
    assert incremental["new-bytes"] == len(dirty_chunks) * CS
    restored = tmp_path / "restored.raw"
    repo("restore", r, "d", restored)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", restored, image, cwd="/")
    first = tmp_path / "first.raw"
    repo("restore", r, f"d@{full['id']}", first)
    assert run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", first, image, check=False, cwd="/").returncode == 1


def test_dirty_bitmap_without_a_parent_is_an_error(tmp_path: Path) -> None:
    require("qemu-img", "qemu-nbd")
    r = init(tmp_path / "r")
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, str(SIZE), cwd="/")
    run("qemu-img", "bitmap", "--add", image, "b0", cwd="/")
    with qemu_nbd(tmp_path, image, extra=("-f", "qcow2", "-r", "-B", "b0")) as peer:
        line = one_line_error(repo("backup", r, "d", peer.uri, "--dirty-bitmap", "b0", check=False))
    assert "needs a parent snapshot" in line
    assert line.startswith("nbd-backup repo backup: ")
    assert snapshots(r) == []
    line = one_line_error(repo("backup", r, "d", image, "--dirty-bitmap", "b0", check=False))
    assert "NBD source" in line


def test_list_json_shape_and_a_disk_without_snapshots(tmp_path: Path) -> None:
    r = init(tmp_path / "r")
    assert snapshots(r) == [] and snapshots(r, "nothing/here") == []
    disk = random_disk(tmp_path / "d.raw", 256 * 1024, seed=4)
    repo("backup", r, "a/b", disk)
    repo("backup", r, "a", disk, "--parent", "none")
    listed = snapshots(r)
    assert [s["disk"] for s in listed] == ["a", "a/b"]
    for s in listed:
        assert set(s) == {"disk", "id", "created", "size", "parent", "new-bytes"}
        assert s["parent"] is None
    table = repo("list", r).stdout.splitlines()
    assert table[0].split() == ["DISK", "ID", "SIZE", "NEW", "PARENT"] and len(table) == 3
    assert json.loads(repo("list", r, "a/b", "--json").stdout) == [listed[1]]


def test_a_disk_that_grew_or_shrank_since_its_parent(tmp_path: Path) -> None:
    """Sizes in whole sectors: a raw file's size is rounded up to 512 bytes, as QEMU sees it."""
    r = init(tmp_path / "r")
    disk = random_disk(tmp_path / "d.raw", 8 * CS + 512, seed=5, data=[(0, 8 * CS + 512)])
    repo("backup", r, "d", disk)
    for size in (12 * CS + 1024, 3 * CS - 512):
        with open(disk, "r+b") as f:
            f.truncate(size)
        repo("backup", r, "d", disk)
        restored = tmp_path / f"restored-{size}.raw"
        repo("restore", r, "d", restored)
        assert filecmp.cmp(disk, restored, shallow=False)
    assert [s["size"] for s in snapshots(r)] == [8 * CS + 512, 12 * CS + 1024, 3 * CS - 512]
