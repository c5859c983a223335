"""``nbd-backup repo … --key-file FILE`` (client-side encryption) and ``repo init s3://… --object-lock-days N``
end to end: the commands a user types, in a directory and in a bucket of a moto server on loopback, and
``serve --repo … --repo-key-file …`` serving an encrypted snapshot to qemu-img."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, require, run
from qmp_daemon import our_daemon
from repo_cli_kit import CS, MiB, one_line_error, repo
from repo_rig import nbd_uri

sys.path.insert(0, str(ROOT / "tests"))
from s3kit import CREDENTIALS, MotoServer

from backup.repo import objectlock

SIZE = 2 * MiB
PATTERN = b"A-KNOWN-PATTERN-OF-THE-GUEST-DISK"


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)  # the commands and the daemon inherit them
    server = MotoServer()
    try:
        yield server
    finally:
        server.close()


def _bucket(server: MotoServer, *, object_lock: bool = False) -> str:
    name = f"e-{uuid.uuid4().hex[:20]}"
    server.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
    return name


def _disk(path: Path) -> Path:
    """A disk full of a known pattern (compressible: stored in clear it would show), half of it zero."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset in range(0, SIZE // 2, CS):
            f.seek(offset)
            f.write((PATTERN + offset.to_bytes(8, "big")) * (CS // (len(PATTERN) + 8)))
    return path


def test_key_file_encrypts_a_directory_repository(tmp_path: Path) -> None:
    loc, key = tmp_path / "repo", tmp_path / "repo.key"
    assert "encrypted" in repo("init", loc, "--chunk-size", str(CS), "--key-file", key).stdout
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_text().strip()) == 64
    disk = _disk(tmp_path / "disk.raw")
    repo("backup", loc, "vm1", disk, "--key-file", key)
    repo("backup", loc, "vm2", disk, "--key-file", key)  # dedup across disks still works
    snaps = json.loads(repo("list", loc, "--json", "--key-file", key).stdout)
    assert [s["disk"] for s in snaps] == ["vm1", "vm2"] and snaps[1]["new-bytes"] == 0
    for path in loc.rglob("*"):
        assert not path.is_file() or PATTERN not in path.read_bytes(), path
    assert one_line_error(repo("list", loc, check=False)).endswith("is encrypted: its key is needed (--key-file FILE)")
    (tmp_path / "wrong.key").write_text(os.urandom(32).hex() + "\n")
    assert "wrong key" in one_line_error(
        repo("restore", loc, "vm1", tmp_path / "x", "--key-file", tmp_path / "wrong.key", check=False)
    )
    assert not (tmp_path / "x").exists()
    assert "does not exist" in one_line_error(repo("gc", loc, "--key-file", tmp_path / "nokey", check=False))
    restored = tmp_path / "restored.raw"
    repo("restore", loc, "vm1", restored, "--key-file", key)
    assert restored.read_bytes() == disk.read_bytes()
    chunk = next(p for p in (loc / "chunks").glob("*/*"))
    blob = bytearray(chunk.read_bytes())
    blob[-1] ^= 0xFF  # the GCM tag
    chunk.write_bytes(bytes(blob))
    bad = repo("verify", loc, "--json", "--key-file", key, check=False)
    assert bad.returncode == 1
    assert [c["digest"] for c in json.loads(bad.stdout)["bad-chunks"]] == [chunk.name]


def test_key_file_and_object_lock_in_a_bucket(
    tmp_path: Path, moto: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one "day" of retention lasts 12 s (init records it): long enough for the commands below to meet it
    monkeypatch.setenv(objectlock.DAY_ENV, "12")
    plain = f"s3://{_bucket(moto)}/r?endpoint={moto.endpoint}&region=us-east-1"
    message = one_line_error(repo("init", plain, "--object-lock-days", "1", check=False))
    assert "does not have Object Lock enabled" in message
    assert "Object Lock needs a repository in S3" in one_line_error(
        repo("init", tmp_path / "dir", "--object-lock-days", "1", check=False)
    )
    bucket = _bucket(moto, object_lock=True)
    loc = f"s3://{bucket}/r?endpoint={moto.endpoint}&region=us-east-1"
    key = tmp_path / "k"
    out = repo("init", loc, "--chunk-size", str(CS), "--key-file", key, "--object-lock-days", "1").stdout
    assert "encrypted, Object Lock 1 days" in out
    disk = _disk(tmp_path / "disk.raw")
    repo("backup", loc, "vm1", disk, "--key-file", key)
    repo("backup", loc, "vm1", disk, "--key-file", key)
    client = moto.client()
    for o in client.list_objects_v2(Bucket=bucket)["Contents"]:
        assert PATTERN not in client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read(), o["Key"]
    first = json.loads(repo("list", loc, "--json", "--key-file", key).stdout)[0]["id"]
    message = one_line_error(repo("prune", loc, "--keep-last", "1", "--key-file", key, check=False))
    assert f"snapshot vm1@{first} is under Object Lock retention until 20" in message
    for _ in range(60):  # bounded: the retention ends on the server's clock 12 s after the backup
        if repo("prune", loc, "--keep-last", "1", "--key-file", key, check=False).returncode == 0:
            break
        time.sleep(0.5)
    assert len(json.loads(repo("list", loc, "--json", "--key-file", key).stdout)) == 1
    repo("gc", loc, "--key-file", key)
    assert repo("verify", loc, "--key-file", key).returncode == 0
    restored = tmp_path / "restored.raw"
    repo("restore", loc, "vm1", restored, "--key-file", key)
    assert restored.read_bytes() == disk.read_bytes()


def test_daemon_serves_an_encrypted_repository(tmp_path: Path) -> None:
    require("qemu-img")
    loc, key = tmp_path / "repo", tmp_path / "repo.key"
    repo("init", loc, "--chunk-size", str(CS), "--key-file", key)
    disk = _disk(tmp_path / "disk.raw")
    repo("backup", loc, "vm1", disk, "--key-file", key)
    workdir = tmp_path / "ours"
    sock = workdir / "nbd.sock"
    with our_daemon(
        workdir, "--repo", f"r={loc}", "--repo-key-file", f"r={key}", "--nbd-socket", str(sock), "--repo-exports"
    ):
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(disk), nbd_uri(sock, "r:vm1@latest"), cwd="/")
