"""``blockdev-create``: the same sequences against qemu-storage-daemon 7.2 and against us (replies,
errors, every job's JOB_STATUS_CHANGE sequence, ``query-jobs``, and what ``qemu-img info`` reads in
the images made), then end to end: a qcow2 image made over QMP, added, exported and read by QEMU's
tools, and the paths ``--allow-dir`` refuses."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from conftest import require
from qmp_daemon import ReplyLog, on_both, our_daemon
from qsd import QmpSync

SIZE = 4 << 20


def img_info(path: Path) -> dict[str, Any]:
    done = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True, timeout=60, check=True
    )
    info = json.loads(done.stdout)
    specific = info.get("format-specific", {}).get("data", {})
    return {
        "format": info["format"],
        "virtual-size": info["virtual-size"],
        "cluster-size": info.get("cluster-size"),
        "compat": specific.get("compat"),
        "refcount-bits": specific.get("refcount-bits"),
        "backing-filename": info.get("backing-filename"),
    }


def create(log: ReplyLog, job_id: str, **options: Any) -> None:
    """``blockdev-create``; when it started a job, wait for it to conclude and read ``query-jobs``."""
    reply = log.q.execute("blockdev-create", {"job-id": job_id, "options": options})
    log.replies.append(("blockdev-create", reply.get("return", reply.get("error"))))
    if "return" in reply:
        log.q.wait_job_status(job_id, "concluded", timeout=60)
        log("query-jobs")


def scenario(q: QmpSync, work: Path) -> dict[str, Any]:
    log = ReplyLog(q)
    qcow2, raw, overlay = work / "disk.qcow2", work / "disk.raw", work / "overlay.qcow2"
    create(log, "c1", driver="file", filename=str(qcow2), size=0)
    log("query-block-jobs")  # a create job is no block job
    log("block-job-dismiss", id="c1")
    log("job-dismiss", id="c1")
    log("blockdev-add", driver="file", filename=str(qcow2), **{"node-name": "f"})
    create(log, "c2", driver="qcow2", file="f", size=SIZE, **{"cluster-size": 65536})
    log("job-dismiss", id="c2")
    log("blockdev-add", driver="qcow2", file="f", **{"node-name": "d"})
    create(log, "c3", driver="file", filename=str(raw), size=SIZE)
    log("job-dismiss", id="c3")
    # an overlay naming the raw image as its backing file (relative: next to the overlay)
    create(log, "c4", driver="file", filename=str(overlay), size=0)
    log("job-dismiss", id="c4")
    log("blockdev-add", driver="file", filename=str(overlay), **{"node-name": "o"})
    options = {"backing-file": raw.name, "backing-fmt": "raw", "cluster-size": 4096}
    create(log, "c5", driver="qcow2", file="o", size=SIZE, **options)
    log("job-dismiss", id="c5")
    # refusals by the command, then failures inside the job (QEMU's texts)
    create(log, "e1", driver="raw")
    create(log, "e2", driver="raw", file="f")
    create(log, "e3", driver="nbd")
    create(log, "1bad", driver="file", filename=str(work / "x"), size=0)
    create(log, "e4", driver="file", filename=str(work / "no" / "dir" / "x"), size=0)
    create(log, "e4", driver="file", filename=str(work / "y"), size=0)  # its id is still taken
    create(log, "e5", driver="qcow2", file="nope", size=SIZE)
    create(log, "e6", driver="qcow2", file="f", size=SIZE, **{"cluster-size": 1000})
    create(log, "e7", driver="qcow2", file="f", size=1000)
    for job in ("e4", "e5", "e6", "e7"):
        log("job-dismiss", id=job)
    log("query-jobs")
    statuses = {job: q.transcript.job_statuses(job) for job in ("c1", "c2", "c3", "c4", "c5", "e4", "e5", "e6", "e7")}
    others = [name for name, data in q.transcript.events() if name.startswith("BLOCK_JOB")]
    d = next(n for n in q.ok("query-named-block-nodes") if n["node-name"] == "d")
    node = {key: d["image"].get(key) for key in ("virtual-size", "format", "cluster-size")}
    return {
        "replies": json.loads(json.dumps(log.replies).replace(str(work), "WORK")),
        "statuses": statuses,
        "block-job-events": others,
        "node": node,
        "images": {"qcow2": img_info(qcow2), "raw": img_info(raw), "overlay": img_info(overlay)},
    }


def test_blockdev_create_as_qemu_storage_daemon(tmp_path: Path) -> None:
    require("qemu-storage-daemon", "qemu-img")
    theirs, ours = on_both(tmp_path, scenario)
    assert ours == theirs
    assert ours["statuses"]["c1"] == ["created", "running", "waiting", "pending", "concluded", "null"]
    assert ours["statuses"]["e4"] == ["created", "running", "aborting", "concluded", "null"]
    assert ours["images"]["qcow2"]["format"] == "qcow2"


def test_blockdev_create_then_export_end_to_end(tmp_path: Path) -> None:
    """Create a qcow2 image over QMP, add it, export it: qemu-img reads it through NBD, qemu-io writes
    and reads it back, and once the daemon stopped ``qemu-img check`` finds it clean."""
    require("qemu-img", "qemu-io")
    images = tmp_path / "images"
    images.mkdir()
    disk = images / "vm.qcow2"
    sock = images / "nbd.sock"  # a socket path a client names obeys --allow-dir too
    with our_daemon(tmp_path / "d", "--allow-dir", str(images)) as daemon, daemon.connect() as q:
        q.ok("blockdev-create", {"job-id": "c", "options": {"driver": "file", "filename": str(disk), "size": 0}})
        q.wait_job_status("c", "concluded", timeout=60)
        q.ok("job-dismiss", id="c")
        q.ok("blockdev-add", driver="file", filename=str(disk), **{"node-name": "vm-file"})
        q.ok("blockdev-create", {"job-id": "c", "options": {"driver": "qcow2", "file": "vm-file", "size": SIZE}})
        q.wait_job_status("c", "concluded", timeout=60)
        assert "error" not in q.ok("query-jobs")[0]
        q.ok("job-dismiss", id="c")
        q.ok("blockdev-add", driver="qcow2", file="vm-file", **{"node-name": "vm"})
        q.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        q.ok("block-export-add", type="nbd", id="vm", **{"node-name": "vm"}, writable=True)
        uri = f"nbd+unix:///vm?socket={sock}"
        info = subprocess.run(["qemu-img", "info", "--output=json", uri], capture_output=True, text=True, timeout=60)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["virtual-size"] == SIZE
        io = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 7 65536 4096", "-c", "read -P 7 65536 4096", uri],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert io.returncode == 0 and "error" not in io.stdout.lower() + io.stderr.lower(), io
    check = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    read = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "read -P 7 65536 4096", str(disk)], capture_output=True, text=True, timeout=60
    )
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, read


def test_blockdev_create_confined_to_allow_dir(tmp_path: Path) -> None:
    """A path outside ``--allow-dir`` is refused by the command (no job, nothing created), and so is a
    qcow2 image naming a backing file outside it (the job fails; the file node stays empty)."""
    images = tmp_path / "images"
    images.mkdir()
    outside = tmp_path / "outside.raw"
    with our_daemon(tmp_path / "d", "--allow-dir", str(images)) as daemon, daemon.connect() as q:
        reply = q.execute(
            "blockdev-create", {"job-id": "c", "options": {"driver": "file", "filename": str(outside), "size": 0}}
        )
        assert "outside the allowed directories" in reply["error"]["desc"]
        assert q.ok("query-jobs") == [] and not outside.exists()
        q.ok(
            "blockdev-create",
            {"job-id": "c", "options": {"driver": "file", "filename": str(images / "t.qcow2"), "size": 0}},
        )
        q.wait_job_status("c", "concluded", timeout=60)
        q.ok("job-dismiss", id="c")
        q.ok("blockdev-add", driver="file", filename=str(images / "t.qcow2"), **{"node-name": "t"})
        options = {"driver": "qcow2", "file": "t", "size": SIZE, "backing-file": str(outside)}
        q.ok("blockdev-create", {"job-id": "c", "options": options})
        q.wait_job_status("c", "concluded", timeout=60)
        (job,) = q.ok("query-jobs")
        assert "outside the allowed directories" in job["error"]
        assert (images / "t.qcow2").stat().st_size == 0
