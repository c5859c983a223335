"""What the repositories received through this daemon: counted when a snapshot is committed or
aborted (from the writer's stats), read by the metrics collector. Kept apart from the metrics
module so the QMP commands do not import the metrics library."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class RepoTotals:
    committed: int = 0
    aborted: int = 0
    new_bytes: int = 0  # stored new (after deduplication)
    reused_bytes: int = 0  # found in the repository already: deduplicated
    zero_bytes: int = 0  # all-zero chunks, stored as nothing

    def add_commit(self, stats: dict[str, Any]) -> None:
        self.committed += 1
        self.new_bytes += int(stats.get("new-bytes", 0))
        self.reused_bytes += int(stats.get("reused-bytes", 0))
        self.zero_bytes += int(stats.get("zero-bytes", 0))


#: Per repository id, for the process (the daemon has one registry; tests may start several).
TOTALS: dict[str, RepoTotals] = {}


def totals(repo_id: str) -> RepoTotals:
    found = TOTALS.get(repo_id)
    if found is None:
        found = TOTALS[repo_id] = RepoTotals()
    return found
