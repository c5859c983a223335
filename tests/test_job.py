"""The Job lifecycle against QEMU 7.2's observed behaviour (see backup/job.py's docstring)."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jobkit import FakeJob, Recorder, until

from backup.errors import InvalidArgument, JobStateError
from backup.events import EventBus
from backup.job import TRANSITIONS, VERBS, Job, JobGroup, JobStatus, JobVerb
from backup.policy import ErrorAction, OnError

EIO = OSError(errno.EIO, "Input/output error")


def make_bus() -> EventBus:
    counter = itertools.count()
    return EventBus(clock=lambda: float(next(counter)))


def new_job(**job_args: Any) -> tuple[FakeJob, Recorder]:
    """Job "j" on a fresh bus, with the record of its events."""
    bus = make_bus()
    rec = Recorder(bus)  # before the job: it records "created"
    return FakeJob("j", events=bus, **job_args), rec


async def run_job(**job_args: Any) -> tuple[FakeJob, Recorder]:
    """Job "j" on a fresh bus, started and run to its end, with the record of its events."""
    job, rec = new_job(**job_args)
    job.start()
    await asyncio.wait_for(job.wait(), 10)
    return job, rec


def completed(job_id: str = "j", *, len_: int = 300, offset: int = 300, speed: int = 0, **extra: object) -> tuple:
    data = {"type": "backup", "device": job_id, "len": len_, "offset": offset, "speed": speed, **extra}
    return ("BLOCK_JOB_COMPLETED", data)


def cancelled(job_id: str = "j", *, len_: int = 300, offset: int = 0, speed: int = 0) -> tuple:
    return ("BLOCK_JOB_CANCELLED", {"type": "backup", "device": job_id, "len": len_, "offset": offset, "speed": speed})


async def test_success_sequence_and_hooks() -> None:
    job, rec = new_job()
    assert job.status is JobStatus.CREATED and job.paused and not job.busy
    job.start()
    assert job.busy and not job.paused
    await asyncio.wait_for(job.wait(), 10)
    assert rec.seq() == [
        ("status", "j", "created"),
        ("status", "j", "running"),
        ("status", "j", "waiting"),
        ("status", "j", "pending"),
        completed(),
        ("status", "j", "concluded"),
        ("status", "j", "null"),
    ]
    assert [e.timestamp for e in rec.events] == [float(i) for i in range(7)]
    assert job.hooks == ["run", "prepare", "commit", "clean"]
    assert job.error is None and job.status is JobStatus.NULL


async def test_manual_finalize_and_dismiss() -> None:
    job, rec = new_job(auto_finalize=False, auto_dismiss=False)
    job.start()
    await until(lambda: job.status is JobStatus.PENDING)
    assert rec.seq()[-2:] == [("status", "j", "pending"), ("BLOCK_JOB_PENDING", {"type": "backup", "id": "j"})]
    assert job.hooks == ["run"]
    with pytest.raises(JobStateError, match=r"^Job 'j' in state 'pending' cannot accept command verb 'dismiss'$"):
        job.dismiss()
    job.finalize()
    await asyncio.wait_for(job.wait(), 10)
    assert job.status is JobStatus.CONCLUDED
    assert job.query_job() == {
        "id": "j",
        "type": "backup",
        "status": "concluded",
        "current-progress": 300,
        "total-progress": 300,
    }
    with pytest.raises(JobStateError, match="cannot accept command verb 'finalize'"):
        job.finalize()
    job.dismiss()
    assert rec.statuses("j")[-3:] == ["pending", "concluded", "null"]
    assert rec.seq()[-3] == completed()


async def test_cancel_running_job() -> None:
    bus = make_bus()
    rec = Recorder(bus)
    gate: asyncio.Queue[None] = asyncio.Queue()
    job = FakeJob("j", events=bus, gate=gate, auto_dismiss=False, speed=12345)
    job.start()
    gate.put_nowait(None)
    await until(lambda: job.current_progress == 100)
    job.cancel()
    await asyncio.wait_for(job.wait(), 10)
    assert rec.seq() == [
        ("status", "j", "created"),
        ("status", "j", "running"),
        ("status", "j", "aborting"),
        cancelled(offset=100, speed=12345),
        ("status", "j", "concluded"),
    ]
    assert job.error == "Operation canceled"
    assert job.query_job()["error"] == "Operation canceled"
    assert job.hooks == ["run", "abort", "clean"]
    with pytest.raises(JobStateError, match=r"^Job 'j' in state 'concluded' cannot accept command verb 'cancel'$"):
        job.cancel()
    job.dismiss()
    assert job.status is JobStatus.NULL


async def test_cancel_paused_job_resumes_it_first() -> None:
    bus = make_bus()
    rec = Recorder(bus)
    gate: asyncio.Queue[None] = asyncio.Queue()
    job = FakeJob("j", events=bus, gate=gate)
    job.start()
    job.pause()
    await until(lambda: job.status is JobStatus.PAUSED)
    assert job.paused and not job.busy and job.user_paused
    job.cancel(force=True)
    await asyncio.wait_for(job.wait(), 10)
    assert rec.statuses("j") == ["created", "running", "paused", "running", "aborting", "concluded", "null"]
    assert rec.seq()[-3] == cancelled(len_=0)  # paused before run() began: no progress yet


async def test_pause_resume_and_their_errors() -> None:
    bus = make_bus()
    rec = Recorder(bus)
    gate: asyncio.Queue[None] = asyncio.Queue()
    job = FakeJob("j", events=bus, gate=gate)
    with pytest.raises(JobStateError, match=r"^Can't resume a job that was not paused$"):
        job.resume()
    job.start()
    job.pause()
    with pytest.raises(JobStateError, match=r"^Job is already paused$"):
        job.pause()
    await until(lambda: job.status is JobStatus.PAUSED)
    assert job.query_block_job()["paused"] is True and job.query_block_job()["busy"] is False
    job.resume()
    with pytest.raises(JobStateError, match=r"^Can't resume a job that was not paused$"):
        job.resume()
    for _ in range(3):
        gate.put_nowait(None)
    await asyncio.wait_for(job.wait(), 10)
    assert rec.statuses("j") == ["created", "running", "paused", "running", "waiting", "pending", "concluded", "null"]


async def test_pause_before_start_pauses_at_first_pause_point() -> None:
    job, rec = new_job()
    job.pause()
    job.start()
    await until(lambda: job.status is JobStatus.PAUSED)
    assert job.hooks == []
    job.resume()
    await asyncio.wait_for(job.wait(), 10)
    assert rec.statuses("j")[:4] == ["created", "running", "paused", "running"]


async def test_cancel_before_start_emits_no_block_event() -> None:
    job, rec = new_job(auto_dismiss=False)
    job.cancel(force=True)
    assert job.status is JobStatus.ABORTING
    await asyncio.wait_for(job.wait(), 10)
    assert rec.seq() == [
        ("status", "j", "created"),
        ("status", "j", "aborting"),
        ("status", "j", "concluded"),
        ("status", "j", "null"),  # never started: dismissed whatever auto-dismiss says
    ]
    assert job.hooks == ["abort", "clean"]


async def test_cancel_between_start_and_first_step() -> None:
    job, rec = new_job()
    job.start()
    job.cancel()
    await asyncio.wait_for(job.wait(), 10)
    assert rec.statuses("j") == ["created", "running", "aborting", "concluded", "null"]
    assert job.hooks == ["abort", "clean"]


async def test_cancel_in_pending_aborts() -> None:
    job, rec = new_job(auto_finalize=False)
    job.start()
    await until(lambda: job.status is JobStatus.PENDING)
    job.cancel()
    await asyncio.wait_for(job.wait(), 10)
    assert rec.statuses("j")[-4:] == ["pending", "aborting", "concluded", "null"]
    assert rec.seq()[-3] == cancelled(offset=300)
    assert job.hooks == ["run", "abort", "clean"]


async def test_failure_completes_with_error() -> None:
    job, rec = await run_job(fail_run=OSError(errno.ENOSPC, "x"), auto_dismiss=False)
    assert rec.seq()[-3:] == [
        ("status", "j", "aborting"),
        completed(offset=0, error="No space left on device"),
        ("status", "j", "concluded"),
    ]
    assert job.query_block_job()["error"] == "No space left on device"
    assert job.hooks == ["run", "abort", "clean"]


async def test_non_oserror_failure_text() -> None:
    job, _ = await run_job(fail_run=InvalidArgument("target too small"))
    assert job.error == "target too small"


async def test_prepare_failure_aborts() -> None:
    job, rec = await run_job(fail_prepare=True)
    assert rec.statuses("j") == ["created", "running", "waiting", "pending", "aborting", "concluded", "null"]
    assert rec.seq()[-3] == completed(error="Input/output error")
    assert job.hooks == ["run", "prepare", "abort", "clean"]


@pytest.mark.parametrize("step", ["commit", "clean"])
async def test_a_failed_commit_or_clean_up_is_reported_as_the_jobs_error(step: str) -> None:
    """The target's last close fails in clean-up: the job must not complete "without error"."""
    failure = OSError(errno.EIO, "close failed")
    job, rec = await run_job(auto_dismiss=False, **{f"fail_{step}": failure})
    assert rec.statuses("j")[-3:] == ["pending", "aborting", "concluded"]
    assert completed(error="Input/output error") in rec.seq()
    assert job.error == "Input/output error" and job.query_job()["error"] == "Input/output error"
    assert job.hooks == (
        ["run", "prepare", "commit", "abort", "clean"] if step == "commit" else ["run", "prepare", "commit", "clean"]
    )


