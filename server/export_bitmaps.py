"""The dirty bitmaps a ``block-export-add`` publishes (``bitmaps``), found and checked as QEMU does.

An exported bitmap is busy for as long as the export lives (QEMU: no job, merge or removal may touch
it meanwhile); ``claim`` marks it and ``release`` undoes that when the export goes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, cast

from backup.node import BlockNode
from nbd.device import backing_of
from nbd.meta import DirtyMap
from server.errors import QmpError


class ExportableBitmap(DirtyMap, Protocol):
    """What the checks read of a bitmap (``backup.dirty_bitmap.DirtyBitmap``)."""

    recording: bool
    busy: bool
    inconsistent: bool


class _WithBitmaps(Protocol):
    bitmaps: Mapping[str, ExportableBitmap]


def node_bitmap(node: BlockNode, name: str) -> ExportableBitmap | None:
    """The bitmap ``name`` of ``node`` (the one lookup that depends on ``BlockNode.bitmaps``)."""
    return cast(_WithBitmaps, node).bitmaps.get(name)


def _lookup(node: BlockNode, name: str) -> tuple[BlockNode, ExportableBitmap] | None:
    """The bitmap on ``node`` or, as QEMU looks, on the first node down its backing chain that has
    one of that name (a fleecing overlay exported with its source's bitmap)."""
    below: BlockNode | None = node
    while below is not None:
        bitmap = node_bitmap(below, name)
        if bitmap is not None:
            return below, bitmap
        backing = backing_of(below.image)
        below = backing if isinstance(backing, BlockNode) else None
    return None


def find(node: BlockNode, names: Sequence[str], *, read_only: bool) -> list[ExportableBitmap]:
    """The bitmaps named, in order, with QEMU's errors: unknown, busy, inconsistent, and an enabled
    bitmap of a writable node in a read-only export (its contents would move under the reader)."""
    found: list[ExportableBitmap] = []
    for name in names:
        hit = _lookup(node, name)
        if hit is None:
            raise QmpError(f"Bitmap '{name}' is not found")
        owner, bitmap = hit
        if bitmap.busy:
            raise QmpError(f"Bitmap '{name}' is currently in use by another operation and cannot be used")
        if bitmap.inconsistent:
            raise QmpError(f"Bitmap '{name}' is inconsistent and cannot be used")
        if read_only and not owner.read_only and bitmap.recording:
            raise QmpError(f"Enabled bitmap '{name}' incompatible with readonly export")
        found.append(bitmap)
    return found


def claim(bitmaps: Iterable[ExportableBitmap]) -> None:
    """Mark the bitmaps of a new export busy."""
    for bitmap in bitmaps:
        bitmap.busy = True


def release(bitmaps: Iterable[DirtyMap]) -> None:
    """The export is gone: its bitmaps are free again."""
    for bitmap in bitmaps:
        cast(ExportableBitmap, bitmap).busy = False
