"""The job lifecycle of QEMU (``JobStatus``, verbs, events), for any long-running block operation.

One table says which status may follow which (``TRANSITIONS``), one says which status accepts which
verb (``VERBS``); every status change goes through ``Job._transition`` and every verb through
``Job._apply_verb``, so the rules live in exactly one place each. A subclass implements ``run()``
and calls ``pause_point()``, ``throttle()`` and ``handle_error()`` between units of work; the base
class does the rest: completion, the optional manual ``finalize``/``dismiss`` steps, cancel, pause,
error policies, and completion of a *group* of jobs together (QEMU's job transaction, used by
``transaction`` with ``completion-mode: grouped``).

What qemu-storage-daemon 7.2 does, observed over QMP (integration/test_qsd_job_semantics.py runs
each scenario against it and against us and asserts both see the same):

- start: ``JOB_STATUS_CHANGE`` created, running, paused, running — ``blockdev-backup`` starts the job
  inside its drained section, so the job parks at its first pause point until the drain ends. Do the
  same with ``pause_internal()``; ``start()``; ``resume_internal()``.
- success: … waiting, pending, ``BLOCK_JOB_COMPLETED`` {type, device, len, offset, speed},
  concluded, null.
- ``auto-finalize: false``: … waiting, pending, ``BLOCK_JOB_PENDING`` {type, id}; ``job-finalize``:
  ``BLOCK_JOB_COMPLETED``, concluded, null. ``auto-dismiss: false``: stays concluded (listed by the
  queries) until ``job-dismiss``: null.
- cancel while running: aborting, ``BLOCK_JOB_CANCELLED`` {type, device, len, offset, speed},
  concluded, null; a kept (auto-dismiss off) job shows ``error: "Operation canceled"``.
  Cancel while paused resumes first: paused, running, aborting, … Cancel in pending: aborting, …
- pause / resume: paused, running. Texts: "Job is already paused", "Can't resume a job that was not
  paused" (checked before the verb table), "Job 'ID' in state 'S' cannot accept command verb 'V'",
  negative speed (set-speed, or at creation, which emits created then null): "Parameter 'speed'
  expects a non-negative value". (``block-job-cancel`` without force of a job paused by the user or by
  an error is refused by the QMP layer: "The block job for device 'ID' is currently paused", the job
  stays paused; ``job-cancel`` always forces; unknown id: "Job not found".)
- an I/O error with ``report``: ``BLOCK_JOB_ERROR`` {device, operation, action: report}, aborting,
  ``BLOCK_JOB_COMPLETED`` with ``error`` (strerror, e.g. "Input/output error"), concluded, null.
  ``stop`` (and ``enospc``/``auto`` on ENOSPC): ``BLOCK_JOB_ERROR`` action stop, paused; query shows
  ``io-status`` "failed" ("nospace" for ENOSPC) and ``paused: true``; resume resets io-status to "ok"
  and retries. ``ignore``: one ``BLOCK_JOB_ERROR`` action ignore per failed attempt, the job goes on.
  QEMU's backup acts on an error only once every request of its block-copy call has ended, so a
  failure never outlives the stop it caused; ours has several requests in flight, so a failure of a
  request issued before the last resume is retried without stopping again (``run_epoch``).
- a job cancelled before it started (a transaction that aborts): created, aborting, concluded, null
  and no BLOCK_JOB_* event.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Iterable
from enum import StrEnum
from typing import Any, ClassVar

from backup.errors import InvalidArgument, JobStateError
from backup.events import EventBus
from backup.policy import ErrorAction, OnError, decide

log = logging.getLogger(__name__)


class JobStatus(StrEnum):
    """QEMU's ``JobStatus`` strings."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(StrEnum):
    """QEMU's ``JobVerb`` strings (the names in the refusal message)."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"
    CHANGE = "change"


S = JobStatus

#: status -> the statuses it may change to (a status may also "change" to itself: no event).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.UNDEFINED: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.RUNNING, S.ABORTING, S.NULL}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.READY: frozenset({S.STANDBY, S.WAITING, S.ABORTING}),
    S.STANDBY: frozenset({S.READY}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}

_ACTIVE = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY})

#: verb -> the statuses that accept it.
VERBS: dict[JobVerb, frozenset[JobStatus]] = {
    JobVerb.CANCEL: _ACTIVE | {S.WAITING, S.PENDING},
    JobVerb.PAUSE: _ACTIVE,
    JobVerb.RESUME: _ACTIVE,
    JobVerb.SET_SPEED: _ACTIVE,
    JobVerb.COMPLETE: frozenset({S.READY}),
    JobVerb.FINALIZE: frozenset({S.PENDING}),
    JobVerb.DISMISS: frozenset({S.CONCLUDED}),
    JobVerb.CHANGE: frozenset({S.RUNNING, S.READY}),
}

_COMPLETED = frozenset({S.WAITING, S.PENDING, S.ABORTING, S.CONCLUDED, S.NULL})

#: Rate limiting allows a burst of this many seconds' worth of bytes before sleeping.
THROTTLE_SLICE = 0.1


def error_message(exc: BaseException) -> str:
    """The text QEMU puts in ``error``: strerror for an errno, else the exception's message."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _cancelled_error() -> OSError:
    return OSError(errno.ECANCELED, os.strerror(errno.ECANCELED))


