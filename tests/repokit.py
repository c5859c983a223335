"""Helpers of the repository tests: a small repository and snapshots written into it."""

from __future__ import annotations

import os
from pathlib import Path

from backup.repo.manifest import Manifest
from backup.repo.repository import Repository

CS = 64 << 10


def new_repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", CS)


def write_snapshot(repo: Repository, disk: str, blocks: list[bytes], parent: str = "none") -> Manifest:
    """Commit a snapshot made of ``blocks`` (each at most one chunk) through the public API."""
    with repo.begin_write(disk) as w:
        p = w.parent(parent)
        digests = [repo.store_chunk(b, w.lease)[0] for b in blocks]
        size = sum(len(b) for b in blocks)
        return w.commit(size, digests, p.id if p else None, {})


def rand_chunk(n: int = CS) -> bytes:
    return os.urandom(n)


def read_snapshot(repo: Repository, m: Manifest) -> bytes:
    return b"".join(
        bytes(m.chunk_length(i)) if d is None else repo.load_chunk(d, m.chunk_length(i)) for i, d in enumerate(m.chunks)
    )
