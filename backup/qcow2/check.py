"""A consistency check of a qcow2 image's metadata, like ``qemu-img check`` (repair: ``repair.py``).

Recomputes every host cluster's reference count from the header, L1/L2 tables and the refcount
structures, and compares it with the stored refcounts and the COPIED flags. The unit tests use it
as the oracle that needs no QEMU; operators can use it to inspect a backup without QEMU installed.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from backup.errors import ImageFormatError
from backup.qcow2 import layout as q
from backup.qcow2.bitmaps import clusters_of, load_directory
from backup.qcow2.header import ImageHeader, read_header
from backup.qcow2.refcount import Refcounts
from nbd.align import div_up


@dataclass
class CheckResult:
    """Problems found: ``corruptions`` make an image unsafe, ``leaks`` only waste space."""

    corruptions: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    dirty: bool = False
    allocated_clusters: int = 0
    compressed_clusters: int = 0

    @property
    def clean(self) -> bool:
        return not self.corruptions and not self.leaks


@dataclass
class References:
    """Who references which host cluster, from the header and the L1/L2 tables (not the refcounts)."""

    counts: Counter[int] = field(default_factory=Counter)
    l1: list[int] = field(default_factory=list)
    l2_tables: dict[int, int] = field(default_factory=dict)  # L2 table offset -> L1 index
    problems: list[str] = field(default_factory=list)
    allocated_clusters: int = 0
    compressed_clusters: int = 0

    def ref(self, offset: int, length: int, cluster_bits: int) -> None:
        for c in range(offset >> cluster_bits, ((offset + length - 1) >> cluster_bits) + 1):
            self.counts[c] += 1


def checkable_header(fd: int, path: str) -> ImageHeader:
    """The header of an image this module can check (and ``repair.py`` can repair)."""
    h = read_header(fd, os.lseek(fd, 0, os.SEEK_END), path)
    if h.nb_snapshots:
        raise ImageFormatError(f"{path}: images with internal snapshots cannot be checked or repaired here")
    if h.incompatible & q.INCOMPAT_EXTL2:
        raise ImageFormatError(f"{path}: images with extended L2 entries cannot be checked or repaired here")
    return h


def walk_references(fd: int, h: ImageHeader) -> References:
    """Count references from the header, the L1 table and every L2 table."""
    cb, cs = h.cluster_bits, h.cluster_size
    file_clusters = div_up(os.lseek(fd, 0, os.SEEK_END), cs)
    refs = References()
    refs.ref(0, cs, cb)
    if h.l1_size:
        refs.ref(h.l1_table_offset, h.l1_size * 8, cb)
        refs.l1 = list(struct.unpack(f">{h.l1_size}Q", os.pread(fd, h.l1_size * 8, h.l1_table_offset)))
    _ref_bitmaps(fd, h, refs)
    zero_flag = q.OFLAG_ZERO if h.version >= 3 else 0
    _, shift, smask = q.compressed_fields(cb)
    for index, l1e in enumerate(refs.l1):
        l2off = l1e & q.L1E_OFFSET_MASK
        if not l2off:
            continue
        if l2off & (cs - 1) or l2off >> cb >= file_clusters:
            refs.problems.append(f"L1 entry {index}: L2 table offset {l2off:#x} is invalid")
            continue
        refs.ref(l2off, cs, cb)
        refs.l2_tables[l2off] = index
        table = os.pread(fd, cs, l2off).ljust(cs, b"\0")
        for i, entry in enumerate(struct.unpack(f">{cs // 8}Q", table)):
            if entry & q.OFLAG_COMPRESSED:
                offset, _ = q.decode_compressed(entry, cb)
                if offset >> cb >= file_clusters:
                    refs.problems.append(f"L2 entry {index}/{i}: compressed data at {offset:#x} is past the end")
                    continue
                refs.ref(offset & ~(q.SECTOR - 1), (((entry >> shift) & smask) + 1) * q.SECTOR, cb)
                refs.compressed_clusters += 1
                refs.allocated_clusters += 1
                if entry & q.OFLAG_COPIED:
                    refs.problems.append(f"compressed cluster entry {index}/{i} has the COPIED flag")
                continue
            host = entry & q.L2E_OFFSET_MASK
            if host:
                if host & (cs - 1) or host >> cb >= file_clusters:
                    refs.problems.append(f"L2 entry {index}/{i}: {host:#x} is unaligned or past the end of the file")
                    continue
                refs.ref(host, cs, cb)
            if host or entry & zero_flag:
                refs.allocated_clusters += 1
    return refs


def _ref_bitmaps(fd: int, h: ImageHeader, refs: References) -> None:
    """The persistent bitmaps' clusters are referenced too (while their extension is trusted)."""
    try:
        directory = load_directory(fd, h, os.lseek(fd, 0, os.SEEK_END), "image", strict=False)
    except ImageFormatError as exc:
        refs.problems.append(str(exc))
        return
    if directory is not None:
        for cluster in clusters_of(directory, h.cluster_bits):
            refs.counts[cluster] += 1


