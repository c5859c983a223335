"""Persistent dirty bitmaps between a node and its qcow2 image, with QEMU's load and store rules.

At open a qcow2 node gets its image's stored bitmaps as ``DirtyBitmap``s (persistent, recording as
the ``auto`` flag says; one left ``in_use`` by a crash is inconsistent, disabled and empty; those of
an image opened read-only are readonly: their bits may not be cleared, merged into or removed — all
as in QEMU). At
the node's clean close its persistent bitmaps go back to the image (recording -> ``auto``, ``in_use``
cleared): an inconsistent one is written back as it was loaded. ``block-dirty-bitmap-remove`` takes
a persistent bitmap off the image at once (``remove``), as QEMU does, so a crash cannot bring it back. The
image keeps the order of the bitmaps it had and gets new ones after them, as QEMU's store does.
The device (``backup.qcow2.device``) does the crash-safe writing; this module only translates.
"""

from __future__ import annotations

import logging
from typing import Protocol

from backup.dirty_bitmap import DirtyBitmap
from backup.qcow2.bitmaps import MAX_BITMAPS, MAX_DATA_BYTES, MAX_NAME, MAX_TABLE_ENTRIES, StoredBitmap, bitmap_bytes
from nbd.align import div_up
from nbd.device import BlockDevice

log = logging.getLogger(__name__)


class BitmapStore(Protocol):
    """What an image that keeps bitmaps offers (``Qcow2Device``)."""

    stored_bitmaps: list[StoredBitmap]

    @property
    def read_only(self) -> bool: ...

    def set_stored_bitmaps(self, bitmaps: list[StoredBitmap]) -> None: ...

    async def remove_stored_bitmap(self, name: str) -> None: ...


def store_of(device: BlockDevice) -> BitmapStore | None:
    """The device itself if it keeps persistent bitmaps, else None."""
    if all(hasattr(device, attr) for attr in ("stored_bitmaps", "set_stored_bitmaps", "remove_stored_bitmap")):
        return device  # type: ignore[return-value]
    return None


def cannot_store(store: BitmapStore, name: str, granularity: int, size: int) -> str | None:
    """Why a new persistent bitmap could not be stored in this image, or None: QEMU's checks, order
    and texts (``qcow2_co_can_store_new_dirty_bitmap``), so that we never write a bitmap QEMU would
    refuse to load."""
    header = getattr(store, "header", None)
    if header is not None and header.version < 3:
        return "Cannot store dirty bitmaps in qcow2 v2 files"
    data = bitmap_bytes(size, granularity)
    cluster = header.cluster_size if header is not None else 65536
    if data > MAX_DATA_BYTES or div_up(data, cluster) > MAX_TABLE_ENTRIES:
        return "Too much space will be occupied by the bitmap. Use larger granularity"
    if len(name.encode()) > MAX_NAME:
        return f"Name length exceeds maximum ({MAX_NAME} characters)"
    if len(store.stored_bitmaps) >= MAX_BITMAPS:
        return "Maximum number of persistent bitmaps is already reached"
    return None


def load(store: BitmapStore, size: int) -> list[DirtyBitmap]:
    """The stored bitmaps as the node's, in the image's directory order (add them in this order:
    the node lists the last one first, as QEMU does)."""
    bitmaps = []
    for b in store.stored_bitmaps:
        if b.in_use:  # QEMU does not read the bits of a bitmap it cannot trust: it lists it empty
            bitmap = DirtyBitmap(b.name, size, b.granularity, persistent=True, recording=False, inconsistent=True)
        else:
            bitmap = DirtyBitmap.from_bytes(b.name, size, b.granularity, b.data, persistent=True, recording=b.auto)
        bitmap.readonly = store.read_only
        bitmaps.append(bitmap)
    return bitmaps


def to_store(store: BitmapStore, bitmaps: dict[str, DirtyBitmap]) -> list[StoredBitmap]:
    """What the image should hold for the node's ``bitmaps``: the persistent ones, those it had first."""
    loaded = {b.name: b for b in store.stored_bitmaps}
    persistent = [b for b in bitmaps.values() if b.persistent]
    ordered = [b for b in persistent if b.name in loaded]
    ordered.sort(key=lambda b: list(loaded).index(b.name))
    ordered += [b for b in persistent if b.name not in loaded]
    out: list[StoredBitmap] = []
    for bitmap in ordered:
        before = loaded.get(bitmap.name)
        if bitmap.inconsistent and before is not None and before.granularity == bitmap.granularity:
            out.append(before)  # QEMU leaves an inconsistent bitmap's entry as it found it
            continue
        data = bitmap.to_bytes()
        if bitmap.successor is not None:  # frozen by a job that never finished: keep both sets of bits
            merged = DirtyBitmap.from_bytes(bitmap.name, bitmap.size, bitmap.granularity, data)
            merged.merge_from(bitmap.successor)
            data = merged.to_bytes()
        out.append(StoredBitmap(bitmap.name, bitmap.granularity, bitmap.inconsistent, bitmap.recording, data))
    return out


async def remove(device: BlockDevice, bitmap: DirtyBitmap) -> None:
    """A persistent bitmap is being removed: off the image now (before the node lets it go)."""
    store = store_of(device)
    if bitmap.persistent and store is not None:
        await store.remove_stored_bitmap(bitmap.name)


def save(store: BitmapStore, bitmaps: dict[str, DirtyBitmap]) -> None:
    """Hand the node's persistent bitmaps to the image, which writes them at its clean close."""
    if store.read_only:
        return
    wanted = to_store(store, bitmaps)
    if not wanted and not store.stored_bitmaps:
        return  # nothing stored, nothing to store: the image is left as it is
    store.set_stored_bitmaps(wanted)
