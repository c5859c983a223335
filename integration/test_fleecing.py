"""The fleecing recipe for pull-mode backups (issue 14 item 4), the same QMP sequence against
qemu-storage-daemon 7.2 and our daemon.

A qcow2 overlay (no backing file of its own) is added with ``backing`` = the live source node,
``blockdev-backup sync=none`` from the source into it copies each cluster out before the guest
overwrites it, and the overlay is exported read-only with the source's (disabled) bitmap: what a
client pulls stays at the point in time of the job's start while qemu-io keeps writing through the
source's own export, and the bitmap lists exactly the granules written before that point."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

from conftest import require
from qmp_daemon import ReplyLog, make_image, on_both
from qsd import QmpSync

SIZE = 4 << 20


def _run(*argv: str | Path) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done
    return done.stdout


def _pull(uri: str, dest: Path) -> str:
    """The whole export copied by nbdcopy, as a digest."""
    _run("nbdcopy", uri, dest)
    return hashlib.sha256(dest.read_bytes()).hexdigest()


def _qemu_io(uri: str, *commands: str) -> None:
    argv: list[str] = ["qemu-io", "-f", "raw", uri]
    for command in commands:
        argv += ["-c", command]
    _run(*argv)


def _scenario(q: QmpSync, work: Path) -> dict[str, Any]:
    source = make_image(work / "src.raw", SIZE)
    fleece = work / "fleece.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", fleece, str(SIZE))
    sock = work / "nbd.sock"
    src_uri, fleece_uri = f"nbd+unix:///src?socket={sock}", f"nbd+unix:///fleece?socket={sock}"
    run = ReplyLog(q)

    run("blockdev-add", driver="file", filename=str(source), **{"node-name": "src-file"})
    run("blockdev-add", driver="raw", file="src-file", **{"node-name": "src"})
    run("block-dirty-bitmap-add", node="src", name="b0")
    run("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    run("block-export-add", type="nbd", id="guest", **{"node-name": "src"}, name="src", writable=True)
    _qemu_io(src_uri, "write -P 1 64k 64k", "write -P 2 1M 4k")  # written since the last backup
    # the point in time: the bitmap stops recording and copy-before-write starts
    run("block-dirty-bitmap-disable", node="src", name="b0")
    fleece_file = {"driver": "file", "filename": str(fleece)}
    run("blockdev-add", driver="qcow2", file=fleece_file, backing="src", **{"node-name": "tmp"})
    run("blockdev-backup", **{"job-id": "fleecing"}, device="src", target="tmp", sync="none")
    run("block-export-add", type="nbd", id="fl", **{"node-name": "tmp"}, name="fleece", bitmaps=["b0"])
    at_start = _pull(src_uri, work / "at-start.raw")
    result: dict[str, Any] = {"pulled before writes": _pull(fleece_uri, work / "pull0.raw") == at_start}
    _qemu_io(src_uri, "write -P 9 0 128k", "write -P 8 1M 64k", "write -z 2M 512k", "write -P 7 3000 5000")
    _qemu_io(src_uri, f"write -P 6 {SIZE - 4096} 4096", "write -P 5 100k 1")  # again over copied clusters
    result["source moved on"] = _pull(src_uri, work / "now.raw") != at_start
    result["pulled after writes"] = _pull(fleece_uri, work / "pull1.raw") == at_start
    result["bitmap"] = _run("nbdinfo", "--map=qemu:dirty-bitmap:b0", fleece_uri)
    run("block-export-del", id="fl")
    q.wait_event("BLOCK_EXPORT_DELETED", lambda data: data["id"] == "fl", timeout=60)
    run("block-job-cancel", device="fleecing")
    q.wait_job_status("fleecing", "null", timeout=60)
    run("blockdev-del", **{"node-name": "tmp"})
    run("block-dirty-bitmap-remove", node="src", name="b0")
    run("nbd-server-stop")
    result["replies"] = run.replies
    return result


def test_fleecing_export_stays_at_its_point_in_time(tmp_path: Path) -> None:
    require("qemu-storage-daemon", "qemu-img", "qemu-io", "nbdcopy", "nbdinfo")
    theirs, ours = on_both(tmp_path, _scenario)
    assert ours == theirs
    assert ours["pulled after writes"] and ours["pulled before writes"] and ours["source moved on"]
    dirty = [row.split()[:2] for row in ours["bitmap"].splitlines() if row.endswith("dirty")]
    assert dirty == [["65536", "65536"], ["1048576", "65536"]]


def _fleece_while_fio_writes(q: QmpSync, work: Path) -> tuple[bool, bool]:
    """The recipe again, pulled twice while fio writes 4 KiB blocks at random all over the source
    through its export: (both pulls equal the source at the job's start, the source changed)."""
    source = make_image(work / "src.raw", SIZE)
    fleece = work / "fleece.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", fleece, str(SIZE))
    sock = work / "nbd.sock"
    src_uri, fleece_uri = f"nbd+unix:///src?socket={sock}", f"nbd+unix:///fleece?socket={sock}"
    q.ok("blockdev-add", driver="raw", file={"driver": "file", "filename": str(source)}, **{"node-name": "src"})
    q.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    q.ok("block-export-add", type="nbd", id="guest", **{"node-name": "src"}, name="src", writable=True)
    fleece_file = {"driver": "file", "filename": str(fleece)}
    q.ok("blockdev-add", driver="qcow2", file=fleece_file, backing="src", **{"node-name": "tmp"})
    q.ok("blockdev-backup", **{"job-id": "fleecing"}, device="src", target="tmp", sync="none")
    q.ok("block-export-add", type="nbd", id="fl", **{"node-name": "tmp"}, name="fleece")
    at_start = hashlib.sha256(source.read_bytes()).hexdigest()  # nothing wrote since the job started
    guest = ["--name=guest", "--ioengine=nbd", f"--uri={src_uri}", "--rw=randwrite", "--bs=4k", "--io_size=16M"]
    fio = subprocess.Popen(
        ["fio", *guest, "--iodepth=8", "--randseed=7", "--output-format=json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        pulls = [_pull(fleece_uri, work / f"pull{i}.raw") for i in range(2)]
    finally:
        _, err = fio.communicate(timeout=120)
    assert fio.returncode == 0, err
    moved = _pull(src_uri, work / "now.raw") != at_start
    q.ok("block-export-del", id="fl")
    q.wait_event("BLOCK_EXPORT_DELETED", lambda data: data["id"] == "fl", timeout=60)
    q.ok("block-job-cancel", device="fleecing")
    q.wait_job_status("fleecing", "null", timeout=60)
    q.ok("blockdev-del", **{"node-name": "tmp"})
    return all(p == at_start for p in pulls), moved


def test_fleecing_pull_stays_put_while_fio_writes(tmp_path: Path) -> None:
    require("qemu-storage-daemon", "qemu-img", "fio", "nbdcopy")
    assert on_both(tmp_path, _fleece_while_fio_writes) == ((True, True), (True, True))


def _listing(q: QmpSync, node: str, work: Path) -> dict[str, Any]:
    """What ``query-named-block-nodes`` says of ``node``'s backing (paths relative to ``work``)."""
    found = next(n for n in q.ok("query-named-block-nodes") if n["node-name"] == node)
    keys = ("backing_file", "backing_file_depth", "drv", "ro")
    return {k: str(v).replace(str(work), "WORK") for k, v in found.items() if k in keys}


def test_qcow2_backing_node_refusals_match_qemu_storage_daemon(tmp_path: Path) -> None:
    """``backing`` naming no node, how the node lists its backing, and deleting a node a qcow2 node
    reads through: as QEMU."""
    require("qemu-storage-daemon", "qemu-img")

    def scenario(q: QmpSync, work: Path) -> list[Any]:
        source = make_image(work / "s.raw", SIZE)
        overlay = work / "f.qcow2"
        _run("qemu-img", "create", "-q", "-f", "qcow2", overlay, str(SIZE))
        file = {"driver": "file", "filename": str(overlay)}
        replies = [
            q.execute("blockdev-add", driver="file", filename=str(source), **{"node-name": "src"}),
            q.execute("blockdev-add", driver="qcow2", file=file, backing="nope", **{"node-name": "t"}),
            q.execute("blockdev-add", driver="qcow2", file=file, backing="src", **{"node-name": "t"}),
            {"return": _listing(q, "t", work)},
            q.execute("blockdev-del", **{"node-name": "src"}),
            q.execute("blockdev-del", **{"node-name": "t"}),
            q.execute("blockdev-del", **{"node-name": "src"}),
        ]
        return [{k: v for k, v in reply.items() if k != "id"} for reply in replies]

    theirs, ours = on_both(tmp_path, scenario)
    assert ours == theirs
