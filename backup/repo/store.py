"""The storage seam below ``Repository``: what a directory and an S3 bucket both provide (issue 17).

``Repository`` keeps the format (names, manifests, the publishing order); a ``RepoStore`` keeps the
bytes and the coordination between writers: chunks (``ChunkStore``), the config object, manifests
(put-if-absent, list, get, delete), disk locks, leases and gc's exclusion. All calls block; async
callers run them in threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Protocol

from . import _fs
from .chunks import ChunkStore, LocalChunkStore
from .errors import DiskBusy, NotARepository, RepoError, SnapshotNotFound
from .lease import Lease
from .names import validate_disk, validate_snapshot_id

CONFIG = "nbd-backup-repo.json"
SNAPSHOTS = "@snapshots"
LOCK = "@lock"
GC_LOCK = "gc.lock"
_DIRS = ("chunks", "disks", "leases", "tmp")


class DiskLock(Protocol):
    """A disk's writer lock; ``fileno()`` is a descriptor whose close also releases it (``lock_disk``)."""

    def release(self) -> None: ...
    def fileno(self) -> int: ...


class RepoStore(Protocol):
    #: Its calls wait on a network, not a disk or a core: a writer runs as many threads as it has chunk
    #: buffers (an S3 store), rather than about one per core.
    latency_bound: bool
    #: Threads a bulk transfer (backup of a file, restore) runs to keep this store busy.
    worker_threads: int

    @property
    def location(self) -> str: ...
    @property
    def chunks(self) -> ChunkStore: ...

    def init_layout(self) -> None: ...
    def write_config(self, data: bytes) -> None: ...
    def read_config(self) -> bytes: ...
    def disks(self) -> list[str]: ...
    def snapshot_names(self, disk: str) -> list[str]: ...
    def get_manifest(self, disk: str, snap_id: str) -> bytes: ...
    def put_manifest(self, disk: str, snap_id: str, data: bytes) -> None: ...
    def delete_manifest(self, disk: str, snap_id: str) -> None: ...
    def lock(self, disk: str) -> DiskLock: ...
    def create_lease(self) -> Lease: ...
    def wait_for_gc(self) -> None: ...
    def missing_chunks(self, digests: set[str], lease: Lease) -> list[str]: ...


class FdLock:
    """A kernel flock held through a descriptor: it goes with its holder, nothing to clean up."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def fileno(self) -> int:
        assert self.fd is not None
        return self.fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class LocalStore:
    """The repository as a directory (``FORMAT.md``): files published by rename, kernel flocks."""

    latency_bound = False
    worker_threads = (os.cpu_count() or 2) + 1  # every core busy, one more for a thread waiting on an fsync

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self.chunks: LocalChunkStore = LocalChunkStore(self.path)

    def init_layout(self) -> None:
        path = self.path
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
        _fs.fsync_dir(path)

    def write_config(self, data: bytes) -> None:
        _fs.publish(self.path / "tmp", self.path / CONFIG, data, "config")
        if self.path.parent != self.path:
            _fs.fsync_dir(self.path.parent)

    def read_config(self) -> bytes:
        try:
            return (self.path / CONFIG).read_bytes()
        except FileNotFoundError:
            raise NotARepository(f"{self.path} is not a repository (no {CONFIG})") from None
        except OSError as e:
            raise NotARepository(f"{self.path} is not a repository ({CONFIG}: {e})") from None

    def disk_dir(self, disk: str) -> Path:
        return self.path / "disks" / validate_disk(disk)

    def manifest_path(self, disk: str, snap_id: str) -> Path:
        return self.disk_dir(disk) / SNAPSHOTS / f"{validate_snapshot_id(snap_id)}.json"

    def disks(self) -> list[str]:
        root = self.path / "disks"
        found = []
        for dirpath, dirnames, _ in os.walk(root):
            if SNAPSHOTS in dirnames:
                found.append(Path(dirpath).relative_to(root).as_posix())
            dirnames[:] = [d for d in dirnames if not d.startswith("@")]
        return sorted(found)

    def snapshot_names(self, disk: str) -> list[str]:
        try:
            return os.listdir(self.disk_dir(disk) / SNAPSHOTS)
        except FileNotFoundError:
            return []

    def get_manifest(self, disk: str, snap_id: str) -> bytes:
        try:
            return self.manifest_path(disk, snap_id).read_bytes()
        except FileNotFoundError:
            raise SnapshotNotFound(f"snapshot {disk}@{snap_id} not found") from None

    def put_manifest(self, disk: str, snap_id: str, data: bytes) -> None:
        """Publish (the disk's flock makes the id ours alone): the single rename that makes a snapshot exist."""
        snaps = self.disk_dir(disk) / SNAPSHOTS
        if not snaps.is_dir():
            snaps.mkdir(exist_ok=True)
            _fs.fsync_dir(snaps.parent)
        _fs.publish(self.path / "tmp", snaps / f"{snap_id}.json", data, "manifest")

    def delete_manifest(self, disk: str, snap_id: str) -> None:
        path = self.manifest_path(disk, snap_id)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            _fs.fsync_dir(path.parent)

    def lock(self, disk: str) -> FdLock:
        d = self.disk_dir(disk)
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
        return FdLock(fd)

    def create_lease(self) -> Lease:
        return Lease.create(self.path)

    def wait_for_gc(self) -> None:
        """Block until no gc runs (a gc holds ``gc.lock`` from mark to the last delete)."""
        fd = os.open(self.path / GC_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        finally:
            os.close(fd)

    def missing_chunks(self, digests: set[str], lease: Lease) -> list[str]:
        """Chunks not there; one missing in a gc's trash window comes back when that gc ends."""
        missing = [c for c in digests if not self.chunks.exists(c)]
        if missing:
            self.wait_for_gc()
            missing = [c for c in missing if not self.chunks.exists(c)]
        return missing
