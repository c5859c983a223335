"""The repository in an S3 bucket (design §3.7, ``FORMAT.md`` "Object storage").

Same names as the directory format, as object keys under ``PREFIX/``. There is no rename and no
kernel lock in S3, so: objects are written once with ``If-None-Match: *`` (chunks: 412 = another
appliance stored the same bytes; manifests: published exactly once, last); locks and leases are
objects that a heartbeat thread rewrites while their holder lives, judged dead by the server's clock
once their ``LastModified`` is older than their ``ttl``; gc (``s3gc``) relies on leases, chunk ages
and its own marker object instead of a trash.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .errors import ChunkMissing, DiskBusy, NotARepository, RepoError, Retained, SnapshotNotFound
from .lease import Lease
from .location import S3Location
from .names import validate_digest, validate_disk, validate_snapshot_id
from .s3client import CONNECTIONS, ObjectInfo, S3Client, server_time
from .store import CONFIG, LOCK, SNAPSHOTS

log = logging.getLogger("nbd_backup.repo")

#: Seconds without a heartbeat after which a lease, lock or gc marker is dead (read with the server's clock).
LEASE_TTL = 120.0
#: Seconds subtracted from gc's cutoff: chunks that young are never deleted (clock skew between S3 gateways).
GC_MARGIN = 60.0
#: Chunk PUTs in flight per repository: with 4 MiB chunks at most ~32 MiB of request bodies.
PUTS_IN_FLIGHT = 8
#: How long a commit waits for a gc in its delete phase to finish before it gives up (≥ LEASE_TTL).
GC_WAIT = 300.0
LEASES = "leases/"
GC_MARKERS = "gc/"


def _now_mono() -> float:
    return time.monotonic()


class LiveObject:
    """An object a heartbeat thread rewrites every ``ttl/5`` s while its holder lives.

    Others take it for dead once ``LastModified + ttl`` is past on the server's clock. The holder
    counts itself *lost* (for good) as soon as ``0.75 ttl`` went by without a successful rewrite: from
    then on somebody may have judged it dead, so it must not act on it any more.
    """

    def __init__(
        self,
        s3: S3Client,
        key: str,
        ttl: float,
        body: dict[str, Any],
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.s3 = s3
        self._extra = extra
        self.key = key
        self.ttl = ttl
        self.body = {**body, "ttl": ttl, "owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self.started = 0.0
        self._last_ok = 0.0
        self._lost = False
        self._released = False
        self._stop = threading.Event()
        self._put_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._watch: tuple[int, int] | None = None  # a pipe: the holder closing its end releases us

    def _encode(self) -> bytes:
        body = {**self.body, **self._extra()} if self._extra is not None else self.body
        return json.dumps(body, separators=(",", ":")).encode()

    def create(self, *, exclusive: bool) -> bool:
        """Write it (``exclusive``: only if absent — False if somebody holds it) and start the heartbeat."""
        t0 = _now_mono()
        data = self._encode()
        r = self.s3.put(self.key, data, if_absent=exclusive)
        if r is not None:
            self.started = server_time(r)
        else:  # somebody holds it — or our PUT landed and its answer was lost, and a retry got the 412
            info = self.s3.head(self.key)
            if info is None or self.s3.get(self.key) != data:
                return False
            self.started = info.mtime
        self.body["started"] = self.started
        self._last_ok = t0
        self._thread = threading.Thread(target=self._beat, name=f"s3-heartbeat-{self.key[-12:]}", daemon=True)
        self._thread.start()
        return True

    def rewrite(self) -> None:
        """Write the body now (and count it as a heartbeat); an error if the object is lost."""
        with self._put_lock:
            if self._released:
                raise RepoError(f"{self.key} is released", errno.EIO)
            t0 = _now_mono()
            self.s3.put(self.key, self._encode())
            self._succeeded(t0)

    def _succeeded(self, t0: float) -> None:
        if _now_mono() - self._last_ok > 0.75 * self.ttl:
            self._lost = True
        elif not self._lost:
            self._last_ok = max(self._last_ok, t0)

    @property
    def live(self) -> bool:
        return not (self._lost or self._released) and _now_mono() - self._last_ok < 0.75 * self.ttl

    def _beat(self) -> None:
        next_beat = _now_mono() + self.ttl / 5
        while not self._stop.wait(min(0.5, self.ttl / 5)):  # short steps: notice a closed descriptor soon
            if self._watch is not None and _peer_closed(self._watch[1]):
                self.release()
                return
            if _now_mono() < next_beat:
                continue
            next_beat = _now_mono() + self.ttl / 5
            try:
                self.rewrite()
            except (RepoError, OSError) as e:
                if self._released:
                    return
                log.warning("repository: heartbeat of %s failed: %s", self.key, e)
            if self._lost:
                log.error("repository: %s lost (no heartbeat for %.0fs)", self.key, 0.75 * self.ttl)
                return

    def fileno(self) -> int:
        """A descriptor whose close releases the object (within a heartbeat)."""
        if self._watch is None:
            self._watch = os.pipe()
        return self._watch[0]

    def release(self) -> None:
        with self._put_lock:
            if self._released:
                return
            self._released = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._watch is not None:
            os.close(self._watch[1])
        try:
            self.s3.delete(self.key)
        except (RepoError, OSError) as e:  # it expires by itself
            log.warning("repository: could not remove %s: %s", self.key, e)


def _peer_closed(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLERR)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))


class S3Lease(Lease):
    """A backup's lease as an object ``leases/<uuid>.lease``: its start time and the digests it records.

    ``record`` (a chunk being stored) only remembers the digest — the chunk is protected by its age
    (see ``s3gc``) — and the heartbeat writes it out; ``record_many`` (a parent's chunks, a commit's
    list) writes the object before it returns, so every gc that reads leases later sees them.
    """

    def __init__(self, store: S3Store) -> None:
        key = store.key(f"{LEASES}{uuid.uuid4().hex}.lease")
        super().__init__(-1, Path(key))
        self._store = store
        self._fd = None
        self._obj = LiveObject(store.s3, key, store.lease_ttl, {"lease": 1}, self._digest_list)
        if not self._obj.create(exclusive=True):
            raise RepoError(f"lease {key} exists already", errno.EEXIST)
        self.started = self._obj.started
        #: Digests the lease object listed when a ``record_many`` returned (every gc reading it after keeps them).
        self.written: frozenset[str] = frozenset()

    def _digest_list(self) -> dict[str, Any]:
        with self._lock:
            return {"digests": sorted(self.digests)}

    @property
    def live(self) -> bool:
        return self._obj.live

    def check_live(self) -> None:
        if not self._obj.live:
            raise RepoError(f"{self._obj.key}: lease lost (no heartbeat); nothing published", errno.EIO)

    def record(self, digest: str) -> None:
        with self._lock:
            self.digests.add(digest)

    def record_many(self, digests: Iterable[str]) -> None:
        with self._lock:
            new = [d for d in dict.fromkeys(digests) if d not in self.digests]
            if not new:
                return
            self.digests.update(new)
            listed = frozenset(self.digests)
        self._obj.rewrite()
        self.written = listed

    def release(self) -> None:
        self._store.forget_lease(self)
        self._obj.release()


class S3ChunkStore:
    """Chunks as objects ``chunks/ab/<digest>``, written once; at most PUTS_IN_FLIGHT uploads at a time."""

    def __init__(self, store: S3Store) -> None:
        self.s3 = store.s3
        self.store = store
        self._puts = threading.BoundedSemaphore(PUTS_IN_FLIGHT)

    def key(self, digest: str) -> str:
        validate_digest(digest)
        return self.store.key(f"chunks/{digest[:2]}/{digest}")

    def exists(self, digest: str) -> bool:
        return self.s3.head(self.key(digest)) is not None

    def put(self, digest: str, blob: bytes) -> bool:
        """Upload unless another writer did (412). A body damaged on the way is never stored: the
        request carries the body's SHA-256 in its signature (``x-amz-content-sha256``, which the store
        checks), over http and https alike — no Content-MD5 (MD5 runs at half SHA-256's speed, and over
        http botocore computes the SHA-256 anyway), except on a PUT with Object Lock retention, where
        S3 requires it (``S3Client.put``).

        A chunk this PUT created is younger than every lease of this store that began before it: each
        of them knows it is there (``Lease.known``: its commit need not HEAD it, see ``missing_chunks``).
        """
        leases = self.store.leases()
        with self._puts:
            stored = (
                self.s3.put(
                    self.key(digest),
                    blob,
                    if_absent=True,
                    retain_until=self.store.retain_until(),
                )
                is not None
            )
        if stored:
            for lease in leases:
                lease.add_known((digest,))
        return stored

    def get(self, digest: str) -> bytes:
        blob = self.s3.get(self.key(digest))
        if blob is None:
            raise ChunkMissing(digest)
        return blob

    def delete(self, digest: str) -> None:
        self.s3.delete(self.key(digest))

    def list_digests(self) -> Iterator[str]:
        for o in self.listing():
            yield o.key.rsplit("/", 1)[1]

    def listing(self) -> Iterator[ObjectInfo]:
        """Every chunk object with its size and LastModified."""
        for o in self.s3.objects(self.store.key("chunks/")):
            name = o.key.rsplit("/", 1)[1]
            if len(name) == 64 and o.key.endswith(f"/{name[:2]}/{name}"):
                yield o

    def touch(self, digest: str) -> None:
        self._touch(self.key(digest))

    def _touch(self, key: str) -> bool:
        """Renew LastModified (a copy onto itself) — and under Object Lock the retention of the copy."""
        if not self.s3.touch(key):
            return False
        until = self.store.retain_until()
        if until is not None:
            self.s3.retain(key, until)
        return True

    def reuse(self, digest: str, lease: Lease) -> bool:
        """HEAD; a chunk that is not young is copied onto itself (young again, see ``s3gc``).

        Not a chunk the lease object lists already (a parent's): the parent's manifest and that list
        keep it. Not a chunk stored less than half gc's margin before the lease began (another host's
        upload of the same data moments ago, the common case of many hosts backing up one image):
        every gc's cutoff lies a whole margin before the start of a lease it saw, or before its own
        start if it began earlier, so no gc can take it — half the margin still absorbs clock skew
        (``FORMAT.md``, "gc on S3"). With Object Lock every found chunk is copied, which also renews
        its retention. False if it is missing — also when gc removed it between the HEAD and the copy.
        """
        if digest in lease.known:  # uploaded by this backup, or its parent's: no request
            return True
        info = self.s3.head(self.key(digest))
        if info is None:
            return False
        copy_if_older_than = lease.started
        if self.store.retention is None:
            copy_if_older_than -= self.store.gc_margin / 2
        if info.mtime < copy_if_older_than and not (isinstance(lease, S3Lease) and digest in lease.written):
            return self._touch(info.key)
        return True


class S3Store:
    """A repository under ``s3://BUCKET/PREFIX``."""

    latency_bound = True
    worker_threads = CONNECTIONS  # each waits on its request: one per connection of the pool

    def __init__(self, loc: S3Location) -> None:
        self.loc = loc
        self.location = loc.url
        self.s3 = S3Client(loc)
        #: Leases, locks and gc markers written by this store declare this ttl.
        self.lease_ttl = LEASE_TTL
        self.gc_margin = GC_MARGIN
        self.gc_wait = GC_WAIT
        #: Object Lock retention (seconds) of every chunk and manifest written; None: no Object Lock.
        self.retention: float | None = None
        self.chunks: S3ChunkStore = S3ChunkStore(self)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._leases: weakref.WeakSet[S3Lease] = weakref.WeakSet()  # created here and not released

    def key(self, name: str) -> str:
        return self.loc.key(name)

    def pool(self) -> ThreadPoolExecutor:
        """Threads for bulk requests (HEAD every chunk of a commit, gc's deletes): one per connection."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(CONNECTIONS, thread_name_prefix="repo-s3")
            return self._pool

    # -- Object Lock (``objectlock``)

    def set_retention(self, seconds: float | None) -> None:
        """Every chunk and manifest written from now on carries ``seconds`` of Object Lock retention."""
        self.retention = seconds
        self.s3.versioned = seconds is not None

    def retain_until(self) -> float | None:
        """The retain-until date (epoch seconds) of an object written now; None without Object Lock."""
        return None if self.retention is None else time.time() + self.retention

    def retained_until(self, info: ObjectInfo, now: float) -> float | None:
        """When the object's retention ends if it is still under retention at ``now`` (server time), else None."""
        if self.retention is None:
            return None
        until = info.retain_until
        return until if until is not None and until > now else None

    # -- config

    def init_layout(self) -> None:
        self.s3.now()  # the bucket must exist: NotARepository otherwise
        root = self.key("")
        if next(self.s3.objects(root), None) is not None:
            raise RepoError(f"cannot init repository: {self.location} is not empty", errno.EEXIST)

    def write_config(self, data: bytes) -> None:
        if self.s3.put(self.key(CONFIG), data, if_absent=True) is None:
            raise RepoError(f"cannot init repository: {self.location} is not empty", errno.EEXIST)

    def read_config(self) -> bytes:
        data = self.s3.get(self.key(CONFIG))
        if data is None:
            raise NotARepository(f"{self.location} is not a repository (no {CONFIG})")
        return data

    # -- manifests

    def _snaps(self, disk: str) -> str:
        return self.key(f"disks/{validate_disk(disk)}/{SNAPSHOTS}/")

    def disks(self) -> list[str]:
        root = self.key("disks/")
        found = set()
        for o in self.s3.objects(root):
            disk, sep, _ = o.key[len(root) :].rpartition(f"/{SNAPSHOTS}/")
            if sep:
                with contextlib.suppress(RepoError):
                    found.add(validate_disk(disk))
        return sorted(found)

    def snapshot_names(self, disk: str) -> list[str]:
        prefix = self._snaps(disk)
        return [o.key[len(prefix) :] for o in self.s3.list(prefix, "/") if isinstance(o, ObjectInfo)]

    def get_manifest(self, disk: str, snap_id: str) -> bytes:
        data = self.s3.get(self._snaps(disk) + f"{validate_snapshot_id(snap_id)}.json")
        if data is None:
            raise SnapshotNotFound(f"snapshot {disk}@{snap_id} not found")
        return data

    def put_manifest(self, disk: str, snap_id: str, data: bytes) -> None:
        """Published once: a 412 is fine only if it is our own PUT that a retry repeated."""
        key = self._snaps(disk) + f"{validate_snapshot_id(snap_id)}.json"
        if (
            self.s3.put(key, data, if_absent=True, retain_until=self.retain_until()) is None
            and self.s3.get(key) != data
        ):
            raise RepoError(f"cannot commit {disk}: snapshot {snap_id} exists already", errno.EEXIST)

    def delete_manifest(self, disk: str, snap_id: str) -> None:
        """Remove the manifest — refused (``Retained``) while Object Lock retains it."""
        key = self._snaps(disk) + f"{validate_snapshot_id(snap_id)}.json"
        if self.retention is not None:
            info = self.s3.head(key)
            until = self.retained_until(info, self.s3.now()) if info is not None else None
            if until is not None:
                raise Retained(f"{disk}@{snap_id}", until)
        self.s3.delete(key)

    # -- locks, leases, gc markers

    def read_live(self, key: str, now: float) -> dict[str, Any] | None:
        """The body of a live lease/lock/marker; None if absent or expired (its holder is dead)."""
        info = self.s3.head(key)
        body = self.s3.get(key) if info is not None else None
        if info is None or body is None:
            return None
        try:
            doc = json.loads(body)
            ttl = float(doc["ttl"])
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(doc, dict) or info.mtime + ttl < now:
            return None
        doc["mtime"] = info.mtime
        return doc

    def take(self, key: str, body: dict[str, Any]) -> LiveObject | None:
        """Create an exclusive live object; an expired one is taken over; None if a live one exists."""
        for _ in range(2):
            obj = LiveObject(self.s3, key, self.lease_ttl, body)
            if obj.create(exclusive=True):
                return obj
            if self.read_live(key, self.s3.now()) is not None:
                return None
            self.s3.delete(key)  # its holder died
        return None

    def lock(self, disk: str) -> LiveObject:
        obj = self.take(self.key(f"disks/{validate_disk(disk)}/{LOCK}"), {"lock": disk})
        if obj is None:
            raise DiskBusy(f"disk {disk} is busy: another backup or prune is writing it")
        return obj

    def create_lease(self) -> Lease:
        lease = S3Lease(self)
        with self._pool_lock:
            self._leases.add(lease)
        return lease

    def leases(self) -> list[S3Lease]:
        """The leases of this store that exist now and are not released."""
        with self._pool_lock:
            return list(self._leases)

    def forget_lease(self, lease: S3Lease) -> None:
        with self._pool_lock:
            self._leases.discard(lease)

    def live_leases(self, now: float) -> tuple[list[dict[str, Any]], list[str]]:
        """(bodies of live leases, keys of dead ones)."""
        live, dead = [], []
        for o in self.s3.objects(self.key(LEASES)):
            doc = self.read_live(o.key, now)
            if doc is None:
                dead.append(o.key)
            else:
                live.append(doc)
        return live, dead

    def gc_markers(self, now: float) -> list[dict[str, Any]]:
        """Bodies of the live gc markers (running gcs)."""
        out = []
        for o in self.s3.objects(self.key(GC_MARKERS)):
            doc = self.read_live(o.key, now)
            if doc is not None:
                out.append(doc)
        return out

    def wait_for_gc(self, *, deleting_only: bool = False) -> None:
        """Until no gc runs — or, ``deleting_only``, until each delete batch running now has ended.

        Bounded by ``gc_wait`` (EBUSY after it): a gc's marker expires with its heartbeat.
        """
        deadline = _now_mono() + self.gc_wait
        delay = 0.05
        waiting: dict[str, object] | None = None
        while True:
            markers = self.gc_markers(self.s3.now())
            now = {str(m.get("owner")): m.get("deleting") for m in markers if m.get("deleting") or not deleting_only}
            if waiting is None:
                waiting = now
            if not any(owner in now and now[owner] == batch for owner, batch in waiting.items()):
                return
            if _now_mono() > deadline:
                raise RepoError(f"{self.location}: a gc is still running after {self.gc_wait:.0f}s", errno.EBUSY)
            time.sleep(delay)
            delay = min(1.0, delay * 2)

    def missing_chunks(self, digests: set[str], lease: Lease) -> list[str]:
        """After the lease lists them: wait out the gc delete batches running now, then HEAD each (in parallel).

        A delete batch that began before this point may have judged a chunk by a HEAD older than our
        touch; one that begins later reads our lease first (``s3gc``). Not HEADed (``Lease.known``):
        chunks this backup uploaded (created after its lease began, so younger than any gc's cutoff)
        and its parent's (its manifest and our lease keep them) — except under Object Lock, where the
        HEADs say whose retention to extend.
        """
        if self.retention is None:
            digests = digests - lease.known
            if not digests:
                return []
        self.wait_for_gc(deleting_only=True)
        ordered = sorted(digests)
        infos = list(self.pool().map(lambda d: self.s3.head(self.chunks.key(d)), ordered))
        missing = [d for d, info in zip(ordered, infos, strict=True) if info is None]
        until = self.retain_until()
        if until is not None and not missing:
            # a snapshot under retention needs its chunks retained as long (a parent's may end sooner)
            short = [i.key for i in infos if i is not None and (i.retain_until or 0.0) < until]
            list(self.pool().map(lambda key: self.s3.retain(key, until), short))
        return missing
