"""The daemon's repository end to end (design §3.6): QEMU pushes into a ``repo-snapshot-begin`` export
(full, then incremental from its own persistent qcow2 bitmap), our own jobs back a node up into the
repository (full + 2 incrementals), instant restore from ``--repo-exports``, and ``nbd-backup backup
... repo:DISK``. Every snapshot is checked against the source as it was at its backup's instant while
a writer kept writing the source during the copy (the oracle of ``repo_rig``)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import nbd_backup_argv, require, run
from peers import nbdcopy_to_file
from qsd import QmpSync
from repo_rig import (
    CS,
    SIZE,
    SPEED,
    Writer,
    begin_export,
    env_seed,
    nbd_uri,
    new_repo,
    qemu,
    read_snapshot,
    read_uri,
    repo_daemon,
    source_image,
    unexport_commit,
    wait_job,
)

DISK = "vm1/disk0"


@pytest.mark.parametrize("kind", ["qsd", "qemu-system"])
def test_qemu_pushes_full_then_incremental(tmp_path: Path, kind: str) -> None:
    """QEMU backs its qcow2 disk up into our export: a full backup (its persistent bitmap added in the
    same transaction), then ``sync=incremental`` from that bitmap into a snapshot begun with parent
    latest; a qemu-io writer writes the source through QEMU's own NBD export during each push."""
    repo_dir = tmp_path / "repo"
    repo = new_repo(repo_dir)
    src = source_image(tmp_path / "src.qcow2", qcow2=True)
    seed = env_seed()
    with repo_daemon(tmp_path / "ours", repo_dir) as daemon, daemon.connect() as ours, qemu(kind, tmp_path / "q") as q:
        ours_sock = tmp_path / "ours" / "nbd.sock"
        theirs_sock = tmp_path / "q" / "nbd.sock"
        with q.connect() as qm:
            qm.ok(
                "blockdev-add",
                driver="qcow2",
                file={"driver": "file", "filename": str(src)},
                **{"node-name": "src"},
            )
            qm.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(theirs_sock)}})
            qm.ok("block-export-add", type="nbd", id="srcx", writable=True, **{"node-name": "src"}, name="src")
            src_uri = nbd_uri(theirs_sock, "src")
            expected = []
            dirty: set[int] = set()  # chunks the first writer touched: all the incremental may store
            for step, (parent, sync) in enumerate((("none", "full"), ("latest", "incremental"))):
                expected.append(read_uri(src_uri, tmp_path / f"ref{step}.raw"))  # nothing writes now
                node = f"s{step}"
                begin_export(ours, node, DISK, SIZE, parent)
                qm.ok(
                    "blockdev-add",
                    driver="nbd",
                    server={"type": "unix", "path": str(ours_sock)},
                    export=node,
                    **{"node-name": f"t{step}"},
                )
                backup = {"job-id": f"j{step}", "device": "src", "target": f"t{step}", "sync": sync, "speed": SPEED}
                if sync == "full":
                    add = {"node": "src", "name": "b0", "persistent": True}
                    actions = [
                        {"type": "block-dirty-bitmap-add", "data": add},
                        {"type": "blockdev-backup", "data": backup},
                    ]
                    qm.ok("transaction", actions=actions)
                else:
                    qm.ok("blockdev-backup", **backup, bitmap="b0")
                writer = Writer(src_uri, SIZE, seed + step)  # starts after the backup's instant
                writer.wait()
                if step == 0:
                    dirty |= writer.chunks(CS)
                wait_job(qm, f"j{step}")
                qm.ok("blockdev-del", **{"node-name": f"t{step}"})
                result = unexport_commit(ours, node)
                assert result["disk"] == DISK and result["size"] == SIZE
                after = read_uri(src_uri, tmp_path / f"after{step}.raw")
                assert after == writer.apply(expected[step])  # the writes landed in the source, not the snapshot
            snapshots = ours.ok("query-repo-snapshots", disk=DISK)
            qm.ok("block-export-del", id="srcx", mode="hard")
    assert [s["parent"] for s in snapshots] == [None, snapshots[0]["id"]]
    for snap, image in zip(snapshots, expected, strict=True):
        assert read_snapshot(repo, DISK, snap["id"]) == image, f"snapshot {snap['id']} (seed {seed})"
    assert snapshots[1]["new-bytes"] <= len(dirty) * CS  # the incremental stored only what the bitmap marked


