"""gc: frees what nothing needs, never what a manifest or a live backup needs, even racing a backup."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest
from repokit import CS, Where, new_repo, rand_chunk, read_snapshot, write_snapshot

from backup.repo import gc
from backup.repo.errors import RepoError
from backup.repo.lease import Lease
from backup.repo.repository import Repository


def _digests(repo: Repository) -> set[str]:
    return set(repo.chunks.list_digests())


def test_frees_orphans_and_keeps_published_chunks(where: Where) -> None:
    repo = new_repo(where)
    a = rand_chunk()
    m = write_snapshot(repo, "d", [a, bytes(CS)])
    with repo.begin_write("d") as w:
        orphan, _ = repo.store_chunk(rand_chunk(), w.lease)
        repo.store_chunk(a, w.lease)
    assert orphan in _digests(repo)
    where.tick()
    report = gc.collect_garbage(repo)
    assert report.chunks_before == 2 and report.chunks_deleted == 1 and report.bytes_freed > 0
    assert _digests(repo) == {m.chunks[0]}
    assert read_snapshot(repo, m) == a + bytes(CS)
    assert gc.collect_garbage(repo).chunks_deleted == 0
    assert where.leftovers(repo) == []


def test_keeps_a_live_lease_and_reclaims_a_dead_one(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    live = repo.begin_write("live")
    kept, _ = repo.store_chunk(rand_chunk(), live.lease)
    dead = repo.begin_write("dead")
    lost, _ = repo.store_chunk(rand_chunk(), dead.lease)
    assert dead.lease._fd is not None
    os.close(dead.lease._fd)  # the holder dies: its flock goes, its lease file stays
    report = gc.collect_garbage(repo)
    assert report.leases_removed == 1 and report.chunks_deleted == 1
    assert _digests(repo) == {kept}
    assert [p.name for p in (repo.path / "leases").iterdir()] == [live.lease.path.name]
    m = live.commit(CS, [kept], None, {})
    assert gc.collect_garbage(repo).chunks_deleted == 0
    assert repo.load_chunk(kept, CS) and m.chunks == [kept] and lost not in _digests(repo)


def test_keeps_the_parent_chunks_a_backup_reads_while_prune_removed_the_parent(where: Where) -> None:
    repo = new_repo(where)
    a = rand_chunk()
    parent = write_snapshot(repo, "d", [a])
    with repo.begin_write("d") as w:
        p = w.parent("latest")
        assert p == parent
        repo.store.delete_manifest("d", parent.id)  # what prune does beside the backup
        where.tick()
        gc.collect_garbage(repo)
        m = w.commit(CS, p.chunks, p.id, {})
    assert read_snapshot(repo, m) == a


def _orphan(repo: Repository, data: bytes, where: Where) -> str:
    """A chunk nothing needs, older than anything that comes after (S3 compares whole seconds)."""
    with repo.begin_write("old") as w:
        digest, new = repo.store_chunk(data, w.lease)
    assert digest and new
    where.tick()
    return digest


def test_backup_reusing_a_chunk_between_mark_and_trash_keeps_it(where: Where, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race of the protocol: a backup records an unmarked chunk and finds it present, then gc trashes it."""
    repo = new_repo(where)
    data = rand_chunk()
    digest = _orphan(repo, data, where)
    writer = repo.begin_write("d")
    seen = []

    def backup_during_gc(candidates: list[str]) -> None:
        assert digest in candidates  # not marked: the backup had not recorded it at mark time
        seen.append(repo.store_chunk(data, writer.lease))  # records, finds it present: dedup

    monkeypatch.setattr(gc, "_after_mark", backup_during_gc)
    report = gc.collect_garbage(repo)
    assert seen == [(digest, False)]
    assert report.chunks_rescued == 1 and report.chunks_deleted == 0
    m = writer.commit(CS, [digest], None, {})
    assert read_snapshot(repo, m) == data


def test_backup_publishing_between_mark_and_trash_keeps_its_chunks(
    where: Where, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backup reuses an orphan, publishes and drops its lease inside gc's window: the manifest rescan keeps it."""
    repo = new_repo(where)
    data = rand_chunk()
    _orphan(repo, data, where)
    published = []
    monkeypatch.setattr(gc, "_after_mark", lambda _: published.append(write_snapshot(repo, "d", [data])))
    report = gc.collect_garbage(repo)
    assert report.chunks_rescued == 1 and report.chunks_deleted == 0
    assert read_snapshot(repo, published[0]) == data


def test_backup_recording_after_trash_writes_the_chunk_again(where: Where, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other order: the chunk is already trashed when the backup records it, so the backup stores it anew.

    (S3 has no trash: the backup finds the chunk, copies it onto itself, and gc's last HEAD spares it.)"""
    repo = new_repo(where)
    data = rand_chunk()
    digest = _orphan(repo, data, where)
    writer = repo.begin_write("d")
    stored = []
    monkeypatch.setattr(gc, "_after_trash", lambda trashed: stored.append(repo.store_chunk(data, writer.lease)))
    report = gc.collect_garbage(repo)
    assert stored == [(digest, where.local)]  # local: it saw the chunk missing and wrote it again
    assert report.chunks_rescued == 1 and report.chunks_deleted == 0
    assert read_snapshot(repo, writer.commit(CS, [digest], None, {})) == data


def test_undoes_the_trash_of_a_gc_that_died(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    data = rand_chunk()
    m = write_snapshot(repo, "d", [data])
    digest = m.chunks[0]
    assert digest
    os.rename(repo.path / "chunks" / digest[:2] / digest, repo.path / "tmp" / f"trash.{digest}")
    gc.collect_garbage(repo)
    assert read_snapshot(repo, m) == data and os.listdir(repo.path / "tmp") == []


def test_removes_temporaries_of_dead_writers_only(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    (repo.path / "tmp" / "chunk.dead.tmp").write_bytes(b"half a chunk")
    busy = repo.path / "tmp" / "chunk.live.tmp"
    fd = os.open(busy, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert gc.collect_garbage(repo).temporaries_removed == 1
        assert os.listdir(repo.path / "tmp") == ["chunk.live.tmp"]
    finally:
        os.close(fd)


def test_grace_period_spares_fresh_chunks(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    digest = _orphan(repo, rand_chunk(), Where())
    assert gc.collect_garbage(repo, grace_seconds=3600).chunks_deleted == 0
    os.utime(repo.path / "chunks" / digest[:2] / digest, (1, 1))
    assert gc.collect_garbage(repo, grace_seconds=3600).chunks_deleted == 1


def test_one_gc_at_a_time(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    fd = os.open(repo.path / "gc.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(RepoError, match="another gc") as e:
            gc.collect_garbage(repo)
        assert e.value.errno == errno.EBUSY
    finally:
        os.close(fd)


def test_a_lease_is_live_while_locked(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    lease = Lease.create(repo.path)
    lease.record("a" * 64)
    lease.record_many(["b" * 64, "a" * 64])
    assert (lease.path.read_text()) == "a" * 64 + "\n" + "b" * 64 + "\n"
    lease.release()
    assert not lease.path.exists() and not lease.live
