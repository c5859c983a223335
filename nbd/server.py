"""asyncio adapter of the NBD server: sockets in, ``ServerCore`` in the middle, block devices below.

Each connection is an ``asyncio.BufferedProtocol`` feeding its own ``ServerCore`` (no stream-reader
copies, no per-request ``readexactly`` awaits, write payloads received in place). Every validated
request starts at once and runs concurrently with the others, so many requests are in flight per
connection and replies go out in completion order. A reply is always written with one synchronous
``transport.write``/``writelines`` call, which makes the transport's buffer the write lock: replies
never interleave, and each request is answered exactly once (``_handle``).

Memory stays bounded whatever clients send or fail to read: every request is charged the bytes it
holds (read data, write payload, then its reply until the transport drains under its high-water
mark) against its connection's limits and the server's ``buffer_budget``; a request that does not
fit waits, with everything received after it, and reading pauses until it does. Sockets are bounded
too: per client address, silent ones make room when the server is full, negotiated ones are closed
when idle (``idle_timeout``) or stalled (``stall_timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import logging
import os
import socket
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from time import perf_counter
from types import MappingProxyType
from typing import Any, Protocol, cast

from nbd import constants as c
from nbd import meta
from nbd.constants import State, TransmissionFlag
from nbd.device import BlockDevice, Extent, allocation_depth, direct_read_fd, hold, release
from nbd.errors import errno_to_nbd
from nbd.meta import DirtyMap
from nbd.peerlog import PeerLog
from nbd.runs import append_run
from nbd.server_core import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    FLAG_DF,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_NO_HOLE,
    FLAG_REQ_ONE,
    META_CONTEXT_ID,
    Closed,
    Event,
    ExportEntry,
    Negotiated,
    Pending,
    Phase,
    Request,
    Resolve,
    ServerCore,
    SparePool,
    StartTls,
)
from nbd.stats import LATENCY_BOUNDS, ConnStats, NbdStats
from nbd.tls import ServerTls, peer_dn
from nbd.unix_path import SocketFileId, remove_own_socket, remove_stale_socket, socket_file_id

log = logging.getLogger(__name__)

SPARSE_READ_MIN = 64 * 1024  # reads at least this long ask the device for holes first
SENDFILE_MIN = int(os.environ.get("NBD_BACKUP_SENDFILE_MIN", 256 * 1024))  # 0: never sendfile
HANDSHAKE_BUFFER = 4096  # the receive buffer until an export is selected (option data is small)
RECEIVE_BUFFER = 256 * 1024  # ... and after (write payloads bypass it)
#: Right after a big write payload was received in place (``BIG_PAYLOAD_REST`` or more of it), the next
#: receive takes at most this much: the next request's header and the start of its payload, which goes
#: through the receive buffer and is copied (the rest lands in place). A full buffer there copied up to
#: 256 KiB of every big write (measured, nbdcopy's 256 KiB writes into a tmpfs export: the daemon's CPU
#: 57 -> 49 ticks per GiB, 1.15x the throughput, paired over 9 rounds). Small writes keep the full
#: buffer: theirs is the batching of many requests per receive (4 KiB random writes at half the IOPS
#: when every receive after a payload was small: the stream never got back in step).
AFTER_PAYLOAD_RECEIVE = 4096
BIG_PAYLOAD_REST = 64 * 1024
MAX_IN_FLIGHT = 64  # requests per connection before it stops starting more
MAX_IN_FLIGHT_BYTES = 64 << 20  # ... or bytes it holds: request data, write payloads, unsent replies
BUFFER_BUDGET = 256 << 20  # the same bytes, all connections together
WRITE_HIGH_WATER = 1 << 20  # unsent reply bytes before a connection stops starting requests
BATCH_BYTES = 256 << 10  # replies batched in one receive callback are written once this is reached
SPARE_BYTES = 64 << 20  # finished write payload buffers kept for reuse, all connections together
SPARE_COUNT = 64
STALL_TIMEOUT = 60.0  # seconds a client may hold buffers (unread replies, a partial payload) unmoving
MAX_DESCRIPTORS = 1 << 20  # the spec's cap on block status descriptors in one chunk
#: Connects queued before they are accepted (the kernel caps it at net.core.somaxconn): asyncio's default
#: of 100 refused a burst of unix-socket clients with EAGAIN (fio starting 128 jobs at once).
LISTEN_BACKLOG = socket.SOMAXCONN
#: A resolver's lookups at once (each may wait on object storage); more queue. Their own threads: in
#: asyncio's default executor, hung lookups would hold up the file I/O of every other export.
LOOKUP_THREADS = 4
_ZERO = int(State.ZERO)

#: What ``_run`` hands back: the reply's bytes, or None when it has been sent already (sendfile).
_Reply = bytes | Sequence[bytes | bytearray | memoryview] | None


class Export:
    """A named view of a block device over NBD (usually a ``BlockNode``, so filters can be inserted
    under a live export)."""

    def __init__(
        self,
        name: str,
        device: BlockDevice,
        *,
        writable: bool = True,
        description: str = "",
        bitmaps: Sequence[DirtyMap] = (),
        allocation_depth: bool = False,
        tls_only: bool = False,
        owns_device: bool = False,
    ) -> None:
        """``bitmaps`` are published as ``qemu:dirty-bitmap:NAME`` contexts and ``allocation_depth``
        as ``qemu:allocation-depth`` (see ``nbd.meta``). ``tls_only``: served only over TLS when the
        server offers TLS without requiring it (``tls`` mode ``on``). ``owns_device``: the export was made
        for one connection (by an ``ExportResolver``) and its device is closed when that connection ends."""
        if len(name.encode()) > c.MAX_STRING:
            raise ValueError(f"export name longer than {c.MAX_STRING} bytes")
        if len(description.encode()) > c.MAX_STRING:
            raise ValueError(f"export description longer than {c.MAX_STRING} bytes")
        self.name = name
        self.device = device
        self.writable = writable
        self.description = description
        self.bitmaps = tuple(bitmaps)
        self.allocation_depth = allocation_depth
        self.tls_only = tls_only
        self.contexts = meta.context_names(self.bitmaps, allocation_depth)
        self.owns_device = owns_device

    @property
    def read_only(self) -> bool:
        return not self.writable or self.device.read_only

    def entry(self) -> ExportEntry:
        """The export as the handshake presents it now (flags follow the device's current capabilities)."""
        device = self.device
        caps = device.capabilities
        limits = device.block_limits
        flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_DF
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            if caps.can_fua:
                flags |= TransmissionFlag.SEND_FUA
            if caps.can_trim:
                flags |= TransmissionFlag.SEND_TRIM
            if caps.can_zero:
                flags |= TransmissionFlag.SEND_WRITE_ZEROES
                if caps.can_fast_zero:
                    flags |= TransmissionFlag.SEND_FAST_ZERO
        if caps.can_flush:
            flags |= TransmissionFlag.SEND_FLUSH
        if caps.can_multi_conn:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        if caps.can_cache:
            flags |= TransmissionFlag.SEND_CACHE
        if caps.rotational:
            flags |= TransmissionFlag.ROTATIONAL
        return ExportEntry(
            name=self.name,
            size=device.size,
            flags=int(flags),
            description=self.description,
            minimum=limits.minimum,
            preferred=limits.preferred,
            maximum=min(limits.maximum, c.MAX_PAYLOAD),
            handle=self,
            contexts=self.contexts,
            tls_only=self.tls_only,
        )

    def __repr__(self) -> str:
        return f"Export({self.name!r}, writable={self.writable})"


#: Exports of an ``ExportResolver`` a client may ask about one by one in a handshake (after a LIST).
RESOLVER_LISTED_EXPORTS = 1024


class ExportResolver(Protocol):
    """Exports that exist without being added: looked up by name when a client asks for one (the
    repository's ``DISK@ID`` snapshots, which appear as they are committed). Consulted after the
    exports added with ``add_export``."""

    def lookup(self, name: str) -> Export | None:
        """The export named ``name`` now, or None."""

    def entries(self) -> Iterable[ExportEntry]:
        """Every export as ``NBD_OPT_LIST`` shows it (name and description)."""


@dataclass(frozen=True)
class ServerLimits:
    """The limits an operator sets on NBD clients (``serve`` flags and config keys of the same names),
    handed as one value from the command line through the daemon to the server.

    ``idle_timeout``: close a negotiated connection after that many seconds without a request (0:
    never). ``max_connections_per_client``: TCP connections from one address (None: half of
    ``max_connections``)."""

    max_connections: int = 100
    handshake_timeout: float = 10.0
    idle_timeout: float = 0.0
    max_connections_per_client: int | None = None


DEFAULT_LIMITS = ServerLimits()


class NbdServer:
    """Listens on any number of TCP and unix sockets and serves the registered exports."""

    def __init__(
        self,
        *,
        limits: ServerLimits = DEFAULT_LIMITS,
        buffer_budget: int = BUFFER_BUDGET,
        stall_timeout: float = STALL_TIMEOUT,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_options: int = 64,
        tls: ServerTls | None = None,
    ) -> None:
        """``tls``: None or mode ``off`` serves clear text only; it is read per connection, so it may
        be replaced while the server runs (QMP).

        ``buffer_budget``: bytes of request data, write payloads and unsent replies of all
        connections together; a connection that would go over waits (stops reading), and the
        connections of one client (address; all unix socket clients are one) get at most half of it,
        so no client can starve the others. ``stall_timeout``: close a connection whose unsent
        replies or partial write payload have not moved for that long (0: never)."""
        self.max_connections = limits.max_connections
        self.handshake_timeout = limits.handshake_timeout
        self.idle_timeout = limits.idle_timeout
        per_client = limits.max_connections_per_client
        self.max_connections_per_client = max(1, self.max_connections // 2) if per_client is None else per_client
        self.buffer_budget = buffer_budget
        self.stall_timeout = stall_timeout
        self.max_in_flight = max_in_flight
        self.max_options = max_options
        self.tls = tls
        self._exports: dict[str, Export] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[tuple[str, SocketFileId | None]] = []
        self._connections: set[_Connection] = set()
        self._handshaking: dict[_Connection, None] = {}  # not negotiated yet, oldest first
        self._clients: dict[str, _Client] = {}  # connections and charges by peer address
        self._charged = 0  # bytes charged by all connections (see ``buffer_budget``)
        self._waiters: deque[_Connection] = deque()  # connections waiting for budget, in order
        self._spares = SparePool(max_bytes=SPARE_BYTES, max_count=SPARE_COUNT)  # shared by all connections
        self._stopping = False
        #: Exports looked up on demand after the added ones (see ``ExportResolver``).
        self.resolver: ExportResolver | None = None
        self._device_closes: set[asyncio.Task[None]] = set()  # devices of ended connections (``owns_device``)
        self._lookups: ThreadPoolExecutor | None = None  # the resolver's threads (``run_lookup``)
        #: Per-request counts for ``serve --metrics`` (None: nothing is counted).
        self.stats: NbdStats | None = None

    @property
    def buffered(self) -> int:
        """Bytes of request data, write payloads and unsent replies held now (all connections)."""
        return self._charged

    def _release(self, client: _Client, size: int) -> None:
        self._charged -= size
        client.charged -= size
        if not client.charged and not client.connections and self._clients.get(client.key) is client:
            del self._clients[client.key]
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        """Let waiting connections go on, in the order they started waiting, as far as the budget
        allows (one whose client has used its share is passed over)."""
        waiters = self._waiters
        share = self.buffer_budget // 2
        for conn in list(waiters):
            need = conn._need
            if not conn._lost:
                if self._charged and self._charged + need > self.buffer_budget:
                    return
                client = conn._client
                if client.charged and client.charged + need > share:
                    continue
            waiters.remove(conn)
            conn._waiting = False
            if not conn._lost:
                # Reserved now, so nobody overtakes it; started from the loop, not from inside
                # another connection's bookkeeping.
                conn._reserved += need
                conn._charge += need
                conn._client.charged += need
                self._charged += need
                conn.loop.call_soon(conn._pump)

    # --- exports -----------------------------------------------------------------------------------

    @property
    def exports(self) -> Mapping[str, Export]:
        return MappingProxyType(self._exports)

    def add_export(self, export: Export) -> None:
        if export.name in self._exports:
            raise ValueError(f"export '{export.name}' already exists")
        self._exports[export.name] = export
        hold(export.device, export)

    def remove_export(self, name: str) -> Export:
        """Stop offering the export and close its connections once their requests are done."""
        export = self._exports.pop(name)
        release(export.device, export)
        for conn in list(self._connections):
            if conn.export is export:
                conn.shutdown()
        return export

    def _close_device(self, export: Export) -> None:
        """The connection an export was made for has ended: close its device (in a task kept till done)."""
        task = asyncio.get_running_loop().create_task(export.device.close())
        self._device_closes.add(task)
        task.add_done_callback(self._device_closes.discard)

    def connection_count(self, name: str) -> int:
        export = self._exports.get(name)
        return sum(1 for conn in self._connections if conn.export is not None and conn.export is export)

    @property
    def connections(self) -> int:
        return len(self._connections)

    def _added(self, name: str) -> Export | None:
        """The added export ``name`` ("" is the default one, when there is only one)."""
        export = self._exports.get(name)
        if export is None and name == "" and len(self._exports) == 1:
            export = next(iter(self._exports.values()))  # the default export, when there is only one
        return export

    # --- listening ---------------------------------------------------------------------------------

    async def listen_tcp(self, host: str = "127.0.0.1", port: int = c.DEFAULT_PORT) -> tuple[str, int]:
        """Listen on TCP; returns the bound address (port 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True, backlog=LISTEN_BACKLOG
        )
        self._servers.append(server)
        for sock in server.sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        addr = server.sockets[0].getsockname()
        log.info("NBD server listening on %s:%d", addr[0], addr[1])
        return str(addr[0]), int(addr[1])

    async def listen_unix(self, path: str | os.PathLike[str]) -> None:
        """Listen on a unix socket: a stale socket file at ``path`` is replaced, a live one (something
        answers on it) or any other file is refused with ``EADDRINUSE`` (see ``nbd.unix_path``)."""
        path = os.fspath(path)
        remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        own: SocketFileId | None = None
        try:
            sock.bind(path)  # bound here: asyncio, given a path, would unlink any socket file there first
            own = socket_file_id(path)
            server = await asyncio.get_running_loop().create_unix_server(
                lambda: _Connection(self), sock=sock, backlog=LISTEN_BACKLOG
            )
        except BaseException:
            sock.close()
            remove_own_socket(path, own)
            raise
        self._servers.append(server)
        self._unix_paths.append((path, own))
        log.info("NBD server listening on unix:%s", path)

    async def listen_socket(self, sock: socket.socket) -> None:
        """Serve on a socket bound by someone else (systemd socket activation); its unix socket file,
        if any, is left to its owner."""
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(lambda: _Connection(self), sock=sock, backlog=LISTEN_BACKLOG)
        else:
            server = await loop.create_server(lambda: _Connection(self), sock=sock, backlog=LISTEN_BACKLOG)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._servers.append(server)
        log.info("NBD server listening on passed socket %s", sock.getsockname())

    def run_lookup(self, work: Callable[[], object]) -> asyncio.Future[object]:
        """``work`` (a resolver's lookup or listing) in the server's lookup threads."""
        if self._lookups is None:
            self._lookups = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="nbd-lookup")
        return asyncio.get_running_loop().run_in_executor(self._lookups, work)

    async def stop(self, *, timeout: float = 5.0) -> None:
        """Stop listening, let in-flight requests finish (up to ``timeout``), close every connection."""
        self._stopping = True
        if self._lookups is not None:
            self._lookups.shutdown(wait=False, cancel_futures=True)  # queued lookups are for closing clients
            self._lookups = None
        for server in self._servers:
            server.close()
        self._servers.clear()
        for path, own in self._unix_paths:
            remove_own_socket(path, own)
        self._unix_paths.clear()
        conns = list(self._connections)
        for conn in conns:
            conn.shutdown()
        if conns:
            waits = [conn.closed for conn in conns]
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for conn in conns:
                if not conn.closed.done():
                    conn.abort()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        await asyncio.sleep(0)  # the ended connections' close callbacks run
        if self._device_closes:
            await asyncio.wait(list(self._device_closes), timeout=timeout)


class _EarlyData(asyncio.Protocol):
    """The app protocol during the server's TLS handshake: keeps the client's first encrypted bytes
    (its first option may follow its last handshake message at once) until the client certificate
    has been authorized and the connection takes them."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.data = bytearray()
        self.lost = False
        self.overflow = False

    def data_received(self, data: bytes) -> None:
        if len(self.data) + len(data) > HANDSHAKE_BUFFER:
            self.overflow = True
        elif not self.overflow:
            self.data += data

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.conn.connection_lost(exc)


class _Client:
    """What the connections from one peer address hold together."""

    __slots__ = ("charged", "connections", "key")

    def __init__(self, key: str) -> None:
        self.key = key
        self.connections = 0
        self.charged = 0


_NO_CLIENT = _Client("")  # before admission (never charged: nothing starts before it)


class _Connection(asyncio.BufferedProtocol):
    """One client: the core's bytes in and out, each request run as soon as it is complete.

    Receiving: a ``BufferedProtocol``, so a write payload is received straight into its own buffer
    (no copy through a chunk), and everything else into one reused buffer.

    Running: a request's coroutine is started eagerly inside the receive callback; most device
    verbs (page-cache I/O) finish without suspending, and then no task is created at all. One that
    suspends is handed to a task that drives it on (``_resume``), so many requests can be in flight
    and their replies go out in completion order.

    Replying: replies produced inside one receive callback are batched into one ``writelines``.

    Bounding: every request is charged the bytes it holds (its read data or write payload, and then
    its reply until the transport is under its high-water mark); a request starts only while the
    connection and the server (``buffer_budget``) are under their limits, the rest of what was
    received waits in a backlog with reading paused. A write payload is charged when its header is
    read, before any of it is received.
    """

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.export: Export | None = None
        self.device: Any = None
        self.core: ServerCore
        self.transport: asyncio.Transport
        self.peer = "?"
        self.log = PeerLog(log, "NBD client", self.peer)
        self._client = _NO_CLIENT  # its client (peer address), once admitted
        self._counted = False  # in its client's connection count
        self._tasks: set[asyncio.Task[None]] = set()  # strong references to suspended requests
        self._in_flight = 0
        # Bytes charged against the limits (this connection's and the server's budget): the data of
        # requests in flight, ``_held`` replies, the ``_precharged`` payload and ``_reserved`` budget.
        self._charge = 0
        self._held = 0  # of requests done whose replies sit in a transport over its high-water mark
        self._precharged = 0  # the write payload being received
        self._reserved = 0  # budget the server set aside for this connection when it woke it
        self._need = 0  # what it waits for, while in the server's waiters
        self._waiting = False
        self._backlog: deque[Event] = deque()  # events received but not started (limits reached)
        self._rbuf: memoryview | None = None  # allocated on first use: small until negotiated
        self._into_payload = False
        self._after_big_payload = False  # a payload with BIG_PAYLOAD_REST or more received in place
        self._batch: list[bytes | bytearray | memoryview] | None = None
        self._batch_bytes = 0
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False
        self._lost = False
        self._timer: asyncio.TimerHandle | None = None
        self._received = False  # anything received (since the idle timer last looked, once negotiated)
        self._quiet_since = 0.0
        self._unsent = 0  # the transport's unsent bytes when the idle timer last looked
        self._sparse = False
        self._contexts: tuple[tuple[int, str], ...] | None = None  # selected beyond base:allocation alone
        self._sock_fd = -1  # the socket, for sendfile (-1: not usable)
        self._gone = False  # connection_lost has run
        self.stats: ConnStats | None = None  # this connection's counts (``NbdServer.stats``)
        self._since = 0.0  # when it chose its export
        self._resolved: dict[str, Export | None] = {}  # the resolver's answers for this connection, by name
        self._listing: list[ExportEntry] | None = None  # the resolver's exports, once listed

    # --- protocol callbacks ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        self.log = PeerLog(log, "NBD client", self.peer)
        server = self.server
        refuse = self._admission(peer[0] if isinstance(peer, tuple) else None)
        if self._lost:
            return
        server._connections.add(self)
        server._handshaking[self] = None
        if refuse:
            self.log.warning("refused: %s", refuse)
        # Listing exports takes a few options per export (nbdinfo --list asks each for its details).
        max_options = server.max_options + 4 * len(server._exports)
        tls = server.tls
        if server.resolver is not None:
            # A fixed allowance, not a count: listing a resolver's exports may be slow (a repository in
            # object storage) and must not run on the event loop for every connection.
            max_options += 4 * RESOLVER_LISTED_EXPORTS
        self.core = ServerCore(
            self._lookup,
            self._list,
            max_options=max_options,
            refuse=refuse,
            spares=server._spares,
            tls=tls.mode if tls is not None else "off",
        )
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        transport.writelines(self.core.data_to_send())
        self._timer = self.loop.call_later(server.handshake_timeout, self._handshake_expired)

    # --- exports: the added ones at once, a resolver's off the event loop ----------------------------

    def _lookup(self, name: str) -> ExportEntry | None:
        """The export ``name``: an added one, else the resolver's — which may block (a repository in object
        storage), so it is looked up in a thread (``Pending``) once per connection and name."""
        server = self.server
        export = server._added(name)
        if export is None and server.resolver is not None:
            if name not in self._resolved:
                raise Pending(lambda: self._resolve(name))
            export = self._resolved[name]
        return export.entry() if export is not None else None

    def _resolve(self, name: str) -> None:
        """In a thread: the resolver's lookup (a failure is "not found", logged)."""
        resolver = self.server.resolver
        try:
            export = resolver.lookup(name) if resolver is not None else None
        except Exception as exc:
            self.log.warning("export '%s': lookup failed: %s", name, exc)
            export = None
        self._resolved[name] = export

    def _list(self) -> list[ExportEntry]:
        server = self.server
        entries = [export.entry() for export in server._exports.values()]
        if server.resolver is not None:
            if self._listing is None:
                raise Pending(self._fetch_listing)
            entries.extend(e for e in self._listing if e.name not in server._exports)
        return entries

    def _fetch_listing(self) -> None:
        """In a thread: the resolver's exports (a failure lists none of them, logged)."""
        resolver = self.server.resolver
        try:
            self._listing = list(resolver.entries()) if resolver is not None else []
        except Exception as exc:
            self.log.warning("listing exports failed: %s", exc)
            self._listing = []

    def _start_resolve(self, event: Resolve) -> None:
        """Run the work an option waits for off the event loop; nothing more is read meanwhile."""
        self._pause_reading()
        task = self.loop.create_task(self._run_resolve(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_resolve(self, event: Resolve) -> None:
        await self.server.run_lookup(event.work)
        if self._closing or self._lost:
            self._close_resolved(None)
            return
        core = self.core
        events = core.resume()
        if core.has_output:
            self.transport.writelines(core.data_to_send())
        if events:
            self._start_events(events)
        if not any(type(e) is Resolve or type(e) is StartTls for e in events):
            self._pump()

    def _close_resolved(self, keep: Export | None) -> None:
        """Close the devices of the resolver's exports this connection looked up but does not serve.

        A lookup thread may be adding to ``_resolved`` meanwhile (the connection went away while it ran):
        the values are copied in one C call, never iterated while they change, and what the thread adds
        later is closed by ``_run_resolve`` once the thread is done."""
        resolved = list(self._resolved.values())
        self._resolved.clear()
        for export in resolved:
            if export is not None and export is not keep and export.owns_device:
                self.server._close_device(export)

    def _admission(self, address: str | None) -> str | None:
        """Whether this new connection is served: None, or why it is refused (with a greeting and
        ERR_POLICY replies, so the client can say why); a flood gets no greeting at all."""
        server = self.server
        if server._stopping:
            return "the server is shutting down"
        client = server._clients.get(address or "unix")
        if client is None:
            client = server._clients[address or "unix"] = _Client(address or "unix")
        limit = server.max_connections_per_client
        refuse = None
        if address is not None and client.connections >= limit:
            self._evict_silent(client)
        if address is not None and client.connections >= limit:
            refuse = f"too many connections from {address} (limit {limit})"
            if client.connections >= 2 * limit:
                self._drop()
                return refuse
        client.connections += 1
        self._client = client
        self._counted = True
        if len(server._connections) >= server.max_connections:
            self._evict_silent(None)
        if len(server._connections) >= server.max_connections:
            refuse = f"too many connections (limit {server.max_connections})"
        if refuse and len(server._connections) >= 2 * server.max_connections:
            self._drop()  # not even a greeting: we are being flooded
        return refuse

    def _evict_silent(self, client: _Client | None) -> None:
        """Drop the oldest socket (of ``client``, or any) that has said nothing since its greeting, to
        make room: a real client answers the greeting at once, so only silent sockets are evicted."""
        server = self.server
        for conn in server._handshaking:
            if not conn._received and not conn._closing and (client is None or conn._client is client):
                conn.log.warning("dropped to make room (silent since its greeting)")
                conn.abort()
                conn._forget_client()
                server._connections.discard(conn)
                del server._handshaking[conn]
                return

    def _drop(self) -> None:
        self._forget_client()
        self.abort()
        self._lost = True

    def _forget_client(self) -> None:
        if self._counted:
            self._counted = False
            client = self._client
            client.connections -= 1
            clients = self.server._clients
            if not client.connections and not client.charged and clients.get(client.key) is client:
                del clients[client.key]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._gone:
            return  # a failed TLS handshake cleans up itself, and asyncio may still report it
        self._gone = True
        server = self.server
        server._connections.discard(self)
        server._handshaking.pop(self, None)
        self._forget_client()
        self._closing = True
        self._lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._backlog.clear()
        self._close_resolved(None)  # looked up but never served (a resolve still running closes its own)
        if self._waiting:
            self._waiting = False
            server._waiters.remove(self)
        idle = self._held + self._precharged + self._reserved
        self._held = self._precharged = self._reserved = 0
        if idle:
            self._uncharge(idle)
        if not self._in_flight and not self.closed.done():
            self.closed.set_result(None)
        self.log.debug("gone")

    def get_buffer(self, sizehint: int) -> memoryview:
        view = self.core.payload_buffer()
        if view is not None:
            self._into_payload = True
            if len(view) >= BIG_PAYLOAD_REST:
                self._after_big_payload = True
            return view
        self._into_payload = False
        rbuf = self._rbuf
        if rbuf is None:
            size = RECEIVE_BUFFER if self.export is not None else HANDSHAKE_BUFFER
            rbuf = self._rbuf = memoryview(bytearray(size))
        if self._after_big_payload:
            self._after_big_payload = False
            return rbuf[:AFTER_PAYLOAD_RECEIVE]
        return rbuf

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        self._received = True
        core = self.core
        if self._into_payload:
            events: list[Event] = core.payload_received(nbytes)
        else:
            assert self._rbuf is not None
            events = core.receive(self._rbuf[:nbytes], reused=True)
        if core.has_output:
            self.transport.writelines(core.data_to_send())
        if events:
            if self._backlog:
                self._backlog.extend(events)
            else:
                self._start_events(events)
        if self._backlog or self._writing_paused:
            self._pause_reading()
        elif core.phase is Phase.WRITE_PAYLOAD and not self._precharged and not self._closing:
            self._charge_payload()

    def eof_received(self) -> bool | None:
        self.shutdown()
        # Keep the transport open until in-flight replies are written (TLS transports cannot).
        core = getattr(self, "core", None)  # none on a socket dropped at once (a flood)
        return None if core is not None and core.tls_active else True

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        held = self._held
        if held:
            self._held = 0
            self._uncharge(held)
        if self._reading_paused or self._backlog:
            self._pump()

    # --- flow control ------------------------------------------------------------------------------

    def _admit(self, size: int) -> bool:
        """Charge a request (or write payload) holding ``size`` bytes, if the limits let it start now.

        This connection waits (False) while its transport is over the high-water mark or it has
        too much in flight, and goes on by itself when that ends (``_done``, ``resume_writing``);
        it waits for the server's budget in line behind the others, and is woken by the server."""
        if (
            self._writing_paused
            or self._in_flight >= self.server.max_in_flight
            or self._charge - self._reserved >= MAX_IN_FLIGHT_BYTES
        ):
            return False
        if not size:
            return True
        reserved = self._reserved
        if reserved:
            self._reserved = 0
            if reserved >= size:
                if reserved > size:
                    self._uncharge(reserved - size)
                return True
            self._uncharge(reserved)
        server = self.server
        client = self._client
        if server._charged and (
            server._waiters
            or server._charged + size > server.buffer_budget
            or (client.charged and client.charged + size > server.buffer_budget // 2)
        ):
            self._need = size
            if not self._waiting:
                self._waiting = True
                server._waiters.append(self)
                server._wake()  # those ahead may be waiting for their own client's share only
            return False
        self._charge += size
        client.charged += size
        server._charged += size
        return True

    def _uncharge(self, size: int) -> None:
        self._charge -= size
        self.server._release(self._client, size)

    def _charge_payload(self) -> bool:
        """Charge the write payload being received before any more of it is read."""
        size = self.core.pending_write_length
        if not self._admit(size):
            self._pause_reading()
            return False
        self._precharged = size
        return True

    def _pause_reading(self) -> None:
        if not self._reading_paused and not self._lost:
            self._reading_paused = True
            self.transport.pause_reading()

    def _pump(self) -> None:
        """Start what waits (backlogged requests, then the payload being received) as far as the
        limits allow; resume reading once nothing waits."""
        if self._lost:
            self._maybe_close()  # the last request of a client that is gone: the connection ends
            return
        backlog = self._backlog
        if backlog:
            events = list(backlog)
            backlog.clear()
            self._start_events(events)
            if backlog:
                return
        if self._closing:
            self._maybe_close()
            return
        if self.core.phase is Phase.WRITE_PAYLOAD and not self._precharged and not self._charge_payload():
            return
        if self._reading_paused and not self._writing_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    def _start_events(self, events: list[Event]) -> None:
        """Start the events in order until a request must wait; the rest go to the backlog."""
        outer = self._batch
        batch: list[bytes | bytearray | memoryview] = [] if outer is None else outer
        self._batch = batch
        server = self.server
        client = self._client
        try:
            for i, event in enumerate(events):
                if type(event) is Request:
                    cmd = event.cmd
                    size = event.length if cmd in (CMD_READ, CMD_WRITE) else 0
                    if cmd == CMD_WRITE and self._precharged:
                        self._precharged = 0  # the payload's charge is now this request's
                    elif (
                        # _admit's common case inline: nothing waits, everything is under its limit
                        not self._writing_paused
                        and self._in_flight < server.max_in_flight
                        and self._charge < MAX_IN_FLIGHT_BYTES
                        and not self._reserved
                        and not server._waiters
                        and server._charged + size <= server.buffer_budget
                        and client.charged + size <= server.buffer_budget // 2
                    ):
                        self._charge += size
                        client.charged += size
                        server._charged += size
                    elif not self._admit(size):
                        self._backlog.extend(events[i:])
                        break
                    self._start(event)
                elif type(event) is Negotiated:
                    self._negotiated(event)
                elif type(event) is Closed:
                    self._client_closed(event)
                elif type(event) is StartTls:
                    self._start_tls()
                elif type(event) is Resolve:
                    self._start_resolve(event)
        finally:
            if outer is None:
                self._batch = None
                self._batch_bytes = 0
                if batch and not self.transport.is_closing():
                    self.transport.writelines(batch)

    def _flush_batch(self) -> None:
        batch = self._batch
        self._batch_bytes = 0
        if batch:
            if not self.transport.is_closing():
                self.transport.writelines(batch)
            batch.clear()

    # --- lifecycle ---------------------------------------------------------------------------------

    def _handshake_expired(self) -> None:
        self._timer = None
        if self.export is None:
            self.log.warning("did not finish the handshake in %.0f s", self.server.handshake_timeout)
            self.abort()

    def _negotiated(self, event: Negotiated) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        export = event.export.handle
        assert isinstance(export, Export)
        self.export = export
        self.device = export.device
        self._close_resolved(export)
        if export.owns_device:
            self.closed.add_done_callback(lambda _: self.server._close_device(export))
        self.server._handshaking.pop(self, None)
        self._rbuf = None  # the big receive buffer from now on
        self._sparse = event.structured and event.export.size > 0
        base_only = event.meta_contexts == ((META_CONTEXT_ID, c.META_BASE_ALLOCATION),)
        self._contexts = None if base_only or not event.meta_contexts else event.meta_contexts
        self._sock_fd = -1
        sock = self.transport.get_extra_info("socket")
        if sock is not None and not self._tls() and SENDFILE_MIN:
            with contextlib.suppress(OSError, AttributeError, ValueError):
                self._sock_fd = sock.fileno()
        server = self.server
        timeouts = [t for t in (server.idle_timeout, server.stall_timeout) if t > 0]
        if timeouts:
            timeout = min(timeouts)
            self._quiet_since = self.loop.time()
            self._timer = self.loop.call_later(timeout / 4, self._idle_check, timeout / 4)
        self._since = time.monotonic()
        stats = self.server.stats
        if stats is not None:
            self.stats = stats.connected(export.name)
        self.closed.add_done_callback(self._ended)
        self.log.info(
            "connected to export '%s'", export.name, extra={"event": "client-connected", "export": export.name}
        )

    def _ended(self, _: object) -> None:
        """The connection is gone and its last request done: say what it served (figures when counted)."""
        assert self.export is not None
        fields: dict[str, Any] = {"event": "client-disconnected", "export": self.export.name}
        fields["seconds"] = round(time.monotonic() - self._since, 3)
        figures = ""
        stats = self.stats
        if stats is not None:
            assert self.server.stats is not None
            self.server.stats.ended_connection(stats)
            fields["requests"] = stats.total_requests
            fields["bytes-read"] = stats.bytes[CMD_READ]
            fields["bytes-written"] = stats.bytes[CMD_WRITE]
            figures = (
                f", {fields['requests']} requests, {fields['bytes-read']} bytes read, {fields['bytes-written']} written"
            )
        self.log.info(
            "disconnected from export '%s' after %.1f s%s", self.export.name, fields["seconds"], figures, extra=fields
        )

    def _tls(self) -> bool:
        """Bytes go through TLS: never write to the socket directly (sendfile) then."""
        transport = self.transport
        return transport.get_extra_info("ssl_object") is not None or transport.get_extra_info("sslcontext") is not None

    def _start_tls(self) -> None:
        """STARTTLS was acknowledged (the ACK is queued in clear text): upgrade the socket."""
        self.transport.pause_reading()  # nothing is read in clear text any more
        task = self.loop.create_task(self._upgrade())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _upgrade(self) -> None:
        """The TLS handshake, bounded by what is left of the handshake timeout (the timer still runs),
        then the client's certificate against the authorizer of the moment. Any failure ends this
        connection only."""
        raw = self.transport
        tls = self.server.tls
        early = _EarlyData(self)  # holds what arrives between the handshake and the authz check
        try:
            if tls is None or tls.mode == "off":
                raise ConnectionError("TLS is no longer configured")
            context = tls.credentials()
            transport = await self.loop.start_tls(
                raw, early, context, server_side=True, ssl_handshake_timeout=self.server.handshake_timeout
            )
        except Exception as exc:  # whatever it was, it costs this connection only
            self.log.warning("TLS handshake failed: %s", exc or type(exc).__name__)
            raw.abort()
            self.connection_lost(None)
            return
        if transport is None or self._closing or early.lost:
            self.abort()
            self.connection_lost(None)
            return
        self.transport = transport
        refusal = tls.authorize(peer_dn(transport.get_extra_info("ssl_object")))
        if refusal is not None or early.overflow:
            self.log.warning("refused: %s", refusal or "too much data before negotiation over TLS")
            self.abort()
            return
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.core.tls_started()
        transport.set_protocol(self)
        self.log.debug("TLS established")
        if early.data:
            rbuf = self.get_buffer(len(early.data))
            assert len(rbuf) >= len(early.data)  # bounded by HANDSHAKE_BUFFER (see _EarlyData)
            rbuf[: len(early.data)] = early.data
            self.buffer_updated(len(early.data))

    def _idle_check(self, period: float) -> None:
        """Close a connection that is idle (no request: ``idle_timeout``) or stalled (holding unsent
        replies or a partial write payload that do not move: ``stall_timeout``)."""
        self._timer = None
        if self._lost:
            return
        now = self.loop.time()
        unsent = self.transport.get_write_buffer_size()
        if self._received or self._in_flight or self._waiting or unsent < self._unsent:
            # The client sent something, the device works, the server's budget holds it up, or
            # replies move.
            self._quiet_since = now
        self._received = False
        self._unsent = unsent
        server = self.server
        stalled = unsent or self._held or self._backlog or self.core.phase is Phase.WRITE_PAYLOAD
        limit = server.stall_timeout if stalled else server.idle_timeout
        if limit > 0 and now - self._quiet_since >= limit:
            what = "stalled" if stalled else "idle"
            self.log.warning("closed, %s for %.0f s", what, now - self._quiet_since)
            self.abort()
            return
        self._timer = self.loop.call_later(period, self._idle_check, period)

    def _client_closed(self, event: Closed) -> None:
        if event.error:
            self.log.warning("%s", event.reason)
        else:
            self.log.debug("%s", event.reason)
        self.shutdown()

    def shutdown(self) -> None:
        """Stop reading; close once the requests received so far have replied."""
        if self._closing:
            return
        self._closing = True
        transport = getattr(self, "transport", None)
        if transport is None:
            return
        self._flush_batch()  # replies of this receive callback go out before the close
        if not self._in_flight and not self._backlog:
            transport.close()
        elif not transport.is_closing():
            self._pause_reading()  # nothing more is read; what was received still gets its reply

    def _maybe_close(self) -> None:
        if not self._in_flight and not self._backlog and self._closing:
            if self._lost:
                if not self.closed.done():
                    self.closed.set_result(None)
            elif not self.transport.is_closing():
                self._flush_batch()
                self.transport.close()

    def abort(self) -> None:
        self._closing = True
        transport = getattr(self, "transport", None)
        if transport is not None:
            transport.abort()

    # --- requests ----------------------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        """Run a request (already charged): eagerly, and in a task only if it suspends."""
        self._in_flight += 1
        coro = self._handle(request)
        try:
            yielded = coro.send(None)
        except StopIteration:
            return  # done without suspending: no task needed
        except asyncio.CancelledError:
            return  # a device cancelled its own work; the request has been answered
        if yielded is not None:
            # Taken over now, as Task.__step does, so other coroutines may await the same future.
            yielded._asyncio_future_blocking = False
        task = self.loop.create_task(self._resume(coro, yielded))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _resume(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
        """Drive a coroutine that suspended on ``yielded`` to completion (what a Task would do)."""
        while True:
            try:
                if yielded is None:
                    await asyncio.sleep(0)  # a bare yield
                else:
                    await yielded
            except BaseException as exc:
                if yielded is None or not yielded.done():
                    try:
                        yielded = coro.throw(exc)
                    except StopIteration:
                        return
                    if yielded is not None:
                        yielded._asyncio_future_blocking = False
                    continue
            try:
                yielded = coro.send(None)  # the coroutine collects the future's result or exception
            except StopIteration:
                return
            if yielded is not None:
                yielded._asyncio_future_blocking = False

    def _send(self, data: bytes) -> None:
        batch = self._batch
        if batch is not None:
            batch.append(data)
        elif not self.transport.is_closing():
            self.transport.write(data)

    def _sendv(self, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send a read reply (header and data, or chunks); a big one is not kept in the batch."""
        batch = self._batch
        if batch is not None:
            batch.extend(buffers)
            self._batch_bytes += len(buffers[-1])
            if self._batch_bytes >= BATCH_BYTES:
                self._flush_batch()  # the transport sees it now, and may pause writing
        elif not self.transport.is_closing():
            self.transport.writelines(buffers)

    async def _handle(self, request: Request) -> None:
        """Run one request and answer it exactly once.

        The ``try`` only computes the reply (a read sent by sendfile is the one exception: it is
        sent there and its reply is None); the send after it is the only place a request's reply is
        written, and nothing after it can answer again — a failure there is logged, not replied to."""
        cmd = request.cmd
        core = self.core
        payload = request.payload
        stats = self.stats
        if stats is not None:
            started = perf_counter()
        reply: _Reply
        try:
            device = self.device
            if cmd == CMD_READ:
                reply = await self._read(request)
            elif cmd == CMD_WRITE:
                assert payload is not None
                request.payload = None
                await device.pwrite(request.offset, payload, fua=bool(request.flags & FLAG_FUA))
                reply = core.reply_ok(request.cookie)
            elif cmd == CMD_FLUSH:
                await device.flush()
                reply = core.reply_ok(request.cookie)
            elif cmd == CMD_WRITE_ZEROES:
                flags = request.flags
                await device.zero(
                    request.offset,
                    request.length,
                    may_trim=not flags & FLAG_NO_HOLE,
                    fast=bool(flags & FLAG_FAST_ZERO),
                    fua=bool(flags & FLAG_FUA),
                )
                reply = core.reply_ok(request.cookie)
            elif cmd == CMD_TRIM:
                await device.trim(request.offset, request.length, fua=bool(request.flags & FLAG_FUA))
                reply = core.reply_ok(request.cookie)
            elif cmd == CMD_CACHE:
                await device.cache(request.offset, request.length)
                reply = core.reply_ok(request.cookie)
            elif cmd == CMD_BLOCK_STATUS:
                reply = await self._block_status(request)
            else:  # the core lets no other command through
                reply = core.reply_error(cmd, request.cookie, errno_mod.EINVAL)
        except OSError as exc:
            self.log.debug("%r failed: %s", request, exc)
            if stats is not None:
                stats.errors[cmd] += 1
            err = errno_to_nbd(exc.errno, request.flags)
            reply = core.reply_error(cmd, request.cookie, err, exc.strerror or str(exc))
        except asyncio.CancelledError:
            # Answer anyway (the client would wait forever), then let the cancellation go on.
            self._send(core.reply_error(cmd, request.cookie, c.Errno.EIO, "request cancelled"))
            self._done(request.length if cmd in (CMD_READ, CMD_WRITE) else 0)
            raise
        except Exception as exc:  # a bug below us must not take the connection (or the daemon) down
            self.log.exception("%r failed", request)
            reply = core.reply_error(cmd, request.cookie, c.Errno.EIO, f"internal error: {exc}")
        try:
            if isinstance(reply, bytes):
                self._send(reply)
            elif reply is not None:
                self._sendv(reply)
            if payload is not None and type(payload) is not bytes:
                core.recycle(payload)
        except Exception:
            self.log.exception("%r failed after its reply", request)
        finally:
            size = request.length if cmd in (CMD_READ, CMD_WRITE) else 0
            self._done(size)
            if stats is not None:  # inline: a call per request would cost more than the counting
                elapsed = perf_counter() - started
                stats.buckets[cmd][bisect_right(LATENCY_BOUNDS, elapsed)] += 1
                stats.seconds[cmd] += elapsed
                stats.bytes[cmd] += size

    def _done(self, size: int) -> None:
        """A request replied: its bytes stop counting once its reply is in a transport that is
        under its high-water mark (or when it gets there: ``resume_writing``)."""
        self._in_flight -= 1
        if size:
            if self._writing_paused:
                self._held += size
            else:
                self._charge -= size
                server = self.server
                server._charged -= size
                client = self._client
                client.charged -= size
                if server._waiters or not client.connections:
                    server._release(client, 0)  # wake waiters, forget a client that is gone
        if self._batch is None and (self._reading_paused or self._backlog):
            self._pump()
        elif self._closing and not self._in_flight:
            self._maybe_close()

    async def _read(self, request: Request) -> _Reply:
        offset, length, cookie = request.offset, request.length, request.cookie
        device = self.device
        if self._sparse and length >= SPARSE_READ_MIN:
            extents = await device.block_status(offset, length)
            if any(e.flags & _ZERO for e in extents):
                return await self._read_sparse(request, extents)
        if length >= SENDFILE_MIN and self._sock_fd >= 0:
            fd = direct_read_fd(device)  # through filters that pass reads, copy-before-write included
            if fd is not None and self._sendfile(request, fd):
                return None
        data = await device.pread(offset, length)
        return self.core.reply_read(cookie, offset, data)

    def _sendfile(self, request: Request, fd: int) -> bool:
        """Send a read reply with ``sendfile`` straight from the page cache (one copy fewer).

        Only when nothing is queued in the transport, so writing to the socket directly keeps the
        order; whatever the socket does not take at once goes through the transport after it, all
        in this one synchronous call. False when the ordinary path must be used."""
        transport = self.transport
        batch = self._batch
        if batch:
            transport.writelines(batch)
            batch.clear()
        if transport.is_closing() or transport.get_write_buffer_size():
            return False
        offset, length, sock = request.offset, request.length, self._sock_fd
        header = self.core.read_header(request.cookie, offset, length)
        try:
            n = os.write(sock, header)
        except BlockingIOError:
            n = 0
        except OSError:
            return False  # nothing was sent: the ordinary path meets the same error
        try:
            self._send_rest(fd, header, n, offset, length)
        except Exception as exc:
            # The reply header is out: no error reply may follow; the spec's only way on is a
            # hard disconnect.
            self.log.warning("read failed after the reply header: %s", exc)
            self.abort()
        return True

    def _send_rest(self, fd: int, header: bytes, n: int, offset: int, length: int) -> None:
        """The rest of a sendfile reply whose first ``n`` header bytes went out."""
        transport = self.transport
        sent = 0
        if n < len(header):
            transport.write(header[n:])
        else:
            try:
                while sent < length:
                    k = os.sendfile(self._sock_fd, fd, offset + sent, length - sent)
                    if k == 0:
                        break  # the end of the file: the unaligned tail reads as zeroes
                    sent += k
            except BlockingIOError:
                pass
        if sent < length:
            rest = os.pread(fd, length - sent, offset + sent)
            if len(rest) < length - sent:
                rest += bytes(length - sent - len(rest))
            transport.write(rest)

    async def _read_sparse(self, request: Request, extents: list[Any]) -> _Reply:
        """Send zero extents as hole chunks (with DF only when the whole range is one hole)."""
        offset, length = request.offset, request.length
        end = offset + length
        runs: list[tuple[int, bool]] = []  # (length, is_data)
        pos = offset
        for extent in extents:
            run = min(extent.length, end - pos)
            if run <= 0:
                break
            append_run(runs, run, not extent.flags & _ZERO)
            pos += run
        if pos < end:
            append_run(runs, end - pos, True)
        device = self.device
        if request.flags & FLAG_DF and (len(runs) > 1 or runs[0][1]):
            data = await device.pread(offset, length)
            return self.core.reply_read(request.cookie, offset, data)
        pieces: list[tuple[int, bytes | None]] = []
        pos = offset
        for run, is_data in runs:
            pieces.append((run, await device.pread(pos, run) if is_data else None))
            pos += run
        return self.core.reply_read_sparse(request.cookie, offset, pieces)

    async def _block_status(self, request: Request) -> bytes:
        if self._contexts is not None:
            return await self._block_status_contexts(request, self._contexts)
        extents = await self.device.block_status(request.offset, request.length)
        return self.core.reply_block_status(request.cookie, _allocation(request, extents))

    async def _block_status_contexts(self, request: Request, contexts: Sequence[tuple[int, str]]) -> bytes:
        """One chunk per selected context (``qemu:dirty-bitmap:NAME``, ``qemu:allocation-depth``)."""
        export = self.export
        assert export is not None
        offset, length = request.offset, request.length
        one = bool(request.flags & FLAG_REQ_ONE)
        # Context ids follow the export's contexts: base:allocation, allocation depth, the bitmaps.
        first_bitmap = META_CONTEXT_ID + 1 + (1 if export.allocation_depth else 0)
        chunks: list[tuple[int, Sequence[tuple[int, int]]]] = []
        for context_id, name in contexts:
            if context_id == META_CONTEXT_ID:
                descriptors = _allocation(request, await self.device.block_status(offset, length))
            elif name == meta.ALLOCATION_DEPTH:
                depth = allocation_depth(export.device)
                descriptors = await meta.depth_descriptors(depth, offset, length, one)
            else:
                descriptors = meta.dirty_descriptors(export.bitmaps[context_id - first_bitmap], offset, length, one)
            if not descriptors:
                raise OSError(errno_mod.EIO, f"no extents for {name}")
            chunks.append((context_id, descriptors))
        return self.core.reply_block_status_contexts(request.cookie, chunks)


def _allocation(request: Request, extents: Sequence[Extent]) -> list[tuple[int, int]]:
    """The base:allocation descriptors of a request from the device's extents (no await of its own:
    BLOCK_STATUS is a hot path)."""
    length = request.length
    descriptors: list[tuple[int, int]] = []
    remaining = length
    for extent in extents:
        run = min(extent.length, remaining)
        if run <= 0:
            break
        flags = extent.flags & 3
        if len(descriptors) >= MAX_DESCRIPTORS and descriptors[-1][1] != flags:
            break
        append_run(descriptors, run, flags)
        remaining -= run
    if not descriptors:
        raise OSError(errno_mod.EIO, "the device reported no extents")
    if request.flags & FLAG_REQ_ONE:
        descriptors = descriptors[:1]
    return descriptors


__all__ = ["DEFAULT_LIMITS", "Export", "NbdServer", "ServerLimits"]
