"""Object Lock (design §3.7): ``init --object-lock-days N`` in a bucket with Object Lock; every chunk and
manifest carries the retention; prune of a retained snapshot fails naming it, after retention it goes;
gc never tries to delete a retained chunk. Retention is shortened through the documented test knob
(``objectlock.DAY_ENV``: the seconds of one "day", read by init only)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
from repokit import CS, S3Where, rand_chunk, read_snapshot, write_snapshot
from s3kit import MotoServer

from backup.repo import objectlock, s3store
from backup.repo.errors import RepoError
from backup.repo.gc import collect_garbage
from backup.repo.prune import PruneRules, prune
from backup.repo.repository import Repository

DAY = 3.0  # seconds one "day" of retention lasts in these tests


@pytest.fixture
def locked(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> S3Where:
    """A bucket created with Object Lock."""
    monkeypatch.setattr(s3store, "GC_MARGIN", 0.0)
    monkeypatch.setenv(objectlock.DAY_ENV, str(DAY))
    name = f"l-{uuid.uuid4().hex[:20]}"
    s3_server.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return S3Where(s3_server.endpoint, name)


def _until(predicate: Callable[[], bool], what: str) -> None:
    """Poll (bounded) for the retention to run out on the server's clock."""
    for _ in range(100):
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(what)


def test_every_object_is_retained_and_prune_waits_for_the_retention(locked: S3Where) -> None:
    repo = Repository.init(locked.loc(), CS, object_lock_days=1)
    config = Repository.open(locked.loc())
    assert config.store.retention == DAY  # type: ignore[attr-defined]
    old = write_snapshot(repo, "vm1", [rand_chunk(), rand_chunk()])
    new = write_snapshot(repo, "vm1", [rand_chunk()])
    for name in [locked.manifest_name("vm1", old.id), *(locked.chunk_name(c) for c in old.chunks if c)]:
        head = locked.client.head_object(Bucket=locked.bucket, Key=locked._key(repo.location, name))
        assert head["ObjectLockMode"] == "COMPLIANCE" and head["ObjectLockRetainUntilDate"], name
    with pytest.raises(RepoError, match=rf"cannot prune: snapshot vm1@{old.id} is under Object Lock retention until "):
        prune(repo, "vm1", PruneRules(keep_last=1))
    assert repo.snapshot_ids("vm1") == [old.id, new.id]
    report = collect_garbage(repo)  # nothing unreferenced yet
    assert report.chunks_deleted == 0

    def pruned() -> bool:
        try:
            prune(repo, "vm1", PruneRules(keep_last=1))
        except RepoError:
            return False
        return True

    _until(pruned, "the retention never ended")
    assert repo.snapshot_ids("vm1") == [new.id]
    # the manifest is gone for good: no version, no delete marker left behind
    key = locked._key(repo.location, locked.manifest_name("vm1", old.id))
    versions = locked.client.list_object_versions(Bucket=locked.bucket, Prefix=key)
    assert not versions.get("Versions") and not versions.get("DeleteMarkers")
    freed: list[int] = []  # the chunks' retention may end a moment after their manifest's (extended at commit)
    _until(lambda: freed.append(collect_garbage(repo).chunks_deleted) or sum(freed) == 2, "chunks never freed")
    assert read_snapshot(repo, repo.resolve("vm1")) == read_snapshot(repo, new)


def test_gc_keeps_unreferenced_chunks_while_retained(locked: S3Where) -> None:
    repo = Repository.init(locked.loc(), CS, object_lock_days=1)
    with repo.begin_write("vm1") as w:  # an aborted backup leaves a retained orphan chunk
        digest, _ = repo.store_chunk(rand_chunk(), w.lease)
    locked.tick()
    report = collect_garbage(repo)
    assert report.chunks_deleted == 0 and report.chunks_retained == 1
    _until(lambda: collect_garbage(repo).chunks_deleted == 1, "the orphan was never freed")
    assert not repo.chunks.exists(str(digest))


def test_a_reused_parent_chunk_is_retained_as_long_as_the_new_snapshot(locked: S3Where) -> None:
    repo = Repository.init(locked.loc(), CS, object_lock_days=1)
    first = write_snapshot(repo, "vm1", [rand_chunk()])
    locked.tick()
    second = write_snapshot(repo, "vm1", [read_snapshot(repo, first)], parent="latest")
    chunk, manifest = (
        locked.client.head_object(Bucket=locked.bucket, Key=locked._key(repo.location, n))["ObjectLockRetainUntilDate"]
        for n in (locked.chunk_name(str(first.chunks[0])), locked.manifest_name("vm1", second.id))
    )
    assert chunk >= manifest.replace(microsecond=0)
    locked.tick()
    # another disk deduplicating against the old chunk copies it onto itself: the copy is retained anew
    third = write_snapshot(repo, "vm2", [read_snapshot(repo, first)])
    chunk, manifest = (
        locked.client.head_object(Bucket=locked.bucket, Key=locked._key(repo.location, n))["ObjectLockRetainUntilDate"]
        for n in (locked.chunk_name(str(first.chunks[0])), locked.manifest_name("vm2", third.id))
    )
    assert third.stats["new-bytes"] == 0 and chunk >= manifest.replace(microsecond=0)


def test_init_refuses_a_bucket_without_object_lock_and_a_directory(s3_server: MotoServer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    plain = S3Where(s3_server.endpoint, s3_server.new_bucket())
    with pytest.raises(RepoError, match=r"^cannot init repository: bucket \S+ does not have Object Lock enabled"):
        Repository.init(plain.loc(), CS, object_lock_days=1)
    with pytest.raises(RepoError, match="Object Lock needs a repository in S3"):
        Repository.init(tmp_path / "repo", CS, object_lock_days=1)
    assert not (tmp_path / "repo").exists()
    with pytest.raises(RepoError, match="positive number of days"):
        Repository.init(plain.loc(), CS, object_lock_days=0)


def test_gc_takes_a_refused_delete_for_retention(locked: S3Where, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should gc misjudge a chunk's retention (a HEAD that does not show it), S3's refusal keeps it: gc
    counts it retained and goes on instead of failing."""
    repo = Repository.init(locked.loc(), CS, object_lock_days=1)
    with repo.begin_write("vm1") as w:
        digest, _ = repo.store_chunk(rand_chunk(), w.lease)
    locked.tick()
    store = repo.store
    assert isinstance(store, s3store.S3Store)
    store.retention = 1e-3  # judged by age, it would be free
    monkeypatch.setattr(s3store.S3Store, "retained_until", lambda self, info, now: None)
    report = collect_garbage(repo)
    assert report.chunks_deleted == 0 and report.chunks_retained == 1
    assert repo.chunks.exists(str(digest))
