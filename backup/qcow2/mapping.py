"""The L1/L2 walk: how guest bytes map to the image file, in one vocabulary for every question.

Reads want exact runs (where the bytes are, one ``pread`` per contiguous host run, compressed
clusters one by one); block status, ``sync=top`` allocation and "does this already read as zeroes"
want only what kind of bytes a range holds. Both come from ``L2Map.runs``; writes and zeroing,
which change the tables, walk them one L2 table at a time with ``spans``. Extended L2 entries
(subclusters, read-only) are walked by the same loop.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from enum import IntEnum

from backup.errors import ImageFormatError
from backup.qcow2 import layout as q
from backup.qcow2.cache import TableCache
from backup.qcow2.header import ImageHeader


class RunKind(IntEnum):
    """What a run of guest bytes is in this image (not below it: the backing file is the caller's)."""

    DATA = 0  # host bytes of this image; ``host`` is their offset
    ZERO = 1  # reads as zeroes: the zero flag (v3), or the zero bit of a subcluster
    UNALLOCATED = 2  # not in this image: the backing file's bytes, or zeroes without one
    COMPRESSED = 3  # one compressed cluster (exact runs only); ``host`` is its L2 entry


# module names for the hot loop: one dict lookup each, not an attribute of the enum class
DATA, ZERO, UNALLOCATED, COMPRESSED = RunKind.DATA, RunKind.ZERO, RunKind.UNALLOCATED, RunKind.COMPRESSED


Run = tuple[int, int, RunKind, int]
"""``(offset, length, kind, host)``: ``length`` guest bytes from ``offset``, all of one ``kind``;
``host`` is, for DATA, the host offset of the first byte (0 when not exact), for COMPRESSED the L2
entry, else 0. A plain tuple: a small read builds one, and a named tuple's constructor would be a
large share of its walk."""


_L1_OFFSET, _L2_OFFSET, _COMPRESSED_FLAG = q.L1E_OFFSET_MASK, q.L2E_OFFSET_MASK, q.OFLAG_COMPRESSED


class L2Map:
    """The walk over an image's L1 table (the device's list, changed in place by its writes) and
    its L2 tables (through the device's cache)."""

    def __init__(
        self, header: ImageHeader, l1: list[int], tables: TableCache, corrupt: Callable[[str], Exception]
    ) -> None:
        self.cluster_bits = cb = header.cluster_bits
        self.extended = bool(header.incompatible & q.INCOMPAT_EXTL2)
        self.l2_bits = cb - (4 if self.extended else 3)
        self.l2_mask = (1 << self.l2_bits) - 1
        self.zero_flag = q.OFLAG_ZERO if header.version >= 3 else 0
        self._corrupt = corrupt
        self._walk = (  # what ``runs`` needs, fetched with one attribute load per call
            cb,
            1 << cb,
            self.l2_bits + cb,
            self.l2_mask,
            self.zero_flag,
            self.extended,
            l1,
            tables.get,
            q.U64.unpack_from,
        )

    def index(self, offset: int) -> int:
        """The L2 entry index of the guest cluster holding ``offset``, in its table."""
        return (offset >> self.cluster_bits) & self.l2_mask

    def spans(self, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
        """``(L1 index, start, end)``: the range cut at L2 table boundaries."""
        shift = self.l2_bits + self.cluster_bits
        pos = offset
        while pos < end:
            l1i = pos >> shift
            table_end = min(end, (l1i + 1) << shift)
            yield l1i, pos, table_end
            pos = table_end

    def kind(self, entry: int) -> RunKind:
        """What a (standard) L2 entry maps its cluster to."""
        if entry & q.OFLAG_COMPRESSED:
            return COMPRESSED
        if entry & self.zero_flag:
            return ZERO
        return DATA if entry & q.L2E_OFFSET_MASK else UNALLOCATED

    def runs(self, offset: int, length: int, *, exact: bool = True) -> list[Run]:
        """The range as runs, neighbours merged; a range without an L2 table is one run, so sparse
        regions cost nothing per cluster.

        ``exact``: DATA runs are contiguous on the host too (one ``pread`` each) and compressed
        clusters are runs of their own. Otherwise compressed clusters count as DATA, every DATA
        neighbour merges and ``host`` is 0: the allocation questions need no more.
        """
        cb, cs, table_shift, l2_mask, zero_flag, extended, l1, load, unpack = self._walk
        cmask = cs - 1
        out: list[Run] = []
        run_pos, run_n, run_kind, run_host = offset, 0, UNALLOCATED, 0
        next_host = 0  # where a DATA run continuing the current one starts on the host (0: none)
        pos, end = offset, offset + length
        table: bytearray | None = None
        table_end = pos
        while pos < end:
            if pos == table_end:  # into the next L2 table
                l1i = pos >> table_shift
                toff = l1[l1i] & _L1_OFFSET
                table = load(toff) if toff else None
                table_end = min(end, (l1i + 1) << table_shift)
            if table is None:
                n, kind, host = table_end - pos, UNALLOCATED, 0
            else:
                in_off = pos & cmask
                i = (pos >> cb) & l2_mask
                if extended:
                    entry = unpack(table, i << 4)[0]
                    n, kind, host = self._subcluster(table, i, entry, pos, in_off, table_end, exact)
                else:
                    entry = unpack(table, i << 3)[0]
                    n = min(cs - in_off, table_end - pos)
                    host = entry & _L2_OFFSET
                    if entry & _COMPRESSED_FLAG:
                        kind, host = (COMPRESSED, entry) if exact else (DATA, 0)
                    elif entry & zero_flag:
                        kind, host = ZERO, 0
                    elif host:
                        kind, host = DATA, host + in_off if exact else 0
                    else:
                        kind = UNALLOCATED
            if kind is run_kind and host == next_host and kind is not COMPRESSED:
                run_n += n
            else:
                if run_n:
                    out.append((run_pos, run_n, run_kind, run_host))
                run_pos, run_n, run_kind, run_host = pos, n, kind, host
            next_host = host + n if host else 0
            pos += n
        if run_n:
            out.append((run_pos, run_n, run_kind, run_host))
        return out

    def _subcluster(
        self, table: bytearray, i: int, entry: int, pos: int, in_off: int, table_end: int, exact: bool
    ) -> tuple[int, RunKind, int]:
        """``(length, kind, host)`` of the piece from ``pos`` in the guest cluster of extended
        entry ``i``: up to the end of its subcluster, or of the cluster when compressed."""
        cs = 1 << self.cluster_bits
        if entry & _COMPRESSED_FLAG:
            return min(cs - in_off, table_end - pos), *((COMPRESSED, entry) if exact else (DATA, 0))
        sub = cs >> 5
        n = min(sub - (in_off & (sub - 1)), table_end - pos)
        bitmap = q.U64.unpack_from(table, (i << 4) + 8)[0]
        j = in_off // sub
        if bitmap >> j & 1:
            host = entry & _L2_OFFSET
            if not host:
                raise self._corrupt(
                    f"subcluster {j} of guest cluster {pos >> self.cluster_bits} is allocated at offset 0"
                )
            return n, DATA, host + in_off if exact else 0
        return n, ZERO if bitmap >> (32 + j) & 1 else UNALLOCATED, 0


def read_l1(fd: int, h: ImageHeader, file_size: int, path: str) -> list[int]:
    """The L1 table, every entry checked to point inside the file at a cluster boundary."""
    if not h.l1_size:
        return []
    raw = os.pread(fd, h.l1_size * 8, h.l1_table_offset)
    if len(raw) < h.l1_size * 8:
        raise ImageFormatError(f"{path}: L1 table is truncated")
    l1 = list(struct.unpack(f">{h.l1_size}Q", raw))
    cs = h.cluster_size
    for index, entry in enumerate(l1):
        off = entry & q.L1E_OFFSET_MASK
        if not off:
            continue
        if off & (cs - 1):
            raise ImageFormatError(f"{path}: L1 entry {index} ({off:#x}) is not cluster aligned")
        if off >= file_size:
            raise ImageFormatError(
                f"{path}: L1 entry {index} points to an L2 table at {off:#x}, past the end of the file "
                f"({file_size} bytes): truncated or corrupt image"
            )
    return l1