async def test_a_failed_clean_up_of_a_failed_job_keeps_the_first_error() -> None:
    job, _ = await run_job(fail_run=OSError(errno.ENOSPC, "x"), fail_clean=OSError(errno.EIO, "y"))
    assert job.error == "No space left on device"


async def test_error_report() -> None:
    _, rec = await run_job(errors=[EIO], policy=OnError.REPORT, is_read=True)
    assert rec.seq()[2:] == [
        ("BLOCK_JOB_ERROR", {"device": "j", "operation": "read", "action": "report"}),
        ("status", "j", "aborting"),
        completed(offset=0, error="Input/output error"),
        ("status", "j", "concluded"),
        ("status", "j", "null"),
    ]


async def test_error_ignore_retries() -> None:
    job, rec = await run_job(errors=[EIO, EIO], policy=OnError.IGNORE)
    errors = [e for e in rec.seq() if e[0] == "BLOCK_JOB_ERROR"]
    assert errors == [("BLOCK_JOB_ERROR", {"device": "j", "operation": "write", "action": "ignore"})] * 2
    assert rec.seq()[-3] == completed()
    assert job.io_status == "ok"


@pytest.mark.parametrize(
    ("policy", "err", "io_status"),
    [
        (OnError.STOP, errno.EIO, "failed"),
        (OnError.STOP, errno.ENOSPC, "nospace"),
        (OnError.ENOSPC, errno.ENOSPC, "nospace"),
    ],
)
async def test_error_stop_then_resume_retries(policy: OnError, err: int, io_status: str) -> None:
    job, rec = new_job(errors=[OSError(err, "x")], policy=policy)
    job.start()
    await until(lambda: job.status is JobStatus.PAUSED)
    assert rec.seq()[2:] == [
        ("BLOCK_JOB_ERROR", {"device": "j", "operation": "write", "action": "stop"}),
        ("status", "j", "paused"),
    ]
    info = job.query_block_job()
    assert info["io-status"] == io_status and info["paused"] is True and info["busy"] is False
    with pytest.raises(JobStateError, match=r"^Job is already paused$"):
        job.pause()
    job.resume()
    assert job.io_status == "ok"
    await asyncio.wait_for(job.wait(), 10)
    assert rec.statuses("j")[2:] == ["paused", "running", "waiting", "pending", "concluded", "null"]
    assert job.attempts == 4


