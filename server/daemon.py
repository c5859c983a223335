"""``Daemon``: the long-running process — block nodes, the NBD server, the QMP monitor, jobs — until
SIGTERM/SIGINT or QMP ``quit``.

The state QMP commands act on lives in ``server.registry.Registry``; the daemon adds the listeners
and the process lifecycle. It is ready (every socket listening) before it writes ``--pid-file`` and
prints its ready line, so a supervisor or test can connect as soon as either appears. Shutdown is
orderly: running jobs are cancelled and their events reach the QMP clients, the monitor closes,
NBD clients are disconnected once their requests finish, and every image is flushed and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from backup.images import open_image
from backup.node import BlockNode
from nbd.device import format_name
from nbd.server import DEFAULT_LIMITS, Export, NbdServer, ServerLimits
from nbd.tls import ServerTls
from server.activation import describe
from server.addresses import parse_monitor_address, show_tcp
from server.errors import ShutdownError
from server.job_watch import JobWatch
from server.paths import PathPolicy
from server.qmp import bitmaps as bitmap_commands
from server.qmp import block as block_commands
from server.qmp import create as create_commands
from server.qmp import jobs as job_commands
from server.qmp import nbd as nbd_commands
from server.qmp import objects as object_commands
from server.qmp import repo as repo_commands
from server.qmp.dispatch import CommandRegistry
from server.qmp.server import QmpServer
from server.registry import Registry
from server.state import StateFile

if TYPE_CHECKING:
    from server.metrics import MetricsServer

log = logging.getLogger(__name__)

READY = "nbd-backup: ready"


def build_commands() -> CommandRegistry:
    """Every QMP command of the daemon (the monitor adds ``query-version``, ``query-commands``, ``quit``)."""
    commands = CommandRegistry()
    block_commands.register(commands)
    create_commands.register(commands)
    bitmap_commands.register(commands)
    nbd_commands.register(commands)
    job_commands.register(commands)
    object_commands.register(commands)
    repo_commands.register(commands)
    return commands


def probed_warning(path: str, name: str, driver: str, *, read_only: bool) -> str:
    """QEMU's warning for an image opened without a format, with what the probe restricts here."""
    text = f"Image format was not specified for '{path}' and probing guessed {driver} (export '{name}')."
    if driver == "raw" and read_only:
        return f"{text} Specify format=raw explicitly to silence this."
    if driver == "raw":
        restriction = "write operations on block 0 will be restricted"
    else:
        restriction = "an image naming a backing file is refused"
    return (
        f"{text} Automatically detecting the format is dangerous: {restriction}. "
        f"Specify format={driver} explicitly to remove the restrictions."
    )


