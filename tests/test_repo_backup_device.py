"""``backup_device``: a full backup of a device that reads into the caller's buffer (an NBD export) —
chunks land as ``SnapshotWriter`` stores them, runs reported as zeroes are not read, the first error or
a cancellation publishes nothing."""

from __future__ import annotations

import asyncio
import errno
import random
from pathlib import Path

import pytest

from backup.repo.backup_device import backup_device_snapshot
from backup.repo.device import SnapshotWriter
from backup.repo.repository import Repository
from nbd.constants import State
from nbd.device import Extent

CS = 64 << 10
ZERO = int(State.HOLE | State.ZERO)


class Source:
    """A device over ``data`` whose block status reports ``holes`` (byte ranges) as zeroes."""

    def __init__(self, data: bytes, holes: list[tuple[int, int]], fail_at: int | None = None) -> None:
        self.data = data
        self.size = len(data)
        self.holes = holes
        self.fail_at = fail_at
        self.reads: list[int] = []
        self.gate: asyncio.Event | None = None

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        out, pos, end = [], offset, offset + length
        for start, stop in self.holes:
            if stop <= pos or start >= end:
                continue
            if start > pos:
                out.append(Extent(start - pos, 0))
            out.append(Extent(min(stop, end) - max(start, pos), ZERO))
            pos = min(stop, end)
        if pos < end:
            out.append(Extent(end - pos, 0))
        return out

    async def pread_into(self, offset: int, buffer: memoryview) -> None:
        self.reads.append(offset)
        if self.gate is not None and len(self.reads) == 3:
            await self.gate.wait()
        if offset == self.fail_at:
            raise OSError(errno.EIO, "read failed")
        buffer[:] = self.data[offset : offset + len(buffer)]


def _disk(chunks: int, tail: int = 0) -> tuple[bytes, list[tuple[int, int]]]:
    data = bytearray(random.Random(4).randbytes(chunks * CS + tail))
    data[3 * CS : 6 * CS] = bytes(3 * CS)  # reported as zeroes: not read
    data[7 * CS : 8 * CS] = bytes(CS)  # zeroes that are read (the status says data)
    data[9 * CS : 10 * CS] = data[:CS]
    return bytes(data), [(3 * CS + 100, 6 * CS)]  # the first zero chunk is data for a hundred bytes


async def test_a_device_lands_as_the_writer_stores_it_and_zero_runs_are_not_read(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    data, holes = _disk(14, tail=777)
    source = Source(data, holes)
    seen: list[int] = []
    manifest = await backup_device_snapshot(
        repo,
        "d",
        source,
        source.pread_into,
        parent="none",
        on_progress=seen.append,  # type: ignore[arg-type]
    )
    writer = SnapshotWriter(repo, "ref", len(data), parent="none")
    await writer.pwrite(0, data)
    reference = await writer.commit()
    assert manifest.chunks == reference.chunks and manifest.parent is None
    assert sorted(source.reads) == [i * CS for i in range(15) if i not in (4, 5)]
    assert sum(seen) == len(data)
    assert manifest.stats["zero-bytes"] == 4 * CS and manifest.stats["reused-bytes"] == CS
    again = await backup_device_snapshot(repo, "d", Source(data, holes), Source(data, holes).pread_into)  # type: ignore[arg-type]
    assert again.parent == manifest.id and again.stats["new-bytes"] == 0


async def test_a_failed_read_publishes_nothing_and_frees_the_disk(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    data, holes = _disk(40)
    source = Source(data, holes, fail_at=12 * CS)
    with pytest.raises(OSError) as caught:
        await backup_device_snapshot(repo, "d", source, source.pread_into)  # type: ignore[arg-type]
    assert caught.value.errno == errno.EIO
    assert max(source.reads) < 40 * CS - 10 * CS  # it stopped reading soon after
    assert repo.snapshot_ids("d") == []
    repo.store.lock("d").release()


async def test_a_cancelled_backup_publishes_nothing(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    data, holes = _disk(20)
    source = Source(data, holes)
    source.gate = asyncio.Event()  # the third read waits forever
    task = asyncio.ensure_future(backup_device_snapshot(repo, "d", source, source.pread_into))  # type: ignore[arg-type]
    for _ in range(1000):
        if len(source.reads) >= 3:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert repo.snapshot_ids("d") == []
    repo.store.lock("d").release()