async def test_a_stop_for_a_request_issued_before_the_last_resume_is_only_a_retry() -> None:
    """A request records ``run_epoch`` when issued; if it fails after a resume that came later, STOP
    returns at once (the caller retries) with no event, no pause and io-status untouched. IGNORE and
    REPORT apply as always; a failure of the current run still stops the job."""
    bus = make_bus()
    rec = Recorder(bus)
    gate: asyncio.Queue[None] = asyncio.Queue()
    job = FakeJob("j", events=bus, units=1, gate=gate)
    job.start()
    before = job.run_epoch
    job.pause()
    job.resume()
    assert job.run_epoch == before + 1
    enospc = OSError(errno.ENOSPC, "No space left on device")
    assert await job.handle_error(enospc, OnError.STOP, is_read=False, epoch=before) is ErrorAction.STOP
    assert await job.handle_error(enospc, OnError.ENOSPC, is_read=False, epoch=before) is ErrorAction.STOP
    assert not job.user_paused and job.io_status == "ok"
    assert [e for e in rec.seq("j") if e[0] == "BLOCK_JOB_ERROR"] == []
    assert await job.handle_error(EIO, OnError.IGNORE, is_read=True, epoch=before) is ErrorAction.IGNORE
    assert await job.handle_error(EIO, OnError.ENOSPC, is_read=True, epoch=before) is ErrorAction.REPORT
    stop = asyncio.ensure_future(job.handle_error(enospc, OnError.STOP, is_read=False, epoch=job.run_epoch))
    await until(lambda: job.status is JobStatus.PAUSED)
    assert job.user_paused and job.io_status == "nospace"
    job.resume()
    assert await stop is ErrorAction.STOP
    assert [e[1]["action"] for e in rec.seq("j") if e[0] == "BLOCK_JOB_ERROR"] == ["ignore", "report", "stop"]
    gate.put_nowait(None)
    await asyncio.wait_for(job.wait(), 10)
    assert job.error is None