class Daemon:
    """Registry + NBD server + QMP monitor; ``await run()`` serves until asked to stop, then shuts down."""

    def __init__(
        self,
        *,
        limits: ServerLimits = DEFAULT_LIMITS,
        paths: PathPolicy | None = None,
        pid_file: str | os.PathLike[str] | None = None,
        tls: ServerTls | None = None,
        state_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.registry = Registry(paths=paths, limits=limits, tls=tls)
        self.registry.stop_requested = self.request_stop
        self.nodes: dict[str, BlockNode] = self.registry.nodes
        self.commands = build_commands()
        #: ``--state-file``: read now (a corrupt file stops the start), restored by ``restore_state``.
        self.state = StateFile(state_file) if state_file is not None else None
        if self.state is not None:
            self.state.load()
            self.state.install(self.commands)
        self.qmp = QmpServer(self.commands, self.registry)
        self.registry.events.subscribe(self.qmp.broadcast)
        self.job_watch = JobWatch(self.registry.jobs)
        self.registry.events.subscribe(self.job_watch)
        self.metrics: MetricsServer | None = None  # ``listen_metrics``
        self.metrics_address: str | None = None
        self.qmp_addresses: list[str] = []
        self.pid_file = Path(pid_file) if pid_file is not None else None
        self._pid_written = False
        self._stop_event: asyncio.Event | None = None
        self._stop_requested = False
        self._closed = False

    # --- state (kept for the serve command and tests) ---------------------------------------------

    @property
    def nbd(self) -> NbdServer | None:
        return self.registry.nbd

    @property
    def nbd_addresses(self) -> list[str]:
        return self.registry.nbd_addresses

    async def open_node(
        self, name: str, path: str | os.PathLike[str], *, format: str | None = None, read_only: bool = False
    ) -> BlockNode:
        """Open an image as block node ``name`` (command-line exports: not subject to ``--allow-dir``)."""
        self.registry.check_new_node_name(name)
        device = await open_image(path, format=format, read_only=read_only)
        driver = format or format_name(device) or "raw"
        if format is None:
            log.warning(probed_warning(os.fspath(path), name, str(driver), read_only=read_only))
        node = BlockNode(name, device, driver=str(driver), filename=_realpath(path))
        return self.registry.add_node(node)

    def node(self, name: str) -> BlockNode:
        return self.registry.node(name)

    def export(
        self, node_name: str, *, name: str | None = None, writable: bool = True, description: str = ""
    ) -> Export:
        """Export a node over NBD as ``name`` (default the node's name); the export id is the name."""
        export_name = name if name is not None else node_name
        entry = self.registry.add_export(
            export_name, node_name, name=export_name, writable=writable, description=description
        )
        return entry.export

    async def restore_state(self) -> list[str]:
        """Set up again what the state file keeps (before QMP listens); returns the commands that failed."""
        if self.state is None:
            return []
        return await self.state.restore(self.registry, self.commands)

    # --- listening ---------------------------------------------------------------------------------

    async def listen_nbd(
        self, tcp: Iterable[tuple[str, int]] = (), unix: Iterable[str] = (), sockets: Iterable[socket.socket] = ()
    ) -> list[str]:
        """Start the NBD server on every address and passed socket; returns them as "HOST:PORT" / "unix:PATH"."""
        return await self.registry.start_nbd(tcp=tcp, unix=unix, sockets=sockets)

    async def listen_qmp(self, addresses: Iterable[str], sockets: Iterable[socket.socket] = ()) -> list[str]:
        """Open the QMP monitor on every ``unix:PATH`` / ``tcp:HOST:PORT`` and passed socket."""
        added = []
        for sock in sockets:
            await self.qmp.listen_socket(sock)
            added.append(describe(sock))
        for text in addresses:
            kind, where = parse_monitor_address(text)
            if kind == "unix":
                assert isinstance(where, str)
                path = await self.qmp.listen_unix(where)
                added.append(f"unix:{path}")
            else:
                assert isinstance(where, tuple)
                added.append("tcp:" + show_tcp(*await self.qmp.listen_tcp(*where)))
        self.qmp_addresses.extend(added)
        return added

    async def listen_metrics(self, host: str, port: int) -> str:
        """Serve Prometheus metrics on ``host:port`` (``--metrics``); the NBD server counts from now on."""
        from nbd.stats import NbdStats
        from server.metrics import MetricsServer, build_registry  # the metrics library only when asked

        stats = self.registry.nbd_stats = NbdStats()
        if self.registry.nbd is not None:
            self.registry.nbd.stats = stats
        self.metrics = MetricsServer(build_registry(self.registry, stats, self.job_watch))
        self.metrics_address = show_tcp(*await self.metrics.listen(host, port))
        return self.metrics_address

    # --- running -----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop_requested = True
        if self._stop_event is not None:
            self._stop_event.set()

    def ready_line(self) -> str:
        parts = [READY]
        if self.nbd_addresses:
            parts.append("nbd=" + ",".join(self.nbd_addresses))
        if self.registry.exports:
            parts.append("exports=" + ",".join(e.name for e in self.registry.exports.values()))
        if self.registry.repos:
            parts.append("repos=" + ",".join(f"{i}:{r.path}" for i, r in self.registry.repos.items()))
        if self.qmp_addresses:
            parts.append("qmp=" + ",".join(self.qmp_addresses))
        if self.metrics_address:
            parts.append("metrics=" + self.metrics_address)
        parts.append(f"pid={os.getpid()}")
        return " ".join(parts)

    def announce_ready(self) -> None:
        """Write the pid file, then print the ready line on stderr: everything is listening by now."""
        if self.pid_file is not None:
            write_pid_file(self.pid_file)
            self._pid_written = True
        print(self.ready_line(), file=sys.stderr, flush=True)

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or ``request_stop``/``quit``), then shut down."""
        loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._stop_requested:
            self._stop_event.set()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
                installed.append(sig)
        try:
            self.announce_ready()
            await self._stop_event.wait()
            jobs = sum(1 for job in self.registry.jobs.values() if not job.is_completed)
            log.info("stopping (%d job(s) running)", jobs, extra={"event": "stopping", "jobs": jobs})
        finally:
            started = time.monotonic()
            try:
                await self.shutdown()
            except ShutdownError as exc:
                log.error("stopped with errors: %s", exc, extra={"event": "stopped", "ok": False, "error": str(exc)})
                raise
            finally:
                for sig in installed:
                    loop.remove_signal_handler(sig)
            seconds = round(time.monotonic() - started, 3)
            log.info("stopped cleanly in %.2f s", seconds, extra={"event": "stopped", "ok": True, "seconds": seconds})

    async def shutdown(self) -> None:
        """Cancel jobs (their events still reach QMP clients), close the monitor, stop NBD, flush and
        close every node, remove the pid file. Safe to call twice. Raises ``ShutdownError`` when an
        image could not be flushed or closed (or a job would not stop): the data may not be safe, so
        the process must not exit as if all went well."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.registry.cancel_jobs()
            await self.qmp.stop()
            await self.registry.close()
        finally:
            if self.metrics is not None:
                await self.metrics.stop()
            if self._pid_written and self.pid_file is not None:
                remove_pid_file(self.pid_file)
        if self.registry.shutdown_errors:
            raise ShutdownError("; ".join(self.registry.shutdown_errors))


def _realpath(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.fspath(path))


def write_pid_file(path: Path) -> None:
    """Write our pid atomically (a reader never sees an empty or partial file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove_pid_file(path: Path) -> None:
    """Remove the pid file if it is still ours (another instance may have replaced it)."""
    with contextlib.suppress(OSError):
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
