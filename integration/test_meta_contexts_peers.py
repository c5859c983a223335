"""Pull-mode meta contexts with real peers: ``nbdinfo --map``, ``qemu-img map`` with
``x-dirty-bitmap`` (how libvirt and QEMU read a bitmap over NBD) and libnbd against our in-process
server, and the same queries against ``qemu-nbd -A -B`` on the same images, which must agree."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from conftest import require
from peers import qemu_nbd

from backup.memory import MemoryDevice
from backup.node import BlockNode
from backup.qcow2.device import Qcow2Device
from backup.rawfile import RawFileDevice
from nbd import meta
from nbd.device import BlockDevice
from nbd.meta import DirtyMap
from nbd.server import Export, NbdServer

LIBNBD_PYTHON = "/usr/bin/python3"  # the interpreter libnbd's bindings (nbdsh's) are installed for
KiB, MiB = 1024, 1024 * 1024
SIZE = 4 * MiB
GRANULE = 64 * KiB
DIRTY = [(64 * KiB, 128 * KiB), (MiB, 64 * KiB), (SIZE - 64 * KiB, 64 * KiB)]  # (offset, length)


class FakeBitmap:
    """A DirtyMap whose dirty ranges the test chooses."""

    def __init__(self, name: str, dirty: list[tuple[int, int]]) -> None:
        self.name = name
        self.dirty = sorted(dirty)

    def dirty_runs(self, offset: int, length: int) -> list[tuple[int, bool]]:
        runs: list[tuple[int, bool]] = []
        pos, end = offset, offset + length
        for start, n in self.dirty:
            lo, hi = max(start, pos), min(start + n, end)
            if lo >= hi:
                continue
            if lo > pos:
                runs.append((lo - pos, False))
            runs.append((hi - lo, True))
            pos = hi
        if pos < end:
            runs.append((end - pos, False))
        return runs


async def tool(*argv: str) -> str:
    """Run a peer without blocking our server's loop; its stdout (it must succeed). It runs in ``/``
    so that libnbd's Python module ``nbd`` is not shadowed by ours."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, (argv, err.decode())
    return out.decode()


def parse_map(text: str) -> list[tuple[int, int, int]]:
    """``nbdinfo --map`` lines as (offset, length, value), neighbours with equal values merged."""
    out: list[tuple[int, int, int]] = []
    for line in text.splitlines():
        offset, length, value = (int(field) for field in line.split()[:3])
        if out and out[-1][2] == value and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, value)
        else:
            out.append((offset, length, value))
    return out


@asynccontextmanager
async def served(tmp: Path, device: BlockDevice, bitmaps: list[DirtyMap], depth: bool) -> AsyncIterator[str]:
    """Our server exporting ``device`` as ``pull`` on a unix socket; yields its URI."""
    server = NbdServer()
    server.add_export(Export("pull", device, writable=False, bitmaps=bitmaps, allocation_depth=depth))
    path = str(tmp / "ours.sock")
    await server.listen_unix(path)
    try:
        yield f"nbd+unix:///pull?socket={path}"
    finally:
        await server.stop()


def expected_dirty() -> list[tuple[int, int, int]]:
    out, pos = [], 0
    for start, n in DIRTY:
        if start > pos:
            out.append((pos, start - pos, 0))
        out.append((start, n, 1))
        pos = start + n
    if pos < SIZE:
        out.append((pos, SIZE - pos, 0))
    return out


