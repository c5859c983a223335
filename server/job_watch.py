"""``JobWatch``: jobs as an operator sees them — a log line when one is created and when it ends
(finished, cancelled or failed, with bytes, seconds and MiB/s), and the figures the metrics need
that a job does not keep (when it started, how many ended how).

It listens to the QMP events every job emits already (``JOB_STATUS_CHANGE``,
``BLOCK_JOB_COMPLETED``/``CANCELLED``), so the job state machine knows nothing of logs or metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from backup.events import Event
from backup.job import Job
from server.logs import mib_per_second

log = logging.getLogger("nbd_backup.jobs")


class JobWatch:
    """Subscribed to the registry's event bus; ``jobs`` is the registry's live mapping."""

    def __init__(self, jobs: Mapping[str, Job], clock: Callable[[], float] = time.monotonic) -> None:
        self.jobs = jobs
        self.clock = clock
        self.started: dict[str, float] = {}  # job id -> when it was created
        #: (job type, outcome: completed|cancelled|failed) -> how many jobs ended so.
        self.ended: dict[tuple[str, str], int] = {}
        #: job type -> bytes the ended jobs copied.
        self.bytes: dict[str, int] = {}

    def __call__(self, event: Event) -> None:
        name, data = event.name, event.data
        if name == "JOB_STATUS_CHANGE":
            if data["status"] == "created":
                self.started[data["id"]] = self.clock()
                self._after(self._created, data["id"])
            elif data["status"] == "null":
                self.started.pop(data["id"], None)
        elif name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            self._ended(name, data)

    def seconds(self, job_id: str) -> float:
        """Since the job was created (0 if unknown)."""
        started = self.started.get(job_id)
        return self.clock() - started if started is not None else 0.0

    @staticmethod
    def _after(callback: Callable[[str], None], job_id: str) -> None:
        """Run once the job is in the registry (it emits ``created`` from its constructor)."""
        try:
            asyncio.get_running_loop().call_soon(callback, job_id)
        except RuntimeError:
            callback(job_id)

    def _created(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        fields: dict[str, Any] = {"event": "job-created", "job": job_id}
        where = ""
        if job is not None:
            fields["type"] = job.type
            source = getattr(job, "source", None)
            if source is not None:
                fields["node"] = source.name
                where = f" of node '{source.name}'"
            target = getattr(job, "target", None)
            if target is not None and getattr(target, "name", None):
                fields["target"] = target.name
        log.info("job '%s' created: %s%s", job_id, fields.get("type", "job"), where, extra=fields)

    def _ended(self, name: str, data: dict[str, Any]) -> None:
        job_id, job_type = data["device"], data["type"]
        seconds = round(self.seconds(job_id), 3)
        nbytes = int(data.get("offset", 0))
        if name == "BLOCK_JOB_CANCELLED":
            outcome, level = "cancelled", logging.INFO
        elif data.get("error"):
            outcome, level = "failed", logging.WARNING
        else:
            outcome, level = "completed", logging.INFO
        key = (job_type, outcome)
        self.ended[key] = self.ended.get(key, 0) + 1
        self.bytes[job_type] = self.bytes.get(job_type, 0) + nbytes
        rate = mib_per_second(nbytes, seconds)
        fields: dict[str, Any] = {
            "event": f"job-{outcome}",
            "job": job_id,
            "type": job_type,
            "bytes": nbytes,
            "length": int(data.get("len", 0)),
            "seconds": seconds,
            "mib-per-second": rate,
        }
        error = ""
        if data.get("error"):
            fields["error"] = data["error"]
            error = f": {data['error']}"
        log.log(
            level,
            "job '%s' %s after %.1f s: %d of %d bytes, %.1f MiB/s%s",
            job_id,
            outcome,
            seconds,
            nbytes,
            fields["length"],
            rate,
            error,
            extra=fields,
        )
