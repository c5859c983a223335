"""What gc of either store shares: its report, and the chunks the published manifests need."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .errors import SnapshotNotFound
from .repository import Repository


@dataclass
class GcReport:
    chunks_before: int = 0
    chunks_deleted: int = 0
    bytes_freed: int = 0
    chunks_rescued: int = 0
    leases_removed: int = 0
    temporaries_removed: int = 0
    #: Unreferenced chunks kept because Object Lock still retains them (S3 only; freed by a later gc).
    chunks_retained: int = 0

    def to_json(self) -> str:
        return json.dumps({k.replace("_", "-"): v for k, v in asdict(self).items()})


def manifest_chunks(repo: Repository, seen: set[tuple[str, str]]) -> set[str]:
    """Chunks of every published manifest not in ``seen`` (``(disk, id)``, which is updated)."""
    marked: set[str] = set()
    for disk in repo.disks():
        for snap_id in repo.snapshot_ids(disk):
            if (disk, snap_id) in seen:
                continue
            try:
                m = repo.load_manifest(disk, snap_id)
            except SnapshotNotFound:
                continue  # pruned meanwhile
            seen.add((disk, snap_id))
            marked.update(c for c in m.chunks if c is not None)
    return marked