async def test_nbdinfo_and_qemu_img_read_a_dirty_bitmap_and_depth(tmp_path: Path) -> None:
    require("nbdinfo", "qemu-img", "nbdsh", LIBNBD_PYTHON)
    device = MemoryDevice(SIZE, data=b"x" * MiB)
    async with served(tmp_path, device, [FakeBitmap("b0", DIRTY)], True) as uri:
        info = json.loads(await tool("nbdinfo", "--json", uri))
        assert info["exports"][0]["contexts"] == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]
        assert parse_map(await tool("nbdinfo", "--map=qemu:dirty-bitmap:b0", uri)) == expected_dirty()
        assert parse_map(await tool("nbdinfo", "--map=qemu:allocation-depth", uri)) == [(0, SIZE, 1)]
        # QEMU's NBD client reads the bitmap in place of base:allocation: dirty shows as "data": false
        opts = f"driver=nbd,server.type=unix,server.path={tmp_path / 'ours.sock'},export=pull"
        opts += ",x-dirty-bitmap=qemu:dirty-bitmap:b0"
        mapped = json.loads(await tool("qemu-img", "map", "--output=json", "--image-opts", opts))
        dirty = [(e["start"], e["length"]) for e in mapped if not e["data"]]
        assert dirty == DIRTY
        # libnbd with every context selected at once: one callback per context per request, REQ_ONE kept
        script = (
            "import nbd\nh = nbd.NBD()\n"
            "for c in ('base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:b0'): h.add_meta_context(c)\n"
            f"h.connect_uri({uri!r})\n"
            "seen = {}\n"
            "def cb(ctx, off, ents, err):\n"
            "    seen[ctx] = list(ents)\n"
            "    return 0\n"
            "h.block_status(SIZE, 0, cb)\n"
            "print(sorted(seen.items()))\n"
            "seen.clear()\n"
            "h.block_status(SIZE, 0, cb, flags=nbd.CMD_FLAG_REQ_ONE)\n"
            "print(sorted(seen.items()))\n"
        ).replace("SIZE", str(SIZE))
        full, one = (await tool(LIBNBD_PYTHON, "-c", script)).splitlines()
        dirty_flat = [v for _, n, d in expected_dirty() for v in (n, d)]
        assert eval(full) == [  # our own repr of lists of ints
            ("base:allocation", [MiB, 0, SIZE - MiB, 3]),
            ("qemu:allocation-depth", [SIZE, 1]),
            ("qemu:dirty-bitmap:b0", dirty_flat),
        ]
        assert eval(one) == [
            ("base:allocation", [MiB, 0]),
            ("qemu:allocation-depth", [SIZE, 1]),
            ("qemu:dirty-bitmap:b0", [GRANULE, 0]),
        ]


def _chain(tmp: Path) -> Path:
    """base.qcow2 (data, a zero cluster) under top.qcow2 (data, a zero cluster, a bitmap b0)."""
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    run = subprocess.run
    run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE)], check=True)
    run(["qemu-io", "-c", "write -P 1 0 1M", "-c", "write -z 2M 64k", base], check=True, capture_output=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top], check=True)
    run(["qemu-io", "-c", "write -P 2 512k 128k", "-c", "write -z 3M 64k", top], check=True, capture_output=True)
    run(["qemu-img", "bitmap", "--add", top, "b0"], check=True)
    run(["qemu-io", "-c", "write -P 3 1M 4k", "-c", "write -P 4 3200k 8k", top], check=True, capture_output=True)
    return top


async def test_qcow2_chain_depth_and_bitmap_listing_match_qemu_nbd(tmp_path: Path) -> None:
    require("nbdinfo", "qemu-img", "qemu-io", "qemu-nbd")
    top = _chain(tmp_path)
    with qemu_nbd(tmp_path, top, export="pull", extra=("-f", "qcow2", "-r", "-A", "-B", "b0")) as peer:
        theirs = {
            ctx: parse_map(await tool("nbdinfo", f"--map={ctx}", peer.uri))
            for ctx in ("qemu:allocation-depth", "qemu:dirty-bitmap:b0")
        }
        their_contexts = json.loads(await tool("nbdinfo", "--json", peer.uri))["exports"][0]["contexts"]
        their_list = await tool("nbdinfo", "--list", "--content", peer.uri)
    # the bitmap's contents are H2's to load: here the export serves qemu-nbd's listing of it
    bitmap = FakeBitmap("b0", [(o, n) for o, n, v in theirs["qemu:dirty-bitmap:b0"] if v])
    assert bitmap.dirty == [(MiB, GRANULE), (3200 * KiB, GRANULE)]
    image = await Qcow2Device.open(top, read_only=True)
    node = BlockNode("top", image, driver="qcow2")  # exports hold nodes: depth comes from the image under it
    try:
        async with served(tmp_path, node, [bitmap], True) as uri:
            ours = {ctx: parse_map(await tool("nbdinfo", f"--map={ctx}", uri)) for ctx in theirs}
            our_contexts = json.loads(await tool("nbdinfo", "--json", uri))["exports"][0]["contexts"]
            our_list = await tool("nbdinfo", "--list", "--content", uri)
    finally:
        await image.close()
    assert ours == theirs
    depth = [(0, 512 * KiB, 2), (512 * KiB, 128 * KiB, 1), (640 * KiB, 384 * KiB, 2), (MiB, 64 * KiB, 1)]
    assert theirs["qemu:allocation-depth"][:4] == depth  # backing, top, backing, top (the bitmap's write)
    assert our_contexts == their_contexts
    assert _contexts_section(our_list) == _contexts_section(their_list)


def _contexts_section(listing: str) -> list[str]:
    lines = listing.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "contexts:")
    return [line.strip() for line in lines[start + 1 :] if line.startswith("\t\t")]


