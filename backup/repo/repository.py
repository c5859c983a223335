"""The repository: chunks, manifests per disk, the writers' locks (design §3.6, ``FORMAT.md``).

Readers never lock anything: a manifest is immutable once published and names only durable chunks.
One writer per disk (its lock); every writer holds a lease for gc. Where the bytes live — a directory
or an S3 bucket (design §3.7) — is the ``RepoStore`` below; the format and its order are here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import objectlock
from .chunks import ChunkStore, LocalChunkStore
from .codec import Buffer, blob_room, chunk_aad, chunk_digest, compress_chunk, decode_chunk, decode_chunk_parts, joined
from .errors import ChunkCorrupt, ChunkMissing, DiskBusy, NotARepository, RepoError, SnapshotNotFound
from .lease import Lease
from .location import is_s3, parse_s3
from .manifest import Manifest, chunk_count
from .names import (
    DEFAULT_CHUNK_SIZE,
    iso_utc,
    new_snapshot_id,
    snapshot_time,
    validate_chunk_size,
    validate_disk,
    validate_snapshot_id,
)
from .store import CONFIG, GC_LOCK, LOCK, SNAPSHOTS, DiskLock, LocalStore, RepoStore

if TYPE_CHECKING:
    from .crypt import RepoCipher  # imported when a repository is encrypted (cryptography is slow to load)

__all__ = ["CONFIG", "FORMAT", "GC_LOCK", "LOCK", "SNAPSHOTS", "VERSION", "DiskWriter", "Repository", "open_store"]

FORMAT = "nbd-backup-repository"
VERSION = 1
_local = threading.local()


def open_store(location: str | Path) -> RepoStore:
    """The store of a repository location: ``s3://BUCKET/PREFIX?endpoint=…&region=…`` or a directory."""
    if is_s3(location):
        from .s3store import S3Store  # boto3 is imported only for S3 repositories

        return S3Store(parse_s3(location))
    return LocalStore(Path(location))


#: ``Repository.lock_wait`` of the command line's writers (seconds), and how often it tries again.
LOCK_WAIT = 2.0
LOCK_POLL = 0.05


