"""The QMP monitor: asyncio transport around the framing parser and the command registry.

One session per client connection, each in QEMU's order of business: greeting, capabilities
negotiation (only ``qmp_capabilities`` until then), then commands executed one at a time in arrival
order (so replies come in request order) while events are interleaved between whole lines. Output
goes through a bounded per-session queue drained by its own task: a client that stops reading, or
disconnects mid-reply, is dropped without delaying the daemon or the other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from backup.events import Event
from nbd.peerlog import PeerLog
from nbd.unix_path import SocketFileId, remove_own_socket, remove_stale_socket, socket_file_id
from server.errors import QmpError
from server.qmp.dispatch import CommandRegistry, run_handler
from server.qmp.framing import MAX_TOKEN_SIZE, JsonError, JsonStreamParser, Message, encode
from server.qmp.schema import Enum, Struct, validate_arguments

log = logging.getLogger(__name__)

__all__ = ["QmpServer", "package_version"]

#: Output a client may leave unread before it is disconnected (QEMU buffers without bound; we don't).
MAX_PENDING_OUTPUT = 16 << 20
READ_CHUNK = 64 << 10
#: Clients served at once; more are disconnected right away (each one costs buffers and a task).
MAX_CLIENTS = 64
#: How long ``stop()`` lets sessions flush queued output (e.g. the reply to ``quit``).
STOP_FLUSH_TIMEOUT = 2.0

_CAPABILITIES_ARGS = Struct(None, {"*enable": [Enum("QMPCapability", ["oob"])]})
#: Capabilities we offer in the greeting. Out-of-band execution only matters for commands QEMU marks
#: allow-oob (migration recovery); none of ours are, so we offer none.
OFFERED_CAPABILITIES: tuple[str, ...] = ()
_REQUEST_KEYS = ("execute", "arguments", "id")


def package_version() -> str:
    try:
        return version("nbd-backup")
    except PackageNotFoundError:
        return "0.0.0"


def version_info(text: str) -> dict[str, Any]:
    """``query-version``'s return (and the greeting's ``version``), in QEMU's member order."""
    nums = [int(part) if part.isdigit() else 0 for part in [*text.split("."), "0", "0", "0"][:3]]
    return {"qemu": {"micro": nums[2], "minor": nums[1], "major": nums[0]}, "package": f"nbd-backup {text}"}


def event_message(event: Event) -> dict[str, Any]:
    """The wire form of an event, members in QEMU's order (timestamp, event, data)."""
    micros = round(event.timestamp * 1_000_000)
    seconds, microseconds = divmod(micros, 1_000_000)
    msg: dict[str, Any] = {"timestamp": {"seconds": seconds, "microseconds": microseconds}, "event": event.name}
    if event.data is not None:
        msg["data"] = event.data
    return msg


def _error(desc: str, error_class: str, request_id: Any, has_id: bool) -> dict[str, Any]:
    # QEMU puts "id" first in errors and last in returns; clients don't care, diffs read better.
    body = {"class": error_class, "desc": desc}
    return {"id": request_id, "error": body} if has_id else {"error": body}


