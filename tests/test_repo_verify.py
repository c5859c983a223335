"""verify: every chunk of the selected snapshots read once, bad ones named with every snapshot they break."""

from __future__ import annotations

import json
from pathlib import Path

from repokit import CS, new_repo, rand_chunk, write_snapshot

from backup.repo import verify as verify_mod
from backup.repo.repository import Repository
from backup.repo.verify import verify


def _chunk_file(repo: Repository, digest: str | None) -> Path:
    assert digest
    return repo.path / "chunks" / digest[:2] / digest


def test_clean_repository(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
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


def test_flipped_byte_and_missing_chunk_name_every_broken_snapshot(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    shared, mine, other = rand_chunk(), rand_chunk(), rand_chunk()
    s1 = write_snapshot(repo, "vm1/d0", [shared, mine])
    s2 = write_snapshot(repo, "vm1/d0", [shared, bytes(CS)])
    s3 = write_snapshot(repo, "vm2", [other, shared])
    clean = write_snapshot(repo, "vm3", [other])
    path = _chunk_file(repo, s1.chunks[0])
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(blob)
    _chunk_file(repo, s1.chunks[1]).unlink()
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


def test_a_bad_manifest_is_reported(tmp_path: Path) -> None:
    repo = new_repo(tmp_path)
    m = write_snapshot(repo, "d", [rand_chunk()])
    repo.manifest_path("d", m.id).write_bytes(b"{garbage")
    report = verify(repo)
    assert not report.ok and list(report.bad_manifests) == [m.ref]


def test_runs_in_a_small_thread_pool(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    repo = new_repo(tmp_path)
    write_snapshot(repo, "d", [rand_chunk() for _ in range(12)])
    monkeypatch.setattr(verify_mod, "THREADS", 3)
    report = verify(repo)
    assert report.ok and report.checked_chunks == 12
