"""Verification: read and check every chunk that the selected snapshots name, each distinct chunk once."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ChunkCorrupt, ChunkMissing, RepoError, SnapshotNotFound
from .manifest import Manifest
from .repository import Repository

#: Reader threads: hashing and zstd release the GIL, so a few threads use the cores and overlap I/O.
THREADS = min(4, os.cpu_count() or 1)

Progress = Callable[[int, int], None]


@dataclass
class VerifyReport:
    #: digest -> "corrupt" | "missing"
    bad: dict[str, str] = field(default_factory=dict)
    #: digest -> every "disk@id" whose restore it breaks
    broken: dict[str, list[str]] = field(default_factory=dict)
    #: manifests that could not be read: "disk@id" -> reason
    bad_manifests: dict[str, str] = field(default_factory=dict)
    snapshots: int = 0
    checked_chunks: int = 0
    checked_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad and not self.bad_manifests

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "ok": self.ok,
            "snapshots": self.snapshots,
            "checked-chunks": self.checked_chunks,
            "checked-bytes": self.checked_bytes,
            "bad-chunks": [
                {"digest": d, "reason": r, "snapshots": self.broken.get(d, [])} for d, r in sorted(self.bad.items())
            ],
            "bad-manifests": [{"snapshot": s, "reason": r} for s, r in sorted(self.bad_manifests.items())],
        }
        return json.dumps(doc)


def _select(repo: Repository, disk: str | None, snap: str | None, report: VerifyReport) -> list[Manifest]:
    if disk is not None and snap is not None:
        return [repo.resolve(disk, snap)]
    out = []
    for d in [disk] if disk is not None else repo.disks():
        for snap_id in repo.snapshot_ids(d):
            try:
                out.append(repo.load_manifest(d, snap_id))
            except SnapshotNotFound:
                continue  # pruned meanwhile
            except RepoError as e:
                report.bad_manifests[f"{d}@{snap_id}"] = str(e)
    return out


def verify(
    repo: Repository,
    disk: str | None = None,
    snap: str | None = None,
    *,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check every chunk the selected snapshots need; ``progress(done_bytes, total_bytes)`` as it goes."""
    report = VerifyReport()
    manifests = _select(repo, disk, snap, report)
    report.snapshots = len(manifests)
    users: dict[str, list[str]] = {}
    lengths: dict[str, int] = {}
    for m in manifests:
        for i, digest in enumerate(m.chunks):
            if digest is None:
                continue
            refs = users.setdefault(digest, [])
            if not refs or refs[-1] != m.ref:
                refs.append(m.ref)
            lengths.setdefault(digest, m.chunk_length(i))
    total = sum(lengths.values())
    todo = iter(sorted(lengths.items()))
    lock = threading.Lock()
    done = 0

    def worker() -> None:
        nonlocal done
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            digest, length = item
            reason = None
            try:
                repo.check_chunk(digest, length)
            except ChunkCorrupt:
                reason = "corrupt"
            except ChunkMissing:
                reason = "missing"
            with lock:
                report.checked_chunks += 1
                report.checked_bytes += length
                done += length
                if reason is not None:
                    report.bad[digest] = reason
                    report.broken[digest] = sorted(users[digest])
                if progress is not None:
                    progress(done, total)

    threads = [threading.Thread(target=worker, name=f"repo-verify-{i}") for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return report