async def test_cancel_while_stopped() -> None:
    job, rec = new_job(errors=[EIO], policy=OnError.STOP)
    job.start()
    await until(lambda: job.status is JobStatus.PAUSED)
    job.cancel()
    assert job.io_status == "ok"
    await asyncio.wait_for(job.wait(), 10)
    assert rec.statuses("j") == ["created", "running", "paused", "running", "aborting", "concluded", "null"]


async def test_set_speed_rules() -> None:
    bus = make_bus()
    rec = Recorder(bus)
    with pytest.raises(InvalidArgument, match=r"^Parameter 'speed' expects a non-negative value$"):
        FakeJob("bad", events=bus, speed=-1)
    assert rec.seq() == [("status", "bad", "created"), ("status", "bad", "null")]
    job = FakeJob("j", events=bus, auto_dismiss=False)
    job.set_speed(1000)
    with pytest.raises(InvalidArgument, match=r"^Parameter 'speed' expects a non-negative value$"):
        job.set_speed(-5)
    assert job.speed == 1000
    job.start()
    await asyncio.wait_for(job.wait(), 10)
    with pytest.raises(JobStateError, match=r"^Job 'j' in state 'concluded' cannot accept command verb 'set-speed'$"):
        job.set_speed(-5)


async def test_throttle_sleeps_and_wakes_on_speed_change() -> None:
    bus = make_bus()
    job = FakeJob("j", events=bus, units=3, unit_size=10_000, speed=1)
    job.start()
    await until(lambda: job.hooks == ["run"] and not job.busy)  # the first unit is asleep in throttle
    job.set_speed(0)
    await asyncio.wait_for(job.wait(), 10)
    assert job.current_progress == 30_000


async def test_throttle_sleep_is_interrupted_by_pause_and_cancel() -> None:
    job, rec = new_job(units=3, unit_size=10_000, speed=1)
    job.start()
    await until(lambda: not job.busy)
    job.pause()
    await until(lambda: job.status is JobStatus.PAUSED)
    job.cancel()
    await asyncio.wait_for(job.wait(), 10)
    assert rec.statuses("j") == ["created", "running", "paused", "running", "aborting", "concluded", "null"]


