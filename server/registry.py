"""``Registry``: the daemon's state that QMP commands act on — block nodes, NBD exports, the NBD
server, jobs — and the event bus that reports on them.

Every check a command needs before its side effects lives here once, with qemu-storage-daemon
7.2's error texts (clients and our differential tests compare them): node and job names, lookups,
"in use" refusals. The command handlers in ``server.qmp`` only translate QMP arguments into these calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from backup.events import EventBus
from backup.job import Job, JobStatus
from backup.node import BlockNode
from backup.repo.repository import Repository
from nbd.constants import MAX_STRING
from nbd.device import backing_of
from nbd.server import DEFAULT_LIMITS, Export, ExportResolver, NbdServer, ServerLimits
from nbd.stats import NbdStats
from nbd.tls import ServerTls
from nbd.uri import NbdUri
from server import export_bitmaps
from server.activation import describe
from server.addresses import show_tcp
from server.errors import QmpError
from server.objects import ObjectStore
from server.paths import PathPolicy

log = logging.getLogger(__name__)

#: QEMU's ``id_wellformed``: a letter, then letters, digits, '-', '.', '_'.
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
#: How long shutdown waits for cancelled jobs to conclude before giving up on them.
JOB_CANCEL_TIMEOUT = 10.0


def id_wellformed(name: str) -> bool:
    return bool(_ID_RE.match(name))


def generic(desc: str) -> QmpError:
    return QmpError(desc, "GenericError")


@dataclass
class BlockExport:
    """A ``block-export-add``: the QMP id, the node, and the NBD export serving it."""

    id: str
    node: BlockNode
    export: Export

    @property
    def name(self) -> str:
        return self.export.name

    def info(self) -> dict[str, Any]:
        """``BlockExportInfo`` of query-block-exports (QEMU's member order)."""
        return {"node-name": self.node.name, "shutting-down": False, "type": "nbd", "id": self.id}


class Registry:
    """Nodes by node-name, exports by id, the NBD server (when started), jobs by id, the event bus."""

    def __init__(
        self,
        *,
        paths: PathPolicy | None = None,
        events: EventBus | None = None,
        limits: ServerLimits = DEFAULT_LIMITS,
        tls: ServerTls | None = None,
    ) -> None:
        self.paths = paths or PathPolicy()
        #: The NBD server's TLS (``serve --tls``); ``start_nbd`` uses it unless given its own.
        self.tls = tls
        self.events = events or EventBus()
        self.limits = limits
        self.nodes: dict[str, BlockNode] = {}
        self.exports: dict[str, BlockExport] = {}
        self.jobs: dict[str, Job] = {}
        self.nbd: NbdServer | None = None
        self.nbd_stats: NbdStats | None = None  # given to the NBD server when it starts (``--metrics``)
        self.nbd_addresses: list[str] = []
        #: ``object-add`` objects (TLS credentials, authorizers) and the credentials id the NBD server uses.
        self.objects = ObjectStore()
        self.nbd_tls_creds: str | None = None
        #: Backup repositories by id (``serve --repo``), for the ``repo-*`` commands.
        self.repos: dict[str, Repository] = {}
        #: Exports the NBD server resolves by name besides the added ones (``--repo-exports``).
        self.export_resolver: ExportResolver | None = None
        #: Per job, what to release when it is gone (target nodes it holds, targets it opened).
        self._job_cleanup: dict[str, list[Callable[[], object]]] = {}
        self._unsubscribe = self.events.subscribe(self._on_event)
        #: Called by ``quit``; the daemon sets it.
        self.stop_requested: Callable[[], None] | None = None
        #: Set once shutdown began: no new jobs.
        self.closing = False
        #: What went wrong while shutting down (reported by the daemon's exit status).
        self.shutdown_errors: list[str] = []

    def request_stop(self) -> None:
        """QMP ``quit``: ask the daemon to shut down (after the reply is sent)."""
        if self.stop_requested is not None:
            self.stop_requested()

    # --- nodes -----------------------------------------------------------------------------------

    def check_new_node_name(self, name: str | None) -> str:
        """Validate a node-name for ``blockdev-add`` before anything is opened."""
        if name is None:
            raise generic("'node-name' must be specified for the root node")
        if not id_wellformed(name):
            raise generic(f"Invalid node-name: '{name}'")
        if name in self.nodes:
            raise generic(f"Duplicate nodes with node-name='{name}'")
        return name

    def add_node(self, node: BlockNode) -> BlockNode:
        self.check_new_node_name(node.name)
        self.nodes[node.name] = node
        log.info(
            "node '%s' added: %s %s",
            node.name,
            node.driver,
            node.filename or "",
            extra=_node_fields("node-added", node),
        )
        return node

    def node(self, name: str) -> BlockNode:
        """Look a node up by name, with the error text of QEMU's ``bdrv_lookup_bs``."""
        try:
            return self.nodes[name]
        except KeyError:
            raise generic(f"Cannot find device='{name}' nor node-name='{name}'") from None

    async def remove_node(self, name: str) -> None:
        """``blockdev-del``: refuse while anything (export, job, parent node) uses it, else close it."""
        node = self.nodes.get(name)
        if node is None:
            raise generic(f"Failed to find node with node-name='{name}'")
        # QEMU's checks in QEMU's order: an export, then a job's blocker, then a parent node
        if any(isinstance(user, Export) for user in node.users):
            raise generic(f"Node {name} is in use")
        job = next((user for user in node.users if isinstance(user, Job)), None)
        if job is not None:
            raise generic(f"Node '{name}' is busy: block device is in use by block job: {job.type}")
        parent = next((u for u in node.users if isinstance(u, BlockNode) and backing_of(u.image) is node), None)
        if parent is not None:  # a qcow2 node reads through it (``backing``: a fleecing overlay)
            raise generic(f"Node '{name}' is busy: node is used as backing hd of '{parent.name}'")
        if node.users:
            raise generic(f"Block device {name} is in use")
        del self.nodes[name]
        log.info("node '%s' removed", name, extra=_node_fields("node-removed", node))
        for other in self.nodes.values():  # the nodes it was built on are free again
            other.release(node)
        if isinstance(node.device, BlockNode):  # a format node over a node: the child stays open
            return
        try:
            if not node.read_only and not getattr(node, "discard_on_close", False):
                await node.device.flush()
        finally:
            await node.close()

    def filename_in_use(self, real_path: str) -> BlockNode | None:
        """The node whose image is ``real_path`` (a backup target must not be an open image)."""
        for node in self.nodes.values():
            if node.filename is None:
                continue
            try:
                if os.path.samefile(node.filename, real_path):
                    return node
            except OSError:
                continue
        return None

    def own_export_node(self, uri: NbdUri) -> BlockNode | None:
        """The node behind ``uri`` when it names one of our own exports (a loopback target)."""
        if self.nbd is None:
            return None
        if uri.socket is not None:
            ours = f"unix:{uri.socket}" in self.nbd_addresses
        else:
            local = uri.host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::", None, "")
            ports = {a.rpartition(":")[2] for a in self.nbd_addresses if not a.startswith("unix:")}
            ours = local and str(uri.port) in ports
        if not ours:
            return None
        for entry in self.exports.values():
            if entry.name == uri.export or (uri.export == "" and len(self.exports) == 1):
                return entry.node
        return None

    # --- the NBD server --------------------------------------------------------------------------

    async def start_nbd(
        self,
        *,
        tcp: Iterable[tuple[str, int]] = (),
        unix: Iterable[str] = (),
        max_connections: int | None = None,
        tls: ServerTls | None = None,
        sockets: Iterable[socket.socket] = (),
    ) -> list[str]:
        """Start the NBD server listening on every address (``nbd-server-start`` / ``--nbd``) and on the
        ``sockets`` passed by systemd, with ``tls`` (default: the daemon's ``--tls`` settings)."""
        if self.nbd is not None:
            raise generic("NBD server already running")
        limits = replace(self.limits, max_connections=max_connections) if max_connections else self.limits
        server = NbdServer(limits=limits, tls=tls if tls is not None else self.tls)
        server.resolver = self.export_resolver
        server.stats = self.nbd_stats
        added: list[str] = []
        try:
            for host, port in tcp:
                added.append(show_tcp(*await server.listen_tcp(host, port)))
            for path in unix:
                await server.listen_unix(path)
                added.append(f"unix:{path}")
            for sock in sockets:
                await server.listen_socket(sock)
                added.append(describe(sock))
        except OSError as exc:
            await server.stop()
            raise generic(f"Failed to listen for NBD clients: {exc.strerror or exc}") from exc
        self.nbd = server
        self.nbd_addresses = added
        return added

    async def stop_nbd(self) -> None:
        """``nbd-server-stop``: every NBD export goes (BLOCK_EXPORT_DELETED each), then the server."""
        server = self.nbd
        if server is None:
            raise generic("NBD server not running")
        for export_id in list(self.exports):
            self._drop_export(export_id)
        self.nbd = None
        self.nbd_addresses = []
        self.nbd_tls_creds = None
        await server.stop()

    # --- exports ---------------------------------------------------------------------------------

    def add_export(
        self,
        export_id: str,
        node_name: str,
        *,
        name: str | None = None,
        writable: bool = False,
        description: str = "",
        bitmaps: Sequence[export_bitmaps.BitmapRef] = (),
        allocation_depth: bool = False,
    ) -> BlockExport:
        """``block-export-add`` type nbd, with QEMU's checks in QEMU's order; ``bitmaps`` (names of
        the node's dirty bitmaps) are published as meta contexts and busy while exported."""
        if not id_wellformed(export_id):
            raise generic(f"Invalid block export id '{export_id}'")
        if export_id in self.exports:
            raise generic(f"Block export id '{export_id}' is already in use")
        node = self.nodes.get(node_name)
        if node is None:
            raise generic(f"Cannot find device='' nor node-name='{node_name}'")
        if writable and node.read_only:
            raise generic("Cannot export read-only node as writable")
        if self.nbd is None:
            raise generic("NBD server not running")
        export_name = node_name if name is None else name
        if len(export_name.encode()) > MAX_STRING:
            raise generic(f"export name '{export_name}' too long")
        if description and len(description.encode()) > MAX_STRING:
            raise generic(f"description '{description}' too long")
        if export_name in self.nbd.exports:
            raise generic(f"NBD server already has export named '{export_name}'")
        found = export_bitmaps.find(node, bitmaps, self.nodes, read_only=not writable)
        export = Export(
            export_name,
            node,
            writable=writable,
            description=description,
            bitmaps=found,
            allocation_depth=allocation_depth,
        )
        self.nbd.add_export(export)
        export_bitmaps.claim(found)
        entry = BlockExport(export_id, node, export)
        self.exports[export_id] = entry
        log.info(
            "export '%s' added: node '%s', %s",
            export_name,
            node_name,
            "writable" if writable else "read-only",
            extra={
                "event": "export-added",
                "export": export_name,
                "id": export_id,
                "node": node_name,
                "writable": writable,
            },
        )
        return entry

    def remove_export(self, export_id: str, *, mode: str = "safe") -> None:
        """``block-export-del``: ``safe`` refuses while clients are connected, ``hard`` drops them."""
        entry = self.exports.get(export_id)
        if entry is None:
            raise generic(f"Export '{export_id}' is not found")
        if mode == "safe" and self.nbd is not None and self.nbd.connection_count(entry.name) > 0:
            raise generic(f"export '{export_id}' still in use")
        self._drop_export(export_id)

    def _drop_export(self, export_id: str) -> None:
        entry = self.exports.pop(export_id)
        log.info(
            "export '%s' removed", entry.name, extra={"event": "export-removed", "export": entry.name, "id": export_id}
        )
        export_bitmaps.release(entry.export.bitmaps)
        if self.nbd is not None:
            with contextlib.suppress(KeyError):
                self.nbd.remove_export(entry.name)
        self.events.emit("BLOCK_EXPORT_DELETED", {"id": export_id})

    # --- jobs ------------------------------------------------------------------------------------

    def check_new_job_id(self, job_id: str) -> str:
        if self.closing:
            raise generic("nbd-backup is shutting down: no new jobs")
        if not id_wellformed(job_id):
            raise generic(f"Invalid job ID '{job_id}'")
        if job_id in self.jobs:
            raise generic(f"Job ID '{job_id}' already in use")
        return job_id

    def add_job(self, job: Job, *, cleanup: Iterable[Callable[[], object]] = ()) -> None:
        """Track a created job until it reaches ``null``; ``cleanup`` callables run then."""
        self.jobs[job.id] = job
        self._job_cleanup[job.id] = list(cleanup)

    def block_job(self, job_id: str) -> Job:
        """A job for the ``block-job-*`` commands (QEMU: DeviceNotActive)."""
        job = self.jobs.get(job_id)
        if job is None or not job.is_block_job:
            raise QmpError(f"Block job '{job_id}' not found", "DeviceNotActive")
        return job

    def job(self, job_id: str) -> Job:
        """A job for the ``job-*`` commands (QEMU: GenericError "Job not found")."""
        job = self.jobs.get(job_id)
        if job is None:
            raise generic("Job not found")
        return job

    def _on_event(self, event: Any) -> None:
        if event.name == "JOB_STATUS_CHANGE" and event.data.get("status") == JobStatus.NULL:
            self.forget_job(event.data["id"])

    def forget_job(self, job_id: str) -> None:
        """The job is gone (``null``): drop it and release what it held."""
        self.jobs.pop(job_id, None)
        for release in self._job_cleanup.pop(job_id, []):
            try:
                result = release()
                if asyncio.iscoroutine(result):
                    task = asyncio.get_running_loop().create_task(result)
                    task.add_done_callback(_log_task_failure)
            except Exception:
                log.exception("releasing the resources of job %s failed", job_id)

    async def cancel_jobs(self, timeout: float = JOB_CANCEL_TIMEOUT) -> None:
        """Shutdown: cancel every job that still works (its events go out), wait for them to conclude."""
        self.closing = True
        waiting: list[Job] = []
        for job in list(self.jobs.values()):
            if job.status in (JobStatus.CONCLUDED, JobStatus.NULL):
                continue
            try:
                job.cancel(force=True)
            except Exception as exc:  # a verb its state refuses (already finishing): just wait
                log.debug("job %s: cancel at shutdown refused: %s", job.id, exc)
            waiting.append(job)
        if waiting:
            _, pending = await asyncio.wait([asyncio.ensure_future(j.wait()) for j in waiting], timeout=timeout)
            for fut in pending:
                fut.cancel()
            if pending:
                self._shutdown_error(f"{len(pending)} job(s) did not stop within {timeout:.0f} s")
        for job_id in list(self.jobs):
            self.forget_job(job_id)

    # --- shutdown --------------------------------------------------------------------------------

    async def close(self) -> None:
        """Cancel jobs, stop the NBD server, flush and close every node (parents before children)."""
        await self.cancel_jobs()
        if self.nbd is not None:
            server, self.nbd = self.nbd, None
            self.exports.clear()
            await server.stop()
        self.exports.clear()
        for name in _close_order(self.nodes):
            node = self.nodes.pop(name)
            if isinstance(node.device, BlockNode):
                continue  # closed through the child node
            try:
                if not node.read_only and not getattr(node, "discard_on_close", False):
                    await node.device.flush()  # an uncommitted repository snapshot is dropped instead
            except Exception as exc:
                self._shutdown_error(f"flushing node '{name}' failed: {exc}")
            try:
                await node.close()
            except Exception as exc:
                self._shutdown_error(f"closing node '{name}' failed: {exc}")
        self._unsubscribe()

    def _shutdown_error(self, message: str) -> None:
        log.error("%s", message)
        self.shutdown_errors.append(message)


def _node_fields(event: str, node: BlockNode) -> dict[str, Any]:
    return {"event": event, "node": node.name, "driver": node.driver, "image": node.filename}


def same_image(a: BlockNode, b: BlockNode) -> bool:
    """Whether two nodes end on the same opened image (a format node over a file node, or the same)."""

    return a.image is b.image or (a.filename is not None and a.filename == b.filename)


def _close_order(nodes: dict[str, BlockNode]) -> list[str]:
    """Nodes whose device is another node first, so a child is closed after its parents."""
    return sorted(nodes, key=lambda name: 0 if isinstance(nodes[name].device, BlockNode) else 1)


def _log_task_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("releasing job resources failed: %s", task.exception())
