"""Garbage collection: free the chunks that no published manifest and no live backup needs.

Protocol (contract "gc protocol"): under ``gc.lock``, mark = the digests of every live lease, *then*
of every published manifest (a backup publishes before it drops its lease, so reading leases first
misses nothing). Each unmarked chunk is moved into ``tmp/`` (trash); then the live leases are read
again, and then the manifests published meanwhile: a digest found there is put back, the rest
deleted. A backup records a digest in its lease before it checks that the chunk exists, so either gc
sees the record, or the backup sees the chunk missing and writes it again.

A repository in S3 has no rename and no flock: its gc (``s3gc``) keeps the same promise with leases
that expire, chunk ages and a marker object instead (``FORMAT.md`` "Object storage").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterable
from pathlib import Path

from . import _fs
from .chunks import TRASH_PREFIX, LocalChunkStore
from .errors import RepoError
from .lease import scan_leases
from .marks import GcReport, manifest_chunks
from .repository import GC_LOCK, Repository


def _after_mark(candidates: list[str]) -> None:
    """Test hook: called between mark and trash (a backup racing gc is injected here)."""


def _after_trash(trashed: list[str]) -> None:
    """Test hook: called between trash and recheck (S3: once the delete phase began, before the recheck)."""


def _gc_lock(repo: Repository) -> int:
    fd = os.open(repo.path / GC_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RepoError(f"{repo.path}: another gc is running", errno.EBUSY) from None
    return fd


def collect_garbage(repo: Repository, *, grace_seconds: float = 0) -> GcReport:
    """Delete unreferenced chunks, dead leases and stale temporaries; safe beside running backups.

    ``grace_seconds`` spares chunks written or touched that recently (belt and braces; 0 = none).
    A manifest that cannot be read stops gc (``RepoError``): its chunks cannot be told apart.
    """
    store = repo.chunks
    if not isinstance(store, LocalChunkStore):
        from .s3gc import collect_s3

        return collect_s3(repo, grace_seconds=grace_seconds, after_mark=_after_mark, after_delete_began=_after_trash)
    report = GcReport()
    fd = _gc_lock(repo)
    try:
        for digest in store.trashed():  # a previous gc died between its phases: undo, decide again
            if store.exists(digest):
                store.purge(digest)
            else:
                store.untrash(digest)
        marked, report.leases_removed = scan_leases(repo.path, remove_dead=True)
        seen: set[tuple[str, str]] = set()
        marked |= manifest_chunks(repo, seen)
        cutoff = time.time() - grace_seconds
        candidates = []
        for digest in store.list_digests():
            report.chunks_before += 1
            if digest not in marked and (grace_seconds <= 0 or store.mtime(digest) < cutoff):
                candidates.append(digest)
        _after_mark(candidates)
        trashed = [d for d in candidates if store.trash(d)]
        _after_trash(trashed)
        needed, _ = scan_leases(repo.path)
        needed |= manifest_chunks(repo, seen)
        for digest in trashed:
            if digest in needed:
                store.untrash(digest)
                report.chunks_rescued += 1
                continue
            with contextlib.suppress(FileNotFoundError):
                report.bytes_freed += store.trash_path(digest).stat().st_size
            store.purge(digest)
            report.chunks_deleted += 1
        report.temporaries_removed = _clean_tmp(repo.path / "tmp")
    finally:
        os.close(fd)
    return report


def _clean_tmp(tmp: Path) -> int:
    """Remove temporaries whose writer is gone (their flock is free); trash is handled above."""
    removed = 0
    entries: Iterable[Path] = sorted(tmp.iterdir())
    for path in entries:
        if path.name.startswith(TRASH_PREFIX + "."):
            continue
        lock = _fs.try_lock(path)
        if lock is None:
            continue
        try:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        finally:
            os.close(lock)
    return removed
