"""Persistent dirty bitmaps in qcow2, against QEMU: bitmaps made by ``qemu-img bitmap`` and recorded
by ``qemu-io`` read back in our code; bitmaps we write are listed by ``qemu-img info``, pass
``qemu-img check``, merge with ``qemu-img bitmap --merge`` and export through ``qemu-nbd -B`` with
exactly our bits (``nbdinfo --map``); a device killed while open read-write leaves them in-use.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require, run
from crashsim import FileJournal
from peers import nbdinfo_json, qemu_nbd

from backup.errors import ImageFormatError
from backup.qcow2 import Qcow2Device
from backup.qcow2.bitmaps import StoredBitmap, bitmap_bytes
from backup.qcow2.check import check_image

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _peers() -> None:
    require("qemu-img", "qemu-io")


def qemu_io(image: Path, *commands: str) -> None:
    argv: list[str] = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    run(*argv, image)


def qemu_bitmaps(image: Path) -> list[dict[str, object]]:
    info = json.loads(run("qemu-img", "info", "--output=json", image).stdout)
    bitmaps: list[dict[str, object]] = info["format-specific"]["data"].get("bitmaps", [])
    return bitmaps


def assert_qemu_check_clean(image: Path) -> None:
    proc = run("qemu-img", "check", "--output=json", image, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report


def set_bits(data: bytes) -> list[int]:
    return [i for i in range(len(data) * 8) if data[i // 8] >> (i % 8) & 1]


def bits_data(size: int, granularity: int, bits: list[int]) -> bytes:
    out = bytearray(bitmap_bytes(size, granularity))
    for i in bits:
        out[i // 8] |= 1 << (i % 8)
    return bytes(out)


async def read_stored(image: Path) -> dict[str, StoredBitmap]:
    dev = await Qcow2Device.open(image, read_only=True)
    try:
        return {b.name: b for b in dev.stored_bitmaps}
    finally:
        await dev.close()


async def test_qemu_bitmaps_read_back_with_names_granularities_flags_and_bits(tmp_path: Path) -> None:
    image = tmp_path / "q.qcow2"
    run("qemu-img", "create", "-f", "qcow2", image, str(10 * MiB))
    run("qemu-img", "bitmap", "--add", image, "rec")
    run("qemu-img", "bitmap", "--add", "-g", "128K", image, "off")
    run("qemu-img", "bitmap", "--add", "-g", "4K", image, "later")
    run("qemu-img", "bitmap", "--disable", image, "later")
    qemu_io(image, "write 0 64k", "write 5M 1k", "write 10239k 1k")
    run("qemu-img", "bitmap", "--disable", image, "rec")
    run("qemu-img", "bitmap", "--enable", image, "later")
    qemu_io(image, "write 8k 4k")
    run("qemu-img", "bitmap", "--add", "--disable", image, "merged")
    run("qemu-img", "bitmap", "--merge", "rec", image, "merged")
    got = await read_stored(image)
    assert list(got) == ["rec", "off", "later", "merged"]
    assert {n: (b.granularity, b.auto, b.in_use) for n, b in got.items()} == {
        "rec": (64 * KiB, False, False),
        "off": (128 * KiB, True, False),
        "later": (4 * KiB, True, False),
        "merged": (64 * KiB, False, False),
    }
    assert set_bits(got["rec"].data) == [0, 80, 159]
    assert set_bits(got["off"].data) == [0, 40, 79]
    assert set_bits(got["later"].data) == [2]
    assert got["merged"].data == got["rec"].data
    assert len(got["later"].data) == bitmap_bytes(10 * MiB, 4 * KiB)


async def test_our_bitmaps_are_listed_checked_merged_and_exported_by_qemu(tmp_path: Path) -> None:
    require("qemu-nbd", "nbdinfo")
    size = 10 * MiB + 3 * KiB  # not a multiple of granularity * 8 for any of these bitmaps
    image = tmp_path / "ours.qcow2"
    dev = await Qcow2Device.create(image, size)
    await dev.pwrite(0, b"x" * 4096)
    mine = [
        StoredBitmap("a", 64 * KiB, in_use=False, auto=True, data=bits_data(size, 64 * KiB, [0, 2, 160])),
        StoredBitmap("b", 512, in_use=False, auto=False, data=bits_data(size, 512, [7, 20485])),
        StoredBitmap("c", 1 * MiB, in_use=False, auto=True, data=bits_data(size, MiB, [])),
    ]
    dev.set_stored_bitmaps(mine)
    await dev.close()
    listed = qemu_bitmaps(image)
    assert [(b["name"], b["granularity"], b["flags"]) for b in listed] == [
        ("a", 64 * KiB, ["auto"]),
        ("b", 512, []),
        ("c", MiB, ["auto"]),
    ]
    assert_qemu_check_clean(image)
    run("qemu-img", "bitmap", "--add", image, "m")
    run("qemu-img", "bitmap", "--merge", "a", image, "m")
    assert_qemu_check_clean(image)
    back = await read_stored(image)
    assert set_bits(back["m"].data) == [0, 2, 160]
    assert [back[n].data for n in "abc"] == [b.data for b in mine]
    with qemu_nbd(tmp_path, image, extra=("-f", "qcow2", "-r", "-B", "a")) as peer:
        ctx = "qemu:dirty-bitmap:a"
        extents = nbdinfo_json(peer.uri, f"--map={ctx}")
    dirty = [(e["offset"], e["length"]) for e in extents if e["type"] & 1]
    assert dirty == [(0, 64 * KiB), (128 * KiB, 64 * KiB), (160 * 64 * KiB, size - 160 * 64 * KiB)]


async def test_rewrites_of_several_bitmaps_free_the_old_clusters(tmp_path: Path) -> None:
    size = 3 * MiB + 512
    image = tmp_path / "r.qcow2"
    await (await Qcow2Device.create(image, size, cluster_size=4096)).close()
    for round_ in range(3):
        dev = await Qcow2Device.open(image)
        assert [b.name for b in dev.stored_bitmaps] == [f"r{round_ - 1}-{k}" for k in range(4)][: 4 if round_ else 0]
        dev.set_stored_bitmaps(
            [
                StoredBitmap(f"r{round_}-{k}", 512 << k, False, k % 2 == 0, bits_data(size, 512 << k, [round_, k + 5]))
                for k in range(4)
            ]
        )
        await dev.close()
        assert_qemu_check_clean(image)
    back = await read_stored(image)
    assert [set_bits(b.data) for b in back.values()] == [[2, 5], [2, 6], [2, 7], [2, 8]]
    dev = await Qcow2Device.open(image)
    dev.set_stored_bitmaps([])
    await dev.close()
    assert qemu_bitmaps(image) == []
    assert_qemu_check_clean(image)


_HOLD_OPEN = """
import asyncio, sys
from backup.qcow2 import Qcow2Device
async def main():
    dev = await Qcow2Device.open(sys.argv[1])
    await dev.pwrite(0, b"y" * 4096)
    print("open", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def kill_while_open(image: Path) -> None:
    """Open ``image`` read-write in another process, write to it, and SIGKILL that process."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_OPEN, str(image)], stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"open\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def test_a_device_killed_while_open_leaves_its_bitmaps_in_use(tmp_path: Path) -> None:
    image = tmp_path / "k.qcow2"
    run("qemu-img", "create", "-f", "qcow2", image, str(4 * MiB))
    run("qemu-img", "bitmap", "--add", image, "b")
    kill_while_open(image)
    assert [b["flags"] for b in qemu_bitmaps(image)] == [["in-use", "auto"]]
    assert (await read_stored(image))["b"].in_use
    dev = await Qcow2Device.open(image)  # repairs the refcounts, bitmap clusters included
    assert dev.stored_bitmaps[0].in_use
    await dev.close()
    assert_qemu_check_clean(image)
    assert [b["flags"] for b in qemu_bitmaps(image)] == [["in-use", "auto"]]


async def test_bitmaps_we_cannot_keep_refuse_read_write_but_read_only_opens(tmp_path: Path) -> None:
    image = tmp_path / "x.qcow2"
    run("qemu-img", "create", "-f", "qcow2", image, str(4 * MiB))
    run("qemu-img", "bitmap", "--add", image, "b")
    before = image.read_bytes()
    with image.open("r+b") as f:  # an unknown flag bit in the one directory entry
        f.seek(json_dir_offset(image) + 12)
        f.write((8 | 2).to_bytes(4, "big"))
    with pytest.raises(ImageFormatError, match=r"unknown flags.*read-only"):
        await Qcow2Device.open(image)
    dev = await Qcow2Device.open(image, read_only=True)
    assert dev.stored_bitmaps == []
    await dev.close()
    assert len(image.read_bytes()) == len(before)


def json_dir_offset(image: Path) -> int:
    """The bitmap directory offset, from the header extension (QEMU does not report it)."""
    data = image.read_bytes()[:65536]
    pos = int.from_bytes(data[100:104], "big")
    while True:
        kind, length = int.from_bytes(data[pos : pos + 4], "big"), int.from_bytes(data[pos + 4 : pos + 8], "big")
        if kind == 0x23852875:
            return int.from_bytes(data[pos + 24 : pos + 32], "big")
        assert kind != 0
        pos += 8 + length + (-length % 8)


async def test_qemu_records_writes_into_our_recording_bitmap(tmp_path: Path) -> None:
    size = 4 * MiB
    image = tmp_path / "rec.qcow2"
    dev = await Qcow2Device.create(image, size)
    dev.set_stored_bitmaps(
        [
            StoredBitmap("on", 64 * KiB, in_use=False, auto=True, data=bits_data(size, 64 * KiB, [3])),
            StoredBitmap("off", 64 * KiB, in_use=False, auto=False, data=bits_data(size, 64 * KiB, [])),
        ]
    )
    await dev.close()
    qemu_io(image, "write 1M 4k", "write 4092k 4k")
    back = await read_stored(image)
    assert {n: (b.in_use, set_bits(b.data)) for n, b in back.items()} == {
        "on": (False, [3, 16, 63]),
        "off": (False, []),
    }
    assert_qemu_check_clean(image)


async def test_a_crash_anywhere_in_open_and_close_leaves_old_new_or_no_bitmaps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every state a power cut can leave while a read-write open marks the bitmaps in_use and a
    close replaces them: no corruption for us or ``qemu-img check``, and the bitmaps read are the
    old ones, the new ones, or none (the extension untrusted), never a mix or garbage."""
    size = 2 * MiB
    path = tmp_path / "img.qcow2"
    old = [StoredBitmap("old", 4 * KiB, False, True, bits_data(size, 4 * KiB, [1, 300]))]
    new = [
        StoredBitmap("new", 512, False, False, bits_data(size, 512, [7])),
        StoredBitmap("old", 4 * KiB, False, True, bits_data(size, 4 * KiB, [2])),
    ]
    dev = await Qcow2Device.create(path, size, cluster_size=4096)
    dev.set_stored_bitmaps(old)
    await dev.close()
    journal = FileJournal(path, monkeypatch)
    dev = await Qcow2Device.open(path)
    await dev.pwrite(0, b"n" * 4096)
    dev.set_stored_bitmaps(new)
    await dev.close()
    monkeypatch.undo()
    probe = tmp_path / "crash.qcow2"
    seen = set()
    for label, image in journal.crash_images():
        probe.write_bytes(image)
        assert not check_image(str(probe)).corruptions, label
        proc = run("qemu-img", "check", "--output=json", probe, check=False)
        assert proc.returncode in (0, 3) and not json.loads(proc.stdout).get("corruptions"), f"{label}: {proc.stdout}"
        got = [(b.name, b.granularity, b.auto, b.data) for b in (await read_stored(probe)).values()]
        kind = next(
            k
            for k, want in (("none", []), ("old", old), ("new", new))
            if got == [(b.name, b.granularity, b.auto, b.data) for b in want]
        )
        seen.add(kind)
    assert seen == {"none", "old", "new"}, seen
    assert journal.syncs >= 6  # dirty bit, in_use marking (3), the new clusters, the header, the frees
    assert [(b.name, b.in_use) for b in (await read_stored(path)).values()] == [("new", False), ("old", False)]
