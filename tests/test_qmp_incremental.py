"""Incremental backups over QMP in-process: what qemu-storage-daemon cannot be made to show in the
differential tests (an inconsistent bitmap needs an image that was not closed cleanly)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_qmp_bitmaps import raw_node
from test_qmp_commands import Harness


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
