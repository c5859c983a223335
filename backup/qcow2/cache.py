"""A write-back LRU cache of one-cluster metadata tables (L2 tables, refcount blocks).

Tables are ``bytearray``s modified in place by the caller, who then calls ``mark_dirty``. Dirty
tables reach the file when evicted or on ``flush``, which writes them in offset order and coalesces
neighbours into one ``pwritev``: metadata costs a few syscalls per flush, not one per cluster.

Crash ordering is the owner's: tables made by ``new`` are not referenced by anything durable yet,
so they can be written at any time (``flush(new_only=True)``); before a dirty table that is
referenced is written back early (evicted), ``before_evict`` runs, to make what it points to
durable first (QEMU's cache dependencies).
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
        self._new: set[int] = set()  # made by ``new`` and not written since
        self.before_evict: Callable[[], None] | None = None
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
        self._new.add(offset)
        return table

    def mark_dirty(self, offset: int, table: bytearray) -> None:
        if self._tables.get(offset) is not table:
            self._insert(offset, table)  # evicted meanwhile: keep the caller's (newer) copy
        self._dirty.add(offset)

    def discard(self, offset: int) -> None:
        """Forget a table whose cluster was freed (its contents no longer matter)."""
        self._tables.pop(offset, None)
        self._dirty.discard(offset)
        self._new.discard(offset)

    def _insert(self, offset: int, table: bytearray) -> None:
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        while len(self._tables) > self._capacity:
            old, old_table = next(iter(self._tables.items()))
            if old in self._dirty:
                if old in self._new:
                    self._new.discard(old)
                elif self.before_evict is not None:
                    self.before_evict()
                os.pwrite(self._fd, old_table, old)
                self._dirty.discard(old)
                self.writes += 1
            del self._tables[old]

    def flush(self, *, new_only: bool = False) -> None:
        """Write every dirty table (or only those made by ``new``), coalescing neighbours."""
        dirty = self._new if new_only else self._dirty
        if not dirty:
            return
        offsets = sorted(dirty)
        run_start, run = offsets[0], [self._tables[offsets[0]]]
        for off in offsets[1:]:
            if off == run_start + len(run) * self._cs and len(run) < 512:
                run.append(self._tables[off])
                continue
            self._write_run(run_start, run)
            run_start, run = off, [self._tables[off]]
        self._write_run(run_start, run)
        if new_only:
            self._dirty -= self._new
        else:
            self._dirty.clear()
        self._new.clear()

    def _write_run(self, offset: int, tables: list[bytearray]) -> None:
        os.pwritev(self._fd, tables, offset)
        self.writes += 1

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)