async def test_throttle_paces_by_speed() -> None:
    """Many small units at a high speed: finishes (no sleeping forever), debt stays bounded."""
    bus = make_bus()
    job = FakeJob("j", events=bus, units=50, unit_size=4096, speed=50 * 1024 * 1024)
    job.start()
    await asyncio.wait_for(job.wait(), 10)
    assert job.current_progress == 50 * 4096


async def test_complete_verb() -> None:
    bus = make_bus()
    job = FakeJob("j", events=bus, gate=asyncio.Queue())
    job.start()
    with pytest.raises(JobStateError, match=r"^Job 'j' in state 'running' cannot accept command verb 'complete'$"):
        job.complete()
    job.mark_ready()
    assert job.query_block_job()["ready"] is True
    with pytest.raises(JobStateError, match=r"^The active block job 'j' cannot be completed$"):
        job.complete()
    job.cancel()
    await asyncio.wait_for(job.wait(), 10)


def test_verb_table_is_qemus() -> None:
    allowed = {verb: {str(s) for s in statuses} for verb, statuses in VERBS.items()}
    active = {"created", "running", "paused", "ready", "standby"}
    assert allowed == {
        JobVerb.CANCEL: active | {"waiting", "pending"},
        JobVerb.PAUSE: active,
        JobVerb.RESUME: active,
        JobVerb.SET_SPEED: active,
        JobVerb.COMPLETE: {"ready"},
        JobVerb.FINALIZE: {"pending"},
        JobVerb.DISMISS: {"concluded"},
        JobVerb.CHANGE: {"running", "ready"},
    }
    assert set(TRANSITIONS) == set(JobStatus)


@pytest.mark.parametrize("status", list(JobStatus))
@pytest.mark.parametrize("verb", [JobVerb.FINALIZE, JobVerb.DISMISS, JobVerb.COMPLETE, JobVerb.SET_SPEED])
def test_every_refusal_has_qemus_text(status: JobStatus, verb: JobVerb) -> None:
    job = FakeJob("id", events=make_bus())
    job.status = status
    if status in VERBS[verb]:
        job._apply_verb(verb)
    else:
        with pytest.raises(JobStateError) as info:
            job._apply_verb(verb)
        assert str(info.value) == f"Job 'id' in state '{status}' cannot accept command verb '{verb}'"


@pytest.mark.parametrize(("old", "new"), list(itertools.product(JobStatus, JobStatus)))
def test_transition_table_enforced(old: JobStatus, new: JobStatus) -> None:
    bus = make_bus()
    rec = Recorder(bus)
    job = FakeJob("id", events=bus)
    job.status = old
    rec.events.clear()
    if new is old or new in TRANSITIONS[old]:
        job._transition(new)
        assert rec.seq() == ([] if new is old else [("status", "id", str(new))])
    else:
        with pytest.raises(AssertionError):
            job._transition(new)


async def test_group_completes_together() -> None:
    bus = make_bus()
    rec = Recorder(bus)
    gate_b: asyncio.Queue[None] = asyncio.Queue()
    a = FakeJob("a", events=bus, units=1)
    b = FakeJob("b", events=bus, units=1, gate=gate_b)
    group = JobGroup([a, b])
    assert a.group is group and b.group is group
    a.start()
    b.start()
    await until(lambda: a.status is JobStatus.WAITING)
    assert a.hooks == ["run"]
    with pytest.raises(JobStateError, match="cannot join"):
        JobGroup([a])
    gate_b.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(a.wait(), b.wait()), 10)
    seq = rec.seq()
    assert seq.index(("status", "a", "pending")) > seq.index(("status", "b", "waiting"))
    assert a.hooks == b.hooks == ["run", "prepare", "commit", "clean"]
    assert [e[0] for e in seq if e[0].startswith("BLOCK")] == ["BLOCK_JOB_COMPLETED"] * 2


