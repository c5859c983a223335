"""What a guest write copies at least: the copier's granularity, as a backup job chooses it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from backup_faults import pattern

from backup.backup_job import GUEST_COPY_GRANULARITY, MAX_COPY_BITS, BackupJob, BackupOptions, copy_granularity
from backup.events import EventBus
from backup.filter import BlockFilter
from backup.memory import MemoryDevice
from backup.node import BlockNode
from nbd.device import BlockLimits

KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB


class Limited(BlockFilter):
    """A target that accepts nothing smaller than ``minimum`` bytes."""

    def __init__(self, next_device: MemoryDevice, minimum: int) -> None:
        super().__init__(next_device)
        self._limits = BlockLimits(minimum=minimum, preferred=minimum)

    @property
    def block_limits(self) -> BlockLimits:
        return self._limits


@dataclass
class CompressingTarget(BlockFilter):
    """Looks like a qcow2 target opened with or without compression."""

    next: MemoryDevice
    compress: bool


def test_a_guest_write_copies_a_few_kib_by_default() -> None:
    target = MemoryDevice(MiB)
    assert copy_granularity(MiB, CLUSTER, target, BackupOptions()) == GUEST_COPY_GRANULARITY < CLUSTER


@pytest.mark.parametrize(
    ("options", "why"),
    [
        (BackupOptions(sync="none"), "its target holds exactly the clusters guests overwrote"),
        (BackupOptions(cluster_size=CLUSTER), "the caller asked for a cluster size"),
    ],
)
def test_whole_clusters_where_that_is_the_contract(options: BackupOptions, why: str) -> None:
    assert copy_granularity(MiB, CLUSTER, MemoryDevice(MiB), options) == CLUSTER, why


def test_a_compressing_target_gets_whole_clusters() -> None:
    assert copy_granularity(MiB, CLUSTER, CompressingTarget(MemoryDevice(MiB), True), BackupOptions()) == CLUSTER
    plain = CompressingTarget(MemoryDevice(MiB), False)
    assert copy_granularity(MiB, CLUSTER, plain, BackupOptions()) == GUEST_COPY_GRANULARITY


def test_never_finer_than_the_target_accepts_nor_coarser_than_the_cluster() -> None:
    assert copy_granularity(MiB, CLUSTER, Limited(MemoryDevice(MiB), 32 * KiB), BackupOptions()) == 32 * KiB
    assert copy_granularity(MiB, CLUSTER, Limited(MemoryDevice(MiB), 256 * KiB), BackupOptions()) == CLUSTER


def test_a_huge_disk_gets_coarser_granules_so_the_bitmap_stays_bounded() -> None:
    small = MemoryDevice(MiB)  # only its block limits are asked
    for size in (1 << 40, 3 << 40, 1 << 43):
        grain = copy_granularity(size, 1 << 20, small, BackupOptions())
        assert grain & (grain - 1) == 0 and grain >= GUEST_COPY_GRANULARITY
        assert -(-size // grain) <= MAX_COPY_BITS
    assert copy_granularity(1 << 50, CLUSTER, small, BackupOptions()) == CLUSTER  # capped at the cluster


async def test_the_job_tracks_granules_and_a_guest_write_copies_one() -> None:
    size = 8 * CLUSTER
    source = MemoryDevice(size, data=pattern(size))
    node = BlockNode("src", source)
    target = MemoryDevice(size)
    job = BackupJob("j", node, target, BackupOptions(), events=EventBus(), target_zero_init=True)
    await job.attach()
    copier = job.copier
    assert copier is not None
    assert copier.cluster_size == GUEST_COPY_GRANULARITY and copier.zero_unit == CLUSTER
    assert copier.clusters == size // GUEST_COPY_GRANULARITY
    await node.pwrite(3 * CLUSTER + 100, b"x")
    first = 3 * CLUSTER // GUEST_COPY_GRANULARITY
    assert [c for c in range(copier.clusters) if not copier.bitmap[c]] == [first]
    assert (
        target.data[3 * CLUSTER : 3 * CLUSTER + GUEST_COPY_GRANULARITY]
        == pattern(size)[3 * CLUSTER : 3 * CLUSTER + GUEST_COPY_GRANULARITY]
    )
    job.start()
    await job.wait()
    assert job.error is None
    assert target.data == pattern(size)
    assert job.current_progress == job.total_progress == size
