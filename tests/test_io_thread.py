"""``IoThread``: calls run in order on one thread, results and errors reach the awaiting coroutine, a call
cancelled before it starts is skipped, and ``stop`` returns only once everything queued has run."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from backup.io_thread import IoThread


async def test_calls_run_in_submission_order_on_one_thread() -> None:
    worker = IoThread("t-order")
    seen: list[tuple[int, str]] = []

    def record(i: int) -> int:
        time.sleep(0.001 * (5 - i % 5))  # later calls are quicker: only a queue keeps them in order
        seen.append((i, threading.current_thread().name))
        return i * 10

    try:
        results = await asyncio.gather(*(worker.submit(record, i) for i in range(20)))
    finally:
        await worker.stop()
    assert results == [i * 10 for i in range(20)]
    assert [i for i, _ in seen] == list(range(20))
    assert {name for _, name in seen} == {"t-order"}


async def test_an_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    worker = IoThread("t-error")

    def fail() -> None:
        raise OSError(28, "No space left on device")

    try:
        with pytest.raises(OSError) as exc:
            await worker.submit(fail)
        assert exc.value.errno == 28
        assert await worker.submit(lambda: "still here") == "still here"
    finally:
        await worker.stop()


async def test_a_call_cancelled_before_it_starts_is_skipped() -> None:
    worker = IoThread("t-cancel")
    gate = threading.Event()
    ran: list[str] = []
    try:
        busy = worker.submit(gate.wait, 30)
        queued = worker.submit(ran.append, "queued")
        queued.cancel()
        kept = worker.submit(ran.append, "kept")
        gate.set()
        await asyncio.wait_for(busy, 30)
        await asyncio.wait_for(kept, 30)
    finally:
        gate.set()
        await worker.stop()
    assert ran == ["kept"]


async def test_stop_waits_for_every_queued_call_even_when_its_waiter_was_cancelled() -> None:
    """The owner closes its descriptor after ``stop``: no call may still be about to use it."""
    worker = IoThread("t-stop")
    gate = threading.Event()
    finished: list[int] = []

    def slow(i: int) -> None:
        gate.wait(30)
        finished.append(i)

    first = worker.submit(slow, 1)
    await asyncio.sleep(0.05)  # the thread is inside the first call: it cannot be skipped any more
    first.cancel()
    worker.submit(slow, 2)
    stopping = asyncio.ensure_future(worker.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()
    gate.set()
    await asyncio.wait_for(stopping, 30)
    assert finished == [1, 2]
    assert worker.stopped
    with pytest.raises(RuntimeError):
        worker.submit(finished.append, 3)
    await worker.stop()  # idempotent


async def test_a_thread_is_only_started_when_needed() -> None:
    worker = IoThread("t-lazy")
    before = {t.name for t in threading.enumerate()}
    await worker.stop()
    assert "t-lazy" not in before | {t.name for t in threading.enumerate()}


def test_a_result_for_a_closed_loop_is_dropped_quietly() -> None:
    """A loop that ended while a call was running: the thread neither dies nor hangs, it serves the next."""
    worker = IoThread("t-closed")
    gate = threading.Event()

    async def start() -> None:
        worker.submit(gate.wait, 30)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(start())
    loop.close()
    gate.set()  # the call returns and its result goes to a closed loop

    async def next_call() -> str:
        try:
            return await asyncio.wait_for(worker.submit(lambda: "alive"), 10)
        finally:
            await asyncio.wait_for(worker.stop(), 10)

    assert asyncio.run(next_call()) == "alive"
