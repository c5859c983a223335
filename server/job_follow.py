"""Following a block job over QMP to its end, for the commands that start one (``nbd-backup backup``,
into a file, an NBD target or a repository snapshot): progress from ``query-block-jobs``, the job's
final event, cancelling it on Ctrl-C."""

from __future__ import annotations

import asyncio
from typing import Any

from server.errors import BackupFailed
from server.progress import Progress
from server.qmp.client import QmpClient, QmpCommandError

#: How often the progress bar asks the daemon for the job's offset.
POLL_INTERVAL = 0.2


async def next_event(conn: QmpClient, timeout: float) -> dict[str, Any] | None:
    """The next event, or None when none arrives within ``timeout`` seconds.

    ``asyncio.timeout``, not ``wait_for``: on Python 3.11 ``wait_for`` swallows a cancellation (Ctrl-C)
    that lands while the event it waited for arrives, and the command then followed a job it should
    have cancelled (seen: one Ctrl-C in ten ignored)."""
    try:
        async with asyncio.timeout(timeout):
            return await conn.next_event()
    except TimeoutError:
        return None


async def execute(conn: QmpClient, name: str, arguments: dict[str, Any] | None = None) -> Any:
    try:
        return await conn.execute(name, arguments)
    except QmpCommandError as exc:
        raise BackupFailed(f"{name}: {exc.desc}") from exc


async def follow(conn: QmpClient, job_id: str, progress: Progress | None, log: Any) -> None:
    """Show progress until the job's final event; raise ``BackupFailed`` unless it completed."""
    while True:
        event = await next_event(conn, POLL_INTERVAL)
        if event is None:
            if progress is not None:
                for job in await execute(conn, "query-block-jobs"):
                    if job.get("device") == job_id:
                        progress.set_total(job["len"])
                        progress.update(job["offset"])
            continue
        name, data = event["event"], event.get("data", {})
        if data.get("device") != job_id:
            continue
        if name == "BLOCK_JOB_ERROR":
            hint = f" (resume: nbd-backup qmp block-job-resume device={job_id})" if data["action"] == "stop" else ""
            print(f"\nnbd-backup backup: {data['operation']} error, action: {data['action']}{hint}", file=log)
        elif name == "BLOCK_JOB_COMPLETED":
            if progress is not None:
                progress.set_total(data["len"])
                progress.update(data["offset"])
                progress.finish(ok="error" not in data)
            if "error" in data:
                raise BackupFailed(f"backup failed: {data['error']}")
            return
        elif name == "BLOCK_JOB_CANCELLED":
            if progress is not None:
                progress.finish(ok=False)
            raise BackupFailed("backup was cancelled")


async def cancel(conn: QmpClient, job_id: str) -> None:
    await execute(conn, "block-job-cancel", {"device": job_id, "force": True})
    while True:
        event = await next_event(conn, 1.0)
        if (
            event is not None
            and event["event"] in ("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED")
            and event.get("data", {}).get("device") == job_id
        ):
            return
