"""gc of a repository in S3: no trash (S3 cannot rename), leases that expire, chunk ages, a marker.

1. A marker ``gc/<uuid>.gc`` (live while its heartbeat runs) says a gc runs; one at a time.
2. Read the live leases, *then* the manifests: their digests are marked. The cutoff is the oldest
   live lease's start (or the gc's own start), minus ``gc_margin`` (clock skew between gateways).
3. Candidates: unmarked chunks whose LastModified is older than the cutoff. A backup only ever
   leaves chunks younger than its lease's start: it uploads them, or it copies an older chunk it
   dedups against onto itself (``S3ChunkStore.reuse``), so no candidate is one a live backup stored
   or touched before this gc listed the chunks.
4. Candidates go in batches of ``BATCH``. For each, the marker is rewritten with ``deleting: N`` —
   *before* any delete of that batch — and the leases and manifests are read again (a backup
   publishing meanwhile, a parent or a commit's chunk list a backup recorded).
5. Each candidate of the batch is HEADed once more and deleted only if it is still older than the
   cutoff: a backup that touched it after step 3 keeps it.
6. Dead leases are removed, then the marker.

A commit lists every chunk in its lease, then waits for the delete batches running at that moment to
end, then HEADs every chunk it found by dedup (not those it uploaded: younger than any cutoff; nor
its parent's: the parent's manifest and the lease keep them), then publishes. A batch that began
before that wait is waited for; one that begins after it reads the lease in step 4 and keeps the
chunks. The one case left — a chunk touched in the instant between a gc's HEAD and its DELETE —
makes the commit fail (EIO, nothing published), never a snapshot with a hole.
"""

from __future__ import annotations

import errno
import threading
import uuid
from collections.abc import Callable
from typing import Any

from .errors import RepoError
from .marks import GcReport, manifest_chunks
from .repository import Repository
from .s3client import ObjectInfo
from .s3store import GC_MARKERS, S3Store

Hook = Callable[[list[str]], None]
#: Candidates per delete batch: a commit waits for the batch running when it checks, not for the whole gc.
BATCH = 1000


def _lease_digests(leases: list[dict[str, Any]]) -> set[str]:
    out: set[str] = set()
    for doc in leases:
        digests = doc.get("digests")
        if isinstance(digests, list):
            out.update(d for d in digests if isinstance(d, str))
    return out


def collect_s3(repo: Repository, *, grace_seconds: float, after_mark: Hook, after_delete_began: Hook) -> GcReport:
    store = repo.store
    if not isinstance(store, S3Store):
        raise RepoError("gc of this chunk store is not supported")
    margin = store.gc_margin
    report = GcReport()
    if store.gc_markers(store.s3.now()):
        raise RepoError(f"{store.location}: another gc is running", errno.EBUSY)
    marker = store.take(store.key(f"{GC_MARKERS}{uuid.uuid4().hex}.gc"), {"gc": 1, "deleting": False})
    if marker is None:
        raise RepoError(f"{store.location}: another gc is running", errno.EBUSY)
    try:
        now = store.s3.now()
        leases, dead = store.live_leases(now)
        marked = _lease_digests(leases)
        starts = [float(doc.get("started", doc["mtime"])) for doc in leases]
        cutoff = min([marker.started, *starts]) - margin
        if grace_seconds > 0:
            cutoff = min(cutoff, now - grace_seconds)
        seen: set[tuple[str, str]] = set()
        marked |= manifest_chunks(repo, seen)
        candidates: list[ObjectInfo] = []
        retention = store.retention
        for o in store.chunks.listing():
            report.chunks_before += 1
            if o.key.rsplit("/", 1)[1] in marked or o.mtime >= cutoff:
                continue
            if retention is not None and o.mtime + retention > now:  # retained at least that long: in use
                report.chunks_retained += 1
                continue
            candidates.append(o)
        names = [o.key.rsplit("/", 1)[1] for o in candidates]
        after_mark(names)
        lock = threading.Lock()

        def sweep(o: ObjectInfo, needed: set[str]) -> None:
            name = o.key.rsplit("/", 1)[1]
            if name in needed:
                with lock:
                    report.chunks_rescued += 1
                return
            if not marker.live:
                raise RepoError(f"{store.location}: gc lost its marker (no heartbeat); stopped", errno.EIO)
            info = store.s3.head(o.key)
            if info is None:
                return
            if info.mtime >= cutoff:  # touched by a backup since the listing
                with lock:
                    report.chunks_rescued += 1
                return
            if store.retained_until(info, now) is not None:  # its retention was extended: never deleted early
                with lock:
                    report.chunks_retained += 1
                return
            try:
                store.s3.delete(o.key)
            except RepoError as e:  # a version still retained (its retention not visible to HEAD): later
                if store.retention is None or e.errno != errno.EACCES:
                    raise
                with lock:
                    report.chunks_retained += 1
                return
            with lock:
                report.chunks_deleted += 1
                report.bytes_freed += info.size

        for n, start in enumerate(range(0, len(candidates), BATCH)):
            batch = candidates[start : start + BATCH]
            marker.body["deleting"] = n + 1  # visible before this batch's first HEAD
            marker.rewrite()
            if n == 0:
                after_delete_began(names)
            again, _ = store.live_leases(store.s3.now())
            needed = _lease_digests(again) | manifest_chunks(repo, seen)
            list(store.pool().map(sweep, batch, [needed] * len(batch)))
        marker.body["deleting"] = None
        now = store.s3.now()
        for key in dead:
            if store.read_live(key, now) is None:
                store.s3.delete(key)
                report.leases_removed += 1
    finally:
        marker.release()
    return report
