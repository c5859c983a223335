"""Host cluster allocation and reference counts (the refcount table and its refcount blocks).

New clusters come from the end of the file (so a backup's data lands in one contiguous run and is
written with one syscall) or from clusters freed earlier in this session. A refcount block that
does not exist yet is allocated on demand and counts itself when it falls in its own range; the
refcount table grows (moves to a bigger contiguous area) when the file outgrows it.

Crash ordering: increments may reach the file at any time (a crash then leaks clusters, which the
refcount rebuild of a dirty image reclaims), decrements only after the metadata that dropped the
reference is durable. So ``free`` only quarantines a cluster; ``release``, called after a
successful flush, applies the decrements: a freed cluster is never reused (and overwritten) while
a durable L2 entry may still point to it. ``meta`` knows where the refcount structures are, for
the overlap check.
"""

from __future__ import annotations

import errno
import heapq
import os
import stat
import struct
from typing import TYPE_CHECKING

from backup.errors import ImageFormatError
from backup.qcow2 import layout as q
from backup.qcow2.cache import TableCache
from backup.qcow2.errors import Qcow2CorruptError
from backup.qcow2.overlap import MetadataMap
from nbd.align import div_up

if TYPE_CHECKING:
    from backup.qcow2.header import ImageHeader


class Refcounts:
    """The refcount state of one image, kept in memory and written back on ``flush``."""

    def __init__(
        self,
        fd: int,
        path: str,
        *,
        cluster_bits: int,
        order: int,
        reftable: list[int],
        reftable_offset: int,
        reftable_clusters: int,
        alloc_end: int,
        cache_tables: int = 32,
    ) -> None:
        self._fd = fd
        self._path = path
        self._cb = cluster_bits
        self._cs = 1 << cluster_bits
        self._order = order
        self._bits = 1 << order
        self.max_refcount = (1 << self._bits) - 1
        self._rb_bits = cluster_bits + 3 - order  # log2(entries per refcount block)
        self._struct, self._width = q.refcount_accessors(order)
        self.reftable = reftable
        self.reftable_offset = reftable_offset
        self.reftable_clusters = reftable_clusters
        self.reftable_dirty = False
        self.header_dirty = False  # the reftable moved: the header must point to it
        self.alloc_end = alloc_end  # first cluster index never used so far
        self._free: list[int] = []  # min-heap of clusters freed in this session
        self._quarantine: list[tuple[int, bool]] = []  # (cluster, was metadata) freed since the last flush
        self.cache = TableCache(
            fd, self._cs, cache_tables, on_short_read=lambda off: self._corrupt(f"refcount block {off:#x} past EOF")
        )
        self.meta = MetadataMap()
        self.meta.add(reftable_offset >> cluster_bits, reftable_clusters)
        # filter(None, ...) skips the (usually thousands of) empty entries at C speed
        self.meta.add_all(
            (e & q.REFT_OFFSET_MASK) >> cluster_bits for e in filter(None, reftable) if e & q.REFT_OFFSET_MASK
        )

    @classmethod
    def load(cls, fd: int, h: ImageHeader, file_size: int, path: str) -> Refcounts:
        """An image's refcounts for writing, every refcount table entry checked to lie in the file."""
        cs = h.cluster_size
        n = h.refcount_table_clusters * cs // 8
        raw = os.pread(fd, n * 8, h.refcount_table_offset).ljust(n * 8, b"\0")
        reftable = list(struct.unpack(f">{n}Q", raw))
        for entry in filter(None, reftable):  # most entries are empty: skip them at C speed
            off = entry & q.REFT_OFFSET_MASK
            if off and (off & (cs - 1) or off >= file_size):
                index = reftable.index(entry)
                raise ImageFormatError(f"{path}: refcount table entry {index} ({off:#x}) is invalid or past the end")
        refs = cls(
            fd,
            path,
            cluster_bits=h.cluster_bits,
            order=h.refcount_order,
            reftable=reftable,
            reftable_offset=h.refcount_table_offset,
            reftable_clusters=h.refcount_table_clusters,
            alloc_end=div_up(file_size, cs),
        )
        if stat.S_ISBLK(os.fstat(fd).st_mode):  # the device's size says nothing about what is used
            refs.alloc_end = refs.last_used() + 1
        return refs

    def _corrupt(self, message: str) -> Qcow2CorruptError:
        return Qcow2CorruptError(self._path, message)

    # --- entry access ------------------------------------------------------------------------------

    def _read_entry(self, block: bytearray, i: int) -> int:
        if self._struct is not None:
            value: int = self._struct.unpack_from(block, i * self._width)[0]
            return value
        per = 8 >> self._order
        return (block[i // per] >> ((i % per) * self._bits)) & self.max_refcount

    def _write_entry(self, block: bytearray, i: int, value: int) -> None:
        if self._struct is not None:
            self._struct.pack_into(block, i * self._width, value)
            return
        per = 8 >> self._order
        shift = (i % per) * self._bits
        byte = i // per
        block[byte] = (block[byte] & ~(self.max_refcount << shift) & 0xFF) | (value << shift)

    def _block(self, cluster: int, *, create: bool) -> tuple[int, bytearray | None]:
        ti = cluster >> self._rb_bits
        if ti >= len(self.reftable):
            if not create:
                return 0, None
            self._grow(ti)
        off = self.reftable[ti] & q.REFT_OFFSET_MASK
        if off:
            if off & (self._cs - 1):
                raise self._corrupt(f"refcount block offset {off:#x} is not cluster aligned")
            return off, self.cache.get(off)
        if not create:
            return 0, None
        # Allocate the block from the end of the file; it needs a refcount itself, which may live
        # in this very block (set below) or in another block allocated the same way.
        index = self.alloc_end
        self.alloc_end += 1
        off = index << self._cb
        self.reftable[ti] = off
        self.reftable_dirty = True
        self.meta.add(index)
        self.cache.new(off)
        self.add(index, 1)
        return off, self.cache.get(off)

    # --- public ------------------------------------------------------------------------------------

    def get(self, cluster: int) -> int:
        _, block = self._block(cluster, create=False)
        if block is None:
            return 0
        return self._read_entry(block, cluster & ((1 << self._rb_bits) - 1))

    def add(self, cluster: int, delta: int) -> int:
        """Change a cluster's refcount; refusing to overflow or go negative (both mean corruption)."""
        off, block = self._block(cluster, create=True)
        assert block is not None
        i = cluster & ((1 << self._rb_bits) - 1)
        value = self._read_entry(block, i) + delta
        if value < 0:
            raise self._corrupt(f"refcount of cluster {cluster:#x} would drop below zero")
        if value > self.max_refcount:
            raise self._corrupt(f"refcount of cluster {cluster:#x} overflows {self._bits}-bit refcounts")
        self._write_entry(block, i, value)
        self.cache.mark_dirty(off, block)
        if value == 0:
            heapq.heappush(self._free, cluster)
        return value

    def alloc(self, count: int = 1, *, from_end: bool = False) -> int:
        """Allocate ``count`` contiguous clusters with refcount 1; returns the first index.

        A single cluster reuses one freed earlier unless ``from_end``; runs always come from the end.
        """
        if count == 1 and not from_end:
            while self._free:
                cluster = heapq.heappop(self._free)
                if self.get(cluster) == 0:
                    self.add(cluster, 1)
                    return cluster
        start = self.alloc_end
        while True:
            busy = self._last_busy(start, count)
            if busy < 0:
                break
            start = busy + 1  # a cluster past the file end with a refcount: skip it
        self.alloc_end = start + count
        self._set_fresh(start, count)
        return start

    def last_used(self) -> int:
        """The highest cluster with a nonzero refcount, or -1 (reads one refcount block)."""
        for ti in range(len(self.reftable) - 1, -1, -1):
            off = self.reftable[ti] & q.REFT_OFFSET_MASK
            if not off:
                continue
            block = self.cache.get(off)
            used = len(block.rstrip(b"\0"))
            if used:
                per_byte = 8 >> self._order if self._order < 3 else 0
                if per_byte:
                    last_byte = block[used - 1]
                    index = (used - 1) * per_byte + (last_byte.bit_length() - 1) // self._bits
                else:
                    index = (used - 1) // self._width
                return (ti << self._rb_bits) + index
        return -1

    def _last_busy(self, start: int, count: int) -> int:
        """The last cluster of the run with a nonzero refcount, or -1 (checked a block slice at a time)."""
        mask = (1 << self._rb_bits) - 1
        pos, end, last = start, start + count, -1
        while pos < end:
            _, block = self._block(pos, create=False)
            i = pos & mask
            n = min(end - pos, mask + 1 - i)
            if block is not None:
                if self._struct is not None:
                    w = self._width
                    if block.count(0, i * w, (i + n) * w) != n * w:
                        last = max(c for c in range(pos, pos + n) if self._read_entry(block, c & mask))
                else:
                    for c in range(pos, pos + n):
                        if self._read_entry(block, c & mask):
                            last = c
            pos += n
        return last

    def _set_fresh(self, start: int, count: int) -> None:
        """Refcount 1 for a run of clusters known to be 0, one slice assignment per block."""
        mask = (1 << self._rb_bits) - 1
        pos, end = start, start + count
        while pos < end:
            off, block = self._block(pos, create=True)
            assert block is not None
            i = pos & mask
            n = min(end - pos, mask + 1 - i)
            if self._order == 4:
                block[i * 2 : (i + n) * 2] = b"\x00\x01" * n
            else:
                for k in range(i, i + n):
                    self._write_entry(block, k, 1)
            self.cache.mark_dirty(off, block)
            pos += n

    def _grow(self, needed_index: int) -> None:
        """Move the refcount table to a bigger area at the end of the file."""
        entries_per_cluster = self._cs // 8
        clusters = max(2 * self.reftable_clusters, 1)
        while True:
            end_after = self.alloc_end + clusters + (clusters >> self._rb_bits) + 2
            needed = max(needed_index + 1, (end_after >> self._rb_bits) + 2)
            if clusters * entries_per_cluster >= needed:
                break
            clusters *= 2
        if clusters * self._cs > q.MAX_REFTABLE_BYTES:
            raise OSError(errno.EFBIG, f"{self._path}: the refcount table would exceed QEMU's 8 MiB limit")
        old_start, old_clusters = self.reftable_offset >> self._cb, self.reftable_clusters
        start = self.alloc_end
        self.alloc_end += clusters
        self.reftable.extend([0] * (clusters * entries_per_cluster - len(self.reftable)))
        self.reftable_offset = start << self._cb
        self.reftable_clusters = clusters
        self.reftable_dirty = True
        self.header_dirty = True
        self.meta.add(start, clusters)
        self._set_fresh(start, clusters)
        for c in range(old_start, old_start + old_clusters):
            self.free(c, metadata=True)  # the durable header points to it until the next flush

    def free(self, cluster: int, *, metadata: bool = False) -> None:
        """Drop a reference once what dropped it is durable (see ``release``); ``metadata``: the
        cluster held a table, which it no longer does once its refcount reaches 0."""
        if not self.get(cluster):
            raise self._corrupt(f"refcount of cluster {cluster:#x} would drop below zero")
        self._quarantine.append((cluster, metadata))

    @property
    def quarantined(self) -> int:
        return len(self._quarantine)

    def release(self) -> tuple[list[int], Qcow2CorruptError | None]:
        """After a successful flush: apply the quarantined decrements; returns the clusters whose
        refcount reached 0 (allocatable from now on) and the error of a cluster freed twice."""
        freed = []
        error: Qcow2CorruptError | None = None
        quarantine, self._quarantine = self._quarantine, []
        for cluster, metadata in quarantine:
            try:
                left = self.add(cluster, -1)
            except Qcow2CorruptError as exc:  # freed twice (a corrupt image): apply the others
                error = error or exc
                continue
            if left == 0:
                freed.append(cluster)
                if metadata:
                    self.meta.discard(cluster)
        return freed, error

    def write_blocks(self) -> None:
        """Write the dirty refcount blocks (always safe: they only count more than is durable)."""
        self.cache.flush()

    def write_table(self) -> None:
        """Write the refcount table if it changed (once the blocks it points to are durable)."""
        if self.reftable_dirty:
            data = struct.pack(f">{len(self.reftable)}Q", *self.reftable)
            os.pwrite(self._fd, data, self.reftable_offset)
            self.reftable_dirty = False

    def flush(self) -> None:
        """Write dirty refcount blocks, then the table if it changed (a new image: no ordering)."""
        self.write_blocks()
        self.write_table()
