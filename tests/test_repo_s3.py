"""The repository in S3 (moto on loopback): locations, many writers in one bucket, faults, dead writers, gc.

The tests of the public API run against S3 too (``where`` in test_repo_*.py); these are about what
only an object store has: other appliances, an unreliable network, leases that expire.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from repokit import CS, S3Where, killed_writer_script, rand_chunk, read_snapshot, write_snapshot
from s3kit import FaultProxy, MotoServer, location

from backup.repo import gc, s3gc, s3store
from backup.repo.errors import DiskBusy, NotARepository, RepoError
from backup.repo.location import S3Location, is_s3, parse_s3
from backup.repo.repository import Repository
from backup.repo.s3store import S3Store
from backup.repo.verify import verify

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def s3(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> S3Where:
    monkeypatch.setattr(s3store, "GC_MARGIN", 0.0)
    return S3Where(s3_server.endpoint, s3_server.new_bucket())


@pytest.fixture
def proxy(s3_server: MotoServer) -> Iterator[FaultProxy]:
    p = FaultProxy(s3_server.port)
    try:
        yield p
    finally:
        p.close()


def _store(repo: Repository) -> S3Store:
    assert isinstance(repo.store, S3Store)
    return repo.store


def test_locations() -> None:
    loc = parse_s3("s3://bkt/a/b?endpoint=http://127.0.0.1:9000&region=eu-west-1")
    assert loc == S3Location("bkt", "a/b", "http://127.0.0.1:9000", "eu-west-1")
    assert loc.key("chunks/ab/x") == "a/b/chunks/ab/x" and parse_s3(loc.url) == loc
    assert parse_s3("s3://bkt") == S3Location("bkt", "") and parse_s3("s3://bkt").key("x") == "x"
    # a location that went through pathlib.Path ("//" collapsed) still parses
    assert parse_s3(Path("s3://bkt/p?endpoint=http://h:1")) == S3Location("bkt", "p", "http://h:1")
    assert is_s3("s3://x") and not is_s3("/srv/repo") and not is_s3("s3-dir/repo")
    for bad in ("s3://B/p", "s3://bkt/p?foo=1", "s3://bkt/p?endpoint=ftp://x", "s3://bkt/a//b", "s3://bkt/p#f"):
        with pytest.raises(RepoError):
            parse_s3(bad)


def test_init_needs_a_bucket_and_an_empty_prefix(s3: S3Where) -> None:
    with pytest.raises(NotARepository, match="no bucket"):
        Repository.init(s3.loc().replace(s3.bucket, "no-such-bucket-here"))
    s3.put_raw(s3.loc("used"), "something", b"x")
    with pytest.raises(RepoError, match="not empty") as e:
        Repository.init(s3.loc("used"))
    assert e.value.errno == errno.EEXIST
    repo = Repository.init(s3.loc("a/b"), CS)
    write_snapshot(repo, "d", [rand_chunk()])
    keys = [o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket)["Contents"]]
    assert {k.split("/")[0] for k in keys} == {"used", "a"}
    assert all(k.startswith("a/b/") for k in keys if k != "used/something")  # every object under PREFIX/
    Repository.init(s3.loc("a/bc"), CS)  # a prefix that merely starts the same is another repository


def test_lock_disk_descriptor_releases_on_close(s3: S3Where) -> None:
    """``Repository.lock_disk`` keeps its contract on S3: closing the descriptor releases the lock."""
    repo = Repository.init(s3.loc(), CS)
    fd = repo.lock_disk("d")
    with pytest.raises(DiskBusy):
        repo.begin_write("d")
    os.close(fd)
    for _ in range(100):  # the heartbeat notices within ttl/5
        try:
            repo.begin_write("d").abort()
            return
        except DiskBusy:
            threading.Event().wait(0.1)
    raise AssertionError("the lock was not released")


_WRITER = """
import random, sys
from concurrent.futures import ThreadPoolExecutor
from backup.repo.repository import Repository
loc, disk, seed, count, cs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
blocks = [rng.randbytes(cs) for _ in range(count)]
repo = Repository.open(loc)
with repo.begin_write(disk) as w, ThreadPoolExecutor(4) as pool:
    digests = [d for d, _ in pool.map(lambda b: repo.store_chunk(b, w.lease), blocks)]
    m = w.commit(count * cs, digests, None, {})
