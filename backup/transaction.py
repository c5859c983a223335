"""All-or-nothing transactions over several actions, with QEMU's ``transaction`` semantics.

``run_transaction`` prepares every action in order. If one fails, every action whose ``prepare``
was entered — the failing one too, so it can undo a partial preparation — is aborted, newest first;
otherwise all are committed in order with no ``await`` in between (nothing else runs while the
commits happen). Either way every entered action is then cleaned, in order. Observed with
qemu-storage-daemon 7.2: ``[backup t1, backup t2, abort]`` emits created t1, created t2, then t2's
aborting/concluded/null before t1's, and fails with "Transaction aborted using Abort action".

A backup action maps onto this as QEMU's does: ``prepare`` drains its source (held until
``clean``, which is what makes the point in time common to every device of the transaction),
creates the job and installs its filter, and holds ``job.pause_internal()``; ``commit`` calls
``job.start()``; ``abort`` cancels the job and waits for it; ``clean`` releases the drain and calls
``job.resume_internal()`` — giving QEMU's events created, running, paused, running per job.

``completion-mode: grouped`` (``Transaction.grouped``): jobs created by the actions join one
``JobGroup`` and complete or fail together; actions that create no job refuse the mode with QEMU's
text (``Transaction.check_completion_mode``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import StrEnum
from typing import Protocol, runtime_checkable

from backup.errors import BackupError
from backup.job import Job, JobGroup

log = logging.getLogger(__name__)


@runtime_checkable
class TransactionAction(Protocol):
    """One action of a transaction (QEMU's ``BlkActionOps``)."""

    async def prepare(self) -> None:
        """Do everything that can fail; leave enough state for ``abort`` to undo it."""

    def commit(self) -> None:
        """Make the prepared change effective. Synchronous and must not fail."""

    async def abort(self) -> None:
        """Undo ``prepare`` — also called after this action's own ``prepare`` failed part-way."""

    async def clean(self) -> None:
        """Release what prepare held, after commit or abort alike."""


class TransactionAborted(BackupError):
    """The ``abort`` action ran (it always fails, to test or force a rollback)."""


class CompletionMode(StrEnum):
    """QEMU's ``ActionCompletionMode``."""

    INDIVIDUAL = "individual"
    GROUPED = "grouped"


class Transaction:
    """Properties shared by the actions of one transaction: the completion mode and its job group."""

    def __init__(self, completion_mode: CompletionMode | str = CompletionMode.INDIVIDUAL) -> None:
        self.completion_mode = CompletionMode(completion_mode)
        self.group: JobGroup | None = JobGroup() if self.grouped else None

    @property
    def grouped(self) -> bool:
        return self.completion_mode is CompletionMode.GROUPED

    def add_job(self, job: Job) -> None:
        """Called by an action's ``prepare`` for the job it created (joins the group when grouped)."""
        if self.group is not None:
            self.group.add(job)

    def check_completion_mode(self, action_type: str) -> None:
        """For actions that create no job: refuse ``grouped`` as QEMU does."""
        if self.completion_mode is not CompletionMode.INDIVIDUAL:
            raise BackupError(
                f"Action '{action_type}' does not support Transaction property completion-mode = {self.completion_mode}"
            )


class AbortAction:
    """QEMU's ``abort`` action: its prepare always fails, so the whole transaction rolls back."""

    async def prepare(self) -> None:
        raise TransactionAborted("Transaction aborted using Abort action")

    def commit(self) -> None:
        raise AssertionError("the abort action can never be committed")

    async def abort(self) -> None:
        return None

    async def clean(self) -> None:
        return None


async def run_transaction(actions: Sequence[TransactionAction]) -> None:
    """Prepare all, then commit all or abort the entered ones; clean always. Re-raises the failure."""
    entered: list[TransactionAction] = []
    try:
        for action in actions:
            entered.append(action)
            await action.prepare()
    except BaseException:
        try:
            for action in reversed(entered):
                try:
                    await action.abort()
                except Exception:
                    log.exception("transaction: abort of %r failed", action)
        finally:
            await _clean(entered)
        raise
    for action in entered:  # no await: the commits happen together
        try:
            action.commit()
        except Exception:
            log.exception("transaction: commit of %r failed", action)
    await _clean(entered)


async def _clean(entered: Sequence[TransactionAction]) -> None:
    for action in entered:
        try:
            await action.clean()
        except Exception:
            log.exception("transaction: clean of %r failed", action)
