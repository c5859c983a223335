"""verify: every chunk of the selected snapshots read once, bad ones named with every snapshot they break."""

from __future__ import annotations

import json

from repokit import CS, Where, new_repo, rand_chunk, write_snapshot

from backup.repo import verify as verify_mod
from backup.repo.verify import verify


def test_clean_repository(where: Where) -> None:
    repo = new_repo(where)
    a, b = rand_chunk(), rand_chunk(100)
    write_snapshot(repo, "d", [a, bytes(CS), b])
    write_snapshot(repo, "d", [a, a, b])
    write_snapshot(repo, "e", [a])
    done = []
    report = verify(repo, progress=lambda n, total: done.append((n, total)))
    assert report.ok and report.bad == {} and report.snapshots == 3
    assert report.checked_chunks == 2 and report.checked_bytes == CS + 100  # each distinct chunk once
    assert done[-1] == (CS + 100, CS + 100)
    assert json.loads(report.to_json())["ok"] is True
    assert verify(repo, "e").checked_chunks == 1


def test_flipped_byte_and_missing_chunk_name_every_broken_snapshot(where: Where) -> None:
    repo = new_repo(where)
    shared, mine, other = rand_chunk(), rand_chunk(), rand_chunk()
    s1 = write_snapshot(repo, "vm1/d0", [shared, mine])
    s2 = write_snapshot(repo, "vm1/d0", [shared, bytes(CS)])
    s3 = write_snapshot(repo, "vm2", [other, shared])
    clean = write_snapshot(repo, "vm3", [other])
    assert s1.chunks[0] and s1.chunks[1]
    blob = bytearray(where.get_raw(repo, where.chunk_name(s1.chunks[0])))
    blob[-1] ^= 1
    where.put_raw(repo.location, where.chunk_name(s1.chunks[0]), bytes(blob))
    repo.chunks.delete(s1.chunks[1])
    report = verify(repo)
    assert not report.ok
    assert report.bad == {s1.chunks[0]: "corrupt", s1.chunks[1]: "missing"}
    assert report.broken[s1.chunks[0]] == sorted([s1.ref, s2.ref, s3.ref])
    assert report.broken[s1.chunks[1]] == [s1.ref]
    doc = json.loads(report.to_json())
    assert {c["digest"]: c["snapshots"] for c in doc["bad-chunks"]} == report.broken
    assert clean.ref not in json.dumps(doc)
    # a selection checks only what it names
    assert verify(repo, "vm3").ok
    assert set(verify(repo, "vm1/d0", s2.id).bad) == {s1.chunks[0]}


def test_a_bad_manifest_is_reported(where: Where) -> None:
    repo = new_repo(where)
    m = write_snapshot(repo, "d", [rand_chunk()])
    where.put_raw(repo.location, where.manifest_name("d", m.id), b"{garbage")
    report = verify(repo)
    assert not report.ok and list(report.bad_manifests) == [m.ref]


def test_runs_in_a_small_thread_pool(where: Where, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    repo = new_repo(where)
    write_snapshot(repo, "d", [rand_chunk() for _ in range(12)])
    monkeypatch.setattr(verify_mod, "THREADS", 3)
    report = verify(repo)
    assert report.ok and report.checked_chunks == 12
