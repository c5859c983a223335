"""QMP repository commands (design §3.6): ``repo-snapshot-begin``/``-commit``/``-abort``/``-open`` and
``query-repo-snapshots``.

``repo-snapshot-begin`` makes a writable block node over a ``SnapshotWriter`` (it reads as its parent,
or zeroes): a ``blockdev-backup`` target, or through ``block-export-add writable`` an NBD export that
QEMU or any client pushes into. Only ``repo-snapshot-commit`` publishes it; every other way a node
goes (``repo-snapshot-abort``, ``blockdev-del``, the daemon stopping, a crash) leaves nothing
published, because closing a writer that was not committed aborts it. Commit and abort are refused
while an export or a job uses the node, so a snapshot is never published under a writer. One
writable snapshot per disk: the repository's disk lock says so across processes, the check here
says it first with the node's name. ``repo-snapshot-open`` makes a read-only node (instant restore).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from backup.job import Job
from backup.node import BlockNode
from backup.repo.errors import DiskBusy, RepoError, SnapshotNotFound
from backup.repo.names import validate_disk, validate_snapshot_id
from backup.repo.repository import Repository
from nbd.server import Export
from server.qmp.dispatch import CommandRegistry
from server.registry import Registry, generic
from server.repo_totals import totals
from server.repos import pick_repo

log = logging.getLogger(__name__)

DRIVER = "repo-snapshot"
#: Our own commands (QEMU has none of these: differential tests against QEMU leave them out).
COMMANDS = (
    "repo-snapshot-begin",
    "repo-snapshot-commit",
    "repo-snapshot-abort",
    "repo-snapshot-open",
    "query-repo-snapshots",
)


def _check_disk(disk: str) -> str:
    try:
        return validate_disk(disk)
    except RepoError:
        raise generic(
            f"Invalid disk name '{disk}': 1-8 segments of [A-Za-z0-9._-] separated by '/', none starting with '.'"
        ) from None


def _check_ref(member: str, value: str, *, none: bool) -> str:
    """``latest``, a snapshot id, or (for a parent) ``none``."""
    if value == "latest" or (none and value == "none"):
        return value
    try:
        return validate_snapshot_id(value)
    except RepoError:
        choices = "'latest', 'none' or a snapshot id" if none else "'latest' or a snapshot id"
        raise generic(f"Parameter '{member}' expects {choices}") from None


def _filename(repo_id: str, disk: str, snapshot: str) -> str:
    return "json:" + json.dumps({"driver": DRIVER, "repo": repo_id, "disk": disk, "snapshot": snapshot})


class SnapshotNode(BlockNode):
    """A block node over a repository snapshot; knows which repository and disk it belongs to."""

    def __init__(self, name: str, device: Any, *, repo_id: str, disk: str, snapshot: str) -> None:
        super().__init__(name, device, driver=DRIVER, filename=_filename(repo_id, disk, snapshot))
        self.repo_id = repo_id
        self.disk = disk
        self.writable = snapshot == "new"
        #: Closing it drops what it holds (an uncommitted snapshot is aborted): no flush first.
        self.discard_on_close = self.writable
        self.finished = not self.writable  # committed or aborted on request

    async def close(self) -> None:
        if not self.finished:  # blockdev-del, the daemon stopping
            log.warning("node '%s': the snapshot of disk '%s' was never committed: aborted", self.name, self.disk)
            self.finished = True
        await super().close()


def _uncommitted(reg: Registry, name: str) -> SnapshotNode:
    node = reg.node(name)
    if not isinstance(node, SnapshotNode) or not node.writable:
        raise generic(f"Node '{name}' is not an uncommitted repository snapshot")
    export = next((u for u in node.users if isinstance(u, Export)), None)
    if export is not None:
        raise generic(f"Node '{name}' is in use by NBD export '{export.name}'")
    job = next((u for u in node.users if isinstance(u, Job)), None)
    if job is not None:
        raise generic(f"Node '{name}' is busy: block device is in use by block job: {job.type}")
    if node.users:
        raise generic(f"Block device {name} is in use")
    return node


def _unregister(reg: Registry, node: BlockNode) -> None:
    del reg.nodes[node.name]
    for other in reg.nodes.values():
        other.release(node)


async def begin(reg: Registry, args: dict[str, Any]) -> BlockNode:
    from backup.repo.device import SnapshotWriter

    repo_id, repo = pick_repo(reg.repos, args.get("repo"))
    name = reg.check_new_node_name(args["node-name"])
    disk = _check_disk(args["disk"])
    size = args["size"]
    if size <= 0:
        raise generic("Parameter 'size' expects a positive number of bytes")
    parent = _check_ref("parent", args.get("parent", "latest"), none=True)
    for node in reg.nodes.values():
        if isinstance(node, SnapshotNode) and node.writable and (node.repo_id, node.disk) == (repo_id, disk):
            raise generic(f"Disk '{disk}' of repository '{repo_id}' already has an uncommitted snapshot: '{node.name}'")
    try:
        writer = SnapshotWriter(repo, disk, size, parent)  # a lock and a manifest read: short
    except DiskBusy:
        raise generic(
            f"Disk '{disk}' of repository '{repo_id}' is busy: another backup or prune is writing it"
        ) from None
    except SnapshotNotFound:
        raise generic(f"Snapshot '{disk}@{parent}' not found in repository '{repo_id}'") from None
    except OSError as exc:
        raise generic(f"Could not begin a snapshot of disk '{disk}': {exc}") from exc
    node = SnapshotNode(name, writer, repo_id=repo_id, disk=disk, snapshot="new")
    try:
        return reg.add_node(node)  # the name may have been taken while the writer opened
    except BaseException:
        await writer.abort()
        raise


async def commit(reg: Registry, name: str) -> dict[str, Any]:
    node = _uncommitted(reg, name)
    writer = node.device
    _unregister(reg, node)  # from here on nobody else can reach it
    try:
        async with node.drained():
            manifest = await writer.commit()  # type: ignore[attr-defined]
    except OSError as exc:
        node.finished = True
        await node.close()  # aborts what did not commit
        raise generic(f"Could not commit the snapshot of disk '{node.disk}': {exc}; nothing was published") from exc
    node.finished = True
    await node.close()
    totals(node.repo_id).add_commit(manifest.stats)
    log.info(
        "repository '%s': snapshot %s@%s committed (%d bytes new)",
        node.repo_id,
        manifest.disk,
        manifest.id,
        int(manifest.stats.get("new-bytes", 0)),
        extra={
            "event": "snapshot-committed",
            "repo": node.repo_id,
            "disk": manifest.disk,
            "snapshot": manifest.id,
            "size": manifest.size,
            **manifest.stats,
        },
    )
    return {
        "disk": manifest.disk,
        "snapshot": manifest.id,
        "size": manifest.size,
        "new-bytes": int(manifest.stats.get("new-bytes", 0)),
    }


async def abort(reg: Registry, name: str) -> None:
    node = _uncommitted(reg, name)
    _unregister(reg, node)
    node.finished = True
    await node.close()
    totals(node.repo_id).aborted += 1
    log.info(
        "repository '%s': snapshot of disk '%s' aborted",
        node.repo_id,
        node.disk,
        extra={"event": "snapshot-aborted", "repo": node.repo_id, "disk": node.disk},
    )


async def open_snapshot(reg: Registry, args: dict[str, Any]) -> BlockNode:
    from backup.repo.device import SnapshotReader

    repo_id, repo = pick_repo(reg.repos, args.get("repo"))
    name = reg.check_new_node_name(args["node-name"])
    disk = _check_disk(args["disk"])
    snap = _check_ref("snapshot", args.get("snapshot", "latest"), none=False)
    try:
        manifest = await asyncio.to_thread(repo.resolve, disk, snap)
    except SnapshotNotFound:
        raise generic(f"Snapshot '{disk}@{snap}' not found in repository '{repo_id}'") from None
    except OSError as exc:
        raise generic(f"Could not open snapshot '{disk}@{snap}': {exc}") from exc
    node = SnapshotNode(name, SnapshotReader(repo, manifest), repo_id=repo_id, disk=disk, snapshot=manifest.id)
    return reg.add_node(node)


def list_snapshots(repo: Repository, disk: str | None) -> list[dict[str, Any]]:
    disks = [disk] if disk is not None else repo.disks()
    return [m.info() for d in disks for m in repo.snapshots(d)]


def register(commands: CommandRegistry) -> None:
    """Add the repository commands; handlers get the daemon's ``Registry`` as ``ctx``."""

    @commands.command(
        "repo-snapshot-begin",
        args={"*repo": "str", "disk": "str", "size": "size", "*parent": "str", "node-name": "str"},
    )
    async def repo_snapshot_begin(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Begin a writable snapshot of a disk (reads as its parent) as a block node."""
        await begin(reg, args)
        return {}

    @commands.command("repo-snapshot-commit", args={"node-name": "str"})
    async def repo_snapshot_commit(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Publish a begun snapshot (no export or job may use it); its node goes."""
        return await commit(reg, args["node-name"])

    @commands.command("repo-snapshot-abort", args={"node-name": "str"})
    async def repo_snapshot_abort(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Drop a begun snapshot without publishing it; its node goes."""
        await abort(reg, args["node-name"])
        return {}

    @commands.command(
        "repo-snapshot-open", args={"*repo": "str", "disk": "str", "*snapshot": "str", "node-name": "str"}
    )
    async def repo_snapshot_open(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Open a published snapshot as a read-only block node (instant restore)."""
        await open_snapshot(reg, args)
        return {}

    @commands.command("query-repo-snapshots", args={"*repo": "str", "*disk": "str"})
    async def query_repo_snapshots(reg: Registry, args: dict[str, Any]) -> list[dict[str, Any]]:
        """The published snapshots, oldest first per disk (as ``repo list --json``)."""
        _, repo = pick_repo(reg.repos, args.get("repo"))
        disk = _check_disk(args["disk"]) if "disk" in args else None
        try:
            return await asyncio.to_thread(list_snapshots, repo, disk)
        except OSError as exc:
            raise generic(f"Could not list the snapshots: {exc}") from exc
