"""run_transaction: every branch of prepare/commit/abort/clean, the abort action, job groups."""

from __future__ import annotations

import asyncio
import logging

import pytest
from jobkit import FakeJob, Recorder, until

from backup.errors import BackupError, JobStateError
from backup.events import EventBus
from backup.job import JobStatus
from backup.transaction import (
    AbortAction,
    CompletionMode,
    Transaction,
    TransactionAborted,
    TransactionAction,
    run_transaction,
)

# The log of a transaction of steps a, b and c that committed: every phase runs over all, in order.
COMMITTED_ABC = [
    "prepare a",
    "prepare b",
    "prepare c",
    "commit a",
    "commit b",
    "commit c",
    "clean a",
    "clean b",
    "clean c",
]


class Step:
    """An action that logs every call into a shared list and fails where told."""

    def __init__(self, name: str, log: list[str], *, fail: str | None = None, exc: BaseException | None = None):
        self.name = name
        self.log = log
        self.fail = fail
        self.exc = exc or RuntimeError(f"{name} {fail} failed")

    def _call(self, what: str) -> None:
        self.log.append(f"{what} {self.name}")
        if self.fail == what:
            raise self.exc

    async def prepare(self) -> None:
        await asyncio.sleep(0)
        self._call("prepare")

    def commit(self) -> None:
        self._call("commit")

    async def abort(self) -> None:
        await asyncio.sleep(0)
        self._call("abort")

    async def clean(self) -> None:
        await asyncio.sleep(0)
        self._call("clean")


async def test_all_prepared_then_all_committed_then_cleaned() -> None:
    log: list[str] = []
    steps = [Step("a", log), Step("b", log), Step("c", log)]
    assert all(isinstance(s, TransactionAction) for s in steps)
    await run_transaction(steps)
    assert log == COMMITTED_ABC


async def test_failure_aborts_entered_newest_first_including_the_failing_one() -> None:
    log: list[str] = []
    steps = [Step("a", log), Step("b", log, fail="prepare"), Step("c", log)]
    with pytest.raises(RuntimeError, match="b prepare failed"):
        await run_transaction(steps)
    assert log == ["prepare a", "prepare b", "abort b", "abort a", "clean a", "clean b"]


async def test_first_action_failing() -> None:
    log: list[str] = []
    with pytest.raises(RuntimeError):
        await run_transaction([Step("a", log, fail="prepare"), Step("b", log)])
    assert log == ["prepare a", "abort a", "clean a"]


async def test_abort_action_text_and_class() -> None:
    log: list[str] = []
    with pytest.raises(TransactionAborted) as info:
        await run_transaction([Step("a", log), AbortAction(), Step("c", log)])
    assert str(info.value) == "Transaction aborted using Abort action"
    assert info.value.qmp_class == "GenericError"
    assert log == ["prepare a", "abort a", "clean a"]
    with pytest.raises(AssertionError):
        AbortAction().commit()


async def test_failing_abort_and_clean_do_not_stop_the_rollback(caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    steps = [Step("a", log, fail="abort"), Step("b", log, fail="clean"), Step("c", log, fail="prepare")]
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="c prepare failed"):
        await run_transaction(steps)
    assert log == [
        "prepare a",
        "prepare b",
        "prepare c",
        "abort c",
        "abort b",
        "abort a",
        "clean a",
        "clean b",
        "clean c",
    ]
    assert "abort of" in caplog.text and "clean of" in caplog.text


async def test_failing_commit_and_clean_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    steps = [Step("a", log, fail="commit"), Step("b", log, fail="clean"), Step("c", log)]
    with caplog.at_level(logging.ERROR):
        await run_transaction(steps)
    assert log == COMMITTED_ABC
    assert "commit of" in caplog.text


async def test_cancelled_prepare_rolls_back_and_propagates() -> None:
    log: list[str] = []
    blocker = asyncio.Event()

    class Blocking(Step):
        async def prepare(self) -> None:
            self.log.append("prepare blocking")
            await blocker.wait()

    task = asyncio.ensure_future(run_transaction([Step("a", log), Blocking("b", log), Step("c", log)]))
    await until(lambda: "prepare blocking" in log)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["prepare a", "prepare blocking", "abort b", "abort a", "clean a", "clean b"]


async def test_empty_transaction() -> None:
    await run_transaction([])


