"""Retention: which snapshots to keep, as restic and borg count (newest of each period, in UTC).

``prune`` removes manifests only; ``gc`` frees the chunks nothing needs any more.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import datetime

from .errors import RepoError, Retained
from .manifest import Manifest
from .names import snapshot_time
from .repository import Repository


@dataclass(frozen=True)
class PruneRules:
    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    def empty(self) -> bool:
        return not (self.keep_last or self.keep_daily or self.keep_weekly or self.keep_monthly)


def _periods() -> list[Callable[[datetime], Hashable]]:
    return [
        lambda t: (t.year, t.month, t.day),
        lambda t: t.isocalendar()[:2],
        lambda t: (t.year, t.month),
    ]


def plan_prune(
    snapshots: list[Manifest],
    keep_last: int = 0,
    keep_daily: int = 0,
    keep_weekly: int = 0,
    keep_monthly: int = 0,
) -> tuple[list[Manifest], list[Manifest]]:
    """(keep, remove), both oldest first. Each rule keeps the newest snapshot of each of its N most recent
    periods that hold one (day, ISO week, month of the snapshot id's UTC time); keep-last the N newest.
    With no rule at all everything is kept."""
    if min(keep_last, keep_daily, keep_weekly, keep_monthly) < 0:
        raise RepoError("keep counts cannot be negative")
    ordered = sorted(snapshots, key=lambda m: m.id)
    if not (keep_last or keep_daily or keep_weekly or keep_monthly):
        return ordered, []
    newest_first = ordered[::-1]
    kept = {m.id for m in newest_first[:keep_last]}
    for count, period in zip((keep_daily, keep_weekly, keep_monthly), _periods(), strict=True):
        last: Hashable = None
        for m in newest_first:
            if count <= 0:
                break
            p = period(snapshot_time(m.id))
            if p != last:
                kept.add(m.id)
                last = p
                count -= 1
    keep = [m for m in ordered if m.id in kept]
    remove = [m for m in ordered if m.id not in kept]
    return keep, remove


def prune(repo: Repository, disk: str | None, rules: PruneRules, dry_run: bool = False) -> list[Manifest]:
    """Remove (or with ``dry_run`` only list) the snapshots the rules do not keep, each disk separately.

    Removal happens under the disk's writer lock (``DiskBusy`` while a backup of it runs); a dry run
    takes no lock. Returns the removed snapshots. A snapshot that Object Lock still retains stays: the
    others go, then a RepoError names it and until when it is retained.
    """
    if rules.empty():
        raise RepoError("prune needs at least one keep rule")
    removed: list[Manifest] = []
    retained: list[Retained] = []
    for d in [disk] if disk is not None else repo.disks():
        if dry_run or not repo.snapshot_ids(d):
            removed += _plan(repo, d, rules)  # nothing to lock for a disk without snapshots
            continue
        lock = repo.hold_disk(d)
        try:
            for m in _plan(repo, d, rules):
                try:
                    repo.store.delete_manifest(d, m.id)
                except Retained as e:  # Object Lock: it stays until its retention ends
                    retained.append(e)
                    continue
                removed.append(m)
        finally:
            lock.release()
    if retained:
        others = f" ({len(retained) - 1} more retained)" if len(retained) > 1 else ""
        done = f"; removed {len(removed)} other snapshot(s)" if removed else ""
        raise RepoError(f"cannot prune: {retained[0]}{others}{done}", retained[0].errno)
    return removed


def _plan(repo: Repository, disk: str, rules: PruneRules) -> list[Manifest]:
    return plan_prune(repo.snapshots(disk), rules.keep_last, rules.keep_daily, rules.keep_weekly, rules.keep_monthly)[1]
