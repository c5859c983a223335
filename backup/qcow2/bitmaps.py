"""qcow2 persistent dirty bitmaps in qcow2's own format (``docs/interop/qcow2.txt``, "Bitmaps").

The bitmaps header extension points to a bitmap directory; each directory entry names a bitmap
(granularity, flags ``in_use``/``auto``) and points to its bitmap table, whose entries point to the
clusters holding the bits (0: an all-zero cluster, 1: all ones). The extension is trusted only
while the header's autoclear bit 0 is set: software that writes the image without knowing bitmaps
clears that bit, which makes the extension stale.

This module reads and writes that structure as plain data (``StoredBitmap``); when to do it, and
the crash-safe order of the writes around it, is the device's business (``device.py``). Anything
this code cannot keep intact (unknown flags, extra data, other bitmap types) is refused with an
``ImageFormatError`` rather than rewritten wrongly.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backup.errors import ImageFormatError
from backup.qcow2 import layout as q
from nbd.align import div_up

if TYPE_CHECKING:
    from backup.qcow2.header import ImageHeader
    from backup.qcow2.refcount import Refcounts

EXTENSION = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, bitmap_directory_size, bitmap_directory_offset
DIR_ENTRY = struct.Struct(">QIIBBHI")  # table offset, table size, flags, type, granularity_bits, name_size, extra
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
FLAGS_KNOWN = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE
TYPE_DIRTY_TRACKING = 1
MAX_BITMAPS = 65535  # QEMU's limits
MAX_NAME = 1023
MAX_DIRECTORY = 64 * 1024 * 1024
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_TABLE_ENTRIES = 0x8000000  # QEMU's BME_MAX_TABLE_SIZE
MAX_DATA_BYTES = 0x20000000  # QEMU's BME_MAX_PHYS_SIZE: at most 512 MiB of clusters of bits per bitmap
TABLE_RESERVED_MASK = 0xFF000000000001FE
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
ALL_ONES = 1


@dataclass
class StoredBitmap:
    """One bitmap as the image stores it: bit i covers guest bytes [i*granularity, (i+1)*granularity),
    least significant bit first in each byte; ``data`` holds ``bitmap_bytes(size, granularity)`` bytes."""

    name: str
    granularity: int
    in_use: bool
    auto: bool
    data: bytes


@dataclass
class DirectoryEntry:
    table_offset: int
    table: list[int]
    flags: int
    granularity_bits: int
    name: str
    usable: bool = True  # a dirty tracking bitmap without extra data we would have to understand


@dataclass
class Directory:
    """Where an image's bitmaps are: what the header extension says, and each entry's table."""

    offset: int
    size: int
    entries: list[DirectoryEntry]


def bitmap_bytes(size: int, granularity: int) -> int:
    """Bytes of bitmap data covering a ``size``-byte disk (the last byte's tail bits are zero)."""
    return div_up(div_up(size, granularity), 8)


def _refuse(path: str, message: str) -> ImageFormatError:
    return ImageFormatError(f"{path}: persistent bitmaps: {message}")


def has_bitmaps(h: ImageHeader) -> bool:
    """Whether the image has a bitmaps extension that is to be trusted (autoclear bit 0 set)."""
    return h.version >= 3 and h.bitmaps_ext is not None and bool(h.autoclear & q.AUTOCLEAR_BITMAPS)


def load_directory(fd: int, h: ImageHeader, file_size: int, path: str, *, strict: bool = True) -> Directory | None:
    """The image's bitmap directory and tables, every field checked, or None without (trusted) bitmaps.

    ``strict`` (for writing) refuses bitmaps this code could not write back as they are (other
    types, extra data, unknown flags); otherwise they are listed as not ``usable``."""
    if not has_bitmaps(h):
        return None
    assert h.bitmaps_ext is not None
    if len(h.bitmaps_ext) != EXTENSION.size:
        raise _refuse(path, f"the header extension has {len(h.bitmaps_ext)} bytes, not {EXTENSION.size}")
    nb, reserved, dir_size, dir_offset = EXTENSION.unpack(h.bitmaps_ext)
    cs = h.cluster_size
    if reserved:
        raise _refuse(path, "reserved field of the header extension is not zero")
    if not 1 <= nb <= MAX_BITMAPS:
        raise _refuse(path, f"{nb} bitmaps (1 to {MAX_BITMAPS} supported)")
    if dir_size > MAX_DIRECTORY or dir_size < nb * DIR_ENTRY.size:
        raise _refuse(path, f"invalid bitmap directory size {dir_size}")
    if not dir_offset or dir_offset % cs or dir_offset + dir_size > file_size:
        raise _refuse(path, f"bitmap directory at {dir_offset:#x} is unaligned or past the end of the file")
    raw = os.pread(fd, dir_size, dir_offset)
    entries: list[DirectoryEntry] = []
    names: set[str] = set()
    pos = 0
    for _ in range(nb):
        entry, pos = _parse_entry(fd, h, raw, pos, file_size, path, strict)
        if entry.name in names:
            raise _refuse(path, f"duplicate bitmap name {entry.name!r}")
        names.add(entry.name)
        entries.append(entry)
    if pos != dir_size:
        raise _refuse(path, f"bitmap directory size {dir_size} does not match its {nb} entries ({pos} bytes)")
    return Directory(dir_offset, dir_size, entries)


def _parse_entry(
    fd: int, h: ImageHeader, raw: bytes, pos: int, file_size: int, path: str, strict: bool
) -> tuple[DirectoryEntry, int]:
    if pos + DIR_ENTRY.size > len(raw):
        raise _refuse(path, "bitmap directory is truncated")
    table_offset, table_size, flags, type_, gbits, name_size, extra_size = DIR_ENTRY.unpack_from(raw, pos)
    end = pos + DIR_ENTRY.size + extra_size + name_size
    if end > len(raw):
        raise _refuse(path, "bitmap directory entry runs past the directory")
    name_bytes = raw[pos + DIR_ENTRY.size + extra_size : end]
    name = name_bytes.decode("utf-8", "surrogateescape")
    problem = None
    if flags & ~FLAGS_KNOWN:
        problem = f"bitmap {name!r} has unknown flags {flags & ~FLAGS_KNOWN:#x}"
    elif type_ != TYPE_DIRTY_TRACKING:
        problem = f"bitmap {name!r} has unsupported type {type_}"
    elif extra_size:
        problem = f"bitmap {name!r} has {extra_size} bytes of extra data, which is not supported"
    if problem and strict:
        raise _refuse(path, problem)
    # Extra data marked compatible may be ignored when reading (not when writing: it must be kept).
    usable = problem is None or (
        type_ == TYPE_DIRTY_TRACKING and not flags & ~FLAGS_KNOWN and bool(flags & FLAG_EXTRA_DATA_COMPATIBLE)
    )
    if not 1 <= name_size <= MAX_NAME:
        raise _refuse(path, f"bitmap name size {name_size} (1 to {MAX_NAME} supported)")
    if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
        raise _refuse(path, f"bitmap {name!r} has granularity 2**{gbits} (2**9 to 2**31 supported)")
    cs = h.cluster_size
    expected = div_up(bitmap_bytes(h.size, 1 << gbits), cs)
    if expected > MAX_TABLE_ENTRIES or expected * cs > MAX_DATA_BYTES:
        raise _refuse(path, f"bitmap {name!r} is too large ({expected} clusters of bits)")
    if table_size != expected:
        raise _refuse(path, f"bitmap {name!r} has a table of {table_size} entries, its size needs {expected}")
    table: list[int] = []
    if table_size:
        if not table_offset or table_offset % cs or table_offset + table_size * 8 > file_size:
            raise _refuse(path, f"bitmap {name!r}: table at {table_offset:#x} is unaligned or past the end")
        table = list(struct.unpack(f">{table_size}Q", os.pread(fd, table_size * 8, table_offset)))
        for i, e in enumerate(table):
            off = e & TABLE_OFFSET_MASK
            if e & TABLE_RESERVED_MASK or (off and e & ALL_ONES) or off % cs or off + cs > div_up(file_size, cs) * cs:
                raise _refuse(path, f"bitmap {name!r}: table entry {i} ({e:#x}) is invalid")
    padded = end + (-end % 8)
    if any(raw[end:padded]):
        raise _refuse(path, f"bitmap {name!r}: directory entry padding is not zero")
    return DirectoryEntry(table_offset, table, flags, gbits, name, usable), padded


def clusters_of(directory: Directory, cluster_bits: int) -> Iterator[int]:
    """Every host cluster the bitmaps use: directory, tables and data (for refcounts and the overlap check)."""
    cs = 1 << cluster_bits
    yield from range(directory.offset >> cluster_bits, div_up(directory.offset + directory.size, cs))
    for entry in directory.entries:
        if entry.table:
            start = entry.table_offset >> cluster_bits
            yield from range(start, start + div_up(len(entry.table) * 8, cs))
        for e in entry.table:
            if e & TABLE_OFFSET_MASK:
                yield (e & TABLE_OFFSET_MASK) >> cluster_bits


def read_data(fd: int, h: ImageHeader, entry: DirectoryEntry) -> bytes:
    """The bits of one bitmap, tail bits past the disk's end cleared."""
    cs = h.cluster_size
    chunks = []
    for e in entry.table:
        off = e & TABLE_OFFSET_MASK
        if off:
            chunks.append(os.pread(fd, cs, off).ljust(cs, b"\0"))
        else:
            chunks.append((b"\xff" if e & ALL_ONES else b"\0") * cs)
    granules = div_up(h.size, 1 << entry.granularity_bits)
    data = bytearray(b"".join(chunks)[: div_up(granules, 8)])
    if granules % 8:
        data[-1] &= (1 << (granules % 8)) - 1
    return bytes(data)


def read_bitmaps(fd: int, h: ImageHeader, file_size: int, path: str) -> list[StoredBitmap]:
    """The usable bitmaps of an open image, in directory order ([] without trusted bitmaps)."""
    directory = load_directory(fd, h, file_size, path, strict=False)
    if directory is None:
        return []
    return [
        StoredBitmap(
            name=e.name,
            granularity=1 << e.granularity_bits,
            in_use=bool(e.flags & FLAG_IN_USE),
            auto=bool(e.flags & FLAG_AUTO),
            data=read_data(fd, h, e),
        )
        for e in directory.entries
        if e.usable
    ]


def check_bitmaps(bitmaps: list[StoredBitmap], h: ImageHeader, path: str) -> None:
    """Refuse what could not be stored, or what QEMU could not read back."""
    if bitmaps and h.version < 3:
        raise ImageFormatError(f"{path}: cannot store persistent bitmaps in a qcow2 v2 image")
    if len(bitmaps) > MAX_BITMAPS:
        raise ImageFormatError(f"{path}: at most {MAX_BITMAPS} persistent bitmaps")
    names: set[str] = set()
    for b in bitmaps:
        encoded = b.name.encode("utf-8", "surrogateescape")
        if not 1 <= len(encoded) <= MAX_NAME:
            raise ImageFormatError(f"{path}: bitmap name must have 1 to {MAX_NAME} bytes")
        if b.name in names:
            raise ImageFormatError(f"{path}: duplicate bitmap name {b.name!r}")
        names.add(b.name)
        g = b.granularity
        if g & (g - 1) or not 1 << MIN_GRANULARITY_BITS <= g <= 1 << MAX_GRANULARITY_BITS:
            raise ImageFormatError(f"{path}: bitmap {b.name!r}: granularity {g} must be a power of two, 512 to 2 GiB")
        if div_up(bitmap_bytes(h.size, g), h.cluster_size) * h.cluster_size > MAX_DATA_BYTES:
            raise ImageFormatError(f"{path}: bitmap {b.name!r}: granularity {g} is too small for a {h.size}-byte disk")
        if len(b.data) != bitmap_bytes(h.size, g):
            raise ImageFormatError(
                f"{path}: bitmap {b.name!r} has {len(b.data)} bytes of data, a {h.size}-byte disk needs "
                f"{bitmap_bytes(h.size, g)}"
            )


def write_bitmaps(
    fd: int, h: ImageHeader, refs: Refcounts, bitmaps: list[StoredBitmap], path: str
) -> tuple[Directory | None, list[int]]:
    """Write the bitmaps' data, tables and directory to newly allocated clusters (nothing points to
    them yet: the caller makes them durable, then points the header at the returned directory).
    Returns the directory (None for no bitmaps) and the clusters it allocated."""
    check_bitmaps(bitmaps, h, path)
    if not bitmaps:
        return None, []
    cb, cs = h.cluster_bits, h.cluster_size
    allocated: list[int] = []

    def alloc(count: int) -> int:
        start = refs.alloc(count, from_end=True)
        allocated.extend(range(start, start + count))
        return start << cb

    entries: list[DirectoryEntry] = []
    for b in bitmaps:
        chunks = [b.data[i : i + cs] for i in range(0, len(b.data), cs)]
        dirty = [i for i, c in enumerate(chunks) if c.count(0) != len(c)]
        table = [0] * len(chunks)
        if dirty:
            start = alloc(len(dirty))
            for k, i in enumerate(dirty):
                table[i] = start + k * cs
                os.pwrite(fd, chunks[i].ljust(cs, b"\0"), table[i])
        table_offset = 0
        if table:
            table_offset = alloc(div_up(len(table) * 8, cs))
            os.pwrite(fd, struct.pack(f">{len(table)}Q", *table), table_offset)
        flags = (FLAG_IN_USE if b.in_use else 0) | (FLAG_AUTO if b.auto else 0)
        entries.append(DirectoryEntry(table_offset, table, flags, b.granularity.bit_length() - 1, b.name))
    raw = encode_directory(entries)
    directory = Directory(alloc(div_up(len(raw), cs)), len(raw), entries)
    os.pwrite(fd, raw, directory.offset)
    return directory, allocated


def encode_directory(entries: list[DirectoryEntry]) -> bytes:
    out = bytearray()
    for e in entries:
        name = e.name.encode("utf-8", "surrogateescape")
        out += DIR_ENTRY.pack(
            e.table_offset, len(e.table), e.flags, TYPE_DIRTY_TRACKING, e.granularity_bits, len(name), 0
        )
        out += name
        out += bytes(-len(out) % 8)
    return bytes(out)


def encode_extension(directory: Directory) -> bytes:
    return EXTENSION.pack(len(directory.entries), 0, directory.size, directory.offset)
