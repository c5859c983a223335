"""Persistent bitmaps in qcow2 without QEMU (QEMU's side: integration/test_qcow2_bitmaps.py): what a
read-write open marks, what a clean close writes, what a read-only open leaves alone, stale
extensions, the overlap check and the refcount rebuild knowing the bitmap clusters."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from backup.errors import ImageFormatError
from backup.qcow2 import Qcow2Device
from backup.qcow2 import layout as q
from backup.qcow2.bitmaps import (
    DIR_ENTRY,
    EXTENSION,
    FLAG_EXTRA_DATA_COMPATIBLE,
    Directory,
    StoredBitmap,
    bitmap_bytes,
    clusters_of,
    load_directory,
)
from backup.qcow2.check import check_image
from backup.qcow2.header import read_header

SIZE = (2 << 20) + 1536  # not a multiple of granularity * 8


def bitmap(name: str, granularity: int = 4096, *, bits: tuple[int, ...] = (0,), auto: bool = True) -> StoredBitmap:
    data = bytearray(bitmap_bytes(SIZE, granularity))
    for i in bits:
        data[i // 8] |= 1 << (i % 8)
    return StoredBitmap(name, granularity, False, auto, bytes(data))


async def make(path: Path, *bitmaps: StoredBitmap) -> None:
    dev = await Qcow2Device.create(path, SIZE, cluster_size=4096)
    dev.set_stored_bitmaps(list(bitmaps))
    await dev.close()


async def stored(path: Path) -> list[StoredBitmap]:
    dev = await Qcow2Device.open(path, read_only=True)
    await dev.close()
    return dev.stored_bitmaps


async def test_round_trip_of_several_bitmaps_with_a_partial_last_byte(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    last = (SIZE - 1) // 512
    mine = [bitmap("x", 512, bits=(0, 9, last)), bitmap("y", 65536, bits=(32,), auto=False), bitmap("z", 1 << 20)]
    await make(path, *mine)
    assert await stored(path) == mine
    assert check_image(str(path)).clean


async def test_read_write_open_marks_in_use_and_a_crash_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    await make(path, bitmap("x"))
    dev = await Qcow2Device.open(path)
    assert not dev.stored_bitmaps[0].in_use  # as loaded: consistent
    dev.abandon()
    assert [b.in_use for b in await stored(path)] == [True]
    dev = await Qcow2Device.open(path)
    assert dev.stored_bitmaps[0].in_use
    await dev.close()  # an inconsistent bitmap stays inconsistent
    assert [b.in_use for b in await stored(path)] == [True]


async def test_read_only_open_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    await make(path, bitmap("x"))
    before = path.read_bytes()
    dev = await Qcow2Device.open(path, read_only=True)
    with pytest.raises(OSError) as err:
        dev.set_stored_bitmaps([])
    assert err.value.errno == errno.EROFS
    await dev.close()
    assert path.read_bytes() == before


async def test_unrecorded_guest_writes_leave_recording_bitmaps_inconsistent(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    await make(path, bitmap("rec"), bitmap("off", auto=False))
    dev = await Qcow2Device.open(path)
    await dev.pwrite(8192, b"z" * 512)
    await dev.close()
    assert [(b.name, b.in_use) for b in await stored(path)] == [("rec", True), ("off", False)]
    dev = await Qcow2Device.open(path)  # no writes: both written back as they were
    dev.set_stored_bitmaps([bitmap("rec"), bitmap("off", auto=False)])
    await dev.close()
    assert [(b.name, b.in_use) for b in await stored(path)] == [("rec", False), ("off", False)]
    assert check_image(str(path)).clean


async def test_a_stale_extension_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    await make(path, bitmap("x"))
    with path.open("r+b") as f:  # what a writer that does not know bitmaps leaves
        f.seek(q.INCOMPAT_OFFSET + 16)
        f.write(bytes(8))
    assert await stored(path) == []
    dev = await Qcow2Device.open(path)
    assert dev.stored_bitmaps == []
    dev.set_stored_bitmaps([bitmap("new")])
    await dev.close()
    assert [b.name for b in await stored(path)] == ["new"]


async def test_bitmap_clusters_are_metadata_for_the_overlap_check(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    await make(path, bitmap("x"), bitmap("y", 512))
    dev = await Qcow2Device.open(path)
    assert dev._bitmap_dir is not None
    used = set(clusters_of(dev._bitmap_dir, 12))
    assert used and used <= set(dev._meta.clusters)
    await dev.close()


async def test_refcount_rebuild_of_a_crashed_image_keeps_the_bitmap_clusters(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    await make(path, bitmap("x", bits=(1, 2, 3)))
    dev = await Qcow2Device.open(path)
    await dev.pwrite(0, b"d" * 65536)
    await dev.flush()
    dev.abandon()  # dirty bit set: the next read-write open rebuilds the refcounts
    dev = await Qcow2Device.open(path)
    for k in range(40):  # new allocations must not reuse the bitmap's clusters
        await dev.pwrite(65536 + k * 4096, b"e" * 4096)
    await dev.close()
    assert check_image(str(path)).clean
    (back,) = await stored(path)
    assert back.in_use and back.data == bitmap("x", bits=(1, 2, 3)).data


@pytest.mark.parametrize(
    ("bitmaps", "message"),
    [
        ([bitmap("x"), bitmap("x")], "duplicate"),
        ([bitmap("")], "1 to 1023 bytes"),
        ([StoredBitmap("x", 4096, False, True, b"\0")], "bytes of data"),
        ([StoredBitmap("x", 3000, False, True, b"")], "power of two"),
    ],
)
async def test_bitmaps_that_cannot_be_stored_are_refused_when_set(
    tmp_path: Path, bitmaps: list[StoredBitmap], message: str
) -> None:
    dev = await Qcow2Device.create(tmp_path / "a.qcow2", SIZE, cluster_size=4096)
    with pytest.raises(ImageFormatError, match=message):
        dev.set_stored_bitmaps(bitmaps)
    await dev.close()


async def test_an_all_ones_table_entry_reads_as_all_ones(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    await make(path, bitmap("x", 512, bits=()))
    directory = load_directory_of(path)
    with path.open("r+b") as f:  # the one table entry: "all ones", no cluster (QEMU never writes it)
        f.seek(directory.entries[0].table_offset)
        f.write((1).to_bytes(8, "big"))
    (back,) = await stored(path)
    granules = -(-SIZE // 512)
    assert back.data[:-1] == b"\xff" * (len(back.data) - 1)
    assert back.data[-1] == (1 << (granules % 8)) - 1  # the tail bits past the disk stay clear


def load_directory_of(path: Path) -> Directory:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        directory = load_directory(fd, read_header(fd, size, str(path)), size, str(path))
    finally:
        os.close(fd)
    assert directory is not None
    return directory


async def test_unchanged_bitmaps_are_updated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    await make(path, bitmap("x"), bitmap("y", 512, bits=(5, 6)))
    size = path.stat().st_size
    for _ in range(3):
        dev = await Qcow2Device.open(path)
        await dev.close()
    assert path.stat().st_size == size
    assert [b.in_use for b in await stored(path)] == [False, False]
    assert check_image(str(path)).clean


async def test_bitmaps_with_extra_data_are_read_if_compatible_and_refuse_writing(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    await make(path, bitmap("a", bits=(4,)), bitmap("b"))
    directory = load_directory_of(path)
    raw = bytearray()
    for e, compatible in zip(directory.entries, (True, False), strict=True):
        name = e.name.encode()
        flags = e.flags | (FLAG_EXTRA_DATA_COMPATIBLE if compatible else 0)
        raw += DIR_ENTRY.pack(e.table_offset, len(e.table), flags, 1, e.granularity_bits, len(name), 8)
        raw += b"extra..." + name + bytes(-(len(name)) % 8)
    with path.open("r+b") as f:
        f.seek(directory.offset)
        f.write(raw)
        f.seek(0)
        first = f.read(4096)
        at = first.index(EXTENSION.pack(2, 0, directory.size, directory.offset))
        f.seek(at)
        f.write(EXTENSION.pack(2, 0, len(raw), directory.offset))
    assert [(b.name, b.data) for b in await stored(path)] == [("a", bitmap("a", bits=(4,)).data)]
    assert check_image(str(path)).clean
    with pytest.raises(ImageFormatError, match=r"extra data.*read-only"):
        await Qcow2Device.open(path)


async def test_no_room_for_the_extension_is_refused_when_set_not_at_close(tmp_path: Path) -> None:
    sub = tmp_path / ("d" * 200)
    sub.mkdir()
    base = sub / ("b" * 160)
    await (await Qcow2Device.create(base, SIZE, cluster_size=512)).close()
    path = tmp_path / "top.qcow2"
    dev = await Qcow2Device.create(path, SIZE, cluster_size=512, backing_file=str(base.relative_to(tmp_path)))
    with pytest.raises(ImageFormatError, match="do not fit"):
        dev.set_stored_bitmaps([bitmap("x")])
    await dev.close()
    assert check_image(str(path)).clean
