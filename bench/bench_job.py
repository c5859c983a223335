"""Per-call cost of the job framework's hot-path hooks (a backup calls them once per cluster).

Prints a table: calls/s and ns/call of ``pause_point()``, ``throttle()`` unthrottled and at a
speed high enough never to sleep, ``progress_done()``, and ``EventBus.emit`` with one subscriber.
Run: ``.venv/bin/python bench/bench_job.py`` (numbers vary on a shared machine).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backup.events import EventBus
from backup.job import Job

N = 200_000


class Idle(Job):
    job_type = "backup"

    async def run(self) -> None:
        return None


async def measure(name: str, step: Callable[[], Awaitable[None] | None]) -> tuple[str, float]:
    start = time.perf_counter()
    for _ in range(N):
        result = step()
        if result is not None:
            await result
    elapsed = time.perf_counter() - start
    return name, elapsed / N * 1e9


async def main() -> None:
    bus = EventBus()
    job = Idle("bench", events=bus)
    job._pause_count = 0  # measure the hooks as a running job sees them, without running it
    fast = Idle("fast", events=bus, speed=1 << 50)
    fast._pause_count = 0
    seen: list[object] = []
    bus.subscribe(seen.append)

    def emit() -> None:
        bus.emit("X", {})

    rows = [
        await measure("pause_point()", job.pause_point),
        await measure("throttle(64 KiB), speed 0", lambda: job.throttle(65536)),
        await measure("throttle(64 KiB), speed 1 PiB/s", lambda: fast.throttle(65536)),
        await measure("progress_done(64 KiB)", lambda: job.progress_done(65536)),
        await measure("EventBus.emit, 1 subscriber", emit),
    ]
    print(f"{'hook':36} {'ns/call':>10} {'calls/s':>12}")
    for name, ns in rows:
        print(f"{name:36} {ns:10.0f} {1e9 / ns:12.0f}")


if __name__ == "__main__":
    asyncio.run(main())
