"""QEMU's ``BlockdevOnError`` policies for block jobs, as one pure decision function.

Semantics of QEMU 7.2 for *jobs* (``block_job_error_action``): ``report`` ends the job with the
error, ``ignore`` only emits ``BLOCK_JOB_ERROR`` and the job retries, ``stop`` pauses the job (user
visible, ``io-status`` set) until it is resumed and then retries, ``enospc`` stops on ENOSPC and
reports anything else. ``auto`` ("inherit the backend's policy") means the same as ``enospc`` for a
job. The direction (read/write) only labels the event's ``operation``; it never changes the action.
"""

from __future__ import annotations

import errno as errno_mod
from enum import StrEnum


class OnError(StrEnum):
    """``BlockdevOnError``: what a job's ``on-source-error`` / ``on-target-error`` asks for."""

    REPORT = "report"
    IGNORE = "ignore"
    ENOSPC = "enospc"
    STOP = "stop"
    AUTO = "auto"


class ErrorAction(StrEnum):
    """``BlockErrorAction``: what the job does about one failed request (the event's ``action``)."""

    IGNORE = "ignore"
    REPORT = "report"
    STOP = "stop"


def decide(policy: OnError | str, err: int | None, *, is_read: bool) -> ErrorAction:
    """The action for a failed request with errno ``err`` (None: a failure without an errno).

    ``is_read`` is accepted so callers pass the whole context; QEMU's decision does not depend on it.
    """
    del is_read  # the direction labels the event only
    policy = OnError(policy)
    if policy is OnError.REPORT:
        return ErrorAction.REPORT
    if policy is OnError.IGNORE:
        return ErrorAction.IGNORE
    if policy is OnError.STOP:
        return ErrorAction.STOP
    # ENOSPC and AUTO: a full target may be grown by the operator, anything else is fatal.
    return ErrorAction.STOP if err == errno_mod.ENOSPC else ErrorAction.REPORT