def test_our_jobs_full_and_two_incrementals(tmp_path: Path) -> None:
    """Our own ``blockdev-backup`` of a node that an NBD client of our export keeps writing: full with a
    bitmap added in its transaction, then two ``sync=incremental`` snapshots (parent latest)."""
    repo_dir = tmp_path / "repo"
    repo = new_repo(repo_dir)
    src = source_image(tmp_path / "src.raw")
    seed = env_seed()
    sock = tmp_path / "ours" / "nbd.sock"
    expected: list[bytes] = []
    with repo_daemon(tmp_path / "ours", repo_dir) as daemon, daemon.connect() as ours:
        ours.ok("blockdev-add", driver="file", filename=str(src), **{"node-name": "src"})
        ours.ok("block-export-add", type="nbd", id="srcx", writable=True, **{"node-name": "src"})
        src_uri = nbd_uri(sock, "src")
        for step in range(3):
            expected.append(read_uri(src_uri, tmp_path / f"ref{step}.raw"))
            node = f"s{step}"
            ours.ok(
                "repo-snapshot-begin",
                disk=DISK,
                size=SIZE,
                parent="none" if step == 0 else "latest",
                **{"node-name": node},
            )
            backup = {"job-id": f"j{step}", "device": "src", "target": node, "speed": SPEED}
            if step == 0:
                actions = [
                    {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b"}},
                    {"type": "blockdev-backup", "data": backup | {"sync": "full"}},
                ]
                ours.ok("transaction", actions=actions)
            else:
                ours.ok("blockdev-backup", **backup, sync="incremental", bitmap="b")
            writer = Writer(src_uri, SIZE, seed + step)
            writer.wait()
            wait_job(ours, f"j{step}")
            ours.ok("repo-snapshot-commit", **{"node-name": node})
        snapshots = ours.ok("query-repo-snapshots", disk=DISK)
        ours.ok("block-export-del", id="srcx", mode="hard")
    assert len(snapshots) == 3
    assert [s["parent"] for s in snapshots] == [None, snapshots[0]["id"], snapshots[1]["id"]]
    for snap, image in zip(snapshots, expected, strict=True):
        assert read_snapshot(repo, DISK, snap["id"]) == image, f"snapshot {snap['id']} (seed {seed})"


def _committed_snapshot(ours: QmpSync, src: Path, disk: str) -> str:
    """Back ``src`` up into a new snapshot of ``disk`` with our own job; returns its id."""
    ours.ok("blockdev-add", driver="file", filename=str(src), **{"node-name": "src"}, **{"read-only": True})
    ours.ok("repo-snapshot-begin", disk=disk, size=src.stat().st_size, parent="none", **{"node-name": "s"})
    ours.ok("blockdev-backup", **{"job-id": "j"}, device="src", target="s", sync="full")
    wait_job(ours, "j")
    snap = ours.ok("repo-snapshot-commit", **{"node-name": "s"})["snapshot"]
    ours.ok("blockdev-del", **{"node-name": "src"})
    return str(snap)


def test_instant_restore_exports(tmp_path: Path) -> None:
    """``--repo-exports``: ``DISK@ID`` and ``DISK@latest`` listed, read by qemu-img compare, nbdcopy and
    QEMU's own NBD block driver equal to the source; writes refused; ``@latest`` follows a new commit."""
    require("qemu-img", "qemu-io", "nbdcopy", "nbdinfo", "qemu-storage-daemon")
    repo_dir = tmp_path / "repo"
    new_repo(repo_dir)
    src = source_image(tmp_path / "src.raw")
    sock = tmp_path / "ours" / "nbd.sock"
    with repo_daemon(tmp_path / "ours", repo_dir, "--repo-exports") as daemon, daemon.connect() as ours:
        first = _committed_snapshot(ours, src, DISK)
        listed = run("nbdinfo", "--list", "--json", f"nbd+unix://?socket={sock}", cwd="/").stdout
        assert f'"{DISK}@{first}"' in listed and f'"{DISK}@latest"' in listed
        uri = nbd_uri(sock, f"{DISK}@{first}")
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri, cwd="/")
        assert nbdcopy_to_file(uri, tmp_path / "copy.raw") == src.read_bytes()
        refused = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", uri], capture_output=True, text=True, cwd="/"
        )
        assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused.stderr
        with qemu("qsd", tmp_path / "q") as q, q.connect() as qm:
            server = {"type": "unix", "path": str(sock)}
            rw = qm.execute("blockdev-add", driver="nbd", server=server, export=f"{DISK}@latest", **{"node-name": "rw"})
            assert "Permission denied" in rw["error"]["desc"]  # QEMU cannot open it for writing
            node = {"node-name": "restore", "read-only": True}
            qm.ok("blockdev-add", driver="nbd", server=server, export=f"{DISK}@latest", **node)
            target = tmp_path / "restored.raw"
            qm.ok("drive-backup", **{"job-id": "r"}, device="restore", target=str(target), format="raw", sync="full")
            wait_job(qm, "r")
            assert target.read_bytes() == src.read_bytes()
            qm.ok("blockdev-del", **{"node-name": "restore"})
        # a later snapshot: @latest follows it, @ID keeps its own bytes
        with open(src, "r+b") as f:
            f.write(b"\xee" * CS)
        second = _committed_snapshot(ours, src, DISK)
        assert second > first
        assert nbdcopy_to_file(nbd_uri(sock, f"{DISK}@latest"), tmp_path / "latest.raw") == src.read_bytes()
        assert nbdcopy_to_file(uri, tmp_path / "old.raw")[:CS] != b"\xee" * CS