class JobGroup:
    """Jobs that complete together (QEMU's ``JobTxn``): all are finalized, or all are aborted.

    Every job starts in a group of its own; ``add`` moves a freshly created job into a shared one.
    Group-wide steps visit the jobs newest first, as QEMU's list does (events come in that order).
    When the last job of a group finishes its work the whole group goes to PENDING and is finalized
    (prepare all, then commit and clean each); if any fails or is cancelled, the others are cancelled
    and every job aborts.
    """

    def __init__(self, jobs: Iterable[Job] = ()) -> None:
        self.jobs: list[Job] = []
        self.aborting = False
        self.finalizing = False
        for job in jobs:
            self.add(job)

    def add(self, job: Job) -> None:
        if job.status is not S.CREATED:
            raise JobStateError(f"Job '{job.id}' in state '{job.status}' cannot join a job group")
        if job.group is not self:
            job.group.jobs.remove(job)
            job.group = self
            self.jobs.insert(0, job)  # QEMU links new jobs at the head: the group acts newest first

    async def job_completed(self, job: Job) -> None:
        """``job``'s work is over (success, failure or cancel): move the group on if it can."""
        job._update_rc()
        if job._ret is not None:
            await self.abort(job)
            return
        job._transition(S.WAITING)
        if not all(other.status in _COMPLETED for other in self.jobs):
            return  # the last one to finish moves the whole group on
        for other in self.jobs:
            other._transition(S.PENDING)
            if not other.auto_finalize:
                other._emit_pending()
        if all(other.auto_finalize for other in self.jobs):
            await self.finalize()

    async def finalize(self) -> None:
        """Prepare every job, then commit (or abort all if a prepare fails), clean and conclude each."""
        if self.finalizing or self.aborting:
            return
        self.finalizing = True
        for job in list(self.jobs):
            if job._ret is None:
                try:
                    await job.prepare()
                except Exception as exc:
                    log.debug("job %s: prepare failed: %s", job.id, exc)
                    job._ret = exc
            job._update_rc()
            if job._ret is not None:
                self.finalizing = False
                await self.abort(job)
                return
        for job in list(self.jobs):
            await self._finalize_single(job)

    async def abort(self, failed: Job) -> None:
        """One job failed or was cancelled: cancel the others, wait for their work to stop, abort all."""
        if self.aborting:
            return  # whoever started the abort finalizes every job, this one included
        self.aborting = True
        for other in self.jobs:
            if other is not failed:
                other._cancel_async(force=True)
        for other in list(self.jobs):
            if other._started:  # a job that never started has no work to wait for
                await other._run_done.wait()
            await self._finalize_single(other)

    async def _finalize_single(self, job: Job) -> None:
        job._update_rc()
        if job._ret is None:
            try:
                job.commit()
            except Exception as exc:
                job._failed_late("commit", exc)
                _call_hook(job, job.abort)
        else:
            _call_hook(job, job.abort)
        try:
            await job.clean()
        except Exception as exc:
            if job._ret is None:
                job._failed_late("clean-up", exc)
            else:
                log.error("job %s: clean-up failed: %s", job.id, exc)
        if job._started:
            if job.is_cancelled:
                job._emit_block_event("BLOCK_JOB_CANCELLED")
            else:
                job._emit_block_event("BLOCK_JOB_COMPLETED", error=job.error)
        if job in self.jobs:
            self.jobs.remove(job)
        job._conclude()


def _call_hook(job: Job, hook: Callable[[], None]) -> None:
    try:
        hook()
    except Exception:
        log.exception("job %s: %s failed", job.id, hook.__name__)