@contextmanager
def image_fd(path: str, flags: int) -> Iterator[int]:
    """A descriptor of the (closed) image at ``path`` for the offline check and repair, closed after."""
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def check_image(path: str) -> CheckResult:
    """Check the image at ``path`` (read-only)."""
    with image_fd(path, os.O_RDONLY) as fd:
        return _check(fd, path)


def _check(fd: int, path: str) -> CheckResult:
    h = checkable_header(fd, path)
    cb, cs = h.cluster_bits, h.cluster_size
    walk = walk_references(fd, h)
    result = CheckResult(
        corruptions=list(walk.problems),
        dirty=bool(h.incompatible & q.INCOMPAT_DIRTY),
        allocated_clusters=walk.allocated_clusters,
        compressed_clusters=walk.compressed_clusters,
    )
    expected = walk.counts
    walk.ref(h.refcount_table_offset, h.refcount_table_clusters * cs, cb)
    n = h.refcount_table_clusters * cs // 8
    reftable = list(struct.unpack(f">{n}Q", os.pread(fd, n * 8, h.refcount_table_offset).ljust(n * 8, b"\0")))
    file_size = os.lseek(fd, 0, os.SEEK_END)
    for index, entry in enumerate(reftable):
        off = entry & q.REFT_OFFSET_MASK
        if off and (off & (cs - 1) or off >= file_size):  # e.g. a table written before its blocks
            result.corruptions.append(f"refcount table entry {index} ({off:#x}) is unaligned or past the end")
            reftable[index] = 0
        elif off:
            walk.ref(off, cs, cb)
    refs = Refcounts(
        fd,
        path,
        cluster_bits=cb,
        order=h.refcount_order,
        reftable=reftable,
        reftable_offset=h.refcount_table_offset,
        reftable_clusters=h.refcount_table_clusters,
        alloc_end=div_up(file_size, cs),
    )
    last = max([*expected, div_up(file_size, cs) - 1, 0])
    for c in range(last + 1):
        stored, want = refs.get(c), expected.get(c, 0)
        if stored == want:
            continue
        message = f"cluster {c} ({c << cb:#x}): refcount {stored}, referenced {want} times"
        (result.leaks if stored > want else result.corruptions).append(message)
    for l2off, index in walk.l2_tables.items():
        copied = bool(walk.l1[index] & q.OFLAG_COPIED)
        if copied != (refs.get(l2off >> cb) == 1):
            result.corruptions.append(f"L2 table of L1 entry {index}: COPIED flag {copied}, refcount mismatch")
        table = os.pread(fd, cs, l2off).ljust(cs, b"\0")
        for i, entry in enumerate(struct.unpack(f">{cs // 8}Q", table)):
            host = entry & q.L2E_OFFSET_MASK
            if entry & q.OFLAG_COMPRESSED or not host or host & (cs - 1):
                continue
            copied = bool(entry & q.OFLAG_COPIED)
            if copied != (refs.get(host >> cb) == 1):
                result.corruptions.append(f"data cluster of L2 entry {index}/{i}: COPIED flag {copied}, wrong refcount")
    return result
