"""Client-side encryption (design §3.7): AES-256-GCM bodies, keyed chunk ids, a key the repository
refuses to open without — the same in a directory and in a bucket (``where``)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from repokit import CS, Where, read_snapshot, write_snapshot

from backup.repo.crypt import load_key_file
from backup.repo.errors import RepoError
from backup.repo.repository import Repository
from backup.repo.verify import verify

PATTERN = b"PLAINTEXT-OF-THE-DISK-0123456789"


def _disk(seed: int) -> list[bytes]:
    """Four chunks that compress well (a repeated pattern: a store of them in clear would show it)."""
    return [
        (PATTERN + seed.to_bytes(4, "big") + bytes([i])) * (CS // (len(PATTERN) + 5)) + bytes(CS % (len(PATTERN) + 5))
        for i in range(4)
    ]


def _key(tmp_path: Path) -> bytes:
    return load_key_file(tmp_path / "repo.key", create=True)


def test_key_file_is_made_once_private_and_random(tmp_path: Path) -> None:
    path = tmp_path / "k"
    key = load_key_file(path, create=True)
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key_file(path, create=True) == key == load_key_file(path)  # an existing file is kept
    assert load_key_file(tmp_path / "other", create=True) != key
    with pytest.raises(RepoError, match="does not exist"):
        load_key_file(tmp_path / "missing")
    (tmp_path / "bad").write_text("not a key\n")
    with pytest.raises(RepoError, match="256-bit key"):
        load_key_file(tmp_path / "bad")


def test_round_trip_dedup_and_nothing_in_clear(where: Where, tmp_path: Path) -> None:
    key = _key(tmp_path)
    repo = Repository.init(where.loc(), CS, key=key)
    blocks = _disk(1)
    first = write_snapshot(repo, "vm1/disk0", [*blocks, bytes(CS)])
    second = write_snapshot(repo, "vm2/disk0", blocks)  # the same data on another disk: dedup
    assert first.chunks[-1] is None  # zero chunks are still not stored
    assert second.chunks == first.chunks[:4] and second.stats["new-bytes"] == 0
    reopened = Repository.open(where.loc(), key=key)
    assert reopened.encrypted
    assert read_snapshot(reopened, reopened.resolve("vm1/disk0")) == b"".join(blocks) + bytes(CS)
    assert verify(reopened).ok
    objects = where.every_object(repo)
    plain_ids = {hashlib.sha256(b).hexdigest() for b in blocks}
    assert not plain_ids & set(first.chunks)  # names are keyed, not the data's SHA-256
    for name, body in objects.items():
        assert PATTERN not in body, name
        assert not any(d in body.decode("latin-1") or d in name for d in plain_ids), name
    manifests = [b for n, b in objects.items() if n.endswith(".json") and n.startswith("disks/")]
    assert len(manifests) == 2 and all(b"chunks" not in m for m in manifests)  # manifests are encrypted too
    config = json.loads(objects["nbd-backup-repo.json"])
    assert config["encryption"]["cipher"] == "AES-256-GCM" and key.hex() not in json.dumps(config)


def test_wrong_or_missing_key_is_a_clear_error(where: Where, tmp_path: Path) -> None:
    key = _key(tmp_path)
    Repository.init(where.loc(), CS, key=key)
    with pytest.raises(RepoError, match="is encrypted: its key is needed"):
        Repository.open(where.loc())
    with pytest.raises(RepoError, match="wrong key"):
        Repository.open(where.loc(), key=os.urandom(32))
    Repository.init(where.loc("plain"), CS)
    with pytest.raises(RepoError, match="is not encrypted"):
        Repository.open(where.loc("plain"), key=key)


def test_a_flipped_byte_of_an_encrypted_chunk_is_named_by_verify(where: Where, tmp_path: Path) -> None:
    key = _key(tmp_path)
    repo = Repository.init(where.loc(), CS, key=key)
    m = write_snapshot(repo, "vm1", _disk(2))
    bad = m.chunks[1]
    assert bad is not None
    name = where.chunk_name(bad)
    blob = bytearray(where.get_raw(repo, name))
    blob[len(blob) // 2] ^= 1
    where.put_raw(repo.location, name, bytes(blob))
    report = verify(Repository.open(where.loc(), key=key))
    assert report.bad == {bad: "corrupt"} and report.broken[bad] == [m.ref]
    # a manifest moved under another snapshot's name does not decrypt (its name is authenticated)
    other = write_snapshot(repo, "vm1", _disk(3))
    where.put_raw(
        repo.location, where.manifest_name("vm1", other.id), where.get_raw(repo, where.manifest_name("vm1", m.id))
    )
    with pytest.raises(RepoError, match="authentication failed"):
        repo.load_manifest("vm1", other.id)


def test_the_daemon_opens_an_encrypted_repository_with_its_key_file(tmp_path: Path) -> None:
    """``serve --repo [ID=]DIR --repo-key-file [ID=]FILE`` (and the config file's ``repo-key-file``)."""
    from server.config import load_config
    from server.errors import ConfigError
    from server.paths import PathPolicy
    from server.repos import open_repos, parse_repo

    key_file = tmp_path / "k"
    Repository.init(tmp_path / "r", CS, key=load_key_file(key_file, create=True))
    specs = [parse_repo(f"main={tmp_path / 'r'}")]
    repos = open_repos(specs, PathPolicy(), [parse_repo(f"main={key_file}")])
    assert repos["main"].encrypted
    with pytest.raises(ConfigError, match=r"^--repo \S+: \S+ is encrypted: its key is needed"):
        open_repos(specs, PathPolicy())
    with pytest.raises(ConfigError, match="no --repo with id 'default'"):
        open_repos(specs, PathPolicy(), [parse_repo(str(key_file))])
    (tmp_path / "wrong").write_text(os.urandom(32).hex())
    with pytest.raises(ConfigError, match="wrong key"):
        open_repos(specs, PathPolicy(), [parse_repo(f"main={tmp_path / 'wrong'}")])
    (tmp_path / "serve.toml").write_text('repo = ["main=r"]\nrepo-key-file = ["main=k"]\n')
    assert load_config(tmp_path / "serve.toml")["repo_key_file"] == [f"main={key_file}"]
