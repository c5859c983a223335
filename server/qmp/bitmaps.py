"""QMP dirty-bitmap commands: ``block-dirty-bitmap-add``, ``-remove``, ``-clear``, ``-enable``,
``-disable`` and ``-merge``, with qemu-storage-daemon 7.2's arguments, checks, order of checks and
error texts (integration/test_qmp_bitmaps_diff.py runs the same sequences against both).

The bitmaps themselves are ``backup.dirty_bitmap.DirtyBitmap`` on ``BlockNode.bitmaps``; the node
marks them on every write. ``persistent`` is accepted on qcow2 nodes only (QEMU stores persistent
bitmaps in qcow2 images and refuses every other format).
"""

from __future__ import annotations

from typing import Any

from backup import persistent_bitmaps
from backup.dirty_bitmap import MAX_NAME_SIZE, DirtyBitmap, check_granularity, default_granularity
from backup.errors import BackupError
from backup.node import BlockNode
from nbd.device import cluster_size
from server.errors import QmpError
from server.qmp.dispatch import CommandRegistry
from server.qmp.schema import Alternate, Struct
from server.registry import Registry, generic

BLOCK_DIRTY_BITMAP = Struct("BlockDirtyBitmap", {"node": "str", "name": "str"})
BLOCK_DIRTY_BITMAP_ADD = Struct(
    "BlockDirtyBitmapAdd",
    {"node": "str", "name": "str", "*granularity": "uint32", "*persistent": "bool", "*disabled": "bool"},
)
BLOCK_DIRTY_BITMAP_OR_STR = Alternate("BlockDirtyBitmapOrStr", ["str", BLOCK_DIRTY_BITMAP])
BLOCK_DIRTY_BITMAP_MERGE = Struct(
    "BlockDirtyBitmapMerge", {"node": "str", "target": "str", "bitmaps": [BLOCK_DIRTY_BITMAP_OR_STR]}
)
#: Drivers whose images can hold persistent bitmaps.
PERSISTENT_DRIVERS = ("qcow2",)


def _qmp(exc: BackupError) -> QmpError:
    return QmpError.from_backup_error(exc)


def lookup_node(reg: Registry, name: str) -> BlockNode:
    """QEMU's ``block_dirty_bitmap_lookup`` wording for a missing node (not ``bdrv_lookup_bs``'s)."""
    node = reg.nodes.get(name)
    if node is None:
        raise generic(f"Node '{name}' not found")
    return node