class Job(ABC):
    """A job with QEMU's lifecycle. Subclasses set ``job_type`` and implement ``run()``.

    ``run()`` returning means success, raising means failure (the error text goes to ``error`` and
    ``BLOCK_JOB_COMPLETED``). ``cancel()`` interrupts ``run()`` at its current ``await`` with
    ``CancelledError`` (like QEMU cancelling the job's in-flight requests), so ``run()`` must be
    cancellation-safe; several worker tasks inside ``run()`` may call ``pause_point``/``throttle``.
    """

    job_type: ClassVar[str] = ""
    #: A block job (backup): listed by query-block-jobs, sends BLOCK_JOB_* events. QEMU's ``create``
    #: job is a plain job: query-jobs and JOB_STATUS_CHANGE only.
    is_block_job: ClassVar[bool] = True

    def __init__(
        self,
        job_id: str,
        *,
        events: EventBus,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        speed: int = 0,
    ) -> None:
        self.id = job_id
        self.events = events
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.status = S.UNDEFINED
        self.speed = 0
        self.current_progress = 0
        self.total_progress = 0
        self.io_status = "ok"
        self.error: str | None = None
        self.user_paused = False
        #: Bumped by every user resume (also after an ``on-*-error=stop`` pause): a request records it
        #: when issued, so ``handle_error`` can tell a failure of the current run from a late one.
        self.run_epoch = 0
        self.group = JobGroup()
        self.group.jobs.append(self)
        self._pause_count = 1  # created jobs count as paused until start()
        self._parked = 0  # tasks waiting in pause_point
        self._sleeping = 0  # tasks sleeping in throttle
        self._resume_to = S.RUNNING
        self._started = False
        self._in_run = False
        self._deferred = False  # run() is over (QEMU's deferred_to_main_loop)
        self._cancelled = False
        self._force_cancel = False
        self._ret: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        self._run_done = asyncio.Event()
        self._concluded = asyncio.Event()
        self._throttle_debt = 0.0
        self._throttle_at: float | None = None
        self._transition(S.CREATED)
        if speed < 0:
            self._transition(S.NULL)  # QEMU's job_early_fail: created, then gone
            raise InvalidArgument("Parameter 'speed' expects a non-negative value")
        self.speed = speed

    # --- state ------------------------------------------------------------------------------------

    @property
    def type(self) -> str:
        return self.job_type

    @property
    def paused(self) -> bool:
        """``paused`` of query-block-jobs: a pause is requested (by the user, an error, or not started)."""
        return self._pause_count > 0

    @property
    def busy(self) -> bool:
        """``busy`` of query-block-jobs: the job's work is executing (not parked, not sleeping)."""
        return self._started and not self._deferred and self._parked == 0 and self._sleeping == 0

    @property
    def is_cancelled(self) -> bool:
        """A cancel that ends the job (QEMU's ``job_is_cancelled``)."""
        return self._cancelled and self._force_cancel

    @property
    def is_completed(self) -> bool:
        return self.status in _COMPLETED

    @property
    def started(self) -> bool:
        return self._started

    def progress_done(self, nbytes: int) -> None:
        """Account work done (``offset`` / ``current-progress``)."""
        self.current_progress += nbytes

    def progress_set_remaining(self, remaining: int) -> None:
        """Set the estimate of work left, so ``len`` = done + remaining."""
        self.total_progress = self.current_progress + remaining

    def query_job(self) -> dict[str, Any]:
        """``JobInfo`` of query-jobs."""
        info: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "status": str(self.status),
            "current-progress": self.current_progress,
            "total-progress": self.total_progress,
        }
        if self.error is not None:
            info["error"] = self.error
        return info

    def query_block_job(self) -> dict[str, Any]:
        """``BlockJobInfo`` of query-block-jobs."""
        info: dict[str, Any] = {
            "auto-finalize": self.auto_finalize,
            "io-status": self.io_status,
            "device": self.id,
            "auto-dismiss": self.auto_dismiss,
            "busy": self.busy,
            "len": self.total_progress,
            "offset": self.current_progress,
            "status": str(self.status),
            "paused": self.paused,
            "speed": self.speed,
            "ready": self.status in (S.READY, S.STANDBY),
            "type": self.type,
        }
        if self.error is not None:
            info["error"] = self.error
        return info

    # --- verbs ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin ``run()`` in a task of the running loop (QEMU's ``job_start``)."""
        if self.status is not S.CREATED or self._started:
            raise JobStateError(f"Job '{self.id}' in state '{self.status}' cannot be started")
        loop = asyncio.get_running_loop()
        self._started = True
        self._pause_count -= 1
        self._transition(S.RUNNING)
        if self._pause_count > 0:
            # QEMU enters the job at once and it parks at its first pause point: paused before start()
            # returns. The same happens when the job's nodes are drained while it starts (pause_internal).
            self._resume_to = S.RUNNING
            self._transition(S.PAUSED)
        self._task = loop.create_task(self._main(), name=f"job-{self.id}")

    def pause(self) -> None:
        self._apply_verb(JobVerb.PAUSE)
        if self.user_paused:
            raise JobStateError("Job is already paused")
        self._pause_count += 1
        self.user_paused = True
        self._wake()

    def resume(self) -> None:
        if not self.user_paused or self._pause_count <= 0:
            raise JobStateError("Can't resume a job that was not paused")
        self._apply_verb(JobVerb.RESUME)
        self.on_user_resume()
        self.user_paused = False
        self.run_epoch += 1
        self._pause_count -= 1
        self._unpark_if_resumed()
        self._wake()

    def pause_internal(self) -> None:
        """A pause that is not the user's (QEMU's ``job_pause``, e.g. while the job's nodes are drained)."""
        self._pause_count += 1
        self._wake()

    def resume_internal(self) -> None:
        """End a ``pause_internal``."""
        if self._pause_count <= 0:
            raise JobStateError(f"Job '{self.id}' is not paused")
        self._pause_count -= 1
        self._unpark_if_resumed()
        self._wake()

    def set_speed(self, speed: int) -> None:
        """Change the rate limit in bytes/s (0 = none); a sleeping ``throttle`` re-evaluates at once."""
        self._apply_verb(JobVerb.SET_SPEED)
        if speed < 0:
            raise InvalidArgument("Parameter 'speed' expects a non-negative value")
        if speed == self.speed:
            return
        self._settle_debt()
        self.speed = speed
        if speed == 0:
            self._throttle_debt = 0.0  # unlimited: nothing is owed when a limit comes back
        self._wake()

    def cancel(self, force: bool = False) -> None:
        """Cancel: the work stops, the job aborts; ``force`` is recorded (no soft cancel for our jobs)."""
        self._apply_verb(JobVerb.CANCEL)
        if self.group.finalizing:
            return  # already committing: the job is as good as done, like QEMU ignoring a late soft cancel
        self._cancel_async(force)
        if not self._started:
            self._run_done.set()
            self._update_rc()
            self._spawn(self.group.job_completed(self))
        elif self._deferred and self.is_cancelled:
            self._spawn(self.group.abort(self))

    def complete(self) -> None:
        """Ask a READY job to finish (mirror-like jobs); backup never becomes READY."""
        self._apply_verb(JobVerb.COMPLETE)
        if self._cancelled or not self.supports_complete:
            raise JobStateError(f"The active block job '{self.id}' cannot be completed")
        self.on_complete()

    def finalize(self) -> None:
        """Finalize a PENDING job (and its group) after ``auto_finalize=False``."""
        self._apply_verb(JobVerb.FINALIZE)
        self._spawn(self.group.finalize())

    def dismiss(self) -> None:
        """Remove a CONCLUDED job after ``auto_dismiss=False``."""
        self._apply_verb(JobVerb.DISMISS)
        self._transition(S.NULL)

    def early_fail(self) -> None:
        """Discard a job that was created but never started (setup failed): created -> null, no other event."""
        if self.status is not S.CREATED or self._started:
            raise JobStateError(f"Job '{self.id}' in state '{self.status}' was already started")
        if self in self.group.jobs:
            self.group.jobs.remove(self)
        self._run_done.set()
        self._transition(S.NULL)
        self._concluded.set()

    async def wait(self) -> None:
        """Return once the job is concluded (or gone)."""
        await self._concluded.wait()

    # --- for subclasses -----------------------------------------------------------------------------

    supports_complete: ClassVar[bool] = False

    @abstractmethod
    async def run(self) -> None:
        """The work. Return on success, raise on failure."""

    async def prepare(self) -> None:  # noqa: B027 (an optional hook)
        """Before commit: the last step that may still fail (and then aborts the whole group)."""

    def commit(self) -> None:  # noqa: B027 (an optional hook)
        """The job succeeded (for the whole group); make its result visible. Should not fail: if it
        does, this job completes with the error and its ``abort`` runs (the group's others stay committed)."""

    def abort(self) -> None:  # noqa: B027 (an optional hook)
        """The job failed or was cancelled (or a group peer did); undo what must not stay."""

    async def clean(self) -> None:  # noqa: B027 (an optional hook)
        """After commit or abort, always: release what the job held (filters, nodes, files). A failure
        is reported: a job that had succeeded completes with the error instead."""

    def on_user_resume(self) -> None:
        """A user resume (or a cancel of a user-paused job): a new attempt, so io-status is ok again."""
        self.io_status = "ok"

    def on_complete(self) -> None:  # noqa: B027 (an optional hook)
        """``complete`` of a READY job (only when ``supports_complete``)."""

    def mark_ready(self) -> None:
        """A job that waits for ``complete`` enters READY (QEMU's ``job_transition_to_ready``)."""
        self._transition(S.READY)
        self._emit_block_event("BLOCK_JOB_READY")

    async def pause_point(self) -> None:
        """Park here while a pause is requested; raise ``CancelledError`` once the job is cancelled."""
        if not self._pause_count and not self._cancelled:
            return  # the hot path: called once per unit of work
        if self.is_cancelled:
            raise asyncio.CancelledError
        while (
            self._pause_count > 0 and not self.is_cancelled and self.status in (S.RUNNING, S.READY, S.PAUSED, S.STANDBY)
        ):
            wakeup = self._wakeup
            if self.status not in (S.PAUSED, S.STANDBY):
                self._resume_to = self.status
                self._transition(S.STANDBY if self.status is S.READY else S.PAUSED)
            self._parked += 1
            try:
                await wakeup.wait()
            except BaseException:
                self._unpark()  # interrupted (cancelled): leave the paused status before unwinding
                raise
            finally:
                self._parked -= 1
        self._unpark_if_resumed()
        if self.is_cancelled:
            raise asyncio.CancelledError

    def _unpark(self) -> None:
        if self.status in (S.PAUSED, S.STANDBY):
            self._transition(self._resume_to)

    def _unpark_if_resumed(self) -> None:
        """The job leaves PAUSED as soon as nothing holds it paused, like QEMU re-entering it at once."""
        if self._pause_count == 0 or self.is_cancelled:
            self._unpark()

    async def throttle(self, nbytes: int) -> None:
        """Account ``nbytes`` of work and sleep as ``speed`` requires; woken by set_speed, pause, cancel.

        A debt of bytes is paid off at ``speed`` bytes/s; up to ``THROTTLE_SLICE`` seconds' worth may
        be outstanding before the caller sleeps, so small units of work do not each sleep.
        """
        if self.speed <= 0 and not self._pause_count and not self._cancelled:
            return  # the hot path of an unthrottled job
        self._settle_debt(self._monotonic())
        self._throttle_debt += nbytes
        while True:
            await self.pause_point()
            if self.speed <= 0:
                self._throttle_debt = 0.0
                return
            self._settle_debt(self._monotonic())
            excess = self._throttle_debt - self.speed * THROTTLE_SLICE
            if excess < 1.0:  # not even a byte over (float residue must not make us spin)
                return
            self._sleeping += 1
            try:
                await self._sleep(excess / self.speed, self._wakeup)
            finally:
                self._sleeping -= 1

    def _monotonic(self) -> float:
        """The throttle's clock (the loop's); a test may substitute a virtual one."""
        return asyncio.get_running_loop().time()

    async def _sleep(self, delay: float, wakeup: asyncio.Event) -> None:
        """Sleep up to ``delay`` seconds, or less when ``wakeup`` fires (set_speed, pause, cancel)."""
        try:
            async with asyncio.timeout(delay):
                await wakeup.wait()
        except TimeoutError:
            pass

    async def handle_error(
        self, exc: OSError, policy: OnError | str, *, is_read: bool, epoch: int | None = None
    ) -> ErrorAction:
        """Apply an error policy to a failed request: event, io-status, and for STOP a pause until resume.

        The caller retries after IGNORE and STOP and gives up (raises) after REPORT. ``epoch`` is
        ``run_epoch`` when the request was issued (None: now). A STOP for a request issued before the
        last resume returns at once, with no event and no pause: its failure belongs to the run the
        job was stopped and resumed for (several requests in flight fail with one cause, and their
        replies may arrive after the resume), so the caller just retries it; if the fault is still
        there, the retry fails in the current run and stops the job again.
        """
        action = decide(policy, exc.errno, is_read=is_read)
        if action is ErrorAction.STOP and epoch is not None and epoch != self.run_epoch:
            log.debug("job %s: retrying a request that failed before the last resume: %s", self.id, exc)
            return action
        self.events.emit(
            "BLOCK_JOB_ERROR",
            {"device": self.id, "operation": "read" if is_read else "write", "action": str(action)},
        )
        if action is ErrorAction.STOP:
            if not self.user_paused:
                self._pause_count += 1
                self.user_paused = True
            if self.io_status == "ok":
                self.io_status = "nospace" if exc.errno == errno.ENOSPC else "failed"
            self._wake()
            await self.pause_point()
        return action

    # --- machinery --------------------------------------------------------------------------------

    def _apply_verb(self, verb: JobVerb) -> None:
        if self.status not in VERBS[verb]:
            raise JobStateError(f"Job '{self.id}' in state '{self.status}' cannot accept command verb '{verb}'")

    def _transition(self, new: JobStatus) -> None:
        old = self.status
        if new is not old and new not in TRANSITIONS[old]:
            raise AssertionError(f"job {self.id}: illegal transition {old} -> {new}")
        self.status = new
        if new is not old:
            self.events.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": str(new)})

    def _emit_block_event(self, name: str, *, error: str | None = None) -> None:
        if not self.is_block_job:
            return
        data: dict[str, Any] = {
            "type": self.type,
            "device": self.id,
            "len": self.total_progress,
            "offset": self.current_progress,
            "speed": self.speed,
        }
        if error is not None:
            data["error"] = error
        self.events.emit(name, data)

    def _emit_pending(self) -> None:
        if not self.is_block_job:
            return
        self.events.emit("BLOCK_JOB_PENDING", {"type": self.type, "id": self.id})

    def _wake(self) -> None:
        """Wake every task parked in pause_point / sleeping in throttle so it re-checks its condition."""
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    def _settle_debt(self, now: float | None = None) -> None:
        """Pay off the throttle debt for the time elapsed at the current speed."""
        if now is None:
            if not self._has_loop():
                return
            now = self._monotonic()
        if self._throttle_at is not None and self.speed > 0:
            self._throttle_debt = max(0.0, self._throttle_debt - (now - self._throttle_at) * self.speed)
        self._throttle_at = now

    @staticmethod
    def _has_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def _cancel_async(self, force: bool) -> None:
        force = self.on_cancel(force)
        if self.user_paused:
            self.on_user_resume()
            self.user_paused = False
            self._pause_count -= 1
        if force or not self._deferred:
            self._cancelled = True
            self._force_cancel = self._force_cancel or force
        self._unpark_if_resumed()
        if self.is_cancelled and self._task is not None and self._in_run and not self._deferred:
            self._task.cancel()
        self._wake()

    def on_cancel(self, force: bool) -> bool:
        """Driver hook: return whether this cancel ends the job (True: none of our jobs soft-cancels)."""
        return True

    def _failed_late(self, step: str, exc: Exception) -> None:
        """A job that did its work but whose commit or clean-up failed (the target's last write or
        close): it completes with the error, as a failure, not silently as a success."""
        log.error("job %s: %s failed: %s", self.id, step, exc)
        self._ret = exc
        self._update_rc()

    def _update_rc(self) -> None:
        if self._ret is None and self.is_cancelled:
            self._ret = _cancelled_error()
        if self._ret is not None:
            if self.error is None:
                self.error = error_message(self._ret)
            self._transition(S.ABORTING)

    def _conclude(self) -> None:
        self._transition(S.CONCLUDED)
        if self.auto_dismiss or not self._started:
            self._transition(S.NULL)
        self._concluded.set()

    async def _main(self) -> None:
        external = False
        self._in_run = True  # from here on a cancel may interrupt us (before, the pause point sees it)
        try:
            await self.pause_point()
            await self.run()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            if not self.is_cancelled:  # someone cancelled our task, not the verb: still end cleanly
                external = True
                self._cancelled = self._force_cancel = True
        except Exception as exc:
            log.debug("job %s failed: %s", self.id, exc)
            self._ret = exc
        self._deferred = True
        self._run_done.set()
        await self.group.job_completed(self)
        if external:
            raise asyncio.CancelledError

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(self._log_failure)

    def _log_failure(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("job %s: background step failed", self.id, exc_info=task.exception())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r} {self.status}>"
