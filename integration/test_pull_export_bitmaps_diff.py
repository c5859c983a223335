"""Differential: one pull-mode sequence (a bitmap exported read-only and writable, with
``allocation-depth``, busy while exported, the guest writing through the export) on
qemu-storage-daemon 7.2 and on our daemon — QMP replies, the contexts ``nbdinfo`` lists, the
``qemu:dirty-bitmap`` and ``qemu:allocation-depth`` maps and the bitmap afterwards must be the same."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from conftest import require
from qmp_daemon import ReplyLog, make_image, on_both
from qsd import QmpSync


def _nbdinfo(*args: str) -> str:
    return subprocess.run(["nbdinfo", *args], check=True, capture_output=True, text=True, timeout=60).stdout


def _scenario(q: QmpSync, work: Path) -> dict[str, Any]:
    image = make_image(work / "d.raw", 4 << 20)
    sock = work / "nbd.sock"
    run = ReplyLog(q)

    run("blockdev-add", driver="file", filename=str(image), **{"node-name": "f"})
    run("blockdev-add", driver="raw", file="f", **{"node-name": "d"})
    run("block-dirty-bitmap-add", node="d", name="b0")
    run("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    run("block-export-add", type="nbd", id="ro", **{"node-name": "d"}, name="ro", bitmaps=["b0"])  # recording
    run("block-export-add", type="nbd", id="missing", **{"node-name": "d"}, name="m", bitmaps=["nope"])
    run("block-export-add", type="nbd", id="w", **{"node-name": "d"}, name="w", writable=True, bitmaps=["b0"])
    run("block-export-add", type="nbd", id="w2", **{"node-name": "d"}, name="w2", bitmaps=[{"node": "d", "name": "b0"}])
    run("block-dirty-bitmap-remove", node="d", name="b0")  # busy while exported
    run("block-dirty-bitmap-clear", node="d", name="b0")
    run("block-dirty-bitmap-add", node="d", name="alloc")
    run("block-export-add", type="nbd", id="a", **{"node-name": "d"}, name="a", **{"allocation-depth": True})
    uri = f"nbd+unix:///w?socket={sock}"
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write 100k 4k", "-c", "write 1M 200k", "-c", "write -z 3M 1", uri],
        check=True,
        capture_output=True,
        timeout=60,
    )
    result: dict[str, Any] = {
        "bitmap map": _nbdinfo("--map=qemu:dirty-bitmap:b0", uri),
        "depth map": _nbdinfo("--map=qemu:allocation-depth", f"nbd+unix:///a?socket={sock}"),
        "contexts": json.loads(_nbdinfo("--json", uri))["exports"][0]["contexts"],
        "contexts a": json.loads(_nbdinfo("--json", f"nbd+unix:///a?socket={sock}"))["exports"][0]["contexts"],
    }
    exports = sorted(e["id"] for e in q.ok("query-block-exports"))
    result["exports"] = exports
    for export in exports:
        run("block-export-del", id=export)
        q.wait_event("BLOCK_EXPORT_DELETED", lambda data, e=export: data["id"] == e, timeout=60)
    nodes = {n["node-name"]: n.get("dirty-bitmaps") for n in q.ok("query-named-block-nodes")}
    result["bitmaps after"] = nodes["d"]
    run("block-dirty-bitmap-remove", node="d", name="b0")  # free again
    run("nbd-server-stop")
    result["replies"] = run.replies
    return result


def test_pull_export_sequence_matches_qemu_storage_daemon(tmp_path: Path) -> None:
    require("qemu-storage-daemon", "qemu-io", "nbdinfo")
    theirs, ours = on_both(tmp_path, _scenario)
    assert ours == theirs
    dirty = [row.split()[:2] for row in ours["bitmap map"].splitlines() if row.endswith("dirty")]
    assert dirty == [["65536", "65536"], ["1048576", "262144"], ["3145728", "65536"]]  # rounded to 64 KiB
