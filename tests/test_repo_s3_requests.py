"""S3 requests per chunk: what a backup asks of the store, counted at the client (botocore's events).

Each request is latency and, on a real service, money: a chunk this backup uploaded, or one its parent
snapshot names, needs no HEAD at commit — the lease and gc's cutoff protect the first, the parent's
manifest and the lease the second (``FORMAT.md``, "gc on S3"). A chunk found by a HEAD (dedup) is
HEADed again at commit: a gc batch may delete it in the instant between its own HEAD and DELETE.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from repokit import CS, S3Where, rand_chunk, read_snapshot, write_snapshot
from s3kit import MotoServer

from backup.repo import s3store
from backup.repo.errors import SnapshotNotFound
from backup.repo.repository import Repository
from backup.repo.s3store import S3Store
from backup.repo.verify import verify


@pytest.fixture
def s3(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> S3Where:
    monkeypatch.setattr(s3store, "GC_MARGIN", 0.0)
    return S3Where(s3_server.endpoint, s3_server.new_bucket())


@contextmanager
def chunk_requests(repo: Repository) -> Iterator[Counter[str]]:
    """Requests of ``repo``'s client on chunk objects, by operation (HeadObject, PutObject, CopyObject...)."""
    store = repo.store
    assert isinstance(store, S3Store)
    seen: Counter[str] = Counter()

    def count(params: dict[str, Any], event_name: str, **_: Any) -> None:
        if "/chunks/" in str(params.get("Key", "")):
            seen[event_name.rsplit(".", 1)[1]] += 1

    events = store.s3.client.meta.events
    events.register("provide-client-params.s3.*", count)
    try:
        yield seen
    finally:
        events.unregister("provide-client-params.s3.*", count)


def test_full_backup_heads_each_new_chunk_once(s3: S3Where) -> None:
    """The dedup check before the upload, and no second HEAD at commit for a chunk this backup stored."""
    repo = Repository.init(s3.loc(), CS)
    blocks = [rand_chunk() for _ in range(4)]
    with chunk_requests(repo) as seen:
        m = write_snapshot(repo, "d", blocks)
    assert seen == {"HeadObject": 4, "PutObject": 4}
    assert read_snapshot(repo, m) == b"".join(blocks)


def test_incremental_sends_no_request_for_the_parent_chunks(s3: S3Where) -> None:
    """Unchanged chunks named by the parent cost nothing: no HEAD while storing, none at commit."""
    repo = Repository.init(s3.loc(), CS)
    blocks = [rand_chunk() for _ in range(4)]
    write_snapshot(repo, "d", blocks)
    changed = [*blocks[:3], rand_chunk()]
    with chunk_requests(repo) as seen:
        m = write_snapshot(repo, "d", changed, parent="latest")
    assert seen == {"HeadObject": 1, "PutObject": 1}
    assert m.stats["new-bytes"] == CS and m.stats["reused-bytes"] == 3 * CS
    assert read_snapshot(repo, m) == b"".join(changed)


def test_dedup_against_another_disk_is_checked_again_at_commit(s3: S3Where) -> None:
    """A chunk found by a HEAD (another host's) is HEADed at commit: it is not protected until then."""
    repo = Repository.init(s3.loc(), CS)
    blocks = [rand_chunk() for _ in range(2)]
    write_snapshot(repo, "host1", blocks)
    with chunk_requests(repo) as seen:
        m = write_snapshot(repo, "host2", blocks)
    assert seen["PutObject"] == 0 and seen["HeadObject"] == 4
    assert read_snapshot(repo, m) == b"".join(blocks) and verify(repo).ok


