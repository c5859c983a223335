"""The repository store: init/open rules, publishing, crash behaviour, writer exclusion, verified reads."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from repokit import CS, Where, killed_writer_script, new_repo, rand_chunk, read_snapshot, write_snapshot

from backup.repo.errors import ChunkCorrupt, ChunkMissing, DiskBusy, NotARepository, RepoError, SnapshotNotFound
from backup.repo.manifest import Manifest
from backup.repo.repository import Repository

ROOT = Path(__file__).resolve().parent.parent


def test_init_creates_format_v1(where: Where) -> None:
    repo = Repository.init(where.loc("r"), 1 << 20)
    config = json.loads(where.get_raw(repo, "nbd-backup-repo.json"))
    assert config["format"] == "nbd-backup-repository" and config["version"] == 1
    assert config["chunk-size"] == 1 << 20 and config["compression"] == "zstd" and config["created"].endswith("Z")
    assert Repository.open(where.loc("r")).chunk_size == repo.chunk_size == 1 << 20
    assert Repository.init(where.loc("empty-missing")).chunk_size == 4 << 20


def test_init_takes_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    Repository.init(tmp_path / "e")


def test_init_refuses(where: Where) -> None:
    where.put_raw(where.loc("full"), "x", b"")
    with pytest.raises(RepoError, match="not empty"):
        Repository.init(where.loc("full"))
    Repository.init(where.loc("r"))
    with pytest.raises(RepoError, match="not empty"):
        Repository.init(where.loc("r"))
    for bad in (3 << 20, 32 << 10, 32 << 20):
        with pytest.raises(RepoError, match="chunk size"):
            Repository.init(where.loc(f"c{bad}"), bad)
        with pytest.raises(NotARepository):
            Repository.open(where.loc(f"c{bad}"))


def test_init_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(RepoError, match="not a directory"):
        Repository.init(tmp_path / "file")
    for bad in (3 << 20, 32 << 10):
        with pytest.raises(RepoError, match="chunk size"):
            Repository.init(tmp_path / f"c{bad}", bad)
        assert not (tmp_path / f"c{bad}").exists()


def test_open_refuses_what_is_not_a_repository(where: Where) -> None:
    loc = where.loc("r")
    with pytest.raises(NotARepository):
        Repository.open(loc)
    where.put_raw(loc, "nbd-backup-repo.json", b'{"format": "other", "version": 1}')
    with pytest.raises(NotARepository):
        Repository.open(loc)
    where.put_raw(loc, "nbd-backup-repo.json", b'{"format": "nbd-backup-repository", "version": 2}')
    with pytest.raises(NotARepository, match="version"):
        Repository.open(loc)


def test_publish_list_resolve(where: Where) -> None:
    repo = new_repo(where)
    a, b = rand_chunk(), rand_chunk(1000)
    first = write_snapshot(repo, "vm1/d0", [a, bytes(CS), b])
    second = write_snapshot(repo, "vm1/d0", [a, a, b], parent="latest")
    write_snapshot(repo, "vm2", [b])
    assert repo.disks() == ["vm1/d0", "vm2"]
    assert [m.id for m in repo.snapshots("vm1/d0")] == [first.id, second.id]
    assert first.id < second.id and second.parent == first.id and first.parent is None
    assert repo.snapshots("vm1") == [] and repo.snapshots("nothing/here") == []
    assert repo.resolve("vm1/d0") == second and repo.resolve("vm1/d0", first.id) == first
    with pytest.raises(SnapshotNotFound):
        repo.resolve("vm3")
    with pytest.raises(SnapshotNotFound):
        repo.resolve("vm2", first.id)
    assert read_snapshot(repo, first) == a + bytes(CS) + b
    assert read_snapshot(repo, second) == a + a + b
    assert first.chunks[1] is None and first.stats["zero-bytes"] == CS
    assert first.stats["new-bytes"] == CS + 1000
    assert second.stats["new-bytes"] == 0 and second.stats["reused-bytes"] == 2 * CS + 1000
    info = second.info()
    assert info == {"disk": "vm1/d0", "id": second.id, "created": second.created, "size": 2 * CS + 1000,
                    "parent": first.id, "new-bytes": 0}  # fmt: skip
    assert Manifest.from_json(second.to_json()) == second
    # dedup: the chunk files on disk are the two distinct non-zero chunks
    assert sorted(repo.chunks.list_digests()) == sorted({c for c in first.chunks if c})
    assert where.leftovers(repo) == []


def test_bad_manifests_are_refused() -> None:
    good = {"version": 1, "disk": "d", "id": "20261207T101112.000000Z", "created": "x", "size": CS + 1,
            "chunk-size": CS, "parent": None, "chunks": [None, "a" * 64], "stats": {}}  # fmt: skip
    Manifest.from_json(json.dumps(good).encode())
    bad_values = [("version", 2), ("disk", "../x"), ("id", "latest"), ("size", -1), ("chunk-size", 1000),
                  ("chunks", [None]), ("chunks", [None, "../../etc"]), ("parent", "x"), ("stats", [])]  # fmt: skip
    for key, value in bad_values:
        with pytest.raises(RepoError, match="bad manifest"):
            Manifest.from_json(json.dumps({**good, key: value}).encode())
    with pytest.raises(RepoError, match="bad manifest"):
        Manifest.from_json(b"{not json")


def test_every_read_verifies_the_digest(where: Where, caplog: pytest.LogCaptureFixture) -> None:
    repo = new_repo(where)
    data = rand_chunk()
    m = write_snapshot(repo, "d", [data])
    digest = m.chunks[0]
    assert digest
    blob = bytearray(where.get_raw(repo, where.chunk_name(digest)))
    blob[len(blob) // 2] ^= 0x40
    where.put_raw(repo.location, where.chunk_name(digest), bytes(blob))
    with caplog.at_level(logging.ERROR, logger="nbd_backup.repo"), pytest.raises(ChunkCorrupt) as e:
        repo.load_chunk(digest, CS)
    assert e.value.errno == 5 and e.value.digest == digest
    assert f"repository: chunk {digest} is corrupt" in caplog.text
    repo.chunks.delete(digest)
    with caplog.at_level(logging.ERROR, logger="nbd_backup.repo"), pytest.raises(ChunkMissing):
        repo.load_chunk(digest, CS)
    assert f"repository: chunk {digest} is missing" in caplog.text


def test_writers_of_one_disk_exclude_each_other(where: Where) -> None:
    repo = new_repo(where)
    w = repo.begin_write("vm1/d0")
    with pytest.raises(DiskBusy) as e:
        Repository.open(repo.location).begin_write("vm1/d0")
    assert e.value.errno == 16 and "\n" not in str(e.value) and "vm1/d0" in str(e.value)
    other = repo.begin_write("vm1/d1")  # another disk is free
    other.abort()
    # another process is refused too
    code = (
        "import sys; from backup.repo.repository import Repository;Repository.open(sys.argv[1]).begin_write('vm1/d0')"
    )
    p = subprocess.run([sys.executable, "-c", code, repo.location], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1 and "DiskBusy" in p.stderr
    w.abort()
    repo.begin_write("vm1/d0").abort()


def test_readers_never_block_on_a_writer(where: Where) -> None:
    repo = new_repo(where)
    m = write_snapshot(repo, "d", [rand_chunk()])
    with repo.begin_write("d") as w:
        assert w.parent("latest") == m
        assert repo.snapshots("d") == [m] and read_snapshot(repo, m)


def test_uncommitted_writes_are_never_listed(where: Where) -> None:
    repo = new_repo(where)
    base = write_snapshot(repo, "d", [rand_chunk()])
    with repo.begin_write("d") as w:
        repo.store_chunk(rand_chunk(), w.lease)
    if where.local:  # leftovers of a crash in the middle of publishing: temporaries of a manifest and a chunk
        (repo.path / "tmp" / "manifest.dead.tmp").write_bytes(base.to_json()[:20])
        (repo.path / "tmp" / "chunk.dead.tmp").write_bytes(b"partial")
    assert [m.id for m in Repository.open(repo.location).snapshots("d")] == [base.id]
    with pytest.raises(RepoError):
        w.commit(CS, [None], None, {})  # a finished writer takes nothing more


def _commit_refuses_a_missing_chunk(repo: Repository, *, dedup: bool) -> None:
    data = rand_chunk()
    if dedup:
        write_snapshot(repo, "other", [data])
    with repo.begin_write("d") as w:
        digest, new = repo.store_chunk(data, w.lease)
        assert digest and new is not dedup
        repo.chunks.delete(digest)
        with pytest.raises(RepoError, match=f"chunk {digest} is missing"):
            w.commit(CS, [digest], None, {})
        with pytest.raises(RepoError, match="chunks do not make"):
            w.commit(2 * CS, [digest], None, {})
    assert repo.snapshots("d") == []


def test_commit_refuses_a_missing_chunk(where: Where) -> None:
    """A chunk it found by dedup, gone behind the writer's back, is never published."""
    _commit_refuses_a_missing_chunk(new_repo(where), dedup=True)


