"""BlockNode: filters stack and unstack, drained sections hold new requests and wait for old ones."""

from __future__ import annotations

import asyncio

import pytest

from backup.filter import BlockFilter
from backup.memory import MemoryDevice
from backup.node import BlockNode
from nbd.device import BlockDevice


class Tagging(BlockFilter):
    """Prefixes writes with a tag byte so the stacking order is visible in the data."""

    def __init__(self, next_device: BlockDevice, tag: bytes, log: list[bytes]) -> None:
        super().__init__(next_device)
        self.tag, self.log = tag, log

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        self.log.append(self.tag)
        await self.next.pwrite(offset, data, fua=fua)


async def test_filters_stack_and_unstack_in_any_order() -> None:
    node = BlockNode("n", MemoryDevice(8192))
    log: list[bytes] = []
    a = node.insert_filter(lambda nxt: Tagging(nxt, b"a", log))
    b = node.insert_filter(lambda nxt: Tagging(nxt, b"b", log))
    await node.pwrite(0, b"x")
    assert log == [b"b", b"a"]
    node.remove_filter(a)  # the lower one: b must now forward straight to the device
    log.clear()
    await node.pwrite(0, b"y")
    assert log == [b"b"]
    assert b.next is node.device
    node.remove_filter(b)
    assert node.top is node.device
    assert await node.pread(0, 1) == b"y"


async def test_drained_waits_for_in_flight_and_holds_new_requests() -> None:
    release = asyncio.Event()

    class Slow(BlockFilter):
        async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
            await release.wait()
            await self.next.pwrite(offset, data, fua=fua)

    node = BlockNode("n", MemoryDevice(4096))
    slow = node.insert_filter(Slow)
    first = asyncio.create_task(node.pwrite(0, b"1"))
    await asyncio.sleep(0)
    assert node.in_flight == 1
    entered = asyncio.Event()

    async def drain() -> None:
        async with node.drained():
            entered.set()
            node.remove_filter(slow)
            second = asyncio.create_task(node.pwrite(1, b"2"))
            await asyncio.sleep(0.01)
            assert not second.done()  # held back while drained
        await second

    drainer = asyncio.create_task(drain())
    await asyncio.sleep(0.01)
    assert not entered.is_set()  # the slow write is still in flight
    release.set()
    await asyncio.wait_for(asyncio.gather(first, drainer), 5)
    assert await node.pread(0, 2) == b"12"


def test_removing_a_foreign_filter_is_refused() -> None:
    node = BlockNode("n", MemoryDevice(512))
    with pytest.raises(Exception, match="not on node"):
        node.remove_filter(BlockFilter(node.device))
