"""Where chunk objects live. ``ChunkStore`` is the seam an object store implements (issue 17).

A blob is one zstd frame (see ``codec``); its name is the SHA-256 of the uncompressed bytes. Blobs
are immutable: putting an existing digest again is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from . import _fs
from .errors import ChunkMissing
from .names import validate_digest

if TYPE_CHECKING:
    from .lease import Lease

TRASH_PREFIX = "trash"


class ChunkStore(Protocol):
    """Blocking calls: async callers run them in threads."""

    def exists(self, digest: str) -> bool: ...
    def put(self, digest: str, blob: bytes) -> bool: ...
    def get(self, digest: str) -> bytes: ...
    def delete(self, digest: str) -> None: ...
    def list_digests(self) -> Iterator[str]: ...
    def touch(self, digest: str) -> None: ...
    def reuse(self, digest: str, lease: Lease) -> bool:
        """True if the chunk is there and stays for the backup holding ``lease`` (dedup)."""
        ...


class LocalChunkStore:
    """Chunks as files ``ROOT/chunks/ab/<digest>``; temporaries in ``ROOT/tmp`` (``ROOT`` = the repository)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.dir = self.root / "chunks"
        self.tmp = self.root / "tmp"

    def path(self, digest: str) -> Path:
        validate_digest(digest)
        return self.dir / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def put(self, digest: str, blob: bytes | Sequence[bytes | bytearray | memoryview]) -> bool:
        """Store ``blob`` (or its parts, written in one go) durably (rename into place, directory
        fsync'd); False if it was there already."""
        target = self.path(digest)
        if target.exists():
            return False
        target.parent.mkdir(exist_ok=True)
        _fs.publish(self.tmp, target, blob, "chunk")
        return True

    def get(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise ChunkMissing(digest) from None

    def read_into(self, digest: str, buffer: bytearray) -> int | None:
        """Read the blob into ``buffer`` (reused by the caller: no fresh allocation, no page faults) and
        return its length; None if it does not fit (read it with ``get``)."""
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ChunkMissing(digest) from None
        try:
            size = os.fstat(fd).st_size
            if size > len(buffer):
                return None
            view = memoryview(buffer)
            got = 0
            while got < size:
                n = os.preadv(fd, [view[got:size]], got)
                if n <= 0:
                    break  # shorter than it said: whatever is there is checked against the name
                got += n
            return got
        finally:
            os.close(fd)

    def delete(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()

    def list_digests(self) -> Iterator[str]:
        for sub in sorted(self.dir.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                for entry in os.scandir(sub):
                    if len(entry.name) == 64 and entry.name.startswith(sub.name):
                        yield entry.name

    def touch(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path(digest))

    def reuse(self, digest: str, lease: Lease) -> bool:
        """The lease recorded the digest already: gc keeps a chunk found here (see gc.py)."""
        if not self.exists(digest):
            return False
        self.touch(digest)
        return True

    # gc's two-phase delete (local only): a chunk is moved aside, then deleted or put back.

    def mtime(self, digest: str) -> float:
        try:
            return self.path(digest).stat().st_mtime
        except FileNotFoundError:
            return time.time()

    def trash_path(self, digest: str) -> Path:
        return self.tmp / f"{TRASH_PREFIX}.{validate_digest(digest)}"

    def trash(self, digest: str) -> bool:
        """Move the chunk out of reach of readers and dedup; False if it was gone already."""
        try:
            os.rename(self.path(digest), self.trash_path(digest))
        except FileNotFoundError:
            return False
        return True

    def untrash(self, digest: str) -> None:
        """Put a trashed chunk back (a backup recorded it meanwhile)."""
        target = self.path(digest)
        target.parent.mkdir(exist_ok=True)
        os.rename(self.trash_path(digest), target)
        _fs.fsync_dir(target.parent)

    def purge(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.trash_path(digest).unlink()

    def trashed(self) -> list[str]:
        """Digests left in the trash by a gc that died between its two phases."""
        n = len(TRASH_PREFIX) + 1
        return [p.name[n:] for p in self.tmp.glob(f"{TRASH_PREFIX}.*") if len(p.name) == n + 64]