class Repository:
    def __init__(
        self,
        path: Path | str,
        chunk_size: int,
        chunks: ChunkStore | None = None,
        store: RepoStore | None = None,
        cipher: RepoCipher | None = None,
    ) -> None:
        self.store: RepoStore = store if store is not None else open_store(path)
        #: The directory (for S3 a Path of the URL, for messages only: use ``location``).
        self.path = self.store.path if isinstance(self.store, LocalStore) else Path(self.store.location)
        self.location = self.store.location
        self.chunk_size = chunk_size
        self.chunks: ChunkStore = chunks if chunks is not None else self.store.chunks
        #: The keys of an encrypted repository (``crypt``); None: chunks named by SHA-256, stored as is.
        self.cipher = cipher
        #: How long a writer (backup, prune) waits for another one's hold on a disk before it is told
        #: the disk is busy. The command line waits (``LOCK_WAIT``): a prune holds a disk for
        #: milliseconds, and a backup that starts meanwhile should not fail for it. The daemon does not:
        #: it takes the lock on its event loop, and answers busy at once.
        self.lock_wait = 0.0

    # -- creating and opening

    @classmethod
    def init(
        cls,
        path: Path | str,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        *,
        key: bytes | None = None,
        object_lock_days: int | None = None,
    ) -> Repository:
        """A new repository in a missing or empty directory (or S3 prefix); the config is written last.

        ``key``: encrypt it with this master key (``crypt``); ``object_lock_days``: every chunk and
        manifest carries that Object Lock retention (S3 only, the bucket must have Object Lock).
        """
        validate_chunk_size(chunk_size)
        store = open_store(path)
        config: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "chunk-size": chunk_size,
            "compression": "zstd",
            "created": iso_utc(datetime.now(UTC)),
        }
        if object_lock_days is not None:
            lock = objectlock.config(object_lock_days)
            from .s3store import S3Store

            if not isinstance(store, S3Store):
                raise objectlock.refuse_local(store.location)
            if not store.s3.object_lock_enabled():
                raise RepoError(
                    f"cannot init repository: bucket {store.loc.bucket} does not have Object Lock enabled "
                    "(create the bucket with Object Lock)"
                )
            config["object-lock"] = lock
            store.set_retention(lock["seconds"])
        cipher = None
        if key is not None:
            from .crypt import RepoCipher

            cipher = RepoCipher.new(key)
            config["encryption"] = cipher.config()
        store.init_layout()
        store.write_config(json.dumps(config, indent=1).encode() + b"\n")
        return cls(path, chunk_size, store=store, cipher=cipher)

    @classmethod
    def open(cls, path: Path | str, *, key: bytes | None = None) -> Repository:
        """Open an existing repository; an encrypted one needs its ``key`` (a one-line error otherwise)."""
        store = open_store(path)
        where = store.location
        try:
            config = json.loads(store.read_config())
        except ValueError as e:
            raise NotARepository(f"{where} is not a repository ({CONFIG}: {e})") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise NotARepository(f"{where} is not a repository ({CONFIG} is of another format)")
        if config.get("version") != VERSION:
            raise NotARepository(f"{where}: unsupported repository version {config.get('version')!r}")
        if config.get("compression") != "zstd":
            raise NotARepository(f"{where}: unsupported compression {config.get('compression')!r}")
        size = config.get("chunk-size")
        if not isinstance(size, int):
            raise NotARepository(f"{where}: invalid chunk size {size!r}")
        validate_chunk_size(size)
        encryption = config.get("encryption")
        cipher = None
        if encryption is not None:
            if key is None:
                raise RepoError(f"{where} is encrypted: its key is needed (--key-file FILE)", errno.EACCES)
            from .crypt import RepoCipher

            cipher = RepoCipher.open(key, encryption, where)
        elif key is not None:
            raise RepoError(f"{where} is not encrypted: no key file goes with it")
        lock = config.get("object-lock")
        if lock is not None:
            from .s3store import S3Store

            if not isinstance(store, S3Store):
                raise objectlock.refuse_local(where)
            store.set_retention(objectlock.retention_seconds(lock, where))
        return cls(path, size, store=store, cipher=cipher)

    @property
    def encrypted(self) -> bool:
        return self.cipher is not None

    # -- reading

    def disks(self) -> list[str]:
        """Every disk with a snapshot directory, sorted."""
        return self.store.disks()

    def snapshot_ids(self, disk: str) -> list[str]:
        """Published ids of ``disk``, oldest first (ids sort as strings in commit order)."""
        ids = []
        for name in self.store.snapshot_names(validate_disk(disk)):
            stem, dot, ext = name.rpartition(".")
            if dot and ext == "json":
                with contextlib.suppress(RepoError):
                    ids.append(validate_snapshot_id(stem))
        return sorted(ids)

    def manifest_path(self, disk: str, snap_id: str) -> Path:
        """The manifest's file (a directory repository only)."""
        if not isinstance(self.store, LocalStore):
            raise RepoError(f"{self.location}: manifests are objects here, not files")
        return self.store.manifest_path(disk, snap_id)

    def load_manifest(self, disk: str, snap_id: str) -> Manifest:
        data = self.store.get_manifest(validate_disk(disk), validate_snapshot_id(snap_id))
        if self.cipher is not None:
            from .crypt import DecryptError

            try:
                data = self.cipher.open_sealed(data, _manifest_aad(disk, snap_id))
            except DecryptError as e:
                raise RepoError(f"bad manifest {disk}@{snap_id}: {e}", errno.EIO) from None
        m = Manifest.from_json(data)
        if m.disk != disk or m.id != snap_id:
            raise RepoError(f"bad manifest: {disk}@{snap_id} names itself {m.ref}")
        return m

    def snapshots(self, disk: str) -> list[Manifest]:
        """Published snapshots of ``disk``, oldest first; [] for a disk without any."""
        out = []
        for snap_id in self.snapshot_ids(disk):
            with contextlib.suppress(SnapshotNotFound):  # pruned while we listed
                out.append(self.load_manifest(disk, snap_id))
        return out

    def resolve(self, disk: str, snap: str = "latest") -> Manifest:
        if snap == "latest":
            ids = self.snapshot_ids(disk)
            if not ids:
                raise SnapshotNotFound(f"disk {disk} has no snapshots")
            return self.load_manifest(disk, ids[-1])
        return self.load_manifest(disk, validate_snapshot_id(snap))

    def hold_snapshot(self, manifest: Manifest) -> Lease:
        """A lease on a published snapshot's chunks for someone reading it (an instant-restore export, a
        restore), so that a prune and gc meanwhile cannot take them from under the reader.

        The chunks are recorded first and the snapshot looked up after: either gc sees the record, or it
        ran while the manifest still named the chunks (and kept them), or the snapshot is gone by now and
        this is SnapshotNotFound — a reader never starts on chunks that may vanish."""
        lease = self.store.create_lease()
        try:
            lease.record_many(c for c in manifest.chunks if c is not None)
            if manifest.id not in self.snapshot_ids(manifest.disk):
                raise SnapshotNotFound(f"snapshot {manifest.ref} no longer exists")
        except BaseException:
            lease.release()
            raise
        return lease

    def load_chunk(self, digest: str, length: int) -> bytes:
        """The chunk's bytes, verified; a bad chunk is ChunkCorrupt/ChunkMissing (EIO), named in the log.

        From a directory without encryption the blob is read into the calling thread's buffer: a chunk
        costs one fresh ``bytes`` (zstd's output, made with the GIL released), not two."""
        try:
            if self.cipher is None and isinstance(self.chunks, LocalChunkStore):
                scratch = self._scratch()
                size = self.chunks.read_into(digest, scratch)
                if size is not None:
                    return decode_chunk(digest, memoryview(scratch)[:size], length)
            return decode_chunk(digest, self.chunks.get(digest), length, self.cipher)
        except (ChunkCorrupt, ChunkMissing) as e:
            e.log()
            raise

    def check_chunk(self, digest: str, length: int) -> None:
        """``load_chunk`` without the bytes (``verify``): an incompressible chunk is hashed where it was read."""
        self.load_chunk_into(digest, length, self._scratch())

    def _scratch(self) -> bytearray:
        """The calling thread's blob buffer (worker threads of readers, verify, writers merging a parent
        chunk); it goes with its thread."""
        scratch: bytearray | None = getattr(_local, "scratch", None)
        room = blob_room(self.chunk_size)
        if scratch is None or len(scratch) < room:
            scratch = _local.scratch = bytearray(room)
        return scratch

    def load_chunk_into(self, digest: str, length: int, scratch: bytearray) -> list[Buffer]:
        """``load_chunk`` for a reader that reuses ``scratch`` (a restore's worker): the chunk's bytes as
        buffers to write one after the other. From a directory without encryption the blob is read into
        ``scratch``, and the bytes of an incompressible chunk are views of it (valid until ``scratch`` is
        reused): one copy from the file and the SHA-256, nothing else. From any other unencrypted store
        such a chunk is views of the fetched blob (no decompression: one copy of the chunk fewer)."""
        try:
            if self.cipher is not None:
                return [decode_chunk(digest, self.chunks.get(digest), length, self.cipher)]
            if not isinstance(self.chunks, LocalChunkStore):
                return decode_chunk_parts(digest, self.chunks.get(digest), length)
            size = self.chunks.read_into(digest, scratch)
            if size is None:  # bigger than any frame we write: decode it the plain way
                return [decode_chunk(digest, self.chunks.get(digest), length)]
            return decode_chunk_parts(digest, memoryview(scratch)[:size], length)
        except (ChunkCorrupt, ChunkMissing) as e:
            e.log()
            raise

    # -- writing

    def store_chunk(self, data: bytes | memoryview, lease: Lease) -> tuple[str | None, bool]:
        """(digest or None for zero, stored new). Records the digest in ``lease`` before looking for it.

        Thread-safe; compresses only a chunk the repository does not have yet.
        """
        digest = chunk_digest(data, self.cipher)
        if digest is None:
            lease.count(zero=len(data))
            return None, False
        lease.record(digest)  # before the exists check: see gc.py
        if self.chunks.reuse(digest, lease):
            lease.count(reused=len(data))
            return digest, False
        parts = compress_chunk(data)  # raw blocks of an incompressible chunk are views of ``data``
        size = sum(len(p) for p in parts)
        if self.cipher is not None:  # encrypted after compression (ciphertext does not compress)
            blob = self.cipher.seal(joined(parts), chunk_aad(digest))
            size = len(blob)
            stored = self.chunks.put(digest, blob)
        elif isinstance(self.chunks, LocalChunkStore):
            stored = self.chunks.put(digest, parts)  # one writev: no copy
        else:
            stored = self.chunks.put(digest, joined(parts))
        if stored:
            lease.count(new=len(data), stored=size)
        else:
            lease.count(reused=len(data))
        return digest, stored

    def begin_write(self, disk: str) -> DiskWriter:
        return DiskWriter(self, disk)

    def lock_disk(self, disk: str) -> int:
        """The disk's writer lock (a descriptor to close to release it); DiskBusy if someone holds it."""
        return self.hold_disk(validate_disk(disk)).fileno()

    def hold_disk(self, disk: str) -> DiskLock:
        """The disk's writer lock, waiting up to ``lock_wait`` for another holder; DiskBusy after that."""
        deadline = time.monotonic() + self.lock_wait
        while True:
            try:
                return self.store.lock(disk)
            except DiskBusy:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(LOCK_POLL)

    def wait_for_gc(self) -> None:
        """Block until no gc runs that could still remove a chunk a writer found."""
        self.store.wait_for_gc()