print(m.id, flush=True)
"""


def test_eight_hosts_into_one_bucket(s3: S3Where) -> None:
    """Eight writer processes at once, four backing up the same image: all restore, shared chunks stored once."""
    repo = Repository.init(s3.loc(), CS)
    count = 16
    hosts = [(f"host{i}/os", 1) for i in range(4)] + [(f"host{i}/data", 100 + i) for i in range(4, 8)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, repo.location, disk, str(seed), str(count), str(CS)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for disk, seed in hosts
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    report = verify(repo)
    assert report.ok and report.snapshots == 8
    expected: set[str] = set()
    for disk, seed in hosts:
        rng = random.Random(seed)
        data = b"".join(rng.randbytes(CS) for _ in range(count))
        m = repo.resolve(disk)
        assert read_snapshot(repo, m) == data
        expected |= {c for c in m.chunks if c}
    assert len(expected) == count * 5  # the image, and four hosts' own data
    stored = list(_store(repo).chunks.listing())
    assert sorted(o.key.rsplit("/", 1)[1] for o in stored) == sorted(expected)  # each chunk once
    assert sum(repo.resolve(d).stats["new-bytes"] for d, _ in hosts[4:]) == 4 * count * CS


def _proxied(proxy: FaultProxy, s3: S3Where, name: str = "repo") -> Repository:
    return Repository.open(location(proxy.endpoint, s3.bucket, name))


def test_faults_never_publish_a_hole(s3: S3Where, proxy: FaultProxy) -> None:
    """5xx bursts, throttling, resets mid-upload (before and after the server stored it): retried, clean."""
    direct = Repository.init(s3.loc(), CS)
    base = write_snapshot(direct, "d", [rand_chunk() for _ in range(4)])
    repo = _proxied(proxy, s3)
    f = proxy.faults
    f.errors = [(500, "InternalError")] * 3 + [(503, "SlowDown")] * 3 + [(503, "ServiceUnavailable")]
    f.reset_put_before = 3
    f.reset_put_after = 3  # the chunk is stored, the answer lost: the retry's 412 is "there already"
    blocks = [rand_chunk() for _ in range(12)] + [read_snapshot(direct, base)[:CS]]
    m = write_snapshot(repo, "d", blocks, parent="latest")
    assert f.errors == [] and f.reset_put_before == 0 and f.reset_put_after == 0
    assert read_snapshot(direct, direct.resolve("d")) == b"".join(blocks)
    assert verify(direct).ok
    # a manifest PUT whose answer is lost is retried; the 412 it then gets is its own manifest
    f.reset_put_after, f.reset_put_after_match = 1, "/%40snapshots/"
    e = write_snapshot(repo, "e", blocks[:1])
    assert [s.id for s in direct.snapshots("e")] == [e.id] and f.reset_put_after == 0
    assert write_snapshot(repo, "d", [rand_chunk()], parent="latest").parent == m.id
    assert verify(direct).ok


def test_a_store_that_stays_down_fails_the_backup_and_publishes_nothing(s3: S3Where, proxy: FaultProxy) -> None:
    direct = Repository.init(s3.loc(), CS)
    base = write_snapshot(direct, "d", [rand_chunk()])
    repo = _proxied(proxy, s3)
    client = _store(repo).s3
    client.down_limit = 1.0  # 45 s in production: the command fails well within two minutes
    w = repo.begin_write("d")
    digest, _ = repo.store_chunk(rand_chunk(), w.lease)
    proxy.faults.down = True
    with pytest.raises(RepoError, match="giving up") as e:
        w.commit(CS, [digest], None, {})
    assert e.value.errno == errno.EIO
    refused = proxy.faults.refused
    assert refused > 0
    with pytest.raises(RepoError, match="giving up"):
        repo.store_chunk(rand_chunk(), w.lease)  # given up: fails at once, without a request
    assert proxy.faults.refused == refused
    proxy.faults.down = False
    client.probe = 0.0  # 10 s in production: the next call probes the store, which is back
    w.abort()
    assert [m.id for m in direct.snapshots("d")] == [base.id] and verify(direct).ok
    assert write_snapshot(repo, "d", [rand_chunk()], parent="latest").parent == base.id


_SHORT_LEASES = "from backup.repo import s3store\ns3store.LEASE_TTL = 2.0"


def test_killed_writer_lease_expires_and_gc_reclaims(s3: S3Where) -> None:
    repo = Repository.init(s3.loc(), CS)
    base = write_snapshot(repo, "d", [rand_chunk()])
    store = _store(repo)
    args = [sys.executable, "-c", killed_writer_script(_SHORT_LEASES), repo.location]
    with subprocess.Popen(args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as p:
        try:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
            with pytest.raises(DiskBusy):
                repo.begin_write("d")
            live, _ = store.live_leases(store.s3.now())
            assert len(live) == 1
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
    assert len(list(repo.chunks.list_digests())) == 4
    for _ in range(100):  # its heartbeat is gone: the lease expires after its ttl (2 s)
        if not store.live_leases(store.s3.now())[0]:
            break
        threading.Event().wait(0.1)
    else:
        raise AssertionError("the killed writer's lease never expired")
    s3.tick()
    report = gc.collect_garbage(repo)
    assert report.chunks_deleted == 3 and report.leases_removed == 1
    assert list(repo.chunks.list_digests()) == [base.chunks[0]] and s3.leftovers(repo) == []
    after = write_snapshot(repo, "d", [rand_chunk()], parent="latest")  # its expired lock is taken over
    assert after.parent == base.id and verify(repo).ok


def test_one_gc_at_a_time(s3: S3Where, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Repository.init(s3.loc(), CS)
    inner: list[Exception] = []

    def second_gc(_: list[str]) -> None:
        try:
            gc.collect_garbage(Repository.open(repo.location))
        except RepoError as e:
            inner.append(e)

    monkeypatch.setattr(gc, "_after_mark", second_gc)
    gc.collect_garbage(repo)
    assert len(inner) == 1 and inner[0].errno == errno.EBUSY and "another gc" in str(inner[0])


def test_backup_starting_during_gc_keeps_what_it_dedups(s3: S3Where, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup begins while gc deletes; it dedups against doomed chunks and commits: nothing it needs goes.

    Its commit waits for the delete batch running then (not for the whole gc); later batches read its lease.
    """
    monkeypatch.setattr(s3gc, "BATCH", 2)
    repo = Repository.init(s3.loc(), CS)
    doomed = [rand_chunk() for _ in range(6)]
    with repo.begin_write("old") as w:  # orphans: candidates of the next gc
        for b in doomed:
            repo.store_chunk(b, w.lease)
    s3.tick()
    other = Repository.open(repo.location)
    writers = []
    release = threading.Event()

    def begin_during_delete_phase(names: list[str]) -> None:
        assert len(names) == 6
        w = other.begin_write("new")  # a lease that starts after gc read the leases
        writers.append((w, [other.store_chunk(b, w.lease)[0] for b in doomed[:3]]))
        release.wait(30)

    monkeypatch.setattr(gc, "_after_trash", begin_during_delete_phase)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(gc.collect_garbage(repo)))
    t.start()
    for _ in range(300):
        if writers:
            break
        threading.Event().wait(0.05)
    w, digests = writers[0]
    # its commit waits for the gc in its delete phase to end, then checks its chunks: let gc go on meanwhile
    threading.Timer(0.3, release.set).start()
    m = w.commit(3 * CS, digests, None, {})
    t.join(60)
    report = result[0]
    assert isinstance(report, gc.GcReport)
    assert report.chunks_deleted == 3 and report.chunks_rescued == 3
    assert read_snapshot(repo, m) == b"".join(doomed[:3]) and verify(repo).ok


