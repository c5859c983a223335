"""prune: restic/borg retention planning (properties), dry run, manifests only, under the writer lock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from repokit import CS, Where, new_repo, rand_chunk, write_snapshot

from backup.repo.errors import DiskBusy, RepoError
from backup.repo.manifest import Manifest
from backup.repo.names import new_snapshot_id, snapshot_time
from backup.repo.prune import PruneRules, plan_prune, prune

BASE = datetime(2026, 1, 1, tzinfo=UTC)


def _snap(when: datetime) -> Manifest:
    snap_id = new_snapshot_id(None, when)
    return Manifest("d", snap_id, "", 0, CS, None, [], {})


def _snaps(offsets_hours: list[int]) -> list[Manifest]:
    return [_snap(BASE + timedelta(hours=h)) for h in sorted(set(offsets_hours))]


def _ids(ms: list[Manifest]) -> list[str]:
    return [m.id for m in ms]


def test_daily_keeps_the_newest_of_each_of_the_last_days() -> None:
    snaps = _snaps([0, 5, 23, 24, 30, 50, 72 + 1])  # days 1 (x3), 2 (x2), 3, 4
    keep, remove = plan_prune(snaps, keep_daily=3)
    assert [snapshot_time(i).strftime("%d %H") for i in _ids(keep)] == ["02 06", "03 02", "04 01"]
    assert _ids(remove) == _ids(snaps[:4])
    keep, _ = plan_prune(snaps, keep_last=2, keep_daily=1)
    assert _ids(keep) == _ids(snaps[-2:])
    keep, _ = plan_prune(snaps, keep_monthly=5)
    assert _ids(keep) == [snaps[-1].id]


def test_weekly_counts_iso_weeks_in_utc() -> None:
    # 2026-01-04 is a Sunday (ISO week 1 ends), 2026-01-05 a Monday (week 2)
    sun = _snap(datetime(2026, 1, 4, 23, 59, tzinfo=UTC))
    mon = _snap(datetime(2026, 1, 5, 0, 1, tzinfo=UTC))
    tue = _snap(datetime(2026, 1, 6, tzinfo=UTC))
    keep, remove = plan_prune([sun, mon, tue], keep_weekly=2)
    assert _ids(keep) == [sun.id, tue.id] and _ids(remove) == [mon.id]


def test_no_rule_keeps_everything() -> None:
    snaps = _snaps([1, 2, 3])
    assert plan_prune(snaps) == (snaps, [])
    with pytest.raises(RepoError):
        plan_prune(snaps, keep_last=-1)


_hours = st.lists(st.integers(min_value=0, max_value=24 * 400), max_size=40)
_n = st.integers(min_value=0, max_value=6)


@settings(max_examples=150, deadline=None)
@given(_hours, _n, _n, _n, _n)
def test_plan_properties(hours: list[int], last: int, daily: int, weekly: int, monthly: int) -> None:
    snaps = _snaps(hours)
    keep, remove = plan_prune(snaps, last, daily, weekly, monthly)
    # a partition of the input, both oldest first
    assert sorted(_ids(keep) + _ids(remove)) == _ids(snaps)
    assert _ids(keep) == sorted(_ids(keep)) and not set(_ids(keep)) & set(_ids(remove))
    if not snaps:
        return
    if last or daily or weekly or monthly:
        assert snaps[-1] in keep  # the newest always stays under any rule
        assert len(keep) <= last + daily + weekly + monthly
    else:
        assert remove == []
        return
    # oracle: keep-last N, plus for each rule the newest snapshot of each of its N newest periods
    expected = set(_ids(snaps[::-1][:last]))
    for count, period in (
        (daily, lambda t: t.date()),
        (weekly, lambda t: t.isocalendar()[:2]),
        (monthly, lambda t: (t.year, t.month)),
    ):
        newest: dict[object, str] = {}
        for m in snaps:
            newest[period(snapshot_time(m.id))] = m.id  # oldest first: the last one of a period wins
        expected |= set(sorted(newest.values())[-count:] if count else [])
    assert set(_ids(keep)) == expected


def test_prune_removes_manifests_only_and_dry_run_nothing(where: Where) -> None:
    repo = new_repo(where)
    data = [rand_chunk() for _ in range(4)]
    ms = [write_snapshot(repo, "d", [c]) for c in data]
    write_snapshot(repo, "e", [data[0]])
    chunks_before = set(repo.chunks.list_digests())
    would = prune(repo, "d", PruneRules(keep_last=1), dry_run=True)
    assert _ids(would) == _ids(ms[:3]) and len(repo.snapshots("d")) == 4
    assert _ids(prune(repo, None, PruneRules(keep_last=1))) == _ids(ms[:3])
    assert _ids(repo.snapshots("d")) == [ms[-1].id] and len(repo.snapshots("e")) == 1
    assert set(repo.chunks.list_digests()) == chunks_before
    assert prune(repo, "nothing", PruneRules(keep_last=1)) == [] and "nothing" not in repo.disks()
    if where.local:
        assert not (repo.path / "disks" / "nothing").exists()
    with pytest.raises(RepoError, match="keep rule"):
        prune(repo, "d", PruneRules(), dry_run=True)


def test_prune_waits_for_no_writer(where: Where) -> None:
    repo = new_repo(where)
    write_snapshot(repo, "d", [rand_chunk()])
    write_snapshot(repo, "d", [rand_chunk()])
    with repo.begin_write("d"):
        with pytest.raises(DiskBusy):
            prune(repo, "d", PruneRules(keep_last=1))
        assert len(prune(repo, "d", PruneRules(keep_last=1), dry_run=True)) == 1
    assert len(prune(repo, "d", PruneRules(keep_last=1))) == 1
