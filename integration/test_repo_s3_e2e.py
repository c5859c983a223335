"""The repository in object storage end to end: ``nbd-backup repo`` against an ``s3://`` location on a
moto server (loopback), and ``serve --repo s3://… --repo-exports`` serving its snapshots to qemu-img.

The store's own behaviour in S3 (conditional PUTs, leases, gc racing backups, faults) is tested in
``tests/test_repo_s3.py``; here the commands a user types take an S3 location wherever a directory goes.
"""

from __future__ import annotations

import filecmp
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require, run
from qmp_daemon import our_daemon
from repo_cli_kit import CS, MiB, random_disk, repo
from repo_rig import nbd_uri
from s3kit import CREDENTIALS, MotoServer

SIZE = 4 * MiB


@pytest.fixture
def bucket_location(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)  # the commands and the daemon inherit them: the AWS chain finds them
    server = MotoServer()
    try:
        yield f"s3://{server.new_bucket()}/backups?endpoint={server.endpoint}&region=us-east-1"
    finally:
        server.close()


def test_repo_commands_take_a_bucket(tmp_path: Path, bucket_location: str) -> None:
    """init, a full and an incremental backup, list, restore of each, verify, prune, gc — in a bucket."""
    loc = bucket_location
    repo("init", loc, "--chunk-size", str(CS))
    disk = random_disk(tmp_path / "disk.raw", SIZE, seed=5)
    original = disk.read_bytes()
    repo("backup", loc, "vm1/disk0", disk)
    with open(disk, "r+b") as f:  # change two chunks
        f.write(os.urandom(CS))
        f.seek(SIZE - CS)
        f.write(os.urandom(CS))
    out = repo("backup", loc, "vm1/disk0", disk).stdout
    first, second = json.loads(repo("list", loc, "vm1/disk0", "--json").stdout)
    assert second["parent"] == first["id"] and out.split()[0] == f"vm1/disk0@{second['id']}"
    assert second["new-bytes"] <= 2 * CS  # the incremental stored only what changed
    for snap, expected in ((first, original), (second, disk.read_bytes())):
        restored = tmp_path / f"{snap['id']}.raw"
        repo("restore", loc, f"vm1/disk0@{snap['id']}", restored)
        assert restored.read_bytes() == expected
    assert repo("verify", loc).returncode == 0
    repo("prune", loc, "--keep-last", "1")
    repo("gc", loc)
    assert [s["id"] for s in json.loads(repo("list", loc, "--json").stdout)] == [second["id"]]
    assert repo("verify", loc).returncode == 0
    restored = tmp_path / "after-gc.raw"
    repo("restore", loc, "vm1/disk0", restored)
    assert filecmp.cmp(disk, restored, shallow=False)


def test_daemon_serves_snapshots_of_a_bucket(tmp_path: Path, bucket_location: str) -> None:
    """``serve --repo s3://… --repo-exports``: a snapshot backed up into the bucket is an NBD export that
    qemu-img reads equal to the source (instant restore straight from object storage)."""
    require("qemu-img")
    loc = bucket_location
    repo("init", loc, "--chunk-size", str(CS))
    disk = random_disk(tmp_path / "disk.raw", SIZE, seed=6)
    repo("backup", loc, "vm2", disk)
    workdir = tmp_path / "ours"
    sock = workdir / "nbd.sock"
    with our_daemon(workdir, "--repo", loc, "--nbd-socket", str(sock), "--repo-exports"):
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(disk), nbd_uri(sock, "vm2@latest"), cwd="/")
