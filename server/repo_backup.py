"""``nbd-backup backup --qmp ADDR DEVICE repo:[ID:]DISK [--bitmap NAME]``: a backup of a daemon's
block node into one of its repositories, as one snapshot.

``repo-snapshot-begin`` → ``blockdev-backup`` into the snapshot's node → ``repo-snapshot-commit``.
Without ``--bitmap`` the backup is full into a snapshot without parent (it starts as zeroes, so the
job skips the source's zero ranges). With ``--bitmap`` and a snapshot of the disk already there, it is
incremental: the snapshot begins as the latest one and ``sync=incremental`` copies only what the
bitmap marks. With ``--bitmap`` and no snapshot yet (or a node without that bitmap any more: a raw
image reopened, whose bitmaps do not persist), it is full and (re)starts the bitmap: one
``transaction`` adds the bitmap (when the node has none of that name, persistent on a qcow2 node)
beside the backup, or the backup takes the existing bitmap with ``bitmap-mode: on-success``, so the
bitmap then marks exactly what changed since this snapshot's instant. Whatever goes wrong (the job
fails, Ctrl-C) the job is cancelled and the snapshot aborted: nothing is published.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from typing import Any, TextIO

from backup.repo.errors import RepoError
from backup.repo.names import validate_disk
from server.errors import BackupFailed, ConfigError, QmpClientError
from server.job_follow import cancel, execute, follow
from server.progress import Progress
from server.qmp.client import QmpClient

PREFIX = "repo:"
#: How long cleaning up after a failure or Ctrl-C may take (cancel the job, abort the snapshot).
CLEANUP_TIMEOUT = 15.0


@dataclass(frozen=True)
class RepoTarget:
    repo: str | None
    disk: str

    def arguments(self) -> dict[str, Any]:
        return {"disk": self.disk} if self.repo is None else {"repo": self.repo, "disk": self.disk}

    def __str__(self) -> str:
        return f"{PREFIX}{self.repo + ':' if self.repo else ''}{self.disk}"


def parse_repo_target(text: str) -> RepoTarget | None:
    """``repo:[ID:]DISK`` (None for any other target)."""
    if not text.startswith(PREFIX):
        return None
    repo, sep, disk = text[len(PREFIX) :].rpartition(":")
    try:
        validate_disk(disk)
    except RepoError as exc:
        raise ConfigError(f"{text}: {exc}") from None
    if sep and not repo:
        raise ConfigError(f"{text}: empty repository id (repo:[ID:]DISK)")
    return RepoTarget(repo if sep else None, disk)


async def _execute(conn: QmpClient, name: str, arguments: dict[str, Any] | None = None) -> Any:
    return await execute(conn, name, arguments)


async def _node_info(conn: QmpClient, device: str) -> dict[str, Any]:
    for info in await _execute(conn, "query-named-block-nodes"):
        if info.get("node-name") == device:
            return dict(info)
    raise BackupFailed(f"no block node named '{device}'")


def backup_commands(
    device: str,
    node: str,
    job_id: str,
    *,
    bitmap: str | None,
    incremental: bool,
    has_bitmap: bool,
    qcow2: bool,
    speed: int = 0,
) -> tuple[str, dict[str, Any]]:
    """The QMP command that starts the job (see the module docstring for the choice)."""
    backup: dict[str, Any] = {"job-id": job_id, "device": device, "target": node, "sync": "full"}
    if speed:
        backup["speed"] = speed
    if bitmap is None:
        return "blockdev-backup", backup
    if incremental:
        return "blockdev-backup", backup | {"sync": "incremental", "bitmap": bitmap}
    if has_bitmap:
        return "blockdev-backup", backup | {"bitmap": bitmap, "bitmap-mode": "on-success"}
    add = {"node": device, "name": bitmap, "persistent": qcow2}
    actions = [
        {"type": "block-dirty-bitmap-add", "data": add},
        {"type": "blockdev-backup", "data": backup},
    ]
    return "transaction", {"actions": actions}


async def run_repo_backup(
    conn: QmpClient,
    device: str,
    target: RepoTarget,
    *,
    bitmap: str | None,
    job_id: str,
    progress: Progress | None,
    speed: int = 0,
    log: TextIO,
) -> dict[str, Any]:
    """Begin, back up, commit; returns ``repo-snapshot-commit``'s reply. Anything else aborts."""
    info = await _node_info(conn, device)
    size = int(info["image"]["virtual-size"])
    snapshots = await _execute(conn, "query-repo-snapshots", target.arguments())
    has_bitmap = any(b.get("name") == bitmap for b in info.get("dirty-bitmaps", []))
    incremental = bitmap is not None and bool(snapshots) and has_bitmap
    if bitmap is not None and snapshots and not has_bitmap:
        print(f"nbd-backup backup: {device} has no bitmap '{bitmap}' (any more): a full backup starts it", file=log)
    node = f"repo-backup-{os.getpid()}"
    begin = target.arguments() | {"size": size, "parent": "latest" if incremental else "none", "node-name": node}
    await _execute(conn, "repo-snapshot-begin", begin)
    started = False
    try:
        command, arguments = backup_commands(
            device,
            node,
            job_id,
            bitmap=bitmap,
            incremental=incremental,
            has_bitmap=has_bitmap,
            qcow2=info.get("drv") == "qcow2",
            speed=speed,
        )
        started = True  # from the request on, the job may exist
        await _execute(conn, command, arguments)
        await follow(conn, job_id, progress, log)
        started = False
        result: dict[str, Any] = await _execute(conn, "repo-snapshot-commit", {"node-name": node})
        return result
    except BaseException:
        with contextlib.suppress(BackupFailed, QmpClientError, OSError, ConnectionError, TimeoutError):
            async with asyncio.timeout(CLEANUP_TIMEOUT):
                if started:
                    with contextlib.suppress(BackupFailed):  # refused: the job is gone already
                        await cancel(conn, job_id)
                await _execute(conn, "repo-snapshot-abort", {"node-name": node})
        raise
