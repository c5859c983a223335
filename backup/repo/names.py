"""Names in a repository: disks, snapshot references, snapshot ids, sizes (design §3.6 "Precisely")."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from .errors import RepoError

_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_ID = re.compile(r"\d{8}T\d{6}\.\d{6}Z")
_SIZE = re.compile(r"(\d+)([KMG]?)", re.IGNORECASE)
_ID_FORMAT = "%Y%m%dT%H%M%S.%fZ"
MAX_SEGMENTS = 8
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 16 << 20
DEFAULT_CHUNK_SIZE = 4 << 20
_DIGEST = re.compile(r"[0-9a-f]{64}")


def validate_disk(name: str) -> str:
    """Return ``name`` if it is a disk name: 1-8 ``/``-separated segments, none starting with a dot."""
    parts = name.split("/") if isinstance(name, str) else []
    if not 1 <= len(parts) <= MAX_SEGMENTS or not all(_SEGMENT.fullmatch(p) for p in parts):
        raise RepoError(f"invalid disk name {name!r}: 1-8 segments of [A-Za-z0-9._-] separated by '/'")
    return name


def validate_snapshot_id(text: str) -> str:
    if not isinstance(text, str) or not _ID.fullmatch(text):
        raise RepoError(f"invalid snapshot id {text!r}")
    return text


def validate_digest(text: str) -> str:
    if not isinstance(text, str) or not _DIGEST.fullmatch(text):
        raise RepoError(f"invalid chunk digest {text!r}")
    return text


def parse_snapshot_ref(text: str) -> tuple[str, str]:
    """``DISK[@SNAP]`` → (disk, snapshot id or ``"latest"``)."""
    disk, sep, snap = text.partition("@")
    validate_disk(disk)
    if not sep:
        return disk, "latest"
    if snap != "latest":
        validate_snapshot_id(snap)
    return disk, snap


def parse_size(text: str) -> int:
    """``64K``, ``4M``, ``1G`` (binary multiples) or plain bytes."""
    m = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m:
        raise RepoError(f"invalid size {text!r}: a number of bytes, optionally with K, M or G")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def validate_chunk_size(size: int) -> int:
    if not (MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE and size & (size - 1) == 0):
        raise RepoError(f"invalid chunk size {size}: a power of two from 64K to 16M")
    return size


def snapshot_time(snap_id: str) -> datetime:
    """The UTC instant a snapshot id encodes."""
    return datetime.strptime(validate_snapshot_id(snap_id), _ID_FORMAT).replace(tzinfo=UTC)


def new_snapshot_id(previous: str | None, now: datetime | None = None) -> str:
    """An id for a snapshot committed ``now``, strictly greater than ``previous`` (1 µs later if the clock lags)."""
    when = (now or datetime.now(UTC)).astimezone(UTC)
    if previous is not None:
        floor = snapshot_time(previous) + timedelta(microseconds=1)
        when = max(when, floor)
    return when.strftime(_ID_FORMAT)


def iso_utc(when: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``, microseconds included (the manifests' ``created``)."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
