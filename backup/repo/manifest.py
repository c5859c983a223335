"""A snapshot's manifest: which chunks make up one disk at one instant (format version 1)."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import RepoError
from .names import validate_chunk_size, validate_digest, validate_disk, validate_snapshot_id

VERSION = 1
STAT_KEYS = ("new-bytes", "stored-bytes", "zero-bytes", "reused-bytes", "seconds")


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def chunk_stats(
    chunks: Sequence[str | None], size: int, chunk_size: int, stored_new: Collection[str], pending: Collection[int] = ()
) -> dict[str, int]:
    """A manifest's byte counts of ``chunks``: ``new-bytes`` for the chunks stored new (``stored_new``)
    that it names, each once however often named; ``zero-bytes``; ``reused-bytes`` for the rest.
    Chunks in ``pending`` (still being written) count nowhere."""
    new = zero = reused = 0
    seen: set[str] = set()
    for index, digest in enumerate(chunks):
        if index in pending:
            continue
        length = min(chunk_size, size - index * chunk_size)
        if digest is None:
            zero += length
        elif digest in stored_new and digest not in seen:
            seen.add(digest)
            new += length
        else:
            reused += length
    return {"new-bytes": new, "zero-bytes": zero, "reused-bytes": reused}


@dataclass
class Manifest:
    disk: str
    id: str
    created: str
    size: int
    chunk_size: int
    parent: str | None
    chunks: list[str | None]
    stats: dict[str, int | float] = field(default_factory=dict)

    def chunk_length(self, index: int) -> int:
        """The uncompressed length of chunk ``index`` (the last one may be short)."""
        return min(self.chunk_size, self.size - index * self.chunk_size)

    @property
    def ref(self) -> str:
        return f"{self.disk}@{self.id}"

    def to_json(self) -> bytes:
        doc = {
            "version": VERSION,
            "disk": self.disk,
            "id": self.id,
            "created": self.created,
            "size": self.size,
            "chunk-size": self.chunk_size,
            "parent": self.parent,
            "chunks": self.chunks,
            "stats": self.stats,
        }
        return json.dumps(doc, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse and validate; anything malformed is a ``RepoError``."""
        try:
            doc = json.loads(data)
            return cls._from_doc(doc)
        except RepoError as e:
            raise RepoError(f"bad manifest: {e}") from None
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise RepoError(f"bad manifest: {type(e).__name__}: {e}") from None

    @classmethod
    def _from_doc(cls, doc: Any) -> Manifest:
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            raise RepoError(f"unsupported manifest version {doc.get('version') if isinstance(doc, dict) else None!r}")
        size, chunk_size = doc["size"], doc["chunk-size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(chunk_size, int):
            raise RepoError(f"invalid size {size!r}")
        validate_chunk_size(chunk_size)
        chunks = doc["chunks"]
        if not isinstance(chunks, list) or len(chunks) != chunk_count(size, chunk_size):
            raise RepoError("chunk list does not match the size")
        for c in chunks:
            if c is not None:
                validate_digest(c)
        parent = doc["parent"]
        if parent is not None:
            validate_snapshot_id(parent)
        stats = doc.get("stats", {})
        if not isinstance(stats, dict) or not all(isinstance(v, int | float) for v in stats.values()):
            raise RepoError("invalid stats")
        if not isinstance(doc["created"], str):
            raise RepoError("invalid created time")
        return cls(
            disk=validate_disk(doc["disk"]),
            id=validate_snapshot_id(doc["id"]),
            created=doc["created"],
            size=size,
            chunk_size=chunk_size,
            parent=parent,
            chunks=chunks,
            stats=stats,
        )

    def info(self) -> dict[str, Any]:
        """The object ``repo list --json`` and ``query-repo-snapshots`` print."""
        return {
            "disk": self.disk,
            "id": self.id,
            "created": self.created,
            "size": self.size,
            "parent": self.parent,
            "new-bytes": int(self.stats.get("new-bytes", 0)),
        }
