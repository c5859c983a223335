"""Which host clusters hold metadata, so guest data is never written over it (QEMU's overlap check).

A corrupt image (an L2 entry pointing at the L1 table, a refcount of 0 on a refcount block) would
otherwise turn a guest write into a metadata overwrite. QEMU checks every write against its
metadata; so do we, against a sorted list of metadata cluster indexes kept up to date as tables
are allocated: one ``bisect`` per contiguous run written, nothing per cluster.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable


class MetadataMap:
    """Cluster indexes of the header, L1/L2 tables, the refcount table and refcount blocks.

    ``clusters`` is the sorted list itself, only ever changed in place: the hot path bisects it
    without a method call.
    """

    __slots__ = ("clusters",)

    def __init__(self) -> None:
        self.clusters: list[int] = []

    def __len__(self) -> int:
        return len(self.clusters)

    def add(self, cluster: int, count: int = 1) -> None:
        for c in range(cluster, cluster + count):
            i = bisect_left(self.clusters, c)
            if i == len(self.clusters) or self.clusters[i] != c:
                insort(self.clusters, c, lo=i)

    def add_all(self, clusters: Iterable[int]) -> None:
        """Many at once (opening an image: every L2 table and refcount block)."""
        self.clusters[:] = sorted(set(self.clusters).union(clusters))

    def discard(self, cluster: int) -> None:
        i = bisect_left(self.clusters, cluster)
        if i < len(self.clusters) and self.clusters[i] == cluster:
            del self.clusters[i]