def test_backup_command_into_repo(tmp_path: Path) -> None:
    """``nbd-backup backup DEVICE repo:DISK --bitmap b``: a full snapshot (the bitmap starts with it),
    then an incremental one holding the change; Ctrl-C mid-backup aborts: nothing published, no node left."""
    repo_dir = tmp_path / "repo"
    repo = new_repo(repo_dir)
    src = source_image(tmp_path / "src.raw")
    with repo_daemon(tmp_path / "ours", repo_dir) as daemon, daemon.connect() as ours:
        ours.ok("blockdev-add", driver="file", filename=str(src), **{"node-name": "src"})
        qmp = f"unix:{daemon.qmp_path}"
        argv = nbd_backup_argv("backup", "--qmp", qmp, "src", f"repo:default:{DISK}", "--bitmap", "b", "--no-progress")
        full = run(*argv)
        assert "completed" in full.stderr
        first = bytes(src.read_bytes())
        ours.ok("block-export-add", type="nbd", id="srcx", writable=True, **{"node-name": "src"})
        run(
            "qemu-io",
            "-f",
            "raw",
            "-c",
            f"write -P 7 {CS + 512} 4096",
            nbd_uri(tmp_path / "ours" / "nbd.sock", "src"),
            cwd="/",
        )
        ours.ok("block-export-del", id="srcx", mode="hard")
        incremental = run(*argv)
        assert "completed" in incremental.stderr
        snaps = repo.snapshots(DISK)
        assert len(snaps) == 2 and snaps[1].parent == snaps[0].id
        assert snaps[1].stats["new-bytes"] == CS  # one chunk changed
        assert read_snapshot(repo, DISK, snaps[0].id) == first
        assert read_snapshot(repo, DISK, snaps[1].id) == src.read_bytes()
        # the node lost its bitmap: a full backup (no parent) starts it again
        ours.ok("block-dirty-bitmap-remove", node="src", name="b")
        again = run(*argv)
        assert "has no bitmap 'b'" in again.stderr and "completed" in again.stderr
        third = repo.snapshots(DISK)[-1]
        assert third.parent is None and read_snapshot(repo, DISK, third.id) == src.read_bytes()
        assert [b["name"] for b in ours.ok("query-named-block-nodes")[0].get("dirty-bitmaps", [])] == ["b"]
        # Ctrl-C while the job runs (throttled): the job is cancelled, the snapshot aborted
        other = nbd_backup_argv("backup", "--qmp", qmp, "src", "repo:other", "--no-progress", "--speed", "64K")
        slow = subprocess.Popen(other, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(600):
                if ours.ok("query-block-jobs"):
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the backup job never appeared")
            slow.send_signal(signal.SIGINT)
            _, err = slow.communicate(timeout=60)
        finally:
            if slow.poll() is None:
                slow.kill()
                slow.wait()
        assert slow.returncode == 130, err
        assert len(repo.snapshots(DISK)) == 3 and repo.snapshots("other") == []
        assert [n["node-name"] for n in ours.ok("query-named-block-nodes")] == ["src"]
        bad = subprocess.run(
            nbd_backup_argv("backup", "--qmp", qmp, "nope", f"repo:{DISK}"), capture_output=True, text=True
        )
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