class DiskWriter:
    """One disk's writer: holds its lock and a lease until commit or abort."""

    def __init__(self, repo: Repository, disk: str) -> None:
        self.repo = repo
        self.disk = validate_disk(disk)
        self._lock: DiskLock | None = repo.hold_disk(self.disk)
        try:
            self.lease = repo.store.create_lease()
        except BaseException:
            self._lock.release()
            raise
        self._started = time.monotonic()

    def __enter__(self) -> DiskWriter:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.abort()

    @property
    def done(self) -> bool:
        return self._lock is None

    def _check(self) -> None:
        if self._lock is None:
            raise RepoError(f"the writer of disk {self.disk} is finished", errno.EIO)

    def parent(self, ref: str) -> Manifest | None:
        """The parent snapshot (``latest`` | id | ``none``); its chunks go into the lease so gc keeps them.

        Then the parent must still be published (as in ``hold_snapshot``): a gc that read the leases
        before our record read the manifests after, so it kept them — unless a prune removed the parent
        meanwhile, which this finds. From then on its chunks need no check (``Lease.known``).
        """
        self._check()
        if ref == "none":
            return None
        if ref == "latest" and not self.repo.snapshot_ids(self.disk):
            return None
        m = self.repo.resolve(self.disk, ref)
        chunks = [c for c in m.chunks if c is not None]
        self.lease.record_many(chunks)
        if m.id not in self.repo.snapshot_ids(self.disk):
            raise SnapshotNotFound(f"snapshot {m.ref} no longer exists")
        self.lease.add_known(chunks)
        return m

    def commit(self, size: int, chunks: list[str | None], parent: str | None, stats: dict[str, Any]) -> Manifest:
        """Publish the snapshot once every chunk it names is there; releases lock and lease."""
        self._check()
        cs = self.repo.chunk_size
        if size < 0 or len(chunks) != chunk_count(size, cs):
            raise RepoError(f"{len(chunks)} chunks do not make a disk of {size} bytes")
        if parent is not None:
            validate_snapshot_id(parent)
        self.lease.record_many(c for c in chunks if c is not None)
        self._check_chunks(chunks)
        previous = self.repo.snapshot_ids(self.disk)
        snap_id = new_snapshot_id(previous[-1] if previous else None)
        full_stats: dict[str, int | float] = {
            "new-bytes": self.lease.new_bytes,
            "stored-bytes": self.lease.stored_bytes,
            "zero-bytes": sum(min(cs, size - i * cs) for i, c in enumerate(chunks) if c is None),
            "reused-bytes": self.lease.reused_bytes,
            "seconds": round(time.monotonic() - self._started, 6),
        }
        full_stats.update(stats)
        m = Manifest(
            disk=self.disk,
            id=snap_id,
            created=iso_utc(snapshot_time(snap_id)),
            size=size,
            chunk_size=cs,
            parent=parent,
            chunks=list(chunks),
            stats=full_stats,
        )
        self.lease.check_live()  # a lease gc may have taken for dead protects nothing: publish nothing
        data = m.to_json()
        if self.repo.cipher is not None:
            data = self.repo.cipher.seal(data, _manifest_aad(self.disk, snap_id))
        self.repo.store.put_manifest(self.disk, snap_id, data)
        self._finish()
        return m

    def _check_chunks(self, chunks: list[str | None]) -> None:
        """Every named chunk must exist (the store waits out a gc that could still remove one)."""
        missing = self.repo.store.missing_chunks({c for c in chunks if c is not None}, self.lease)
        if missing:
            ChunkMissing(missing[0]).log()
            raise RepoError(f"cannot commit {self.disk}: chunk {missing[0]} is missing", errno.EIO)

    def abort(self) -> None:
        """Drop the snapshot: nothing is published; its chunks are left for gc."""
        self._finish()

    def _finish(self) -> None:
        if self._lock is None:
            return
        self.lease.release()
        self._lock.release()
        self._lock = None


def _manifest_aad(disk: str, snap_id: str) -> str:
    """An encrypted manifest authenticates its own name: one copied under another name fails to decrypt."""
    return f"manifest {disk}@{snap_id}"
