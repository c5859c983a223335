"""The pieces of the copy engine that both copiers share: zero runs, extent runs, tasks run together."""

from __future__ import annotations

import asyncio
import errno

import pytest

from backup.copy_engine import copy_device, extent_runs, run_together, zero_runs
from backup.memory import MemoryDevice
from nbd.device import Extent

CS = 4096


def test_zero_runs_follow_absolute_cluster_boundaries() -> None:
    data = bytearray(4 * CS)
    data[CS + 5] = 1  # the second cluster of the data holds a byte
    # the data starts half-way into a cluster: the first run is that half, the rest go by whole clusters
    runs = zero_runs(data, CS // 2, len(data), CS, bytes(CS))
    assert runs == [(0, CS // 2, True), (CS // 2, CS + CS // 2, False), (CS + CS // 2, 4 * CS, True)]


class StatusDevice(MemoryDevice):
    """Answers block status from a script: a list of extents, an error, or nothing."""

    def __init__(self, size: int, answers: list[list[Extent] | OSError]) -> None:
        super().__init__(size)
        self.answers = answers

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        answer = self.answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer


async def test_extent_runs_tell_where_the_source_cannot_say() -> None:
    told: list[tuple[int, int | None]] = []

    def unknown(offset: int, exc: OSError | None) -> None:
        told.append((offset, exc.errno if exc is not None else None))

    answers: list[list[Extent] | OSError] = [[Extent(CS, 3)], OSError(errno.ENOTSUP, "no"), []]
    device = StatusDevice(4 * CS, answers)
    runs = [run async for run in extent_runs(device, 0, 4 * CS, span=2 * CS, unknown=unknown)]
    assert runs == [(0, CS, True), (CS, 2 * CS, False), (3 * CS, CS, False)]
    assert told == [(CS, errno.ENOTSUP), (3 * CS, None)]


async def test_a_block_status_failure_other_than_the_servers_fails_the_copy() -> None:
    src = StatusDevice(4 * CS, [OSError(errno.EIO, "disk")])
    with pytest.raises(OSError) as info:
        await copy_device(src, MemoryDevice(4 * CS), request_size=CS)
    assert info.value.errno == errno.EIO


async def test_run_together_cancels_the_rest_on_the_first_failure_or_when_told() -> None:
    async def fail() -> None:
        await asyncio.sleep(0)
        raise OSError(errno.EIO, "first")

    forever = [asyncio.ensure_future(asyncio.Event().wait()) for _ in range(3)]
    with pytest.raises(OSError, match="first"):
        await run_together([asyncio.ensure_future(fail()), *forever])
    assert all(task.cancelled() for task in forever)

    stop = asyncio.get_running_loop().create_future()
    waiting = [asyncio.ensure_future(asyncio.Event().wait()) for _ in range(2)]
    asyncio.get_running_loop().call_soon(stop.set_result, None)
    assert await run_together(waiting, until=stop) is False
    assert all(task.cancelled() for task in waiting)
    assert await run_together([asyncio.ensure_future(asyncio.sleep(0))]) is True


class BehindRecorder(MemoryDevice):
    """A destination that records when a copy asks it to write behind (as a raw file can)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.behind: list[bool] = []
        self.writes_while_behind: list[bool] = []

    def write_behind(self, enabled: bool) -> None:
        self.behind.append(enabled)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        self.writes_while_behind.append(self.behind[-1:] == [True])
        await super().pwrite(offset, data, fua=fua)


async def test_a_copy_has_its_destination_write_behind_and_turns_it_off_again() -> None:
    """Every write of a copy is made while the destination writes behind (its own thread, for a raw
    file); afterwards, failed or not, the destination is back to its own rule."""
    src = MemoryDevice(8 * CS)
    await src.pwrite(0, bytes(range(256)) * (8 * CS // 256))
    dst = BehindRecorder(8 * CS)
    await copy_device(src, dst, request_size=CS)
    assert dst.behind == [True, False] and dst.writes_while_behind == [True] * 8
    assert await dst.pread(0, 8 * CS) == await src.pread(0, 8 * CS)

    failing = BehindRecorder(8 * CS)
    with pytest.raises(OSError):
        await copy_device(StatusDevice(8 * CS, [OSError(errno.EIO, "disk")]), failing, request_size=CS)
    assert failing.behind == [True, False]
