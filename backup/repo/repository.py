"""The repository: chunks, manifests per disk, the writers' locks (design §3.6, ``FORMAT.md``).

Readers never lock anything: a manifest is immutable once published and names only durable chunks.
One writer per disk (flock on ``disks/<disk>/@lock``); every writer holds a lease for gc.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from . import _fs
from .chunks import ChunkStore, LocalChunkStore
from .codec import chunk_digest, compress_chunk, decode_chunk
from .errors import ChunkCorrupt, ChunkMissing, DiskBusy, NotARepository, RepoError, SnapshotNotFound
from .lease import Lease
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

CONFIG = "nbd-backup-repo.json"
FORMAT = "nbd-backup-repository"
VERSION = 1
SNAPSHOTS = "@snapshots"
LOCK = "@lock"
GC_LOCK = "gc.lock"
_DIRS = ("chunks", "disks", "leases", "tmp")


class Repository:
    def __init__(self, path: Path, chunk_size: int, chunks: ChunkStore | None = None) -> None:
        self.path = Path(path)
        self.chunk_size = chunk_size
        self.chunks: ChunkStore = chunks if chunks is not None else LocalChunkStore(self.path)

    # -- creating and opening

    @classmethod
    def init(cls, path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Repository:
        """A new repository in a missing or empty directory; the config file is written last."""
        path = Path(path)
        validate_chunk_size(chunk_size)
        if path.exists() and not path.is_dir():
            raise RepoError(f"cannot init repository: {path} is not a directory", errno.ENOTDIR)
        if path.is_dir() and any(path.iterdir()):
            raise RepoError(f"cannot init repository: {path} is not empty", errno.EEXIST)
        path.mkdir(parents=True, exist_ok=True)
        for name in _DIRS:
            (path / name).mkdir(exist_ok=True)
        for i in range(256):
            (path / "chunks" / f"{i:02x}").mkdir(exist_ok=True)
        _fs.fsync_dir(path / "chunks")
        config = {
            "format": FORMAT,
            "version": VERSION,
            "chunk-size": chunk_size,
            "compression": "zstd",
            "created": iso_utc(datetime.now(UTC)),
        }
        _fs.fsync_dir(path)
        _fs.publish(path / "tmp", path / CONFIG, json.dumps(config, indent=1).encode() + b"\n", "config")
        if path.parent != path:
            _fs.fsync_dir(path.parent)
        return cls(path, chunk_size)

    @classmethod
    def open(cls, path: Path) -> Repository:
        path = Path(path)
        try:
            config = json.loads((path / CONFIG).read_bytes())
        except FileNotFoundError:
            raise NotARepository(f"{path} is not a repository (no {CONFIG})") from None
        except (OSError, ValueError) as e:
            raise NotARepository(f"{path} is not a repository ({CONFIG}: {e})") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise NotARepository(f"{path} is not a repository ({CONFIG} is of another format)")
        if config.get("version") != VERSION:
            raise NotARepository(f"{path}: unsupported repository version {config.get('version')!r}")
        if config.get("compression") != "zstd":
            raise NotARepository(f"{path}: unsupported compression {config.get('compression')!r}")
        size = config.get("chunk-size")
        if not isinstance(size, int):
            raise NotARepository(f"{path}: invalid chunk size {size!r}")
        validate_chunk_size(size)
        return cls(path, size)

    # -- reading

    def _disk_dir(self, disk: str) -> Path:
        return self.path / "disks" / validate_disk(disk)

    def disks(self) -> list[str]:
        """Every disk with a snapshot directory, sorted."""
        root = self.path / "disks"
        found = []
        for dirpath, dirnames, _ in os.walk(root):
            if SNAPSHOTS in dirnames:
                found.append(Path(dirpath).relative_to(root).as_posix())
            dirnames[:] = [d for d in dirnames if not d.startswith("@")]
        return sorted(found)

    def snapshot_ids(self, disk: str) -> list[str]:
        """Published ids of ``disk``, oldest first (ids sort as strings in commit order)."""
        snaps = self._disk_dir(disk) / SNAPSHOTS
        try:
            names = os.listdir(snaps)
        except FileNotFoundError:
            return []
        ids = []
        for name in names:
            stem, dot, ext = name.rpartition(".")
            if dot and ext == "json":
                with contextlib.suppress(RepoError):
                    ids.append(validate_snapshot_id(stem))
        return sorted(ids)

    def manifest_path(self, disk: str, snap_id: str) -> Path:
        return self._disk_dir(disk) / SNAPSHOTS / f"{validate_snapshot_id(snap_id)}.json"

    def load_manifest(self, disk: str, snap_id: str) -> Manifest:
        try:
            data = self.manifest_path(disk, snap_id).read_bytes()
        except FileNotFoundError:
            raise SnapshotNotFound(f"snapshot {disk}@{snap_id} not found") from None
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

    def load_chunk(self, digest: str, length: int) -> bytes:
        """The chunk's bytes, verified; a bad chunk is ChunkCorrupt/ChunkMissing (EIO), named in the log."""
        try:
            return decode_chunk(digest, self.chunks.get(digest), length)
        except (ChunkCorrupt, ChunkMissing) as e:
            e.log()
            raise

    # -- writing

    def store_chunk(self, data: bytes | memoryview, lease: Lease) -> tuple[str | None, bool]:
        """(digest or None for zero, stored new). Records the digest in ``lease`` before looking for it.

        Thread-safe; compresses only a chunk the repository does not have yet.
        """
        digest = chunk_digest(data)
        if digest is None:
            lease.count(zero=len(data))
            return None, False
        lease.record(digest)  # before the exists check: see gc.py
        if self.chunks.exists(digest):
            self.chunks.touch(digest)
            lease.count(reused=len(data))
            return digest, False
        blob = compress_chunk(data)
        stored = self.chunks.put(digest, blob)
        if stored:
            lease.count(new=len(data), stored=len(blob))
        else:
            lease.count(reused=len(data))
        return digest, stored

    def begin_write(self, disk: str) -> DiskWriter:
        return DiskWriter(self, disk)

    def lock_disk(self, disk: str) -> int:
        """The disk's writer lock (a descriptor to close to release it); DiskBusy if someone holds it."""
        d = self._disk_dir(disk)
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DiskBusy(f"disk {disk} is busy: another backup or prune is writing it") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def wait_for_gc(self) -> None:
        """Block until no gc runs (a gc holds ``gc.lock`` from mark to the last delete)."""
        fd = os.open(self.path / GC_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        finally:
            os.close(fd)


class DiskWriter:
    """One disk's writer: holds its ``@lock`` and a lease until commit or abort."""

    def __init__(self, repo: Repository, disk: str) -> None:
        self.repo = repo
        self.disk = validate_disk(disk)
        self._lock_fd: int | None = repo.lock_disk(disk)
        try:
            self.lease = Lease.create(repo.path)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._started = time.monotonic()

    def __enter__(self) -> DiskWriter:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.abort()

    @property
    def done(self) -> bool:
        return self._lock_fd is None

    def _check(self) -> None:
        if self._lock_fd is None:
            raise RepoError(f"the writer of disk {self.disk} is finished", errno.EIO)

    def parent(self, ref: str) -> Manifest | None:
        """The parent snapshot (``latest`` | id | ``none``); its chunks go into the lease so gc keeps them."""
        self._check()
        if ref == "none":
            return None
        if ref == "latest" and not self.repo.snapshot_ids(self.disk):
            return None
        m = self.repo.resolve(self.disk, ref)
        self.lease.record_many(c for c in m.chunks if c is not None)
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
        snaps = self.repo._disk_dir(self.disk) / SNAPSHOTS
        if not snaps.is_dir():
            snaps.mkdir(exist_ok=True)
            _fs.fsync_dir(snaps.parent)
        _fs.publish(self.repo.path / "tmp", snaps / f"{snap_id}.json", m.to_json(), "manifest")
        self._finish()
        return m

    def _check_chunks(self, chunks: list[str | None]) -> None:
        """Every named chunk must exist; one missing in a gc's trash window comes back when that gc ends."""
        distinct = {c for c in chunks if c is not None}
        missing = [c for c in distinct if not self.repo.chunks.exists(c)]
        if missing:
            self.repo.wait_for_gc()
            missing = [c for c in missing if not self.repo.chunks.exists(c)]
        if missing:
            ChunkMissing(missing[0]).log()
            raise RepoError(f"cannot commit {self.disk}: chunk {missing[0]} is missing", errno.EIO)

    def abort(self) -> None:
        """Drop the snapshot: nothing is published; its chunks are left for gc."""
        self._finish()

    def _finish(self) -> None:
        if self._lock_fd is None:
            return
        self.lease.release()
        os.close(self._lock_fd)
        self._lock_fd = None