def test_parent_pruned_before_its_chunks_were_leased_is_not_used(s3: S3Where, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent's chunks go into the lease, then the parent must still exist: else gc may take them."""
    repo = Repository.init(s3.loc(), CS)
    first = write_snapshot(repo, "d", [rand_chunk()])
    real = repo.resolve

    def resolve_then_prune(disk: str, snap: str = "latest") -> Any:
        m = real(disk, snap)
        repo.store.delete_manifest(disk, first.id)  # a prune between our read and our lease record
        return m

    monkeypatch.setattr(repo, "resolve", resolve_then_prune)
    with repo.begin_write("d") as w, pytest.raises(SnapshotNotFound, match="no longer exists"):
        w.parent("latest")


def test_a_writer_into_s3_runs_a_thread_per_buffer(s3: S3Where, tmp_path: Path) -> None:
    """Requests wait on the network, not a core: as many in flight as the writer has buffers (a directory's
    writer keeps about one thread per core)."""
    from backup.repo.device import SnapshotWriter

    for repo, threads in [
        (Repository.init(s3.loc(), CS), 8),
        (Repository.init(tmp_path / "repo", CS), min(8, (os.cpu_count() or 1) + 2)),
    ]:
        writer = SnapshotWriter(repo, "d", 4 * CS, "none", max_chunks_in_flight=8)
        try:
            assert writer._workers._threads == threads
        finally:
            writer._writer.abort()


def test_a_file_backup_and_a_restore_into_s3_keep_a_request_per_connection_in_flight(
    s3: S3Where, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file backup's and the restore's worker threads follow the store: one per S3 connection (each
    waits on its request), about one per core for a directory."""
    import threading

    from backup.repo import backup_file as backup_file_module
    from backup.repo import restore as restore_module
    from backup.repo.s3client import CONNECTIONS

    source = tmp_path / "disk.raw"
    source.write_bytes(b"".join(rand_chunk() for _ in range(3)))
    real_thread = threading.Thread
    started: list[str] = []

    def spy(*args: Any, **kwargs: Any) -> threading.Thread:
        started.append(str(kwargs.get("name")))
        return real_thread(*args, **kwargs)

    for repo, expected in [
        (Repository.init(s3.loc(), CS), CONNECTIONS),
        (Repository.init(tmp_path / "repo", CS), (os.cpu_count() or 2) + 1),
    ]:
        started.clear()
        monkeypatch.setattr(threading, "Thread", spy)
        fd = os.open(source, os.O_RDONLY)
        try:
            manifest = backup_file_module.backup_file(repo, "d", fd, source.stat().st_size)
        finally:
            os.close(fd)
        assert manifest is not None
        restore_module.restore_file(repo, manifest, tmp_path / "out.raw", force=True)
        monkeypatch.setattr(threading, "Thread", real_thread)
        assert sum(name.startswith("repo-backup-") for name in started) == expected
        assert sum(name.startswith("repo-restore-") for name in started) == expected
        assert (tmp_path / "out.raw").read_bytes() == source.read_bytes()


class _Captured:
    """A botocore ``before-send`` hook: keeps each request's headers and body, and answers a PUT
    itself (200) when ``answer`` is set, so no server is needed."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    def __call__(self, request: Any, **_: Any) -> Any:
        body = request.body
        if hasattr(body, "read"):  # a stream: read it, and leave it where botocore expects it
            start = body.tell()
            data = body.read()
            body.seek(start)
        else:
            data = bytes(body or b"")
        headers = {k.lower(): v.decode() if isinstance(v, bytes) else str(v) for k, v in request.headers.items()}
        self.requests.append((request.url, headers, data))
        if not self.answer:
            return None
        from botocore.awsrequest import AWSResponse

        class Raw:
            def stream(self, **_: Any) -> Iterator[bytes]:
                yield b""

        return AWSResponse(request.url, 200, {"ETag": '"x"'}, Raw())


def _signed_with_body_sha256(headers: dict[str, str], body: bytes) -> bool:
    import hashlib

    return headers.get("x-amz-content-sha256") == hashlib.sha256(body).hexdigest()


def test_a_chunk_put_is_signed_with_its_body_sha256_and_carries_no_md5(s3: S3Where) -> None:
    """A body damaged on the way is refused by the store: its SHA-256 is in the signature (checked by
    S3), so no Content-MD5 is computed on top (MD5 costs twice SHA-256's time per byte)."""
    repo = Repository.init(s3.loc(), CS)
    store = repo.store
    assert isinstance(store, S3Store)
    captured = _Captured(answer=False)
    store.s3.client.meta.events.register("before-send.s3.PutObject", captured)
    write_snapshot(repo, "d", [rand_chunk() for _ in range(2)])
    chunk_puts = [(h, b) for url, h, b in captured.requests if "/chunks/" in url]
    assert len(chunk_puts) == 2
    for headers, body in chunk_puts:
        assert body and _signed_with_body_sha256(headers, body)
        assert "content-md5" not in headers


def test_over_https_a_put_without_md5_is_still_signed_with_its_body_sha256(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over https botocore leaves the payload unsigned when a Content-MD5 is there; without one (our chunk
    PUTs) it signs the body's SHA-256: every chunk PUT carries a checksum the store verifies."""
    from backup.repo.location import S3Location
    from backup.repo.s3client import S3Client

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = S3Client(S3Location("bucket", "repo", "https://s3.invalid", "us-east-1"))
    captured = _Captured(answer=True)
    client.client.meta.events.register("before-send.s3.PutObject", captured)
    body = os.urandom(4096)
    client.put("repo/chunks/ab/x", body, if_absent=True)
    client.put("repo/manifest", body, md5="1B2M2Y8AsgTpgAmY7PhCfg==")  # with MD5: botocore's own rule
    (_, signed, _), (_, with_md5, _) = captured.requests
    assert _signed_with_body_sha256(signed, body) and "content-md5" not in signed
    assert with_md5["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"  # what the MD5 would have replaced


def test_an_incompressible_chunk_from_s3_is_checked_without_zstd(s3: S3Where, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk stored as zstd raw blocks comes back as views of the fetched blob, hashed but never
    decompressed (one copy of the chunk fewer per read); a flipped byte in it is still ChunkCorrupt."""
    from backup.repo import codec
    from backup.repo.errors import ChunkCorrupt

    size = 256 << 10  # big enough to be sampled, and stored raw when no sample compresses
    repo = Repository.init(s3.loc(), size)
    data = rand_chunk(size)
    digest = write_snapshot(repo, "d", [data]).chunks[0]
    assert digest is not None
    name = s3.chunk_name(digest)
    assert codec.raw_frame_parts(s3.get_raw(repo, name), size) is not None  # stored as raw blocks

    def no_zstd() -> Any:
        raise AssertionError("decompressed")

    monkeypatch.setattr(codec, "_decompressor", no_zstd)
    assert b"".join(repo.load_chunk_into(digest, size, bytearray(16))) == data
    flipped = bytearray(s3.get_raw(repo, name))
    flipped[len(flipped) // 2] ^= 1
    s3.put_raw(str(repo.location), name, bytes(flipped))
    with pytest.raises(ChunkCorrupt):
        repo.load_chunk_into(digest, size, bytearray(16))
