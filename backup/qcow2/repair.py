"""Rebuild the refcounts of an image that was not cleanly closed (the dirty bit is set).

With lazy refcounts, as QEMU's, the L1/L2 tables are trusted and the refcounts are not: the repair
counts every reference the tables make, writes a complete new refcount table and refcount blocks
past the end of the file, points the header at them, and only then clears the dirty bit. A crash
during the repair leaves the old structures and the dirty bit in place, so it simply runs again.
COPIED flags are set to agree with the new counts.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

from backup.errors import ImageFormatError
from backup.qcow2 import layout as q
from backup.qcow2.check import checkable_header, image_fd, walk_references
from nbd.align import div_up

log = logging.getLogger(__name__)


@dataclass
class RepairReport:
    """What the repair did: clusters referenced, and where the new refcount structures went."""

    referenced_clusters: int
    reftable_offset: int
    reftable_clusters: int
    refblocks: int
    copied_flags_fixed: int


def repair_image(path: str) -> RepairReport:
    """Rebuild refcounts and clear the dirty bit of the (closed) image at ``path``."""
    with image_fd(path, os.O_RDWR) as fd:
        return _repair(fd, path)


def _layout(end: int, cluster_size: int, rb_entries: int) -> tuple[int, int]:
    """(reftable clusters, refblocks) that cover the image plus themselves, placed from ``end``."""
    table, blocks = 1, 1
    while True:
        total = end + table + blocks
        need_blocks = div_up(total, rb_entries)
        need_table = div_up(need_blocks * 8, cluster_size)
        if (need_blocks, need_table) == (blocks, table):
            return table, blocks
        table, blocks = max(table, need_table), max(blocks, need_blocks)


def _repair(fd: int, path: str) -> RepairReport:
    h = checkable_header(fd, path)
    if h.incompatible & q.INCOMPAT_CORRUPT:
        raise ImageFormatError(f"{path}: image is marked corrupt; repair it with 'qemu-img check -r all'")
    walk = walk_references(fd, h)
    if walk.problems:
        raise ImageFormatError(f"{path}: cannot rebuild refcounts, the tables are damaged: {walk.problems[0]}")
    cb, cs = h.cluster_bits, h.cluster_size
    order = h.refcount_order
    bits = 1 << order
    rb_entries = cs * 8 // bits
    counts = walk.counts
    end = max([div_up(os.lseek(fd, 0, os.SEEK_END), cs), *(c + 1 for c in counts)])
    table_clusters, nblocks = _layout(end, cs, rb_entries)
    if table_clusters * cs > q.MAX_REFTABLE_BYTES:
        raise ImageFormatError(f"{path}: the rebuilt refcount table would exceed 8 MiB")
    table_start, blocks_start = end, end + table_clusters
    for c in range(table_start, blocks_start + nblocks):
        counts[c] += 1
    max_refcount = (1 << bits) - 1
    over = [c for c, n in counts.items() if n > max_refcount]
    if over:
        raise ImageFormatError(f"{path}: cluster {over[0]} is referenced more than {bits}-bit refcounts can count")
    blocks = [bytearray(cs) for _ in range(nblocks)]
    fmt, width = q.refcount_accessors(order)
    for c, n in counts.items():
        block, i = blocks[c // rb_entries], c % rb_entries
        if fmt is not None:
            fmt.pack_into(block, i * width, n)
        else:
            per = 8 >> order
            block[i // per] |= n << ((i % per) * bits)
    reftable = [0] * (table_clusters * cs // 8)
    for b in range(nblocks):
        reftable[b] = (blocks_start + b) << cb
    fixed = _fix_copied(fd, h.l1_table_offset, walk.l1, counts, cb, cs)
    os.pwritev(fd, blocks, blocks_start << cb)
    os.pwrite(fd, struct.pack(f">{len(reftable)}Q", *reftable), table_start << cb)
    os.fsync(fd)
    os.pwrite(fd, q.REFTABLE_FIELDS_FAST.pack(table_start << cb, table_clusters), q.REFTABLE_FIELDS_OFFSET)
    os.fsync(fd)
    if h.version >= 3 and h.incompatible & q.INCOMPAT_DIRTY:
        incompatible = h.incompatible & ~q.INCOMPAT_DIRTY
        os.pwrite(fd, q.U64.pack(incompatible), q.INCOMPAT_OFFSET)
        os.fsync(fd)
    log.warning("%s: refcounts rebuilt (%d clusters referenced)", path, len(counts))
    return RepairReport(len(counts), table_start << cb, table_clusters, nblocks, fixed)


def _fix_copied(fd: int, l1_offset: int, l1: list[int], counts: dict[int, int], cb: int, cs: int) -> int:
    """Make every COPIED flag say whether the refcount is exactly one; returns how many changed."""
    fixed = 0
    l1_changed = False
    for index, l1e in enumerate(l1):
        l2off = l1e & q.L1E_OFFSET_MASK
        if not l2off:
            continue
        want = l2off | (q.OFLAG_COPIED if counts.get(l2off >> cb) == 1 else 0)
        if want != l1e & (q.L1E_OFFSET_MASK | q.OFLAG_COPIED):
            l1[index] = want
            l1_changed = True
            fixed += 1
        table = bytearray(os.pread(fd, cs, l2off).ljust(cs, b"\0"))
        changed = False
        for i in range(cs // 8):
            entry = q.U64.unpack_from(table, i * 8)[0]
            host = entry & q.L2E_OFFSET_MASK
            if entry & q.OFLAG_COMPRESSED or not host:
                continue
            new = entry | q.OFLAG_COPIED if counts.get(host >> cb) == 1 else entry & ~q.OFLAG_COPIED
            if new != entry:
                q.U64.pack_into(table, i * 8, new)
                changed = True
                fixed += 1
        if changed:
            os.pwrite(fd, table, l2off)
    if l1_changed:
        os.pwrite(fd, struct.pack(f">{len(l1)}Q", *l1), l1_offset)
    return fixed
