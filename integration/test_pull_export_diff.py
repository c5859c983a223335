"""Differential: ``block-export-add`` with ``allocation-depth`` on a qcow2 node over a backing file,
on qemu-storage-daemon and on our daemon — the QMP replies, the contexts ``nbdinfo`` lists and the
``qemu:allocation-depth`` map must be the same."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from conftest import require
from qmp_daemon import on_both
from qsd import QmpSync

MiB = 1024 * 1024


def _chain(work: Path) -> Path:
    base, top = work / "base.qcow2", work / "top.qcow2"
    run = subprocess.run
    run(["qemu-img", "create", "-q", "-f", "qcow2", base, "4M"], check=True)
    run(["qemu-io", "-c", "write -P 1 0 1M", "-c", "write -z 2M 64k", base], check=True, capture_output=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top], check=True)
    run(["qemu-io", "-c", "write -P 2 512k 128k", "-c", "write -z 3M 64k", top], check=True, capture_output=True)
    return top


def _nbdinfo(*args: str) -> str:
    return subprocess.run(["nbdinfo", *args], check=True, capture_output=True, text=True, timeout=60).stdout


def _scenario(q: QmpSync, work: Path) -> dict[str, Any]:
    top = _chain(work)
    sock = work / "nbd.sock"
    replies = [
        q.execute("blockdev-add", driver="file", filename=str(top), **{"node-name": "top-file"}),
        q.execute("blockdev-add", driver="qcow2", file="top-file", **{"node-name": "top"}),
        q.execute("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}}),
        q.execute("block-export-add", type="nbd", id="e", **{"node-name": "top"}, **{"allocation-depth": True}),
        q.execute("block-export-add", type="nbd", id="plain", **{"node-name": "top"}, name="plain"),
    ]
    uri = f"nbd+unix:///top?socket={sock}"
    plain = f"nbd+unix:///plain?socket={sock}"
    result = {
        "replies": [{k: v for k, v in r.items() if k != "id"} for r in replies],
        "contexts": json.loads(_nbdinfo("--json", uri))["exports"][0]["contexts"],
        "plain": json.loads(_nbdinfo("--json", plain))["exports"][0]["contexts"],
        "depth": _nbdinfo("--map=qemu:allocation-depth", uri),
    }
    q.execute("nbd-server-stop")
    return result


def test_allocation_depth_export_matches_qemu_storage_daemon(tmp_path: Path) -> None:
    require("qemu-storage-daemon", "qemu-img", "qemu-io", "nbdinfo")
    theirs, ours = on_both(tmp_path, _scenario)
    assert ours == theirs
    assert theirs["contexts"] == ["base:allocation", "qemu:allocation-depth"]
    assert theirs["plain"] == ["base:allocation"]
    assert "backing depth 2" in theirs["depth"] and "absent" in theirs["depth"]
