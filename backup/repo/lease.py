"""Leases: what a backup in progress needs, so that gc keeps it (design §3.6, contract "gc protocol").

A lease is a file ``leases/<uuid>.lease`` that its holder keeps flock'd and appends digests to, one
hex per line, *before* it checks whether a chunk exists. It is live exactly while its flock is held:
a killed holder's kernel lock goes with it, so its lease is void without any clock (no fsync needed).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from . import _fs

SUFFIX = ".lease"


class Lease:
    """One backup's lease; thread-safe (worker threads store chunks concurrently)."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path
        self.digests: set[str] = set()
        #: Bytes this backup stored that were not in the repository before (manifest ``new-bytes``).
        self.new_bytes = 0
        #: Compressed bytes of those chunks (manifest ``stored-bytes``).
        self.stored_bytes = 0
        self.reused_bytes = 0
        self.zero_bytes = 0
        #: Chunks known to be there without asking the store again: those this backup uploaded and
        #: those of its parent snapshot (an S3 commit HEADs only the others, ``S3Store.missing_chunks``).
        self.known: set[str] = set()
        #: When the lease began (epoch seconds; for an S3 lease the server's clock): gc spares younger chunks.
        self.started = time.time()
        self._lock = threading.Lock()

    @classmethod
    def create(cls, repo_path: Path) -> Lease:
        """A new live lease: created and locked under a temporary name, then renamed into ``leases/``.

        Locking before the rename means gc never sees it unlocked (it would take it for a dead one).
        """
        target = repo_path / "leases" / f"{uuid.uuid4().hex}{SUFFIX}"
        for _ in range(5):
            path = repo_path / "tmp" / f"lease.{uuid.uuid4().hex}.tmp"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.rename(path, target)
            except FileNotFoundError:
                os.close(fd)  # gc removed the temporary before we locked it
                continue
            except BaseException:
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                raise
            return cls(fd, target)
        raise OSError(f"could not create a lease in {repo_path}")

    @property
    def live(self) -> bool:
        return self._fd is not None

    def check_live(self) -> None:
        """Raise unless the lease still protects what it recorded (a commit checks before it publishes)."""
        if not self.live:
            raise OSError(f"lease {self.path.name} is released")

    def count(self, *, new: int = 0, stored: int = 0, reused: int = 0, zero: int = 0) -> None:
        """Add to the statistics (worker threads store chunks concurrently)."""
        with self._lock:
            self.new_bytes += new
            self.stored_bytes += stored
            self.reused_bytes += reused
            self.zero_bytes += zero

    def add_known(self, digests: Iterable[str]) -> None:
        with self._lock:
            self.known.update(digests)

    def record(self, digest: str) -> None:
        self.record_many((digest,))

    def record_many(self, digests: Iterable[str]) -> None:
        """Append the digests not recorded yet; returns once gc can read them."""
        with self._lock:
            new = [d for d in dict.fromkeys(digests) if d not in self.digests]
            if not new:
                return
            if self._fd is None:
                raise OSError(f"lease {self.path.name} is released")
            _fs.write_all(self._fd, "".join(d + "\n" for d in new).encode())
            self.digests.update(new)

    def release(self) -> None:
        """Remove the lease (still locked while it is unlinked, so gc never reads it as dead and half)."""
        with self._lock:
            if self._fd is None:
                return
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None


def _read_digests(path: Path) -> set[str]:
    try:
        text = path.read_bytes().decode("ascii", "replace")
    except FileNotFoundError:
        return set()
    # only complete lines: a line being written belongs to a record() that has not returned yet
    return {line for line in text.split("\n")[:-1] if len(line) == 64}


def scan_leases(repo_path: Path, *, remove_dead: bool = False) -> tuple[set[str], int]:
    """(digests of every live lease, number of dead leases [removed if ``remove_dead``])."""
    live: set[str] = set()
    dead = 0
    for path in sorted((repo_path / "leases").glob(f"*{SUFFIX}")):
        fd = _fs.try_lock(path)
        if fd is None:
            if path.exists():
                live |= _read_digests(path)
            continue
        try:
            dead += 1
            if remove_dead:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        finally:
            os.close(fd)
    return live, dead