def lookup(reg: Registry, node_name: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
    """The node and its bitmap ``name``, with QEMU's refusals."""
    node = lookup_node(reg, node_name)
    try:
        return node, node.bitmap(name)
    except BackupError as exc:
        raise _qmp(exc) from None


def add_bitmap(reg: Registry, args: dict[str, Any]) -> DirtyBitmap:
    """``block-dirty-bitmap-add``: checks in QEMU 7.2's order (name, node, granularity, name taken, whether
    the image can store it, name length)."""
    name = args["name"]
    if not name:
        raise generic("Bitmap name cannot be empty")
    node = reg.node(args["node"])
    granularity = args.get("granularity")
    if granularity is None:
        granularity = default_granularity(cluster_size(node.image))
    persistent = args.get("persistent", False)
    try:
        check_granularity(granularity)
        if name in node.bitmaps:
            raise generic(f"Bitmap already exists: {name}")
        if persistent and node.driver not in PERSISTENT_DRIVERS:
            raise generic(f"Can't store persistent bitmaps to {node.name}: Operation not supported")
        store = persistent_bitmaps.store_of(node.device) if persistent else None
        reason = None if store is None else persistent_bitmaps.cannot_store(store, name, granularity, node.size)
        if reason is not None:
            raise generic(f"Can't make bitmap '{name}' persistent in '{node.name}': {reason}")
        if len(name.encode()) > MAX_NAME_SIZE:
            raise generic(f"Bitmap name too long: {name}")
        bitmap = DirtyBitmap(
            name, node.size, granularity, persistent=persistent, recording=not args.get("disabled", False)
        )
        node.add_bitmap(bitmap)
    except BackupError as exc:
        raise _qmp(exc) from None
    return bitmap


def merge_bitmaps(reg: Registry, args: dict[str, Any]) -> None:
    """``block-dirty-bitmap-merge``: every source is found and checked before the target changes, so a
    refusal leaves it as it was. Sources are names on the target's node or ``{node, name}`` anywhere;
    granularities may differ, sizes may not."""
    node, target = lookup(reg, args["node"], args["target"])
    sources: list[DirtyBitmap] = []
    try:
        for item in args["bitmaps"]:
            source = node.bitmap(item) if isinstance(item, str) else lookup(reg, item["node"], item["name"])[1]
            target.check_usable(readonly=True)
            source.check_usable()  # qsd 7.2 refuses a busy source too (a backup's)
            if source.size != target.size:
                target.merge_from(source)  # raises QEMU's "different sizes" refusal
            sources.append(source)
    except BackupError as exc:
        raise _qmp(exc) from None
    # An empty list merges nothing: qemu-storage-daemon 7.2 dies on it; QEMU's documentation ("on
    # error, target is unchanged"; nothing to merge is no error) and newer releases return success.
    for source in sources:
        target.merge_from(source)


def register(commands: CommandRegistry) -> None:
    """Add the dirty-bitmap commands; handlers get the daemon's ``Registry`` as ``ctx``."""

    @commands.command("block-dirty-bitmap-add", args=BLOCK_DIRTY_BITMAP_ADD)
    async def block_dirty_bitmap_add(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Create a dirty bitmap on a node; it records every later write unless ``disabled``."""
        add_bitmap(reg, args)
        return {}

    @commands.command("block-dirty-bitmap-remove", args=BLOCK_DIRTY_BITMAP)
    async def block_dirty_bitmap_remove(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Stop tracking and delete a dirty bitmap (refused while a job or export uses it)."""
        node, bitmap = lookup(reg, args["node"], args["name"])
        try:
            bitmap.check_usable(readonly=True, inconsistent=False)
            await persistent_bitmaps.remove(node.device, bitmap)  # QEMU: off the image at once
            node.remove_bitmap(args["name"])
        except BackupError as exc:
            raise _qmp(exc) from None
        except OSError as exc:
            raise generic(f"Failed to remove bitmap '{bitmap.name}' from the image: {exc.strerror or exc}") from None
        return {}

    @commands.command("block-dirty-bitmap-clear", args=BLOCK_DIRTY_BITMAP)
    async def block_dirty_bitmap_clear(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Mark every granule of a bitmap clean."""
        _, bitmap = lookup(reg, args["node"], args["name"])
        try:
            bitmap.check_usable(readonly=True)
        except BackupError as exc:
            raise _qmp(exc) from None
        bitmap.clear()
        return {}

    @commands.command("block-dirty-bitmap-enable", args=BLOCK_DIRTY_BITMAP)
    async def block_dirty_bitmap_enable(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Start recording writes in a bitmap."""
        _set_recording(reg, args, True)
        return {}

    @commands.command("block-dirty-bitmap-disable", args=BLOCK_DIRTY_BITMAP)
    async def block_dirty_bitmap_disable(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Stop recording writes in a bitmap (its bits stay)."""
        _set_recording(reg, args, False)
        return {}

    @commands.command("block-dirty-bitmap-merge", args=BLOCK_DIRTY_BITMAP_MERGE)
    async def block_dirty_bitmap_merge(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Set in ``target`` every granule that is dirty in any of ``bitmaps``."""
        merge_bitmaps(reg, args)
        return {}


def _set_recording(reg: Registry, args: dict[str, Any], recording: bool) -> None:
    _, bitmap = lookup(reg, args["node"], args["name"])
    try:
        bitmap.check_usable()
    except BackupError as exc:
        raise _qmp(exc) from None
    bitmap.recording = recording