async def test_raw_file_depth_is_one_everywhere_as_qemu_nbd_says(tmp_path: Path) -> None:
    require("nbdinfo", "qemu-nbd", "qemu-io")
    path = tmp_path / "sparse.raw"
    await tool("truncate", "-s", str(SIZE), str(path))
    await tool("qemu-io", "-f", "raw", "-c", "write -P 7 1M 70000", str(path))
    with qemu_nbd(tmp_path, path, export="pull", extra=("-r", "-A")) as peer:
        theirs = parse_map(await tool("nbdinfo", "--map=qemu:allocation-depth", peer.uri))
    device = await RawFileDevice.open(path, read_only=True)
    try:
        async with served(tmp_path, device, [], True) as uri:
            ours = parse_map(await tool("nbdinfo", "--map=qemu:allocation-depth", uri))
    finally:
        await device.close()
    assert ours == theirs == [(0, SIZE, 1)]  # holes included


async def _qemu_img(*args: str) -> None:
    await tool("qemu-img", *args)


@pytest.mark.parametrize("backing", ["raw", "qcow2", "none"])
async def test_depth_past_a_shorter_backing_file_as_qemu_nbd(tmp_path: Path, backing: str) -> None:
    """A 2 MiB top over a 1 MiB backing file (raw: all allocated; qcow2: one cluster) or none."""
    require("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
    top = tmp_path / "top.qcow2"
    if backing == "none":
        await _qemu_img("create", "-q", "-f", "qcow2", str(top), "2M")
    else:
        base = tmp_path / f"base.{backing}"
        await _qemu_img("create", "-q", "-f", backing, str(base), "1M")
        if backing == "qcow2":
            await tool("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", str(base))
        await _qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", backing, str(top), "2M")
    await tool("qemu-io", "-f", "qcow2", "-c", "write -P 2 64k 64k", "-c", "write -z 1536k 64k", str(top))
    with qemu_nbd(tmp_path, top, export="pull", extra=("-f", "qcow2", "-r", "-A")) as peer:
        theirs = parse_map(await tool("nbdinfo", "--map=qemu:allocation-depth", peer.uri))
    image = await Qcow2Device.open(top, read_only=True)
    try:
        ours, pos = [], 0
        for length, depth in meta.clip(await image.allocation_depth(0, image.size), image.size, False):
            ours.append((pos, length, depth))
            pos += length
    finally:
        await image.close()
    assert ours == theirs


async def _meta_replies(path: str, opt: int, export: str, queries: list[str]) -> tuple[list[str], int]:
    """The context names one LIST (9) or SET (10) META_CONTEXT answers, and its final reply type."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        await reader.readexactly(18)
        writer.write(struct.pack(">I", 3))
        data = struct.pack(">I", len(export)) + export.encode() + struct.pack(">I", len(queries))
        for query in queries:
            data += struct.pack(">I", len(query)) + query.encode()
        for option, payload in ((8, b""), (opt, data)):
            writer.write(struct.pack(">QII", 0x49484156454F5054, option, len(payload)) + payload)
        names: list[str] = []
        replies = 0
        while True:
            _, option, reply, length = struct.unpack(">QIII", await reader.readexactly(20))
            body = await reader.readexactly(length)
            if option == opt and reply == 4:
                names.append(body[4:].decode())
            if reply != 4:
                replies += 1
                if replies == 2:
                    return names, reply
    finally:
        writer.close()


QUERIES = [
    [],
    ["qemu:"],
    ["qemu:dirty-bitmap:"],
    ["base:"],
    ["base:allocation", "qemu:allocation-depth"],
    ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b0", "base:allocation"],
    ["qemu:dirty-bitmap:b"],
    ["qemu:allocation"],
    ["qemu:dirty-bitmap:nope"],
    ["x-other:"],
    ["qemu:", "base:", "qemu:dirty-bitmap:b0"],
]


async def test_list_and_set_meta_context_answers_match_qemu_nbd(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io", "qemu-nbd")
    top = _chain(tmp_path)
    asked = [(opt, queries) for opt in (9, 10) for queries in QUERIES]
    with qemu_nbd(tmp_path, top, export="pull", extra=("-f", "qcow2", "-r", "-A", "-B", "b0")) as peer:
        sock = str(peer.socket)
        theirs = [await _meta_replies(sock, opt, "pull", queries) for opt, queries in asked]
    async with served(tmp_path, MemoryDevice(SIZE), [FakeBitmap("b0", DIRTY)], True):
        sock = str(tmp_path / "ours.sock")
        ours = [await _meta_replies(sock, opt, "pull", queries) for opt, queries in asked]
    assert list(zip(asked, ours, strict=True)) == list(zip(asked, theirs, strict=True))