async def test_group_member_failure_cancels_the_others() -> None:
    bus = make_bus()
    rec = Recorder(bus)
    gate_b: asyncio.Queue[None] = asyncio.Queue()
    a = FakeJob("a", events=bus, units=1)
    b = FakeJob("b", events=bus, units=2, gate=gate_b)
    c = FakeJob("c", events=bus, units=1, fail_run=EIO)
    JobGroup([a, b, c])
    a.start()
    await until(lambda: a.status is JobStatus.WAITING)
    b.start()
    gate_b.put_nowait(None)
    await until(lambda: b.current_progress == 100)
    c.start()
    await asyncio.wait_for(asyncio.gather(a.wait(), b.wait(), c.wait()), 10)
    assert rec.statuses("a") == ["created", "running", "waiting", "aborting", "concluded", "null"]
    assert rec.statuses("b") == ["created", "running", "aborting", "concluded", "null"]
    assert rec.statuses("c") == ["created", "running", "aborting", "concluded", "null"]
    blocks = [(e[0], e[1]["device"], e[1].get("error")) for e in rec.seq() if e[0].startswith("BLOCK")]
    assert blocks == [  # newest first, like QEMU's job transaction list
        ("BLOCK_JOB_COMPLETED", "c", "Input/output error"),
        ("BLOCK_JOB_CANCELLED", "b", None),
        ("BLOCK_JOB_CANCELLED", "a", None),
    ]
    assert a.hooks == ["run", "abort", "clean"]
    assert c.hooks == ["run", "abort", "clean"]


async def test_group_cancel_of_waiting_job_aborts_newest_first() -> None:
    """qemu-storage-daemon: cancel of a waiting g1 while g2 runs: g2 aborts fully, then g1."""
    bus = make_bus()
    rec = Recorder(bus)
    g1 = FakeJob("g1", events=bus, units=1)
    g2 = FakeJob("g2", events=bus, units=1, gate=asyncio.Queue())
    JobGroup([g1, g2])
    g1.start()
    g2.start()
    await until(lambda: g1.status is JobStatus.WAITING)
    rec.events.clear()
    g1.cancel()
    await asyncio.wait_for(asyncio.gather(g1.wait(), g2.wait()), 10)
    assert rec.seq() == [
        ("status", "g2", "aborting"),
        cancelled("g2", len_=100),
        ("status", "g2", "concluded"),
        ("status", "g2", "null"),
        ("status", "g1", "aborting"),
        cancelled("g1", len_=100, offset=100),
        ("status", "g1", "concluded"),
        ("status", "g1", "null"),
    ]


async def test_group_manual_finalize_of_one_finalizes_all() -> None:
    bus = make_bus()
    rec = Recorder(bus)
    a = FakeJob("a", events=bus, units=1, auto_finalize=False)
    b = FakeJob("b", events=bus, units=1)
    JobGroup([a, b])
    a.start()
    b.start()
    await until(lambda: a.status is JobStatus.PENDING and b.status is JobStatus.PENDING)
    assert [e for e in rec.seq() if e[0] == "BLOCK_JOB_PENDING"] == [
        ("BLOCK_JOB_PENDING", {"type": "backup", "id": "a"})
    ]
    a.finalize()
    await asyncio.wait_for(asyncio.gather(a.wait(), b.wait()), 10)
    assert a.hooks == b.hooks == ["run", "prepare", "commit", "clean"]


async def test_early_fail_and_start_twice() -> None:
    bus = make_bus()
    rec = Recorder(bus)
    job = FakeJob("j", events=bus)
    job.early_fail()
    await asyncio.wait_for(job.wait(), 10)
    assert rec.statuses("j") == ["created", "null"]
    other = FakeJob("k", events=bus)
    other.start()
    with pytest.raises(JobStateError):
        other.start()
    with pytest.raises(JobStateError):
        other.early_fail()
    await asyncio.wait_for(other.wait(), 10)


