"""The meta contexts an export publishes beyond ``base:allocation``, as QEMU names and answers them.

``qemu:dirty-bitmap:NAME`` describes a dirty bitmap (flag bit 0: dirty) and ``qemu:allocation-depth``
says at which layer of a backing chain each byte is allocated (0: nowhere, 1: the top image, 2: its
backing file, …) — what libvirt's pull-mode backups and virtnbdbackup read. The protocol core only
sees context names (``context_names``); the server turns the selected ones into descriptors here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from nbd.constants import META_BASE_ALLOCATION

ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
DIRTY = 1  # the one flag of a qemu:dirty-bitmap descriptor

#: Queries that, in NBD_OPT_LIST_META_CONTEXT only, stand for every context under them (QEMU's
#: leaf-less queries; no other prefix selects anything).
LIST_PREFIXES = ("base:", "qemu:", DIRTY_BITMAP_PREFIX)


class DirtyMap(Protocol):
    """What an export needs of a dirty bitmap (``backup.dirty_bitmap.DirtyBitmap`` is one)."""

    name: str

    def dirty_runs(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """Runs ``(length, dirty)`` covering exactly ``[offset, offset + length)``."""
        ...


Depth = Callable[[int, int], Awaitable[list[tuple[int, int]]]]
"""An allocation-depth query: runs ``(length, depth)`` of a range (see ``nbd.device.AllocationDepth``)."""


def context_names(bitmaps: Sequence[DirtyMap], allocation_depth: bool) -> tuple[str, ...]:
    """The contexts an export publishes besides ``base:allocation``, in QEMU's order."""
    names = [ALLOCATION_DEPTH] if allocation_depth else []
    names.extend(DIRTY_BITMAP_PREFIX + bitmap.name for bitmap in bitmaps)
    return tuple(names)


def select(queries: Sequence[str], names: Sequence[str], *, listing: bool) -> list[int]:
    """Indexes into ``names`` that the queries select, in ``names``' order, each once (QEMU answers
    in its own order whatever the order of the queries). No query lists all; no query sets none.
    A name exported twice is matched exactly by its first index only, as QEMU does."""
    if not queries:
        return list(range(len(names))) if listing else []
    chosen: set[int] = set()
    for query in queries:
        if listing and query in LIST_PREFIXES:
            chosen.update(i for i, name in enumerate(names) if name.startswith(query))
        elif query in names:
            chosen.add(names.index(query))
    return sorted(chosen)


def all_names(extra: Sequence[str]) -> tuple[str, ...]:
    """Every context of an export: ``base:allocation`` first, then the extra ones."""
    return (META_BASE_ALLOCATION, *extra)


def clip(runs: Sequence[tuple[int, int]], length: int, one: bool) -> list[tuple[int, int]]:
    """Descriptors ``(length, flags)`` from runs: neighbours with equal flags merged, at most
    ``length`` bytes, at least one descriptor unless ``runs`` is empty; ``one``: only the first."""
    out: list[tuple[int, int]] = []
    remaining = length
    for run, flags in runs:
        run = min(run, remaining)
        if run <= 0:
            break
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + run, flags)
        else:
            if one and out:
                break
            out.append((run, flags))
        remaining -= run
    return out


def dirty_descriptors(bitmap: DirtyMap, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
    """A ``qemu:dirty-bitmap`` chunk's descriptors for the range."""
    runs = bitmap.dirty_runs(offset, length)
    return clip([(n, DIRTY if dirty else 0) for n, dirty in runs], length, one)


async def depth_descriptors(depth: Depth | None, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
    """A ``qemu:allocation-depth`` chunk's descriptors; a device that cannot tell is one layer that
    holds everything (depth 1, as QEMU answers for a raw file, holes included)."""
    if depth is None:
        return [(length, 1)]
    return clip(await depth(offset, length), length, one)
