"""Persistent dirty bitmaps glued to block nodes: a qcow2 node loads its stored bitmaps as
``DirtyBitmap``s and stores its persistent ones at its clean close (QEMU's load and store rules)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backup import persistent_bitmaps
from backup.dirty_bitmap import DirtyBitmap
from backup.errors import InvalidArgument
from backup.node import BlockNode
from backup.qcow2.bitmaps import StoredBitmap, bitmap_bytes
from backup.qcow2.device import Qcow2Device

SIZE = 4 << 20


async def _image(path: Path, stored: list[StoredBitmap] | None = None) -> Path:
    device = await Qcow2Device.create(path, SIZE)
    if stored:
        device.set_stored_bitmaps(stored)
    await device.close()
    return path


def _bits(granularity: int, *granules: int) -> bytes:
    data = bytearray(bitmap_bytes(SIZE, granularity))
    for g in granules:
        data[g // 8] |= 1 << (g % 8)
    return bytes(data)


async def test_a_qcow2_node_loads_its_stored_bitmaps_as_qemu_does(tmp_path: Path) -> None:
    stored = [
        StoredBitmap("rec", 65536, in_use=False, auto=True, data=_bits(65536, 0, 5)),
        StoredBitmap("off", 4096, in_use=False, auto=False, data=_bits(4096, 3)),
        StoredBitmap("bad", 65536, in_use=True, auto=True, data=_bits(65536, 1)),
    ]
    image = await _image(tmp_path / "a.qcow2", stored)
    node = BlockNode("n", await Qcow2Device.open(image), driver="qcow2")
    try:
        # QEMU lists the loaded bitmaps newest first: the directory's last entry first
        assert list(node.bitmaps) == ["bad", "off", "rec"]
        rec, off, bad = node.bitmaps["rec"], node.bitmaps["off"], node.bitmaps["bad"]
        assert (rec.persistent, rec.recording, rec.inconsistent, rec.count) == (True, True, False, 2 * 65536)
        assert (off.persistent, off.recording, off.granularity, off.count) == (True, False, 4096, 4096)
        # an in_use bitmap is inconsistent and, as in QEMU, disabled and listed empty
        assert (bad.persistent, bad.recording, bad.inconsistent, bad.count) == (True, False, True, 0)
    finally:
        await node.close()


async def test_persistent_bitmaps_are_stored_at_close_and_removed_ones_go(tmp_path: Path) -> None:
    stored = [
        StoredBitmap("old", 65536, in_use=False, auto=True, data=_bits(65536, 0)),
        StoredBitmap("gone", 65536, in_use=False, auto=True, data=_bits(65536, 1)),
        StoredBitmap("bad", 65536, in_use=True, auto=False, data=_bits(65536, 2)),
    ]
    image = await _image(tmp_path / "a.qcow2", stored)
    node = BlockNode("n", await Qcow2Device.open(image), driver="qcow2")
    node.remove_bitmap("gone")
    node.add_bitmap(DirtyBitmap("new", SIZE, 4096, persistent=True, recording=False))
    node.add_bitmap(DirtyBitmap("temp", SIZE, 4096))  # not persistent: never stored
    await node.pwrite(3 * 65536, b"x" * 10)
    node.bitmaps["new"].set_range(8192, 1)
    await node.close()

    device = await Qcow2Device.open(image, read_only=True)
    try:
        by_name = {b.name: b for b in device.stored_bitmaps}
    finally:
        await device.close()
    assert [b.name for b in device.stored_bitmaps] == ["old", "bad", "new"]  # kept in place, new appended
    assert by_name["old"] == StoredBitmap("old", 65536, in_use=False, auto=True, data=_bits(65536, 0, 3))
    assert by_name["new"] == StoredBitmap("new", 4096, in_use=False, auto=False, data=_bits(4096, 2))
    # an inconsistent bitmap stays as it was on disk: in_use, its flags and bits untouched
    assert by_name["bad"] == stored[2]


async def test_a_read_only_qcow2_node_loads_but_never_stores(tmp_path: Path) -> None:
    stored = [StoredBitmap("b", 65536, in_use=False, auto=True, data=_bits(65536, 7))]
    image = await _image(tmp_path / "a.qcow2", stored)
    node = BlockNode("n", await Qcow2Device.open(image, read_only=True), driver="qcow2")
    assert node.bitmaps["b"].persistent and node.bitmaps["b"].count == 65536
    assert node.bitmaps["b"].readonly  # QEMU's readonly bitmap: its bits may not change
    with pytest.raises(InvalidArgument, match="Bitmap 'b' is readonly and cannot be modified"):
        node.remove_bitmap("b")
    node.bitmaps["b"].check_usable()  # using it (an export, a merge source) is fine
    await node.close()
    device = await Qcow2Device.open(image, read_only=True)
    assert device.stored_bitmaps == stored
    await device.close()


async def test_removing_a_persistent_bitmap_takes_it_off_the_image_at_once(tmp_path: Path) -> None:
    """As QEMU: after a crash (here ``abandon``) a removed bitmap does not come back; the others do,
    in_use (inconsistent) with their bits as they were on disk."""
    stored = [
        StoredBitmap("keep", 65536, in_use=False, auto=True, data=_bits(65536, 4)),
        StoredBitmap("gone", 65536, in_use=False, auto=False, data=_bits(65536, 1)),
    ]
    image = await _image(tmp_path / "a.qcow2", stored)
    device = await Qcow2Device.open(image)
    node = BlockNode("n", device, driver="qcow2")
    await persistent_bitmaps.remove(node.device, node.bitmaps["gone"])
    node.remove_bitmap("gone")
    await persistent_bitmaps.remove(node.device, DirtyBitmap("never-stored", SIZE, persistent=True))  # no-op
    device.abandon()
    after = await Qcow2Device.open(image, read_only=True)
    try:
        assert after.stored_bitmaps == [StoredBitmap("keep", 65536, in_use=True, auto=True, data=_bits(65536, 4))]
    finally:
        await after.close()
