"""``serve --state-file`` end to end: nodes, exports, the NBD server and a persistent dirty bitmap set up
over QMP, the daemon stopped with SIGTERM and started again with the same state file — the same
``query-*`` replies come back; a path that left ``--allow-dir`` meanwhile and an image gone missing are
refused with a log line while the rest comes up; a corrupt state file stops the start."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from conftest import require
from peers import nbd_backup_argv
from qmp_daemon import make_image, our_daemon
from qsd import QmpSync

SIZE = 4 << 20
#: What changes with a restart by itself: the files' allocated size (qcow2 stores its bitmaps on close).
VOLATILE = {"actual-size"}


def stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def queries(q: QmpSync) -> dict[str, Any]:
    return stable({name: q.ok(name) for name in ("query-named-block-nodes", "query-block-exports", "query-block")})


def without_bitmap(replies: dict[str, Any], name: str) -> dict[str, Any]:
    """``replies`` as they must read once bitmap ``name`` is gone (QEMU drops the member when empty)."""

    def strip(info: dict[str, Any]) -> None:
        kept = [b for b in info.get("dirty-bitmaps", []) if b["name"] != name]
        if kept:
            info["dirty-bitmaps"] = kept
        else:
            info.pop("dirty-bitmaps", None)

    copy = json.loads(json.dumps(replies))
    for node in copy["query-named-block-nodes"]:
        strip(node)
    for device in copy["query-block"]:
        strip(device["inserted"])
    return copy


def set_up(q: QmpSync, keep: Path, gone: Path) -> None:
    """file+raw ``r`` and file+qcow2 ``q`` (persistent bitmap ``pb``, and ``tmp`` which is not) in
    ``keep``; a raw node ``g`` in ``gone``; an authz object; the NBD server and three exports."""
    q.ok("blockdev-add", driver="file", filename=str(keep / "r.raw"), **{"node-name": "r-file"})
    q.ok("blockdev-add", driver="raw", file="r-file", **{"node-name": "r"})
    q.ok(
        "blockdev-add", driver="qcow2", file={"driver": "file", "filename": str(keep / "q.qcow2")}, **{"node-name": "q"}
    )
    q.ok("block-dirty-bitmap-add", node="q", name="pb", persistent=True)
    q.ok("block-dirty-bitmap-add", node="q", name="tmp")
    q.ok("blockdev-add", driver="raw", file={"driver": "file", "filename": str(gone / "g.raw")}, **{"node-name": "g"})
    q.ok("object-add", **{"qom-type": "authz-simple", "id": "az", "identity": "CN=backup"})
    q.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(keep / "nbd.sock")}}, **{"max-connections": 8})
    q.ok("block-export-add", type="nbd", id="r", **{"node-name": "r"}, writable=True, description="raw disk")
    q.ok("block-export-add", type="nbd", id="q", **{"node-name": "q"}, writable=True, bitmaps=["pb"])
    q.ok("block-export-add", type="nbd", id="g", **{"node-name": "g"})


def guest_write(keep: Path, export: str) -> None:
    uri = f"nbd+unix:///{export}?socket={keep / 'nbd.sock'}"
    done = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 9 65536 131072", uri], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "error" not in done.stdout.lower(), done


def test_restart_brings_back_what_qmp_set_up(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    images = tmp_path / "images"
    keep, gone = images / "keep", images / "gone"
    keep.mkdir(parents=True)
    gone.mkdir()
    make_image(keep / "r.raw", SIZE)
    make_image(gone / "g.raw", SIZE)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(keep / "q.qcow2"), str(SIZE)], check=True, timeout=60
    )
    state = tmp_path / "state.json"
    args = ("--state-file", str(state))

    with our_daemon(tmp_path / "first", *args, "--allow-dir", str(images)) as daemon, daemon.connect() as q:
        set_up(q, keep, gone)
        guest_write(keep, "q")  # the persistent bitmap's count must survive the restart too
        before = queries(q)
    assert next(b for b in before["query-named-block-nodes"] if b["node-name"] == "q")["dirty-bitmaps"][0]["count"] > 0
    assert json.loads(state.read_text())["format"] == "nbd-backup-state"

    with our_daemon(tmp_path / "second", *args, "--allow-dir", str(images)) as daemon, daemon.connect() as q:
        after = queries(q)
        assert q.ok("query-jobs") == []
    assert after == without_bitmap(before, "tmp")
    log = daemon.stderr()
    assert "dirty bitmap 'tmp' of node 'q' was not persistent" in log
    assert "not restored" not in log

    # the 'gone' directory is no longer allowed and r.raw was deleted: both refused, q comes up
    (keep / "r.raw").unlink()
    kept_before = state.read_text()
    with our_daemon(tmp_path / "third", *args, "--allow-dir", str(keep)) as daemon, daemon.connect() as q:
        nodes = sorted(n["node-name"] for n in q.ok("query-named-block-nodes"))
        exports = sorted(e["id"] for e in q.ok("query-block-exports"))
    log = daemon.stderr()
    assert nodes == ["q"] and exports == ["q"]
    assert "state: not restored: blockdev-add" in log and "outside the allowed directories" in log
    assert f"Could not open '{keep / 'r.raw'}'" in log
    assert (tmp_path / "state.json.unrestored").read_text() == kept_before
    assert [e["execute"] for e in json.loads(state.read_text())["setup"]] == [
        "object-add",
        "blockdev-add",
        "nbd-server-start",
        "block-export-add",
    ]


def test_a_corrupt_state_file_is_an_error_at_start(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text('{"format": "nbd-backup-state", "version": 1, "setup": [')
    done = subprocess.run(
        nbd_backup_argv("serve", "--qmp", f"unix:{tmp_path / 'qmp.sock'}", "--state-file", str(state)),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 1
    assert f"state file {state}: not JSON" in done.stderr and "move it aside" in done.stderr
    assert state.read_text() == '{"format": "nbd-backup-state", "version": 1, "setup": ['


def test_state_file_setting_in_the_config_file(tmp_path: Path) -> None:
    """``state-file`` in TOML, relative to the config file's directory, as every path there."""
    config = tmp_path / "serve.toml"
    config.write_text('state-file = "kept.json"\n')
    image = make_image(tmp_path / "a.raw", SIZE)
    with our_daemon(tmp_path / "d", "--config", str(config)) as daemon, daemon.connect() as q:
        q.ok("blockdev-add", driver="file", filename=str(image), **{"node-name": "a"})
    assert json.loads((tmp_path / "kept.json").read_text())["setup"][0]["arguments"]["node-name"] == "a"
