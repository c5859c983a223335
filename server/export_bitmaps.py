"""The dirty bitmaps a ``block-export-add`` publishes (``bitmaps``), found and checked as QEMU does.

An exported bitmap is busy for as long as the export lives (QEMU: no job, merge or removal may touch
it meanwhile); ``claim`` marks it and ``release`` undoes that when the export goes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import cast

from backup.dirty_bitmap import DirtyBitmap
from backup.errors import BackupError
from backup.node import BlockNode
from nbd.device import backing_of
from nbd.meta import DirtyMap
from server.errors import QmpError


def node_bitmap(node: BlockNode, name: str) -> DirtyBitmap | None:
    """The bitmap ``name`` of ``node``, or None."""
    return node.bitmaps.get(name)


def _lookup(node: BlockNode, name: str) -> tuple[BlockNode, DirtyBitmap] | None:
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


BitmapRef = str | Mapping[str, str]
"""QMP's ``BlockDirtyBitmapOrStr``: a bitmap name of the exported node (or down its backing chain),
or ``{"node": …, "name": …}`` naming any node's bitmap."""


def find(
    node: BlockNode, refs: Sequence[BitmapRef], nodes: Mapping[str, BlockNode], *, read_only: bool
) -> list[DirtyBitmap]:
    """The bitmaps named, in order, with QEMU's errors: unknown, busy, inconsistent, and an enabled
    bitmap of a writable node in a read-only export (its contents would move under the reader).
    The same bitmap may be named twice (qemu-storage-daemon 7.2 accepts that too)."""
    found: list[DirtyBitmap] = []
    for ref in refs:
        if isinstance(ref, str):
            name = ref
            hit = _lookup(node, name)
            if hit is None:
                raise QmpError(f"Bitmap '{name}' is not found")
            owner: BlockNode | None = hit[0]
            bitmap = hit[1]
        else:
            name = ref["name"]
            other = nodes.get(ref["node"])
            if other is None:
                raise QmpError(f"Node '{ref['node']}' not found")
            named = node_bitmap(other, name)
            if named is None:
                raise QmpError(f"Dirty bitmap '{name}' not found")
            # qemu-storage-daemon 7.2 exports another node's recording bitmap read-only: it does
            # not apply the check below to this form.
            owner, bitmap = None, named
        try:
            bitmap.check_usable()  # busy, then inconsistent: QEMU's order and texts
        except BackupError as exc:
            raise QmpError.from_backup_error(exc) from None
        if read_only and owner is not None and not owner.read_only and bitmap.recording:
            raise QmpError(f"Enabled bitmap '{name}' incompatible with readonly export")
        found.append(bitmap)
    return found


def claim(bitmaps: Iterable[DirtyBitmap]) -> None:
    """Mark the bitmaps of a new export busy."""
    for bitmap in bitmaps:
        bitmap.busy = True


def release(bitmaps: Iterable[DirtyMap]) -> None:
    """The export is gone: its bitmaps are free again."""
    for bitmap in bitmaps:
        cast(DirtyBitmap, bitmap).busy = False