async def test_concurrent_workers_share_pause_points() -> None:
    bus = make_bus()
    rec = Recorder(bus)
    stop = False

    class Workers(Job):
        job_type = "backup"

        async def run(self) -> None:
            async def worker() -> None:
                while not stop:
                    await self.pause_point()
                    await asyncio.sleep(0)

            async with asyncio.TaskGroup() as tg:
                for _ in range(4):
                    tg.create_task(worker())

    job = Workers("w", events=bus)
    job.start()
    await asyncio.sleep(0.01)
    job.pause()
    await until(lambda: job.status is JobStatus.PAUSED and job._parked == 4)
    job.resume()
    await until(lambda: job.status is JobStatus.RUNNING)
    job.pause()
    await until(lambda: job.status is JobStatus.PAUSED and job._parked == 4)
    stop = True
    job.resume()
    await asyncio.wait_for(job.wait(), 10)
    assert rec.statuses("w") == [
        "created",
        "running",
        "paused",
        "running",
        "paused",
        "running",
        "waiting",
        "pending",
        "concluded",
        "null",
    ]


async def test_external_task_cancel_still_ends_the_job() -> None:
    job, rec = new_job(gate=asyncio.Queue())
    job.start()
    await until(lambda: job.hooks == ["run"])
    assert job._task is not None
    job._task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job._task
    assert rec.statuses("j")[-3:] == ["aborting", "concluded", "null"]
    assert rec.seq()[-3] == cancelled()


