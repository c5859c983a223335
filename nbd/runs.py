"""Runs of bytes that share a kind (extent flags, data or hole, …), neighbours of one kind merged.

Every walker over a device's allocation produces such runs; they all extend the last run instead of
appending one of the same kind, so this is written once.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")


def append_run(runs: list[tuple[int, K]], length: int, kind: K) -> None:
    """Add ``length`` bytes of ``kind`` after ``runs``: the last run grows if it is of the same kind."""
    if runs and runs[-1][1] == kind:
        runs[-1] = (runs[-1][0] + length, kind)
    else:
        runs.append((length, kind))


__all__ = ["append_run"]
