"""What ``nbd-backup repo`` prints for people: the snapshot table, a backup's summary, verify's and gc's
reports (``--json`` prints the library's own objects instead)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from backup.repo.gc import GcReport
from backup.repo.manifest import Manifest
from backup.repo.verify import VerifyReport
from server.progress import human_bytes


def snapshot_table(manifests: Iterable[Manifest]) -> Iterator[str]:
    """One line per snapshot under a header; nothing at all when there is none."""
    rows = [
        (m.disk, m.id, human_bytes(m.size), human_bytes(int(m.stats.get("new-bytes", 0))), m.parent or "-")
        for m in manifests
    ]
    if not rows:
        return
    header = ("DISK", "ID", "SIZE", "NEW", "PARENT")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        yield "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()


def backup_line(m: Manifest) -> str:
    """``DISK@ID`` first (scripts take the first word), then what the backup cost."""
    s = m.stats
    return (
        f"{m.ref} size {human_bytes(m.size)}: new {human_bytes(int(s.get('new-bytes', 0)))} "
        f"(stored {human_bytes(int(s.get('stored-bytes', 0)))}), "
        f"reused {human_bytes(int(s.get('reused-bytes', 0)))}, zero {human_bytes(int(s.get('zero-bytes', 0)))}, "
        f"{float(s.get('seconds', 0)):.1f} s"
    )


def verify_lines(report: VerifyReport) -> Iterator[str]:
    for digest, reason in sorted(report.bad.items()):
        yield f"chunk {digest} is {reason}: breaks {', '.join(report.broken.get(digest, [])) or 'no snapshot'}"
    for ref, reason in sorted(report.bad_manifests.items()):
        yield f"snapshot {ref} is unreadable: {reason}"
    yield (
        f"checked {report.snapshots} snapshot(s), {report.checked_chunks} chunk(s), "
        f"{human_bytes(report.checked_bytes)}: "
        + ("ok" if report.ok else f"{len(report.bad)} bad chunk(s), {len(report.bad_manifests)} bad manifest(s)")
    )


def gc_line(report: GcReport) -> str:
    return (
        f"deleted {report.chunks_deleted} of {report.chunks_before} chunk(s), freed {human_bytes(report.bytes_freed)}; "
        f"removed {report.leases_removed} dead lease(s) and {report.temporaries_removed} temporary file(s)"
    )
