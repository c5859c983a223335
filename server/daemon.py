"""``Daemon``: the long-running process — block nodes, the NBD server — until SIGTERM/SIGINT.

It owns what outlives a single request: the named block nodes (opened images, with their filter
stacks) and the ``NbdServer`` exporting them. Shutdown is orderly: stop listening, let in-flight
requests finish, close the connections, then close the images (flushing them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterable

from backup.errors import InvalidArgument, NodeBusy, NodeNotFound
from backup.images import open_image
from backup.node import BlockNode
from nbd.server import Export, NbdServer

log = logging.getLogger(__name__)


class Daemon:
    """Nodes + NBD server; ``await run()`` serves until a stop signal and then shuts down cleanly."""

    def __init__(self, *, max_connections: int = 100, handshake_timeout: float = 10.0) -> None:
        self.nodes: dict[str, BlockNode] = {}
        self.nbd = NbdServer(max_connections=max_connections, handshake_timeout=handshake_timeout)
        self.nbd_addresses: list[str] = []  # "HOST:PORT" and "unix:PATH", in listening order
        self._stop_event: asyncio.Event | None = None
        self._closed = False

    # --- nodes and exports -------------------------------------------------------------------------

    async def open_node(
        self, name: str, path: str | os.PathLike[str], *, format: str | None = None, read_only: bool = False
    ) -> BlockNode:
        """Open an image as block node ``name``."""
        if name in self.nodes:
            raise InvalidArgument(f"Duplicate nodes with node-name='{name}'")
        device = await open_image(path, format=format, read_only=read_only)
        driver = format or getattr(device, "format_name", None) or type(device).__name__
        node = BlockNode(name, device, driver=str(driver), filename=os.fspath(path))
        self.nodes[name] = node
        return node

    def node(self, name: str) -> BlockNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise NodeNotFound(f"Cannot find device='{name}' nor node-name='{name}'") from None

    async def close_node(self, name: str) -> None:
        node = self.node(name)
        if node.users:
            raise NodeBusy(f"Node '{name}' is busy: {', '.join(sorted(map(repr, node.users)))}")
        del self.nodes[name]
        await node.close()

    def export(
        self, node_name: str, *, name: str | None = None, writable: bool = True, description: str = ""
    ) -> Export:
        """Export a node over NBD (as ``name``, default the node's name)."""
        node = self.node(node_name)
        export = Export(name if name is not None else node_name, node, writable=writable, description=description)
        self.nbd.add_export(export)
        return export

    # --- listening ---------------------------------------------------------------------------------

    async def listen_nbd(self, tcp: Iterable[tuple[str, int]] = (), unix: Iterable[str] = ()) -> list[str]:
        """Start the NBD server on every address; returns them as "HOST:PORT" / "unix:PATH"."""
        added = []
        for host, port in tcp:
            bound_host, bound_port = await self.nbd.listen_tcp(host, port)
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            added.append(f"{shown}:{bound_port}")
        for path in unix:
            await self.nbd.listen_unix(path)
            added.append(f"unix:{path}")
        self.nbd_addresses.extend(added)
        return added

    # --- running -----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()

    def ready_line(self) -> str:
        parts = ["nbd-backup: ready"]
        if self.nbd_addresses:
            parts.append("nbd=" + ",".join(self.nbd_addresses))
        if self.nbd.exports:
            parts.append("exports=" + ",".join(self.nbd.exports))
        return " ".join(parts)

    def announce_ready(self) -> None:
        """Print the ready line on stderr: everything is listening by now."""
        print(self.ready_line(), file=sys.stderr, flush=True)

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or ``request_stop``), then shut down."""
        loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
                installed.append(sig)
        try:
            self.announce_ready()
            await self._stop_event.wait()
            log.info("stopping")
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop the NBD server, then flush and close every node. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self.nbd.stop()
        for name, node in list(self.nodes.items()):
            try:
                if not node.read_only:
                    await node.device.flush()
            except OSError as exc:
                log.error("flushing node '%s' failed: %s", name, exc)
            try:
                await node.close()
            except OSError as exc:
                log.error("closing node '%s' failed: %s", name, exc)
        self.nodes.clear()
