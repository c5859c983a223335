"""The daemon's repository under faults (design §3.6: a snapshot begun and never committed is never
published): ``kill -9`` of the daemon mid-backup at random instants, a pushing NBD client that
vanishes, ``blockdev-del`` and daemon stop; then the store verifies, gc reclaims the orphans and the
next backup works. Also the refusals through a real monitor."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

from qmp_daemon import start_daemon
from repo_rig import (
    CS,
    SIZE,
    begin_export,
    chunk_files,
    env_seed,
    manifest_chunks,
    nbd_uri,
    new_repo,
    read_snapshot,
    repo_daemon,
    source_image,
    unexport_commit,
    wait_job,
)

from backup.repo.gc import GcReport, collect_garbage
from backup.repo.repository import Repository
from backup.repo.verify import verify

DISK = "vm1/disk0"


def _check_store(repo: Repository, published: int) -> GcReport:
    """Nothing new published, every chunk verifies, gc leaves exactly what the manifests name."""
    assert len(repo.snapshots(DISK)) == published
    report = verify(repo)
    assert report.bad == {} and report.broken == {}
    gc = collect_garbage(repo)
    assert chunk_files(repo.path) == manifest_chunks(repo)
    assert not any((repo.path / "tmp").iterdir())
    assert not any((repo.path / "leases").iterdir())
    return gc


def test_kill_daemon_mid_backup(tmp_path: Path) -> None:
    """``kill -9`` while a backup writes into a begun snapshot — our own job, or a client pushing into
    its export (``qemu-img convert -n``), in turn — at several random instants: the repository is as
    before each time, gc reclaims the killed backup's chunks and lease, the next backup works."""
    rng = random.Random(env_seed())
    repo_dir = tmp_path / "repo"
    repo = new_repo(repo_dir)
    src = source_image(tmp_path / "src.raw")
    orphans = 0
    for round_ in range(4):
        with open(src, "r+b") as f:  # new data each round: the killed backup stores chunks nobody else has
            for _ in range(8):
                f.seek(rng.randrange(SIZE // CS) * CS)
                f.write(rng.randbytes(CS))
        workdir = tmp_path / f"d{round_}"
        daemon = start_daemon(workdir, "--repo", str(repo_dir), "--nbd-socket", str(workdir / "nbd.sock"))
        pusher = None
        try:
            with daemon.connect() as ours:
                ours.ok("repo-snapshot-begin", disk=DISK, size=SIZE, parent="latest", **{"node-name": "s"})
                if round_ % 2:
                    ours.ok("block-export-add", type="nbd", id="s", writable=True, **{"node-name": "s"})
                    uri = nbd_uri(workdir / "nbd.sock", "s")
                    argv = ["qemu-img", "convert", "-n", "-r", "4M", "-f", "raw", "-O", "raw", str(src), uri]
                    pusher = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
                else:
                    ours.ok("blockdev-add", driver="file", filename=str(src), **{"node-name": "src"})
                    ours.ok("blockdev-backup", **{"job-id": "j"}, device="src", target="s", sync="full", speed=SIZE)
                time.sleep(rng.uniform(0.05, 0.8))
        finally:
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
            if pusher is not None:
                pusher.kill()
                pusher.wait()
        reclaimed = _check_store(repo, round_)
        assert reclaimed.leases_removed == 1  # the killed writer's
        orphans += reclaimed.chunks_deleted
        # the next backup works (and its disk is not left locked)
        with repo_daemon(workdir / "next", repo_dir) as again, again.connect() as ours:
            ours.ok("blockdev-add", driver="file", filename=str(src), **{"node-name": "src"})
            ours.ok("repo-snapshot-begin", disk=DISK, size=SIZE, **{"node-name": "s"})
            ours.ok("blockdev-backup", **{"job-id": "j"}, device="src", target="s", sync="full")
            wait_job(ours, "j")
            ours.ok("repo-snapshot-commit", **{"node-name": "s"})
        assert read_snapshot(repo, DISK) == src.read_bytes()
        _check_store(repo, round_ + 1)
    print(f"chunks of killed backups reclaimed by gc: {orphans}")


def test_vanished_client_blockdev_del_and_stop_publish_nothing(tmp_path: Path) -> None:
    """A pushing client killed mid-write, then ``blockdev-del``; and snapshots still open when the
    daemon stops: nothing is published, the store stays clean."""
    repo_dir = tmp_path / "repo"
    repo = new_repo(repo_dir)
    sock = tmp_path / "ours" / "nbd.sock"
    with repo_daemon(tmp_path / "ours", repo_dir) as daemon, daemon.connect() as ours:
        begin_export(ours, "s", DISK, SIZE, "none")
        pusher = subprocess.Popen(
            ["qemu-io", "-f", "raw", "-c", f"write -P 9 0 {SIZE}", "-c", f"write -P 8 0 {SIZE}", nbd_uri(sock, "s")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
        )
        time.sleep(0.2)
        pusher.kill()
        pusher.wait()
        refused = ours.execute("blockdev-del", **{"node-name": "s"})
        assert refused["error"]["desc"] == "Node s is in use"
        ours.ok("block-export-del", id="s", mode="hard")
        ours.ok("blockdev-del", **{"node-name": "s"})
        assert ours.ok("query-repo-snapshots") == []
        # a finished push is published only by commit
        begin_export(ours, "s", DISK, 2 * CS, "none")
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 5 0 64k", nbd_uri(sock, "s")], check=True, cwd="/")
        assert unexport_commit(ours, "s")["new-bytes"] == CS
        # open at stop: both aborted (one still exported, one holding written data)
        begin_export(ours, "s", DISK, 2 * CS, "latest")
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 6 0 64k", nbd_uri(sock, "s")], check=True, cwd="/")
        ours.ok("repo-snapshot-begin", disk="other", size=CS, **{"node-name": "o"})
    assert daemon.proc.returncode == 0
    assert [m.id for m in repo.snapshots("other")] == []
    [only] = repo.snapshots(DISK)
    assert read_snapshot(repo, DISK, only.id) == b"\x05" * CS + bytes(CS)
    _check_store_all(repo)


def _check_store_all(repo: Repository) -> None:
    assert verify(repo).bad == {}
    collect_garbage(repo)
    assert chunk_files(repo.path) == manifest_chunks(repo)


def test_refusals_over_qmp(tmp_path: Path) -> None:
    """The refusals as a client sees them (GenericError, QEMU-style texts), two repositories open."""
    new_repo(tmp_path / "r1")
    new_repo(tmp_path / "r2")
    extra = ("--repo", f"two={tmp_path / 'r2'}")
    with repo_daemon(tmp_path / "ours", tmp_path / "r1", *extra) as daemon, daemon.connect() as ours:

        def refused(command: str, **args: object) -> str:
            reply = ours.execute(command, **args)
            assert reply["error"]["class"] == "GenericError", reply
            return str(reply["error"]["desc"])

        begin = {"disk": DISK, "size": CS, "node-name": "s"}
        assert refused("repo-snapshot-begin", **begin).startswith("Parameter 'repo' is missing")
        assert refused("repo-snapshot-begin", repo="nope", **begin) == "Repository 'nope' not found"
        assert refused("repo-snapshot-begin", repo="default", **(begin | {"disk": "a/../b"})).startswith(
            "Invalid disk name 'a/../b'"
        )
        ours.ok("repo-snapshot-begin", repo="default", **begin)
        assert refused("repo-snapshot-begin", repo="default", **(begin | {"node-name": "t"})) == (
            f"Disk '{DISK}' of repository 'default' already has an uncommitted snapshot: 's'"
        )
        ours.ok("repo-snapshot-begin", repo="two", **(begin | {"node-name": "t"}))  # another repository
        ours.ok("block-export-add", type="nbd", id="e", writable=True, **{"node-name": "s"})
        assert refused("repo-snapshot-commit", **{"node-name": "s"}) == "Node 's' is in use by NBD export 's'"
        ours.ok("block-export-del", id="e")
        snap = ours.ok("repo-snapshot-commit", **{"node-name": "s"})
        ours.ok("repo-snapshot-open", repo="default", disk=DISK, snapshot=snap["snapshot"], **{"node-name": "o"})
        assert refused("block-export-add", type="nbd", id="e", writable=True, **{"node-name": "o"}) == (
            "Cannot export read-only node as writable"
        )
        names = {c["name"] for c in ours.ok("query-commands")}
        assert {"repo-snapshot-begin", "repo-snapshot-commit", "repo-snapshot-abort"} <= names
        assert {"repo-snapshot-open", "query-repo-snapshots"} <= names
