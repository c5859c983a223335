"""A scripted Job subclass and event recording shared by the job and transaction tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from backup.events import Event, EventBus
from backup.job import Job
from backup.policy import ErrorAction, OnError


class FakeJob(Job):
    """``units`` units of ``unit_size`` bytes; each waits for a token on ``gate`` (when given),
    then consumes the queued ``errors`` through ``handle_error`` before it succeeds."""

    job_type = "backup"

    def __init__(
        self,
        job_id: str,
        *,
        events: EventBus,
        units: int = 3,
        unit_size: int = 100,
        gate: asyncio.Queue[None] | None = None,
        errors: list[OSError] | None = None,
        policy: OnError = OnError.REPORT,
        is_read: bool = False,
        fail_prepare: bool = False,
        fail_run: Exception | None = None,
        fail_commit: Exception | None = None,
        fail_clean: Exception | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(job_id, events=events, **kwargs)
        self.units = units
        self.unit_size = unit_size
        self.gate = gate
        self.errors = list(errors or [])
        self.policy = policy
        self.is_read = is_read
        self.fail_prepare = fail_prepare
        self.fail_run = fail_run
        self.fail_commit = fail_commit
        self.fail_clean = fail_clean
        self.hooks: list[str] = []
        self.attempts = 0

    async def run(self) -> None:
        self.hooks.append("run")
        self.progress_set_remaining(self.units * self.unit_size)
        for _ in range(self.units):
            await self.pause_point()
            if self.gate is not None:
                await self.gate.get()
            while self.errors:
                self.attempts += 1
                exc = self.errors.pop(0)
                if await self.handle_error(exc, self.policy, is_read=self.is_read) is ErrorAction.REPORT:
                    raise exc
            self.attempts += 1
            if self.fail_run is not None:
                raise self.fail_run
            await self.throttle(self.unit_size)
            self.progress_done(self.unit_size)

    async def prepare(self) -> None:
        self.hooks.append("prepare")
        if self.fail_prepare:
            raise OSError(5, "Input/output error")

    def commit(self) -> None:
        self.hooks.append("commit")
        if self.fail_commit is not None:
            raise self.fail_commit

    def abort(self) -> None:
        self.hooks.append("abort")

    async def clean(self) -> None:
        await asyncio.sleep(0)
        self.hooks.append("clean")
        if self.fail_clean is not None:
            raise self.fail_clean


def short(event: Event) -> tuple[Any, ...]:
    """Status changes as ("status", id, status); other events as (name, data)."""
    if event.name == "JOB_STATUS_CHANGE":
        return ("status", event.data["id"], event.data["status"])
    return (event.name, event.data)


class Recorder:
    def __init__(self, bus: EventBus) -> None:
        self.events: list[Event] = []
        bus.subscribe(self.events.append)

    def seq(self, job_id: str | None = None) -> list[tuple[Any, ...]]:
        out = [short(e) for e in self.events]
        if job_id is not None:
            out = [e for e in out if job_id in (e[1] if e[0] == "status" else (e[1].get("device"), e[1].get("id")))]
        return out

    def statuses(self, job_id: str) -> list[str]:
        return [e[2] for e in self.seq(job_id) if e[0] == "status"]


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Let the loop run until ``cond()`` holds (bounded so a bug fails instead of hanging)."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.001)