class VirtualTimeJob(FakeJob):
    """Throttle against a virtual clock: each sleep advances it by exactly the delay asked for."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.now = 0.0
        self.sleeps: list[float] = []

    def _monotonic(self) -> float:
        return self.now

    async def _sleep(self, delay: float, wakeup: asyncio.Event) -> None:
        self.sleeps.append(delay)
        self.now += delay
        await asyncio.sleep(0)


async def test_throttle_paces_exactly_at_speed_after_one_slice_of_burst() -> None:
    speed = 1_000_000
    job = VirtualTimeJob("j", events=make_bus(), units=40, unit_size=50_000, speed=speed)
    job.start()
    await asyncio.wait_for(job.wait(), 10)
    burst = speed * 0.1
    # 2 MB at 1 MB/s, minus the burst allowance that may stay outstanding: 1.9 s of virtual sleep
    assert sum(job.sleeps) == pytest.approx((40 * 50_000 - burst) / speed)
    assert job.now == pytest.approx(1.9)


async def test_throttle_speed_change_applies_to_the_remaining_debt() -> None:
    job = VirtualTimeJob("j", events=make_bus(), units=1, unit_size=1_000_000, speed=100_000)
    job._settle_debt()
    job.set_speed(0)
    job.set_speed(500_000)  # the debt is re-evaluated at the new speed
    job.start()
    await asyncio.wait_for(job.wait(), 10)
    assert sum(job.sleeps) == pytest.approx((1_000_000 - 50_000) / 500_000)


OPS = ["step", "step", "yield", "pause", "resume", "cancel", "speed0", "speed_slow", "finalize", "dismiss", "complete"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(st.sampled_from(OPS), max_size=30),
    auto_finalize=st.booleans(),
    auto_dismiss=st.booleans(),
    policy=st.sampled_from(list(OnError)),
    errors=st.lists(st.sampled_from([errno.EIO, errno.ENOSPC]), max_size=2),
    start_first=st.booleans(),
)
def test_random_verb_sequences_follow_the_tables(
    ops: list[str], auto_finalize: bool, auto_dismiss: bool, policy: OnError, errors: list[int], start_first: bool
) -> None:
    """Any interleaving of verbs and progress: verbs are accepted exactly as the tables say (plus
    QEMU's pause/resume rules), every transition is legal (``_transition`` asserts it), and the job
    always reaches its end once nothing holds it back."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        crashes: list[object] = []
        loop.set_exception_handler(lambda _loop, ctx: crashes.append(ctx))
        bus = make_bus()
        rec = Recorder(bus)
        gate: asyncio.Queue[None] = asyncio.Queue()
        job = FakeJob(
            "j",
            events=bus,
            gate=gate,
            errors=[OSError(e, os.strerror(e)) for e in errors],
            policy=policy,
            auto_finalize=auto_finalize,
            auto_dismiss=auto_dismiss,
        )
        if start_first:
            job.start()
        verbs = {
            "pause": (JobVerb.PAUSE, job.pause),
            "resume": (JobVerb.RESUME, job.resume),
            "cancel": (JobVerb.CANCEL, job.cancel),
            "speed0": (JobVerb.SET_SPEED, lambda: job.set_speed(0)),
            "speed_slow": (JobVerb.SET_SPEED, lambda: job.set_speed(1)),
            "finalize": (JobVerb.FINALIZE, job.finalize),
            "dismiss": (JobVerb.DISMISS, job.dismiss),
            "complete": (JobVerb.COMPLETE, job.complete),
        }
        for op in ops:
            if op == "step":
                gate.put_nowait(None)
            if op in ("step", "yield"):
                for _ in range(3):
                    await asyncio.sleep(0)
                continue
            verb, call = verbs[op]
            status, user_paused = job.status, job.user_paused
            special = (
                (op == "pause" and user_paused)
                or (op == "resume" and not user_paused)
                or (op == "complete")
                or (op == "finalize" and job.group.finalizing)
            )
            try:
                call()
            except JobStateError:
                assert status not in VERBS[verb] or special, (op, status)
            else:
                assert status in VERBS[verb], (op, status)
        # let it finish: no pause, no speed limit, enough work tokens, then the manual steps
        if not job.started and job.status is JobStatus.CREATED:
            job.start()
        if job.user_paused and job.status in VERBS[JobVerb.RESUME]:
            job.resume()
        if job.status in VERBS[JobVerb.SET_SPEED]:
            job.set_speed(0)
        for _ in range(10):
            gate.put_nowait(None)
        async with asyncio.timeout(10):
            while job.status not in (JobStatus.CONCLUDED, JobStatus.NULL):
                if job.user_paused and job.status in VERBS[JobVerb.RESUME]:
                    job.resume()  # a STOP error paused it again
                if job.status is JobStatus.PENDING and not job.group.finalizing:
                    job.finalize()
                await asyncio.sleep(0.001)
            await job.wait()
        if job.status is JobStatus.CONCLUDED:
            assert not auto_dismiss
            job.dismiss()
        statuses = rec.statuses("j")
        assert statuses[0] == "created" and statuses[-1] == "null"
        blocks = [e[0] for e in rec.seq() if e[0] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")]
        assert len(blocks) == (1 if job.started else 0)
        assert (blocks == ["BLOCK_JOB_COMPLETED"]) == (job.error is None and job.started) or job.error is not None
        assert not crashes, crashes

    asyncio.run(scenario())


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_lifecycle_on_both_event_loops(loop_name: str) -> None:
    """Cancel of a paused, throttled job and a STOP/resume cycle behave the same on uvloop."""
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop

    async def scenario() -> tuple[list[str], list[str]]:
        bus = make_bus()
        rec = Recorder(bus)
        slow = FakeJob("slow", events=bus, units=2, unit_size=10_000, speed=1)
        slow.start()
        await until(lambda: not slow.busy and slow.hooks == ["run"])
        slow.pause()
        await until(lambda: slow.status is JobStatus.PAUSED)
        slow.cancel()
        stopped = FakeJob("stopped", events=bus, errors=[EIO], policy=OnError.STOP)
        stopped.start()
        await until(lambda: stopped.status is JobStatus.PAUSED)
        stopped.resume()
        await asyncio.wait_for(asyncio.gather(slow.wait(), stopped.wait()), 10)
        return rec.statuses("slow"), rec.statuses("stopped")

    with asyncio.Runner(loop_factory=factory) as runner:
        slow, stopped = runner.run(scenario())
    assert slow == ["created", "running", "paused", "running", "aborting", "concluded", "null"]
    assert stopped == ["created", "running", "paused", "running", "waiting", "pending", "concluded", "null"]
