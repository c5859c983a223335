"""Errors of the backup repository.

They are ``OSError`` so that a block device built on the repository reports them with an errno (a
bad chunk is EIO to an NBD client), and their ``str()`` is the one-line message the CLI prints.
"""

from __future__ import annotations

import errno as _errno
import logging

log = logging.getLogger("nbd_backup.repo")


class RepoError(OSError):
    """Base of every repository error; EINVAL unless a subclass says otherwise."""

    default_errno = _errno.EINVAL

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(err if err is not None else self.default_errno, message)

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        return (self.__class__, (str(self.strerror), int(self.errno or 0)))


class NotARepository(RepoError):
    """The directory holds no repository (or one of a format we do not know)."""


class SnapshotNotFound(RepoError):
    default_errno = _errno.ENOENT


class DiskBusy(RepoError):
    """Another writer (a backup, a prune) holds the disk."""

    default_errno = _errno.EBUSY


class Retained(RepoError):
    """Object Lock retains the object: it cannot be removed before ``until`` (epoch seconds)."""

    default_errno = _errno.EPERM

    def __init__(self, what: str, until: float) -> None:
        from datetime import UTC, datetime

        self.what = what
        self.until = until
        when = datetime.fromtimestamp(until, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        super().__init__(f"snapshot {what} is under Object Lock retention until {when}")

    def __reduce__(self) -> tuple[type, tuple[str, float]]:  # type: ignore[override]
        return (self.__class__, (self.what, self.until))


class _ChunkError(RepoError):
    default_errno = _errno.EIO
    what = ""

    def __init__(self, digest: str, detail: str = "") -> None:
        self.digest = digest
        message = f"repository: chunk {digest} is {self.what}"
        super().__init__(message + (f" ({detail})" if detail else ""))

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # type: ignore[override]
        return (self.__class__, (self.digest, ""))

    def log(self) -> None:
        """Name the chunk in the log, as every reader of a bad chunk must."""
        log.error("repository: chunk %s is %s", self.digest, self.what)


class ChunkCorrupt(_ChunkError):
    """The stored bytes do not decompress to data of the chunk's digest and length."""

    what = "corrupt"


class ChunkMissing(_ChunkError):
    """A chunk that a manifest names is not in the repository."""

    what = "missing"
