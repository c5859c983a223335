"""Object Lock retention of a repository in S3 (design §3.7, ``FORMAT.md`` "Object Lock").

``repo init s3://… --object-lock-days N`` records the retention in the config; from then on every
chunk and manifest is written with a retain-until date N days ahead, in COMPLIANCE mode: nobody —
not the appliance's credentials, not the bucket's owner — can delete or shorten it before it ends,
which is the point of ransomware protection (GOVERNANCE mode could be bypassed by any credentials
holding ``s3:BypassGovernanceRetention``). The price: a retention set by mistake cannot be undone.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from .errors import RepoError

MODE = "COMPLIANCE"
DAY = 86400.0
#: Internal knob for the tests only: the seconds one "day" of ``--object-lock-days`` lasts, read by
#: ``init`` alone (the config records the retention in seconds, so every later command agrees).
DAY_ENV = "NBD_BACKUP_OBJECT_LOCK_DAY_SECONDS"


def day_seconds() -> float:
    text = os.environ.get(DAY_ENV)
    return float(text) if text else DAY


def config(days: int) -> dict[str, Any]:
    """What the repository config records."""
    if not isinstance(days, int) or days < 1:
        raise RepoError(f"--object-lock-days must be a positive number of days, not {days!r}")
    return {"mode": MODE, "days": days, "seconds": days * day_seconds()}


def retention_seconds(doc: Any, where: str) -> float:
    """The retention a config's ``object-lock`` entry describes (a RepoError if it is not one we know)."""
    if not isinstance(doc, dict) or doc.get("mode") != MODE:
        raise RepoError(f"{where}: unsupported object-lock setting {doc!r}")
    seconds = doc.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
        raise RepoError(f"{where}: invalid object-lock retention {seconds!r}")
    return float(seconds)


def refuse_local(where: str) -> RepoError:
    return RepoError(f"{where}: Object Lock needs a repository in S3 (a directory has no retention)", errno.EINVAL)
