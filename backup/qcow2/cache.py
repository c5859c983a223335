"""A write-back LRU cache of one-cluster metadata tables (L2 tables, refcount blocks).

Tables are ``bytearray``s modified in place by the caller, who then calls ``mark_dirty``. Dirty
tables reach the file when evicted or on ``flush``, which writes them in offset order and coalesces
neighbours into one ``pwritev``: metadata costs a few syscalls per flush, not one per cluster.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable


class TableCache:
    """Cluster-sized tables keyed by file offset; at most ``capacity`` kept in memory."""

    def __init__(
        self,
        fd: int,
        cluster_size: int,
        capacity: int,
        *,
        on_short_read: Callable[[int], Exception],
    ) -> None:
        self._fd = fd
        self._cs = cluster_size
        self._capacity = max(4, capacity)
        self._tables: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty: set[int] = set()
        self._on_short_read = on_short_read
        self.writes = 0  # pwrite/pwritev calls issued (for tests and benchmarks)

    def __contains__(self, offset: int) -> bool:
        return offset in self._tables

    def get(self, offset: int) -> bytearray:
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
            return table
        data = os.pread(self._fd, self._cs, offset)
        if len(data) < self._cs:
            if not data:
                raise self._on_short_read(offset)
            data += bytes(self._cs - len(data))  # QEMU pads short tail reads with zeroes too
        table = bytearray(data)
        self._insert(offset, table)
        return table

    def new(self, offset: int) -> bytearray:
        """A zeroed table at a freshly allocated offset (dirty: it must reach the file)."""
        table = bytearray(self._cs)
        self._insert(offset, table)
        self._dirty.add(offset)
        return table

    def mark_dirty(self, offset: int, table: bytearray) -> None:
        if self._tables.get(offset) is not table:
            self._insert(offset, table)  # evicted meanwhile: keep the caller's (newer) copy
        self._dirty.add(offset)

    def discard(self, offset: int) -> None:
        """Forget a table whose cluster was freed (its contents no longer matter)."""
        self._tables.pop(offset, None)
        self._dirty.discard(offset)

    def _insert(self, offset: int, table: bytearray) -> None:
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        while len(self._tables) > self._capacity:
            old, old_table = self._tables.popitem(last=False)
            if old in self._dirty:
                self._dirty.discard(old)
                os.pwrite(self._fd, old_table, old)
                self.writes += 1

    def flush(self) -> None:
        """Write every dirty table, coalescing tables at consecutive offsets."""
        if not self._dirty:
            return
        offsets = sorted(self._dirty)
        run_start, run = offsets[0], [self._tables[offsets[0]]]
        for off in offsets[1:]:
            if off == run_start + len(run) * self._cs and len(run) < 512:
                run.append(self._tables[off])
                continue
            self._write_run(run_start, run)
            run_start, run = off, [self._tables[off]]
        self._write_run(run_start, run)
        self._dirty.clear()

    def _write_run(self, offset: int, tables: list[bytearray]) -> None:
        os.pwritev(self._fd, tables, offset)
        self.writes += 1

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)