class QmpServer:
    """QMP over unix sockets (mode 0600) and TCP, for any number of clients at once.

    ``registry`` holds the commands; ``context`` is passed to every handler as ``ctx``. The core
    commands ``query-version``, ``query-commands`` and ``quit`` are added to the registry unless it
    already has them; ``quit`` replies, then calls ``on_quit`` (the daemon's "please stop"), or
    ``context.request_stop()`` when no ``on_quit`` is given.
    """

    def __init__(
        self,
        registry: CommandRegistry,
        context: Any,
        *,
        on_quit: Callable[[], object] | None = None,
        version: str | None = None,
        max_message_size: int | None = None,
        max_pending_output: int = MAX_PENDING_OUTPUT,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.registry = registry
        self.context = context
        self.version = version or package_version()
        self.max_message_size = max_message_size
        self.max_pending_output = max_pending_output
        self.max_clients = max_clients
        self._on_quit = on_quit
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[tuple[str, SocketFileId | None]] = []
        self._sessions: set[_Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._install_core_commands()

    # --- listening ---

    async def listen_unix(self, path: str | os.PathLike[str]) -> str:
        """Listen on a unix socket created with mode 0600 (a stale socket file is replaced, a live one
        is refused: see ``nbd.unix_path``)."""
        path = os.fspath(path)
        remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o177)  # no window where the socket is group/world accessible
            try:
                sock.bind(path)
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)
            server = await asyncio.start_unix_server(self._on_connect, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._servers.append(server)
        self._unix_paths.append((path, socket_file_id(path)))
        log.info("QMP monitor listening on unix:%s", path)
        return path

    async def listen_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on TCP; returns the bound address (``port=0`` picks a free one)."""
        server = await asyncio.start_server(self._on_connect, host, port, reuse_address=True)
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        log.info("QMP monitor listening on tcp:%s:%s", bound[0], bound[1])
        return bound[0], bound[1]

    async def listen_socket(self, sock: socket.socket) -> None:
        """Serve on a socket bound by someone else (systemd socket activation: its owner set the mode)."""
        if sock.family == socket.AF_UNIX:
            server = await asyncio.start_unix_server(self._on_connect, sock=sock)
        else:
            server = await asyncio.start_server(self._on_connect, sock=sock)
        self._servers.append(server)
        log.info("QMP monitor listening on passed socket %s", sock.getsockname())

    @property
    def client_count(self) -> int:
        return len(self._sessions)

    # --- events ---

    def broadcast(self, event: Event) -> None:
        """Queue an event for every client past negotiation (synchronous: usable as an EventBus subscriber)."""
        if not self._sessions:
            return
        line = encode(event_message(event))
        for session in list(self._sessions):
            if session.negotiated:
                session.send_line(line)

    # --- shutdown ---

    async def stop(self) -> None:
        """Stop listening, let queued output (e.g. the reply to ``quit``) flush briefly, close every client."""
        self._closing = True
        for server in self._servers:
            server.close()
        for path, own in self._unix_paths:
            remove_own_socket(path, own)
        sessions = list(self._sessions)
        if sessions:
            flushing = [asyncio.ensure_future(s.flush()) for s in sessions]
            _, unflushed = await asyncio.wait(flushing, timeout=STOP_FLUSH_TIMEOUT)
            for future in unflushed:  # a client that does not read: its output is dropped below
                future.cancel()
        for session in sessions:
            session.close()  # their read loops see EOF and end
        tasks = list(self._tasks)
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=STOP_FLUSH_TIMEOUT)
            for task in stuck:  # a command still running: interrupt it
                task.cancel()
            if stuck:
                await asyncio.gather(*stuck, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        self._unix_paths.clear()

    # --- sessions ---

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing or len(self._sessions) >= self.max_clients:
            if not self._closing:
                log.warning("QMP: %d clients already connected; refusing another", len(self._sessions))
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        session = _Session(self, reader, writer)
        self._sessions.add(session)
        try:
            await session.run()
        except asyncio.CancelledError:
            if not self._closing:
                raise
            # stop() interrupted a command: end this connection task quietly.
        except (ConnectionError, OSError) as exc:
            session.log.debug("gone: %s", exc)
        except Exception:
            session.log.exception("session failed")
        finally:
            self._sessions.discard(session)
            self._tasks.discard(task)
            session.close()
            await session.wait_closed()

    def greeting(self) -> dict[str, Any]:
        return {"QMP": {"version": version_info(self.version), "capabilities": list(OFFERED_CAPABILITIES)}}

    # --- core commands ---

    def _install_core_commands(self) -> None:
        reg = self.registry

        if "query-version" not in reg:

            async def query_version(ctx: Any, args: dict[str, Any]) -> Any:
                """Return the server's version (QEMU-compatible shape; ``package`` names nbd-backup)."""
                return version_info(self.version)

            reg.register("query-version", query_version)

        if "query-commands" not in reg:

            async def query_commands(ctx: Any, args: dict[str, Any]) -> Any:
                """List the commands this monitor accepts."""
                return [{"name": name} for name in ["qmp_capabilities", *reg.names()]]

            reg.register("query-commands", query_commands)

        if "quit" not in reg:

            async def quit_(ctx: Any, args: dict[str, Any]) -> Any:
                """Ask the daemon to shut down cleanly (jobs are finished or cancelled first)."""
                callback = self._on_quit or getattr(ctx, "request_stop", None)
                if callback is None:
                    raise QmpError("This server cannot be stopped over QMP", "GenericError")
                # Reply first (as QEMU does); the callback typically schedules the shutdown.
                asyncio.get_running_loop().call_soon(callback)
                return {}

            reg.register("quit", quit_)


class _Session:
    def __init__(self, server: QmpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        peer = writer.get_extra_info("peername")
        self.peer = str(peer) if peer else "unix"
        self.log = PeerLog(log, "QMP client", self.peer)
        self.parser = JsonStreamParser(max_size=server.max_message_size or MAX_TOKEN_SIZE)
        self._out: asyncio.Queue[bytes] = asyncio.Queue()
        self._out_bytes = 0
        self._closed = False
        self._writer_task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        self._writer_task = asyncio.create_task(self._write_loop(), name=f"qmp-writer-{self.peer}")
        self.send(self.server.greeting())
        while not self._closed:
            data = await self.reader.read(READ_CHUNK)
            if not data:
                # The client half-closed (``socat`` does after its last request): let the replies out.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STOP_FLUSH_TIMEOUT):
                        await self.flush()
                return
            for message in self.parser.feed(data):
                reply = await self.handle(message)
                if not self._closed:
                    self.send_line(reply)

    def send(self, obj: Any) -> None:
        self.send_line(encode(obj))

    def send_line(self, line: bytes) -> None:
        if self._closed:
            return
        if self._out_bytes + len(line) > self.server.max_pending_output:
            self.log.warning("does not read its output; disconnecting it")
            self.close(abort=True)
            return
        self._out_bytes += len(line)
        self._out.put_nowait(line)

    async def _write_loop(self) -> None:
        try:
            while True:
                line = await self._out.get()
                try:
                    self.writer.write(line)
                    self._out_bytes -= len(line)
                    if self._out.empty():
                        await self.writer.drain()
                finally:
                    self._out.task_done()  # also when the write failed: flush() must not wait for it
        except (ConnectionError, OSError) as exc:
            self.log.debug("write failed: %s", exc)
            self._closed = True
            self.writer.transport.abort()
            # Unblock flush() waiters.
            while not self._out.empty():
                self._out.get_nowait()
                self._out.task_done()

    async def flush(self) -> None:
        if not self._closed:
            await self._out.join()

    def close(self, *, abort: bool = False) -> None:
        """Close the connection; unsent output is discarded (a plain close would wait for a client
        that may never read it)."""
        self._closed = True
        if self._writer_task is not None:
            self._writer_task.cancel()
        if abort or self.writer.transport.get_write_buffer_size():
            self.writer.transport.abort()
        else:
            self.writer.close()

    async def wait_closed(self) -> None:
        if self._writer_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer_task
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    # --- one request ---

    async def handle(self, message: Message) -> bytes:
        """The reply line to one input message (every message gets exactly one)."""
        if isinstance(message, JsonError):
            return encode(_error(message.desc, "GenericError", None, False))
        request = message.value
        if not isinstance(request, dict):
            return encode(_error("QMP input must be a JSON object", "GenericError", None, False))
        has_id = "id" in request
        request_id = request.get("id")
        try:
            result = await self._execute(request)
        except QmpError as exc:
            return encode(_error(exc.desc, exc.error_class, request_id, has_id))
        reply: dict[str, Any] = {"return": result}
        if has_id:
            reply["id"] = request_id
        try:
            return encode(reply)
        except (TypeError, ValueError) as exc:
            log.error("QMP reply is not JSON-serialisable: %r", result)
            return encode(_error(f"Internal error: reply is not JSON: {exc}", "GenericError", request_id, has_id))

    async def _execute(self, request: dict[str, Any]) -> Any:
        for key, value in request.items():
            if key == "execute":
                if not isinstance(value, str):
                    raise QmpError("QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QmpError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise QmpError(f"QMP input member '{key}' is unexpected")
        if "execute" not in request:
            raise QmpError("QMP input lacks member 'execute'")
        name: str = request["execute"]
        arguments: dict[str, Any] = request.get("arguments", {})
        if name == "qmp_capabilities":
            args = validate_arguments(_CAPABILITIES_ARGS, arguments)  # QEMU validates first
            if self.negotiated:
                raise QmpError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
            unavailable = [cap for cap in args.get("enable", []) if cap not in OFFERED_CAPABILITIES]
            if unavailable:
                raise QmpError(f"Capability {', '.join(unavailable)} not available")
            self.negotiated = True
            return {}
        if not self.negotiated:
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
        cmd = self.server.registry.lookup(name)
        args = validate_arguments(cmd.args, arguments)
        return await run_handler(cmd, self.server.context, args)
