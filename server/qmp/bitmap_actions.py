"""The dirty-bitmap ``transaction`` actions (QEMU 7.2's ``block-dirty-bitmap-add``, ``-remove``,
``-clear``, ``-enable``, ``-disable`` and ``-merge`` action ops), so a backup and a bitmap change
happen at one point in time — the usual recipe: a full backup and a new bitmap in one transaction,
then incrementals from that bitmap.

Each action's ``prepare`` makes the change with the QMP command's own checks and texts
(``server.qmp.bitmaps``) and keeps what ``abort`` needs to undo it; ``remove`` only marks the bitmap
busy until ``commit`` removes it, as QEMU does. Every action drains the bitmap's node from its
``prepare`` to the transaction's ``clean`` (QEMU drains all I/O for the whole transaction): our
prepares may wait (a backup opens its target), and no guest write may land between a bitmap's change
and a backup's point in time. Like QEMU's, these actions refuse ``completion-mode: grouped``.
"""

from __future__ import annotations

import contextlib
from typing import Any

from backup.dirty_bitmap import DirtyBitmap
from backup.errors import BackupError
from backup.node import BlockNode
from backup.transaction import Transaction
from server.errors import QmpError
from server.qmp.bitmaps import add_bitmap, lookup, merge_bitmaps
from server.registry import Registry

KINDS = (
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
)


def _copy(bitmap: DirtyBitmap) -> DirtyBitmap:
    """The bits as they are now (QEMU's ``backup`` HBitmap that ``abort`` restores)."""
    return DirtyBitmap.from_bytes(bitmap.name, bitmap.size, bitmap.granularity, bitmap.to_bytes())


def _restore(bitmap: DirtyBitmap, saved: DirtyBitmap) -> None:
    bitmap.clear()
    bitmap.merge_from(saved)


class BitmapAction:
    """One ``block-dirty-bitmap-*`` action of a transaction."""

    def __init__(self, reg: Registry, kind: str, args: dict[str, Any], txn: Transaction) -> None:
        self.reg = reg
        self.kind = kind
        self.args = args
        self.txn = txn
        self._drain: contextlib.AbstractAsyncContextManager[None] | None = None
        self._undo: list[Any] = []  # what abort restores, set once the change is made
        self._bitmap: DirtyBitmap | None = None
        self._node: BlockNode | None = None

    async def prepare(self) -> None:
        try:
            self.txn.check_completion_mode(self.kind)
        except BackupError as exc:
            raise QmpError.from_backup_error(exc) from None
        node = self.reg.nodes.get(self.args["node"])
        if node is not None:
            drain = node.drained()
            await drain.__aenter__()
            self._drain = drain
        verb = self.kind.removeprefix("block-dirty-bitmap-")
        if verb == "add":
            self._bitmap = add_bitmap(self.reg, self.args)
            self._node = node
            return
        if verb == "merge":
            _, target = lookup(self.reg, self.args["node"], self.args["target"])
            saved = _copy(target)
            merge_bitmaps(self.reg, self.args)
            self._bitmap, self._undo = target, [saved]
            return
        self._node, bitmap = lookup(self.reg, self.args["node"], self.args["name"])
        try:
            if verb in ("enable", "disable"):
                bitmap.check_usable()
                self._undo = [bitmap.recording]
                bitmap.recording = verb == "enable"
            elif verb == "clear":
                bitmap.check_usable()
                self._undo = [_copy(bitmap)]
                bitmap.clear()
            else:  # remove: busy until commit removes it, so no later action of the transaction uses it
                bitmap.check_usable(inconsistent=False)
                bitmap.busy = True
        except BackupError as exc:
            raise QmpError.from_backup_error(exc) from None
        self._bitmap = bitmap

    def commit(self) -> None:
        bitmap, node = self._bitmap, self._node
        if self.kind == "block-dirty-bitmap-remove" and bitmap is not None and node is not None:
            bitmap.busy = False
            node.forget_bitmap(bitmap)

    async def abort(self) -> None:
        bitmap, node = self._bitmap, self._node
        if bitmap is None:
            return  # the change was never made
        verb = self.kind.removeprefix("block-dirty-bitmap-")
        if verb == "add" and node is not None:
            node.forget_bitmap(bitmap)
        elif verb in ("enable", "disable"):
            bitmap.recording = self._undo[0]
        elif verb in ("clear", "merge"):
            _restore(bitmap, self._undo[0])
        elif verb == "remove":
            bitmap.busy = False

    async def clean(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None:
            await drain.__aexit__(None, None, None)


__all__ = ["KINDS", "BitmapAction"]
