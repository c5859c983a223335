"""The pure parts of ``nbd-backup repo``: dirty ranges widened to whole chunks, the writer's buffer budget,
and what the commands print."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from backup.repo.manifest import Manifest
from backup.repo.verify import VerifyReport
from server.repo_report import backup_line, snapshot_table, verify_lines
from server.repo_transfer import BUFFER_BUDGET, request_size, whole_chunks, writer_buffers

CS = 64 << 10
MiB = 1 << 20


def test_dirty_ranges_become_whole_merged_chunks_clipped_to_the_disk() -> None:
    size = 10 * CS + 100
    assert whole_chunks([(5, 1), (CS - 1, 2), (4 * CS, CS), (10 * CS + 3, 1)], CS, size) == [
        (0, 2 * CS),
        (4 * CS, CS),
        (10 * CS, 100),
    ]
    assert whole_chunks([(0, 0)], CS, size) == []


@given(st.lists(st.tuples(st.integers(0, 40 * CS - 1), st.integers(1, 5 * CS)), max_size=20))
def test_whole_chunks_cover_every_dirty_byte_with_aligned_disjoint_runs(dirty: list[tuple[int, int]]) -> None:
    size = 40 * CS
    dirty = sorted((o, min(n, size - o)) for o, n in dirty)
    runs = whole_chunks(dirty, CS, size)
    covered = {c for o, n in runs for c in range(o // CS, (o + n - 1) // CS + 1)}
    assert covered == {c for o, n in dirty for c in range(o // CS, (o + n - 1) // CS + 1)}
    for (o1, n1), (o2, _) in pairwise(runs):
        assert o1 + n1 < o2  # disjoint and not touching (merged)
    assert all(o % CS == 0 and (n % CS == 0 or o + n == size) for o, n in runs)


def test_requests_and_buffers_stay_bounded_for_every_chunk_size() -> None:
    for shift in range(16, 25):
        cs = 1 << shift
        step = request_size(cs)
        assert MiB <= step <= 4 * MiB
        buffers = writer_buffers(cs, step * max(2, 4 * MiB // step))
        assert buffers >= 4 and (buffers * cs <= BUFFER_BUDGET or buffers == 4)
        assert buffers * cs >= min(2 * 4 * MiB, BUFFER_BUDGET)  # the copy's window twice over, within budget


def _manifest(disk: str, snap: str, parent: str | None) -> Manifest:
    stats = {"new-bytes": 3 * MiB, "stored-bytes": MiB, "zero-bytes": 0, "reused-bytes": 2 * MiB, "seconds": 1.25}
    return Manifest(disk, snap, "2026-12-07T10:11:12.000000Z", 5 * MiB, CS, parent, [None] * 80, stats)


def test_what_the_commands_print() -> None:
    a = _manifest("vm1/disk0", "20261207T101112.000000Z", None)
    b = _manifest("vm1/disk0", "20261207T101113.000000Z", a.id)
    assert list(snapshot_table([])) == []
    header, first, second = snapshot_table([a, b])
    assert header.split() == ["DISK", "ID", "SIZE", "NEW", "PARENT"]
    assert first.split() == ["vm1/disk0", a.id, "5.0", "MiB", "3.0", "MiB", "-"]
    assert second.split()[-1] == a.id
    assert backup_line(b).startswith(f"vm1/disk0@{b.id} size 5.0 MiB: new 3.0 MiB (stored 1.0 MiB)")
    report = VerifyReport(bad={"ab" * 32: "corrupt"}, broken={"ab" * 32: [a.ref, b.ref]}, snapshots=2)
    lines = list(verify_lines(report))
    assert lines[0] == f"chunk {'ab' * 32} is corrupt: breaks {a.ref}, {b.ref}"
    assert lines[-1].endswith("1 bad chunk(s), 0 bad manifest(s)")
    assert list(verify_lines(VerifyReport()))[-1].endswith(": ok")
