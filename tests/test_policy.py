"""Every branch of the BlockdevOnError decision for jobs."""

from __future__ import annotations

import errno

import pytest

from backup.policy import ErrorAction, OnError, decide


@pytest.mark.parametrize("is_read", [True, False])
@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC, errno.EPERM, None])
def test_fixed_policies_ignore_errno_and_direction(err: int | None, is_read: bool) -> None:
    assert decide(OnError.REPORT, err, is_read=is_read) is ErrorAction.REPORT
    assert decide(OnError.IGNORE, err, is_read=is_read) is ErrorAction.IGNORE
    assert decide(OnError.STOP, err, is_read=is_read) is ErrorAction.STOP


@pytest.mark.parametrize("policy", [OnError.ENOSPC, OnError.AUTO])
@pytest.mark.parametrize("is_read", [True, False])
def test_enospc_and_auto_stop_only_on_enospc(policy: OnError, is_read: bool) -> None:
    assert decide(policy, errno.ENOSPC, is_read=is_read) is ErrorAction.STOP
    assert decide(policy, errno.EIO, is_read=is_read) is ErrorAction.REPORT
    assert decide(policy, errno.EDQUOT, is_read=is_read) is ErrorAction.REPORT
    assert decide(policy, None, is_read=is_read) is ErrorAction.REPORT


def test_accepts_qapi_strings_and_refuses_unknown() -> None:
    assert decide("enospc", errno.ENOSPC, is_read=False) is ErrorAction.STOP
    assert [p.value for p in OnError] == ["report", "ignore", "enospc", "stop", "auto"]
    assert [a.value for a in ErrorAction] == ["ignore", "report", "stop"]
    with pytest.raises(ValueError):
        decide("retry", errno.EIO, is_read=True)