def test_chunk_deleted_under_a_dedup_fails_the_commit_cleanly(s3: S3Where, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one instant left: a backup copies a chunk between gc's last HEAD and its DELETE — no hole is published."""
    repo = Repository.init(s3.loc(), CS)
    data = rand_chunk()
    with repo.begin_write("old") as w:
        repo.store_chunk(data, w.lease)
    s3.tick()
    other = Repository.open(repo.location)
    writer = other.begin_write("d")
    store = _store(repo)
    real_delete = store.s3.delete
    dedup = []

    def delete_after_a_touch(key: str) -> None:
        if "/chunks/" in key and not dedup:
            dedup.append(other.store_chunk(data, writer.lease))  # found and touched: not new
        real_delete(key)

    monkeypatch.setattr(store.s3, "delete", delete_after_a_touch)
    assert gc.collect_garbage(repo).chunks_deleted == 1
    assert dedup and dedup[0][1] is False
    with pytest.raises(RepoError, match="missing") as e:
        writer.commit(CS, [dedup[0][0]], None, {})
    assert e.value.errno == errno.EIO
    writer.abort()
    assert repo.snapshots("d") == [] and verify(repo).ok
    m = write_snapshot(other, "d", [data])  # the next backup stores it again
    assert read_snapshot(repo, m) == data


def test_no_credentials_is_a_one_line_error_at_once(s3: S3Where, tmp_path: Path) -> None:
    repo = Repository.init(s3.loc(), CS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    code = (
        "import sys\nfrom backup.repo.repository import Repository\n"
        "try:\n    Repository.open(sys.argv[1])\nexcept OSError as e:\n    print(e.errno, e)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, repo.location], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith(f"{errno.EACCES} ") and "credentials" in p.stdout
    assert p.stdout.count("\n") == 1


def test_backups_and_gcs_at_once_publish_no_hole(s3: S3Where) -> None:
    """Writers dedup against orphans while gcs run back to back: every published snapshot restores.

    A commit may fail (the instant between a gc's HEAD and DELETE); it then publishes nothing.
    """
    repo = Repository.init(s3.loc(), CS)
    orphans = [rand_chunk() for _ in range(12)]
    with repo.begin_write("old") as w:
        for b in orphans:
            repo.store_chunk(b, w.lease)
    s3.tick()
    stop = threading.Event()
    reports: list[gc.GcReport] = []
    errors: list[BaseException] = []

    def gcs() -> None:
        g = Repository.open(repo.location)
        while not stop.is_set() and len(reports) < 20:
            try:
                reports.append(gc.collect_garbage(g))
            except RepoError as e:
                if e.errno != errno.EBUSY:
                    errors.append(e)

    published = []

    def writer(i: int) -> None:
        r = Repository.open(repo.location)
        rng = random.Random(i)
        for _ in range(3):
            blocks = [rng.choice(orphans) if rng.random() < 0.7 else rand_chunk() for _ in range(4)]
            try:
                published.append((write_snapshot(r, f"w{i}", blocks, parent="latest"), b"".join(blocks)))
            except RepoError as e:
                if "is missing" not in str(e):
                    errors.append(e)

    threads = [threading.Thread(target=gcs)] + [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join(120)
    stop.set()
    threads[0].join(120)
    assert errors == [] and reports and published
    assert verify(repo).ok
    for m, data in published:
        assert read_snapshot(repo, m) == data


def test_incremental_does_not_copy_the_parent_chunks(s3: S3Where, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unchanged chunks of the parent are kept by its manifest and our lease: a HEAD, never a copy."""
    repo = Repository.init(s3.loc(), CS)
    blocks = [rand_chunk() for _ in range(4)]
    first = write_snapshot(repo, "d", blocks)
    other = write_snapshot(repo, "e", [rand_chunk()])
    s3.tick()
    touched: list[str] = []
    store = _store(repo)
    real = store.s3.touch
    monkeypatch.setattr(store.s3, "touch", lambda key: touched.append(key) or real(key))
    second = write_snapshot(repo, "d", [*blocks[:3], read_snapshot(repo, other)], parent="latest")
    assert second.parent == first.id and second.stats["new-bytes"] == 0
    assert touched == [store.chunks.key(other.chunks[0] or "")]  # only the chunk that is not the parent's
    assert read_snapshot(repo, second) == b"".join(blocks[:3]) + read_snapshot(repo, other)


def test_a_chunk_stored_moments_before_is_deduplicated_without_a_copy(
    s3: S3Where, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second host backing up the same image finds the first host's fresh chunks: a HEAD each, no copy
    onto itself (no gc can take a chunk younger than half its margin before the lease began). A chunk
    older than that is still copied, and with Object Lock every found chunk is."""
    repo = Repository.init(s3.loc(), CS)
    data = rand_chunk()
    write_snapshot(repo, "host1", [data])
    s3.tick()  # LastModified has whole seconds: the chunk is now older than any new lease
    other = Repository.open(repo.location)
    store = _store(other)
    store.gc_margin = 60.0
    touched: list[str] = []
    real = store.s3.touch
    monkeypatch.setattr(store.s3, "touch", lambda key: touched.append(key) or real(key))
    second = write_snapshot(other, "host2", [data])
    assert touched == [] and second.stats["new-bytes"] == 0 and read_snapshot(other, second) == data

    with other.begin_write("host3") as w:
        w.lease.started += 31  # as if this backup began more than half a margin after the upload
        assert other.store_chunk(data, w.lease) == (second.chunks[0], False)
    assert touched == [store.chunks.key(second.chunks[0] or "")]

    touched.clear()
    s3.tick()  # the copy made it young again: let it age past the next lease's start
    store.retention = 3600.0  # Object Lock: the copy also renews the chunk's retention
    monkeypatch.setattr(store.chunks, "_touch", lambda key: touched.append(key) or True)
    with other.begin_write("host4") as w:
        other.store_chunk(data, w.lease)
    assert touched == [store.chunks.key(second.chunks[0] or "")]


def test_gc_does_not_take_a_young_chunk_a_backup_found_without_copying_it(
    s3: S3Where, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the copy guarded against, with a young chunk: gc reads the leases before the backup's
    lease exists, the backup then finds the orphan chunk (no copy), gc goes on deleting — and keeps it,
    since its cutoff lies a whole margin before its own start."""
    monkeypatch.setattr(s3store, "GC_MARGIN", 60.0)
    repo = Repository.init(s3.loc(), CS)
    data = rand_chunk()
    with repo.begin_write("old") as w:  # an orphan: unreferenced, but stored moments ago
        repo.store_chunk(data, w.lease)
    s3.tick()
    other = Repository.open(repo.location)
    found: list[tuple[str | None, bool]] = []
    writers = []

    def backup_after_marking(_: list[str]) -> None:
        w = other.begin_write("new")  # begins after gc read the leases
        writers.append(w)
        found.append(other.store_chunk(data, w.lease))

    monkeypatch.setattr(gc, "_after_mark", backup_after_marking)
    touched: list[str] = []
    monkeypatch.setattr(_store(other).s3, "touch", lambda key: touched.append(key) or True)
    report = gc.collect_garbage(repo)
    assert found and found[0][1] is False and touched == []  # deduplicated, not copied
    assert report.chunks_deleted == 0
    m = writers[0].commit(CS, [found[0][0]], None, {})
    assert read_snapshot(repo, m) == data and verify(repo).ok