def test_commit_refuses_a_missing_chunk_it_stored(tmp_path: Path) -> None:
    """In a directory also one the writer stored. (An S3 commit trusts the chunks it uploaded itself, which no
    gc deletes while its lease lives: FORMAT.md, tests/test_repo_s3_requests.py.)"""
    _commit_refuses_a_missing_chunk(new_repo(tmp_path), dedup=False)


def test_killed_writer_leaves_no_snapshot_and_frees_the_disk(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    base = write_snapshot(repo, "d", [rand_chunk()])
    args = [sys.executable, "-c", killed_writer_script(), str(repo.path)]
    with subprocess.Popen(args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as p:
        try:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
            with pytest.raises(DiskBusy):
                repo.begin_write("d")
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
    assert [m.id for m in repo.snapshots("d")] == [base.id]
    assert len(list(repo.chunks.list_digests())) == 4
    from backup.repo.gc import collect_garbage

    report = collect_garbage(repo)
    assert report.chunks_deleted == 3 and report.leases_removed == 1
    assert os.listdir(repo.path / "leases") == [] and os.listdir(repo.path / "tmp") == []
    after = write_snapshot(repo, "d", [rand_chunk()], parent="latest")
    assert after.parent == base.id and after.id > base.id


def test_store_chunk_from_threads_counts_exactly_and_compresses_only_new_chunks(
    where: Where, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from backup.repo import repository as repository_mod

    repo = new_repo(where)
    blocks = [rand_chunk() for _ in range(8)]
    compressed = []
    real = repository_mod.compress_chunk
    monkeypatch.setattr(repository_mod, "compress_chunk", lambda d: compressed.append(1) or real(d))
    with repo.begin_write("d") as w, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: repo.store_chunk(b, w.lease), blocks + [bytes(CS)] * 4))
        assert sum(new for _, new in results) == 8 and len(compressed) == 8
        assert w.lease.new_bytes == 8 * CS and w.lease.zero_bytes == 4 * CS
        again = list(pool.map(lambda b: repo.store_chunk(b, w.lease), blocks))
        assert not any(new for _, new in again) and len(compressed) == 8 and w.lease.reused_bytes == 8 * CS
        assert len(w.lease.digests) == 8
        if where.local:
            assert w.lease.path.read_text().count("\n") == 8
