"""Incremental backups over QMP in-process: what qemu-storage-daemon cannot be made to show in the
differential tests (an inconsistent bitmap needs an image that was not closed cleanly)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_qmp_bitmaps import raw_node
from test_qmp_commands import Harness

from backup.filter import BlockFilter
from backup.memory import MemoryDevice
from backup.node import BlockNode


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


@pytest.mark.parametrize(("sync", "mode"), [("incremental", None), ("full", "on-success"), ("bitmap", "never")])
async def test_an_inconsistent_bitmap_is_refused_and_left_alone(h: Harness, sync: str, mode: str | None) -> None:
    """Never a silently incomplete backup: QEMU's error, no job, the bitmap neither busy nor changed."""
    await raw_node(h)
    await h("block-dirty-bitmap-add", node="src", name="b")
    bitmap = h.reg.nodes["src"].bitmaps["b"]
    bitmap.set_range(0, 4096)
    bitmap.inconsistent = True
    extra = {} if mode is None else {"bitmap-mode": mode}
    target = str(h.tmp / "t.raw")
    error = await h.error("drive-backup", device="src", target=target, sync=sync, bitmap="b", **extra)
    assert error == ("GenericError", "Bitmap 'b' is inconsistent and cannot be used")
    assert await h("query-block-jobs") == []
    assert not bitmap.busy and not bitmap.frozen and bitmap.count == 65536


CS = 65536


class SlowWrites(BlockFilter):
    """A disk whose writes take a moment: some guest write is always in flight (so a bitmap added
    without draining the node would see writes that end up in the backup too)."""

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        await asyncio.sleep(0.001)
        await self.next.pwrite(offset, data, fua=fua)


@pytest.mark.parametrize("bitmap_first", [True, False])
async def test_transaction_backup_and_new_bitmap_share_one_instant(h: Harness, bitmap_first: bool) -> None:
    """A guest rewrites granule after granule while ``transaction [drive-backup full, bitmap-add]``
    runs (in either order; the prepares wait on the target's creation). Each write is in exactly one
    of the two: before the common instant in the backup (and not dirty), after it dirty in the bitmap
    (the backup keeps the old data). In both would mean the bitmap started early; in neither, that a
    write fell between the two and the next incremental would miss it."""
    node = h.reg.add_node(BlockNode("src", SlowWrites(MemoryDevice(64 * CS))))
    target = h.tmp / "full.raw"
    backup = {"job-id": "j", "device": "src", "target": str(target), "sync": "full", "format": "raw"}
    add = {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b"}}
    actions = [{"type": "drive-backup", "data": {**backup, "speed": 8 * CS}}]
    actions = [add, *actions] if bitmap_first else [*actions, add]

    async def guest(first: int) -> None:  # eight guests at once: some write is always on its way
        for granule in range(first, 64, 8):
            await node.pwrite(granule * CS, bytes([granule + 1]) * CS)
            await asyncio.sleep(0)

    writer = asyncio.gather(*(guest(first) for first in range(8)))
    await asyncio.sleep(0)  # the guest is writing as the command arrives
    await h("transaction", actions=actions)
    await writer
    job = h.reg.jobs["j"]
    job.set_speed(0)
    await h.wait_gone("j")
    bitmap = node.bitmaps["b"]
    data = target.read_bytes()
    in_backup = [data[g * CS] == g + 1 for g in range(64)]
    dirty = [bitmap.is_dirty(g * CS) for g in range(64)]
    assert all(a != b for a, b in zip(in_backup, dirty, strict=True)), (in_backup, dirty)
    assert any(dirty) and any(in_backup)  # the instant fell among the writes: the test saw both sides
