"""The dirty-bitmap QMP commands in-process: what the differential tests cannot reach with
qemu-storage-daemon (busy and inconsistent bitmaps, an empty merge, persistent on qcow2) and the
``dirty-bitmaps`` member of both queries."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from test_qmp_commands import Harness

MiB = 1 << 20


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


async def raw_node(h: Harness, name: str = "src", size: int = MiB) -> None:
    await h("blockdev-add", driver="file", filename=str(h.image(f"{name}.raw", size)), **{"node-name": f"{name}-file"})
    await h("blockdev-add", driver="raw", file=f"{name}-file", **{"node-name": name})


def bitmaps_of(nodes: list[dict[str, object]], name: str) -> object:
    (node,) = [n for n in nodes if n["node-name"] == name]
    return node.get("dirty-bitmaps")


async def test_queries_list_bitmaps_newest_first_with_counts_after_writes(h: Harness) -> None:
    await raw_node(h)
    await h("block-dirty-bitmap-add", node="src", name="a")
    await h("block-dirty-bitmap-add", node="src", name="b", granularity=4096, disabled=True)
    await h.reg.nodes["src"].pwrite(70000, b"x" * 10)
    nodes = await h("query-named-block-nodes")
    assert bitmaps_of(nodes, "src") == [
        {"name": "b", "recording": False, "persistent": False, "busy": False, "granularity": 4096, "count": 0},
        {"name": "a", "recording": True, "persistent": False, "busy": False, "granularity": 65536, "count": 65536},
    ]
    assert bitmaps_of(nodes, "src-file") is None  # no member without bitmaps, as QEMU
    (block,) = await h("query-block")
    assert block["inserted"]["dirty-bitmaps"] == bitmaps_of(nodes, "src")


async def test_busy_and_inconsistent_bitmaps_are_refused_as_qemu_refuses_them(h: Harness) -> None:
    await raw_node(h)
    await h("block-dirty-bitmap-add", node="src", name="a")
    await h("block-dirty-bitmap-add", node="src", name="b")
    a = h.reg.nodes["src"].bitmaps["a"]
    a.busy = True
    in_use = ("GenericError", "Bitmap 'a' is currently in use by another operation and cannot be used")
    for verb in ("remove", "clear", "enable", "disable"):
        assert await h.error(f"block-dirty-bitmap-{verb}", node="src", name="a") == in_use
    assert await h.error("block-dirty-bitmap-merge", node="src", target="a", bitmaps=["b"]) == in_use
    # qemu-storage-daemon 7.2 refuses a busy source too (integration/test_qmp_incremental_diff.py)
    assert await h.error("block-dirty-bitmap-merge", node="src", target="b", bitmaps=["a"]) == in_use
    a.busy, a.inconsistent = False, True
    bad = ("GenericError", "Bitmap 'a' is inconsistent and cannot be used")
    assert await h.error("block-dirty-bitmap-merge", node="src", target="b", bitmaps=["a"]) == bad
    assert await h.error("block-dirty-bitmap-clear", node="src", name="a") == bad
    nodes = await h("query-named-block-nodes")
    assert bitmaps_of(nodes, "src")[1]["inconsistent"] is True  # type: ignore[index]
    await h("block-dirty-bitmap-remove", node="src", name="a")


async def test_a_refused_merge_leaves_the_target_unchanged_and_an_empty_one_is_a_no_op(h: Harness) -> None:
    await raw_node(h)
    await raw_node(h, "big", 2 * MiB)
    await h("block-dirty-bitmap-add", node="src", name="t")
    await h("block-dirty-bitmap-add", node="src", name="s", granularity=512)
    await h("block-dirty-bitmap-add", node="big", name="x")
    await h.reg.nodes["src"].pwrite(0, b"x")
    await h("block-dirty-bitmap-disable", node="src", name="s")
    await h("block-dirty-bitmap-clear", node="src", name="t")
    error = await h.error(
        "block-dirty-bitmap-merge", node="src", target="t", bitmaps=["s", {"node": "big", "name": "x"}]
    )
    assert error[1].startswith("Bitmaps are of different sizes")
    assert h.reg.nodes["src"].bitmaps["t"].count == 0
    await h("block-dirty-bitmap-merge", node="src", target="t", bitmaps=[])
    assert h.reg.nodes["src"].bitmaps["t"].count == 0
    await h("block-dirty-bitmap-merge", node="src", target="t", bitmaps=["s"])
    assert h.reg.nodes["src"].bitmaps["t"].count == 65536


async def test_persistent_is_accepted_on_qcow2_only(h: Harness, tmp_path: Path) -> None:
    image = tmp_path / "q.qcow2"
    argv = ["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=32768", str(image), "1M"]
    await asyncio.to_thread(subprocess.run, argv, check=True, capture_output=True)
    await h("blockdev-add", driver="qcow2", file={"driver": "file", "filename": str(image)}, **{"node-name": "q"})
    await h("block-dirty-bitmap-add", node="q", name="p", persistent=True)
    (info,) = bitmaps_of(await h("query-named-block-nodes"), "q")  # type: ignore[misc]
    assert info["persistent"] is True and info["granularity"] == 32768  # the cluster size by default
    await raw_node(h)
    assert await h.error("block-dirty-bitmap-add", node="src", name="p", persistent=True) == (
        "GenericError",
        "Can't store persistent bitmaps to src: Operation not supported",
    )


async def test_a_backup_into_a_node_marks_the_target_s_bitmap(h: Harness) -> None:
    await raw_node(h)
    await raw_node(h, "dst")
    await h("block-dirty-bitmap-add", node="dst", name="d")
    await h("blockdev-backup", device="src", target="dst", sync="full", **{"job-id": "j"})
    await h.wait_gone("j")
    assert h.reg.nodes["dst"].bitmaps["d"].count == MiB
