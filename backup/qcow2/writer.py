"""Guest data writes at consecutive host offsets, coalesced into one ``pwritev``: a backup's
clusters land in contiguous runs, and each run is checked against the metadata clusters once
(``overlap.py``), not cluster by cluster."""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable

from backup.qcow2.overlap import MetadataMap

_IOV_MAX = 1024


class DataWriter:
    """Coalesces guest data writes at consecutive host offsets into one ``pwritev``, each run
    checked against the metadata clusters first (``refuse`` makes the error). One per device,
    used under its lock."""

    __slots__ = ("_bufs", "_cb", "_end", "_fd", "_meta", "_refuse", "_start")

    def __init__(
        self, fd: int, meta: MetadataMap, cluster_bits: int, refuse: Callable[[int, int, int], Exception]
    ) -> None:
        self._fd = fd
        self._meta = meta.clusters
        self._cb = cluster_bits
        self._refuse = refuse
        self._start = 0
        self._end = -1
        self._bufs: list[bytes | bytearray | memoryview] = []

    def reset(self) -> None:
        """Forget what a failed request left queued."""
        self._bufs = []
        self._end = -1

    def add(self, offset: int, buf: bytes | bytearray | memoryview) -> None:
        if offset != self._end or len(self._bufs) >= _IOV_MAX:
            self.finish()
            self._start = offset
            self._end = offset
        self._bufs.append(buf)
        self._end += len(buf)

    def finish(self) -> None:
        if not self._bufs:
            return
        meta = self._meta
        i = bisect_left(meta, self._start >> self._cb)
        if i < len(meta) and meta[i] <= (self._end - 1) >> self._cb:
            self.reset()
            raise self._refuse(self._start, self._end, meta[i])
        total = self._end - self._start
        done = os.pwritev(self._fd, self._bufs, self._start)
        if done != total:  # short write: finish the rest the slow way
            rest = b"".join(bytes(b) for b in self._bufs)[done:]
            while rest:
                n = os.pwrite(self._fd, rest, self._start + done)
                done += n
                rest = rest[n:]
        self._bufs = []
        self._end = -1