def test_completion_mode_checks() -> None:
    individual = Transaction()
    assert individual.group is None and not individual.grouped
    individual.check_completion_mode("block-dirty-bitmap-add")
    grouped = Transaction("grouped")
    assert grouped.completion_mode is CompletionMode.GROUPED and grouped.group is not None
    with pytest.raises(BackupError) as info:
        grouped.check_completion_mode("block-dirty-bitmap-add")
    assert str(info.value) == (
        "Action 'block-dirty-bitmap-add' does not support Transaction property completion-mode = grouped"
    )
    with pytest.raises(ValueError):
        Transaction("sometimes")


class JobAction:
    """A backup-like action: the job is created in prepare, started in commit, released in clean."""

    def __init__(self, job: FakeJob, txn: Transaction) -> None:
        self.job = job
        self.txn = txn

    async def prepare(self) -> None:
        self.txn.add_job(self.job)
        self.job.pause_internal()

    def commit(self) -> None:
        self.job.start()

    async def abort(self) -> None:
        try:
            self.job.cancel(force=True)
        except JobStateError:
            pass  # the group already aborted it
        await asyncio.wait_for(self.job.wait(), 10)

    async def clean(self) -> None:
        self.job.resume_internal()


async def test_job_actions_like_qemu_individual() -> None:
    bus = EventBus()
    rec = Recorder(bus)
    txn = Transaction()
    t1 = FakeJob("t1", events=bus, units=1)
    t2 = FakeJob("t2", events=bus, units=1)
    await run_transaction([JobAction(t1, txn), JobAction(t2, txn)])
    assert rec.seq()[:8] == [
        ("status", "t1", "created"),
        ("status", "t2", "created"),
        ("status", "t1", "running"),
        ("status", "t1", "paused"),
        ("status", "t2", "running"),
        ("status", "t2", "paused"),
        ("status", "t1", "running"),
        ("status", "t2", "running"),
    ]
    await asyncio.wait_for(asyncio.gather(t1.wait(), t2.wait()), 10)
    assert t1.group is not t2.group


async def test_job_actions_rolled_back_by_abort_newest_first() -> None:
    bus = EventBus()
    rec = Recorder(bus)
    txn = Transaction()
    t1 = FakeJob("t1", events=bus)
    t2 = FakeJob("t2", events=bus)
    with pytest.raises(TransactionAborted):
        await run_transaction([JobAction(t1, txn), JobAction(t2, txn), AbortAction()])
    assert rec.seq() == [
        ("status", "t1", "created"),
        ("status", "t2", "created"),
        ("status", "t2", "aborting"),
        ("status", "t2", "concluded"),
        ("status", "t2", "null"),
        ("status", "t1", "aborting"),
        ("status", "t1", "concluded"),
        ("status", "t1", "null"),
    ]
    assert t1.hooks == t2.hooks == ["abort", "clean"]


async def test_grouped_abort_does_not_hang() -> None:
    """QEMU 7.2 deadlocks on a grouped transaction of two backups plus ``abort``; we roll back."""
    bus = EventBus()
    rec = Recorder(bus)
    txn = Transaction("grouped")
    t1 = FakeJob("t1", events=bus)
    t2 = FakeJob("t2", events=bus)
    with pytest.raises(TransactionAborted):
        await asyncio.wait_for(run_transaction([JobAction(t1, txn), JobAction(t2, txn), AbortAction()]), 10)
    assert t1.status is JobStatus.NULL and t2.status is JobStatus.NULL
    assert not [e for e in rec.seq() if e[0] != "status"]
    assert t1.hooks == t2.hooks == ["abort", "clean"]


async def test_grouped_jobs_finalize_together_newest_first() -> None:
    bus = EventBus()
    rec = Recorder(bus)
    txn = Transaction("grouped")
    g1 = FakeJob("g1", events=bus, units=1, gate=asyncio.Queue())
    g2 = FakeJob("g2", events=bus, units=1)
    await run_transaction([JobAction(g1, txn), JobAction(g2, txn)])
    await until(lambda: g2.status is JobStatus.WAITING)
    assert g1.gate is not None
    g1.gate.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(g1.wait(), g2.wait()), 10)
    tail = [e if e[0] == "status" else (e[0], e[1]["device"]) for e in rec.seq()[8:]]
    assert tail == [
        ("status", "g2", "waiting"),
        ("status", "g1", "waiting"),
        ("status", "g2", "pending"),
        ("status", "g1", "pending"),
        ("BLOCK_JOB_COMPLETED", "g2"),
        ("status", "g2", "concluded"),
        ("status", "g2", "null"),
        ("BLOCK_JOB_COMPLETED", "g1"),
        ("status", "g1", "concluded"),
        ("status", "g1", "null"),
    ]
