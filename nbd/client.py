"""``NbdClient``: a remote NBD export as a ``BlockDevice``, over asyncio.

The protocol lives in ``nbd.client_core``; this module only moves bytes and keeps promises:

* Each connection is an ``asyncio.BufferedProtocol``, so read payloads are received straight into the
  caller's buffer (no intermediate copies), and the cookie → future table is the core's in-flight map.
* Requests are pipelined up to ``max_in_flight`` across all connections, split to the server's maximum
  payload and aligned to its minimum block size (read-modify-write for unaligned writes).
* ``pwrite_from_fd`` sends a write's payload with ``sendfile`` straight from a file into the socket (no
  copy through Python). Only while the transport holds nothing do we write to the socket ourselves; when
  the socket is full mid-payload, later requests wait in the connection's own queue and the rest follows
  once a duplicate of the socket's descriptor polls writable, so nothing interleaves with a payload.
* Several connections are opened when the server advertises ``CAN_MULTI_CONN`` (which is what makes a
  flush on one connection cover writes completed on the others).
* ``request_timeout``: a connection with requests in flight that receives nothing for that long is
  considered dead and dropped (its requests fail with ``ETIMEDOUT``), whether or not anyone still waits
  for them; a slow server that keeps answering is never cut off, and a connection waiting only for a
  FLUSH (which may take minutes on a large dirty cache) gets ``FLUSH_TIMEOUT_FACTOR`` times as long.
* ``close`` never leaves a socket open: it does not wait for requests stuck on a connection that has
  been silent for ``CLOSE_GRACE``, and connections whose orderly close (the DISC going out) does not
  finish within ``CLOSE_GRACE`` — a server that stopped reading — are aborted, as they are when
  ``close`` itself is cancelled.
* A dropped connection fails every pending request at once with :class:`DisconnectedError`, unless
  ``reconnect_delay`` is set: then (like QEMU's ``reconnect-delay``) new requests wait, and requests the
  server never acknowledged are replayed on a new connection — only once the old one is fully closed,
  and never a write over a range that a newer, acknowledged write has since covered.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from nbd import constants as c
from nbd.client_core import (
    ClientHandshake,
    ClientTransmission,
    ExportNameAccepted,
    Greeting,
    HandshakeEvent,
    InfoBlockSizeReceived,
    InfoDescriptionReceived,
    InfoExportReceived,
    InfoNameReceived,
    MetaContext,
    OptionAck,
    OptionError,
    ClientRequest,
    ServerEntry,
    _NeedData,
    describe_rep_error,
)
from nbd.device import BlockLimits, Capabilities, Extent, FlushLatch, pread_padded
from nbd.errors import (
    DisconnectedError,
    HandshakeError,
    NbdError,
    NbdRequestError,
    ProtocolError,
    RequestTimeoutError,
    nbd_to_errno,
)
from nbd.uri import NbdUri, parse_uri

log = logging.getLogger(__name__)

DEFAULT_MAX_IN_FLIGHT = 64
DEFAULT_CONNECT_TIMEOUT = 30.0
MAX_AUTO_CONNECTIONS = 4
DEFAULT_MAX_PAYLOAD = c.MAX_PAYLOAD  # what we assume when the server does not say (spec: 32 MiB is safe)
_MAX_LENGTH32 = 0xFFFFFFFF
_RETRY_INTERVAL = 1.0
_ZEROES = bytes(1024 * 1024)
_UNCORK_PAYLOAD = 64 * 1024
SOCKET_BUFFER = 4 * 1024 * 1024
_MAX_OPTION_REPLIES = 100_000  # e.g. exports in one NBD_OPT_LIST: a bound against endless replies
#: How long ``close`` lets connections send their DISC and close before aborting them.
CLOSE_GRACE = 2.0
#: A connection waiting only for FLUSH replies is dead after this many request timeouts.
FLUSH_TIMEOUT_FACTOR = 10


@dataclass(frozen=True)
class ExportInfo:
    """What negotiation told us about the export (``nbd-backup info`` prints this)."""

    name: str
    size: int
    flags: int
    description: str = ""
    block_minimum: int | None = None
    block_preferred: int | None = None
    block_maximum: int | None = None
    contexts: tuple[str, ...] = ()
    structured: bool = False
    handshake_flags: int = 0
    used_go: bool = True

    def has(self, flag: c.TransmissionFlag) -> bool:
        return bool(self.flags & flag)


@dataclass(frozen=True)
class ExportEntry:
    """One export from ``NBD_OPT_LIST``."""

    name: str
    description: str = ""


@dataclass(slots=True, eq=False)
class _Op:
    """One request as the caller sees it; survives a reconnect (it is replayed, not re-created)."""

    cmd: int
    offset: int
    length: int
    flags: int
    future: asyncio.Future[ClientRequest]
    data: bytes | bytearray | memoryview | None = None
    buffer: bytearray | memoryview | None = None
    seq: int = 0  # writes (WRITE, WRITE_ZEROES, TRIM): issue order, for the replay rule
    parts: int = 0  # a write replayed in pieces (part of it was superseded): pieces still out
    parent: _Op | None = None  # set on such a piece
    fresh: bool = True  # READ into a buffer known to be zeroed (holes need no filling)
    source: _Source | None = None  # WRITE: the payload is in this file, from source_offset (``pwrite_from_fd``)
    source_offset: int = 0


class _Source:
    """A private duplicate of a caller's file descriptor for ``pwrite_from_fd``, closed when its last user
    lets go: the payload of a cancelled write may still be going out after the caller closed its own
    descriptor, whose number a newly opened file may already have taken."""

    __slots__ = ("fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = os.dup(fd)
        self.users = 1

    def hold(self) -> _Source:
        self.users += 1
        return self

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(slots=True, eq=False)
class _FilePayload:
    """What is left to send of a WRITE payload that is still in its source file."""

    op: _Op
    source: _Source
    offset: int
    length: int


_Out = bytes | bytearray | memoryview | _FilePayload
_SOCKET_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNABORTED})
_IOV_MAX = 512


_WRITE_CMDS = frozenset({c.Cmd.WRITE, c.Cmd.WRITE_ZEROES, c.Cmd.TRIM})


class _Connection(asyncio.BufferedProtocol):
    """One socket: the handshake core until transmission, then the transmission core."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.hs = ClientHandshake()
        self.tx: ClientTransmission | None = None
        self._hs_buffer = memoryview(bytearray(65536))
        self._hs_event = asyncio.Event()
        self._eof = False
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._writable = asyncio.Event()
        self._writable.set()
        self.reason: BaseException | None = None  # why we aborted, when we did
        self.last_progress = 0.0  # loop time of the last bytes received, or of a request sent while idle
        self.on_replies: Callable[[list[ClientRequest]], None] = lambda done: None
        self.on_lost: Callable[[_Connection, BaseException], None] = lambda conn, exc: None
        self.ready = False
        self._corked: list[_Out] = []
        self._uncork_scheduled = False
        self._files = 0  # file payloads in ``_corked``: then the pump sends it, not the transport
        self._pumping = False  # the pump waits for the socket to take more (polling ``_poll_fd``)
        self._poll_fd = -1  # a dup of the socket: the transport already polls the socket's own descriptor
        self._sock_fd = -1
        self._plain: bool | None = None

    # -- asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def get_buffer(self, sizehint: int) -> memoryview:
        tx = self.tx
        return tx.get_buffer() if tx is not None else self._hs_buffer

    def buffer_updated(self, nbytes: int) -> None:
        tx = self.tx
        if tx is None:
            self.hs.receive_data(self._hs_buffer[:nbytes])
            self._hs_event.set()
            return
        self.last_progress = self.loop.time()
        try:
            tx.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.abort(exc)
        done = tx.pop_completed()
        if done:
            self.on_replies(done)

    def eof_received(self) -> bool | None:
        self._eof = True
        self._hs_event.set()
        return None

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_pump(close=True)
        self._eof = True
        self._hs_event.set()
        self._writable.set()
        if not self.closed.done():
            self.closed.set_result(None)
        reason: BaseException
        if self.reason is not None:
            reason = self.reason
        else:
            where = " in the middle of a reply" if self.tx is not None and self.tx.mid_reply else ""
            detail = f": {exc}" if exc else ""
            reason = DisconnectedError(f"connection to {self.label} lost{where}{detail}")
        self.on_lost(self, reason)

    # -- helpers

    def abort(self, reason: BaseException) -> None:
        """Drop the connection now; pending requests fail (or are replayed) from ``connection_lost``."""
        if self.reason is None:
            self.reason = reason
        self._stop_pump(close=False)
        if self.transport is not None:
            self.transport.abort()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def next_event(self) -> HandshakeEvent:
        while True:
            event = self.hs.next_event()
            if not isinstance(event, _NeedData):
                return event
            if self._eof:
                self.hs.receive_eof()
                raise HandshakeError(f"connection to {self.label} closed during negotiation")
            self._hs_event.clear()
            await self._hs_event.wait()

    async def option(self, data: bytes) -> list[HandshakeEvent]:
        """Send one option and gather its replies up to the final ack or error."""
        self.write(data)
        events: list[HandshakeEvent] = []
        while True:
            event = await self.next_event()
            events.append(event)
            if isinstance(event, OptionAck | OptionError):
                return events
            if len(events) > _MAX_OPTION_REPLIES:
                raise ProtocolError(f"{self.label}: more than {_MAX_OPTION_REPLIES} replies to one option")

    def start_transmission(self, tx: ClientTransmission) -> None:
        self.tx = tx
        leftover = self.hs.trailing_data
        if leftover:
            raise ProtocolError("server sent data before any request")

    def send(self, op: _Op) -> None:
        tx = self.tx
        assert tx is not None and self.transport is not None
        if op.source is not None and not self._plain_socket():
            # TLS (or a transport without a socket): the payload must go through the transport as bytes.
            try:
                op.data = pread_padded(op.source.fd, op.source_offset, op.length)
            except OSError as exc:
                future = (op.parent or op).future
                if not future.done():
                    future.set_exception(exc)  # the caller sees the file's errno; the rest is bookkeeping
                self.on_replies([ClientRequest(0, op.cmd, op.flags, op.offset, op.length, userdata=op, error=c.Errno.EIO)])
                return
            op.source = None
        if not tx.inflight:
            self.last_progress = self.loop.time()  # the request timeout runs from here
        _, header = tx.request(op.cmd, op.offset, op.length, op.flags, buffer=op.buffer, userdata=op, fresh=op.fresh)
        # Cork: requests issued in one loop iteration leave in one write (each write can wake the server
        # and cost us the CPU on a busy machine); large payloads are written at once, no point holding them.
        corked = self._corked
        corked.append(header)
        if op.source is not None:
            corked.append(_FilePayload(op, op.source.hold(), op.source_offset, op.length))
            self._files += 1
            self._uncork()
            return
        if op.data is not None:
            corked.append(op.data)
            if len(op.data) >= _UNCORK_PAYLOAD:
                self._uncork()
                return
        if not self._uncork_scheduled:
            self._uncork_scheduled = True
            self.loop.call_soon(self._uncork)

    def _uncork(self) -> None:
        self._uncork_scheduled = False
        if self._pumping:
            return  # the pump sends everything corked, in order, once the socket takes more
        if self._files:
            self._pump()
            return
        corked = self._corked
        if not corked:
            return
        self._corked = []
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # connection_lost fails (or replays) the requests
        if len(corked) == 1:
            transport.write(corked[0])  # type: ignore[arg-type]  # no file payload in there
        else:
            transport.writelines(corked)  # type: ignore[arg-type]

    def write_last(self, data: bytes) -> None:
        """Queue ``data`` after everything corked (``NBD_CMD_DISC``) and send what can be sent."""
        self._corked.append(data)
        self._uncork()

    # -- the pump: corked output that holds file payloads goes to the socket directly

    def _pump(self) -> None:
        """Send ``_corked`` in order: bytes with ``writev``, file payloads with ``sendfile``. Direct writes
        only while the transport's buffer is empty (whatever it holds was queued first); whenever the
        socket is full, wait for it to be writable and go on from there."""
        transport = self.transport
        if transport is None or transport.is_closing():
            self._stop_pump(close=False)
            return  # connection_lost fails (or replays) the requests
        if transport.get_write_buffer_size():
            self._wait_writable()
            return
        corked = self._corked
        sock = self._socket_fd()
        done = 0
        try:
            while done < len(corked):
                item = corked[done]
                if isinstance(item, _FilePayload):
                    if not self._send_file(sock, item):
                        break
                    self._files -= 1
                    item.source.release()
                    done += 1
                    continue
                end = done + 1
                while end < len(corked) and end - done < _IOV_MAX and not isinstance(corked[end], _FilePayload):
                    end += 1
                sent = os.writev(sock, cast(list[bytes], corked[done:end]))
                while done < end:
                    size = memoryview(corked[done]).nbytes  # type: ignore[arg-type]
                    if sent < size:
                        if sent:
                            corked[done] = memoryview(corked[done]).cast("B")[sent:]  # type: ignore[arg-type]
                        break
                    sent -= size
                    done += 1
                if done < end:
                    break  # the socket took part of it: full
        except BlockingIOError:
            pass
        except OSError as exc:
            del corked[:done]
            self.abort(DisconnectedError(f"connection to {self.label} lost: {exc}"))
            return
        del corked[:done]
        if corked:
            self._wait_writable()
        else:
            self._stop_pump(close=False)

    def _send_file(self, sock: int, item: _FilePayload) -> bool:
        """Send what is left of a file payload; False when the socket is full. A source that ends early
        reads as zeroes from there (like a raw file's unaligned tail); a source that fails fails its
        request and — the header being out, with no way to take it back — the connection."""
        while item.length:
            try:
                sent = os.sendfile(sock, item.source.fd, item.offset, item.length)
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno in _SOCKET_ERRNOS:
                    raise
                op = item.op.parent or item.op
                if not op.future.done():
                    op.future.set_exception(
                        OSError(exc.errno, f"reading the write payload at offset {item.offset}: {exc.strerror}")
                    )
                raise OSError(exc.errno, f"the source of a write payload failed: {exc.strerror}") from exc
            if sent == 0:
                zeroes = bytes(item.length)
                sent = os.write(sock, zeroes)  # raises BlockingIOError when full: the rest stays a file payload
            item.offset += sent
            item.length -= sent
        return True

    def _wait_writable(self) -> None:
        if self._pumping:
            return
        if self._poll_fd < 0:
            assert self.transport is not None
            self._poll_fd = os.dup(self._socket_fd())
        self.loop.add_writer(self._poll_fd, self._pump)
        self._pumping = True

    def _plain_socket(self) -> bool:
        """Bytes written to the socket reach the peer as they are (no TLS layer above it)."""
        if self._plain is None:
            transport = self.transport
            assert transport is not None
            self._plain = transport.get_extra_info("socket") is not None and (
                transport.get_extra_info("ssl_object") is None
            )
        return self._plain

    def _socket_fd(self) -> int:
        if self._sock_fd < 0:
            assert self.transport is not None
            self._sock_fd = self.transport.get_extra_info("socket").fileno()
        return self._sock_fd

    def _stop_pump(self, *, close: bool) -> None:
        """Stop polling; on ``close`` also give back the duplicate descriptor (it keeps the socket open)
        and the file payloads that will never be sent."""
        if self._pumping:
            self._pumping = False
            self.loop.remove_writer(self._poll_fd)
        if close:
            if self._poll_fd >= 0:
                os.close(self._poll_fd)
                self._poll_fd = -1
            for item in self._corked:
                if isinstance(item, _FilePayload):
                    item.source.release()
            self._corked.clear()
            self._files = 0

    @property
    def inflight(self) -> int:
        return len(self.tx.inflight) if self.tx is not None else 0

    async def writable(self) -> None:
        if not self._writable.is_set():
            await self._writable.wait()


async def _open_socket(uri: NbdUri, label: str) -> _Connection:
    loop = asyncio.get_running_loop()
    if uri.socket is not None:
        path = uri.socket
        if path.startswith("\0"):
            path = "\0" + path[1:]
        _, proto = await loop.create_unix_connection(lambda: _Connection(label), path)
    else:
        _, proto = await loop.create_connection(lambda: _Connection(label), uri.host or "localhost", uri.port)
    sock = proto.transport.get_extra_info("socket") if proto.transport else None
    if sock is not None:
        _tune(sock, tcp=uri.socket is None)
    return proto


def _tune(sock: socket.socket, *, tcp: bool) -> None:
    """Big socket buffers (a whole large request fits: no partial writes left to the loop to finish), and
    no Nagle delay on small requests. Best effort: the kernel caps the sizes (net.core.wmem_max)."""
    options = [
        (socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER),
        (socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER),
    ]
    if tcp:
        options.append((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass


async def _greet(conn: _Connection) -> None:
    event = await conn.next_event()
    if not isinstance(event, Greeting):
        raise ProtocolError(f"expected the server greeting, got {event!r}")
    conn.write(conn.hs.send_client_flags())


def _option_error(conn: _Connection, what: str, event: OptionError, export: str | None = None) -> HandshakeError:
    meaning = describe_rep_error(event.reply)
    target = f" for export {export!r}" if export is not None else ""
    detail = f" ({event.message})" if event.message else ""
    return HandshakeError(f"{conn.label}: {what}{target} refused: {meaning}{detail}", event.reply)


async def _negotiate(conn: _Connection, export: str, *, list_contexts: bool) -> ExportInfo:
    """Structured replies, base:allocation, then GO (falling back to EXPORT_NAME)."""
    await _greet(conn)
    hs = conn.hs
    structured = False
    events = await conn.option(hs.send_option(c.Opt.STRUCTURED_REPLY))
    if isinstance(events[-1], OptionAck):
        structured = True
    contexts: list[str] = []
    if structured and list_contexts:
        events = await conn.option(hs.send_meta_context(export, [], set_=False))
        contexts = [e.name for e in events if isinstance(e, MetaContext)]
    context_id: int | None = None
    if structured:
        events = await conn.option(hs.send_meta_context(export, [c.META_BASE_ALLOCATION], set_=True))
        for event in events:
            if isinstance(event, MetaContext) and event.name == c.META_BASE_ALLOCATION:
                context_id = event.context_id
        if isinstance(events[-1], OptionError) and events[-1].reply == c.Rep.ERR_UNKNOWN:
            raise _option_error(conn, "NBD_OPT_SET_META_CONTEXT", events[-1], export)
    if not contexts and context_id is not None:
        contexts = [c.META_BASE_ALLOCATION]

    requests = (c.Info.BLOCK_SIZE, c.Info.DESCRIPTION)
    events = await conn.option(hs.send_go(export, requests))
    last = events[-1]
    size = flags = None
    description, block = "", None
    used_go = True
    if isinstance(last, OptionError):
        if last.reply != c.Rep.ERR_UNSUP:
            raise _option_error(conn, "NBD_OPT_GO", last, export)
        used_go = False
        conn.write(hs.send_export_name(export))
        reply = await conn.next_event()
        if not isinstance(reply, ExportNameAccepted):
            raise ProtocolError(f"expected the NBD_OPT_EXPORT_NAME reply, got {reply!r}")
        size, flags = reply.size, reply.transmission_flags
    else:
        for event in events:
            if isinstance(event, InfoExportReceived):
                size, flags = event.size, event.transmission_flags
            elif isinstance(event, InfoBlockSizeReceived):
                block = event
            elif isinstance(event, InfoDescriptionReceived):
                description = event.description
            elif isinstance(event, InfoNameReceived):
                pass
        if size is None or flags is None:
            raise ProtocolError("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
        hs.enter_transmission()
    if not flags & c.TransmissionFlag.HAS_FLAGS:
        flags = 0
    conn.start_transmission(ClientTransmission(structured=structured, meta_context_id=context_id))
    return ExportInfo(
        name=export,
        size=size,
        flags=flags,
        description=description,
        block_minimum=block.minimum if block else None,
        block_preferred=block.preferred if block else None,
        block_maximum=block.maximum if block else None,
        contexts=tuple(contexts),
        structured=structured,
        handshake_flags=hs.handshake_flags,
        used_go=used_go,
    )


def _as_uri(uri: str | NbdUri) -> NbdUri:
    return uri if isinstance(uri, NbdUri) else parse_uri(uri)


class NbdClient:
    """A remote NBD export as a :class:`~nbd.device.BlockDevice`."""

    def __init__(
        self,
        uri: NbdUri,
        info: ExportInfo,
        *,
        max_in_flight: int,
        connect_timeout: float,
        request_timeout: float | None,
        reconnect_delay: float,
    ) -> None:
        self.uri = uri
        self.export_info = info
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout if request_timeout and request_timeout > 0 else None
        self._watchdog: asyncio.TimerHandle | None = None
        self._reconnect_delay = reconnect_delay
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_in_flight = max_in_flight
        self._conns: list[_Connection] = []
        self._ready = asyncio.Event()
        self._closing = False
        self._closed = False
        self._broken: BaseException | None = None
        self._failing_fast = False
        self._rmw_lock = asyncio.Lock()
        self._write_seq = 0
        self._pending_writes: dict[int, _Op] = {}  # seq → write op not yet acknowledged
        self._acked_log: list[tuple[int, int, int]] = []  # (seq, offset, end) acked while older writes pend
        self._tasks: set[asyncio.Task[None]] = set()
        self._flush_latch = FlushLatch(str(uri))  # a failed remote FLUSH fails every later flush and FUA write
        flags = info.flags
        minimum = info.block_minimum or 1
        maximum = info.block_maximum or DEFAULT_MAX_PAYLOAD
        maximum = min(maximum, DEFAULT_MAX_PAYLOAD) if maximum != _MAX_LENGTH32 else DEFAULT_MAX_PAYLOAD
        self._minimum = minimum
        self._max_payload = max(minimum, maximum - maximum % minimum)
        self._max_length = _MAX_LENGTH32 - _MAX_LENGTH32 % max(minimum, 1 << 20)  # zero/trim/status
        self._read_only = bool(flags & c.TransmissionFlag.READ_ONLY)
        self._capabilities = Capabilities(
            can_flush=bool(flags & c.TransmissionFlag.SEND_FLUSH),
            can_fua=bool(flags & c.TransmissionFlag.SEND_FUA),
            can_trim=bool(flags & c.TransmissionFlag.SEND_TRIM),
            can_zero=bool(flags & c.TransmissionFlag.SEND_WRITE_ZEROES),
            can_fast_zero=bool(flags & c.TransmissionFlag.SEND_FAST_ZERO),
            can_cache=bool(flags & c.TransmissionFlag.SEND_CACHE),
            can_multi_conn=bool(flags & c.TransmissionFlag.CAN_MULTI_CONN),
            can_extents=c.META_BASE_ALLOCATION in info.contexts,
            rotational=bool(flags & c.TransmissionFlag.ROTATIONAL),
        )
        self._block_limits = BlockLimits(
            minimum=minimum, preferred=max(info.block_preferred or 4096, minimum), maximum=self._max_payload
        )

    # -- construction

    @classmethod
    async def connect(
        cls,
        uri: str | NbdUri,
        *,
        connections: int | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        request_timeout: float | None = None,
        reconnect_delay: float = 0,
    ) -> NbdClient:
        """Connect and negotiate. ``connections=None`` opens up to 4 when the server allows multi-conn.
        ``request_timeout`` (seconds; None or 0: none) drops a connection that goes silent with requests
        in flight (see the module docstring)."""
        target = _as_uri(uri)
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        first, info = await cls._open(target, connect_timeout, list_contexts=True)
        client = cls(
            target,
            info,
            max_in_flight=max_in_flight,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            reconnect_delay=reconnect_delay,
        )
        client._adopt(first)
        wanted = connections if connections is not None else MAX_AUTO_CONNECTIONS
        if wanted > 1 and not info.has(c.TransmissionFlag.CAN_MULTI_CONN):
            if connections is not None:
                log.info("%s: server does not allow multi-conn; using one connection", target)
            wanted = 1
        try:
            await client._open_more(target, connect_timeout, wanted - 1)
        except BaseException:
            await client.close()
            raise
        return client

    async def _open_more(self, target: NbdUri, timeout: float, count: int) -> None:
        """Open ``count`` more connections side by side (each handshake is a few round trips), adopting
        every one that opened, even when another failed or the caller was cancelled, so that ``close``
        finds them all; the first failure is raised."""
        if count <= 0:
            return
        opening = [asyncio.ensure_future(self._open(target, timeout, list_contexts=False)) for _ in range(count)]
        try:
            await asyncio.wait(opening)
        finally:
            for task in opening:
                task.cancel()
            await asyncio.gather(*opening, return_exceptions=True)
            for task in opening:
                if not task.cancelled() and task.exception() is None:
                    self._adopt(task.result()[0])
        for task in opening:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    @staticmethod
    async def _open(uri: NbdUri, timeout: float, *, list_contexts: bool) -> tuple[_Connection, ExportInfo]:
        conn: _Connection | None = None

        async def attempt() -> tuple[_Connection, ExportInfo]:
            nonlocal conn
            conn = await _open_socket(uri, str(uri))
            return conn, await _negotiate(conn, uri.export, list_contexts=list_contexts)

        try:
            return await asyncio.wait_for(attempt(), timeout)
        except TimeoutError:
            if conn is not None:
                conn.abort(TimeoutError())
            raise TimeoutError(f"{uri}: no NBD session within {timeout:g} s") from None
        except (NbdError, OSError):
            if conn is not None and conn.transport is not None:
                conn.transport.abort()
            raise

    def _adopt(self, conn: _Connection) -> None:
        conn.on_replies = self._on_replies
        conn.on_lost = self._on_lost
        conn.ready = True
        if conn not in self._conns:
            self._conns.append(conn)
        self._ready.set()
        self._arm_watchdog()

    # -- the request timeout

    def _arm_watchdog(self) -> None:
        timeout = self._request_timeout
        if timeout is None or self._watchdog is not None or self._closed:
            return
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(min(timeout / 4, 1.0), self._watch)

    def _watch(self) -> None:
        """Drop every connection that has had requests in flight and received nothing for the timeout.
        A periodic check rather than a timer per request: it costs nothing per request and also covers
        requests whose caller stopped waiting (a cancelled copy still holds the connection)."""
        self._watchdog = None
        timeout = self._request_timeout
        if timeout is None or self._closed:
            return
        self._drop_silent(timeout, flush_factor=FLUSH_TIMEOUT_FACTOR)
        self._arm_watchdog()

    def _drop_silent(self, limit: float, *, flush_factor: float = 1) -> None:
        """Abort the connections that have had requests in flight and received nothing for ``limit``
        seconds (``limit * flush_factor`` when they wait only for FLUSH replies)."""
        now = asyncio.get_running_loop().time()
        for conn in self._conns:
            tx = conn.tx
            if tx is None or not tx.inflight or conn.reason is not None or conn.closed.done():
                continue
            silent = now - conn.last_progress
            if silent < limit:
                continue
            if silent < limit * flush_factor and all(r.cmd == c.Cmd.FLUSH for r in tx.inflight.values()):
                continue
            message = f"{self.uri}: request timed out: no reply for {silent:.0f} s ({len(tx.inflight)} in flight)"
            log.warning("%s", message)
            conn.abort(RequestTimeoutError(message))

    @classmethod
    async def list_exports(
        cls, uri: str | NbdUri, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    ) -> list[ExportEntry]:
        """``NBD_OPT_LIST`` (the export in ``uri`` is ignored)."""
        target = _as_uri(uri)

        async def run() -> list[ExportEntry]:
            conn = await _open_socket(target, str(target))
            try:
                await _greet(conn)
                events = await conn.option(conn.hs.send_option(c.Opt.LIST))
                if isinstance(events[-1], OptionError):
                    raise _option_error(conn, "NBD_OPT_LIST", events[-1])
                conn.write(conn.hs.send_abort())
                return [ExportEntry(e.name, e.description) for e in events if isinstance(e, ServerEntry)]
            finally:
                if conn.transport is not None:
                    conn.transport.close()

        try:
            return await asyncio.wait_for(run(), connect_timeout)
        except TimeoutError:
            raise TimeoutError(f"{target}: no export list within {connect_timeout:g} s") from None

    # -- BlockDevice properties

    @property
    def size(self) -> int:
        return self.export_info.size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def block_limits(self) -> BlockLimits:
        return self._block_limits

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def request_timeout(self) -> float | None:
        return self._request_timeout

    def __repr__(self) -> str:
        return f"<NbdClient {self.uri} size={self.size} connections={len(self._conns)}>"

    # -- request machinery

    def _check_usable(self) -> None:
        if self._closed or self._closing:
            raise OSError(errno.EBADF, f"{self.uri}: client is closed")
        if self._broken is not None:
            raise DisconnectedError(f"{self.uri}: connection is gone ({self._broken})")

    async def _pick(self) -> _Connection:
        while True:
            self._check_usable()
            conns = [conn for conn in self._conns if conn.ready]
            if conns:
                return conns[0] if len(conns) == 1 else min(conns, key=_load)
            if self._failing_fast:
                raise DisconnectedError(f"{self.uri}: disconnected, reconnecting")
            self._ready.clear()
            await self._ready.wait()

    async def _submit(
        self,
        cmd: int,
        offset: int,
        length: int,
        flags: int = 0,
        *,
        data: bytes | bytearray | memoryview | None = None,
        buffer: bytearray | memoryview | None = None,
        fresh: bool = True,
        source: _Source | None = None,
        source_offset: int = 0,
    ) -> ClientRequest:
        self._check_usable()
        loop = asyncio.get_running_loop()
        async with self._slots:
            conn = await self._pick()
            await conn.writable()
            if not conn.ready:
                conn = await self._pick()
            op = _Op(cmd, offset, length, flags, loop.create_future(), data, buffer, fresh=fresh)
            if source is not None:
                op.source, op.source_offset = source, source_offset
            if cmd in _WRITE_CMDS:
                self._write_seq += 1
                op.seq = self._write_seq
                self._pending_writes[op.seq] = op
            conn.send(op)
            return await op.future

    def _on_replies(self, done: list[ClientRequest]) -> None:
        for req in done:
            op: _Op = req.userdata
            if op.parent is not None:
                self._piece_done(op.parent, req)
                continue
            if op.seq:
                self._write_acked(op, ok=not req.error)
            future = op.future
            if future.done():
                continue
            if req.error:
                future.set_exception(_request_error(req))
            else:
                future.set_result(req)

    def _piece_done(self, parent: _Op, req: ClientRequest) -> None:
        parent.parts -= 1
        if req.error and not parent.future.done():
            parent.future.set_exception(_request_error(req))
        if parent.parts:
            return
        self._write_acked(parent, ok=not parent.future.done())
        if not parent.future.done():
            parent.future.set_result(req)

    def _write_acked(self, op: _Op, *, ok: bool) -> None:
        self._pending_writes.pop(op.seq, None)
        if not self._pending_writes:
            self._acked_log.clear()
            return
        oldest = next(iter(self._pending_writes))  # sequence numbers are inserted in increasing order
        if ok and op.seq > oldest:
            self._acked_log.append((op.seq, op.offset, op.offset + op.length))
        if self._acked_log and self._acked_log[0][0] < oldest:
            self._acked_log = [entry for entry in self._acked_log if entry[0] > oldest]

    def _on_lost(self, conn: _Connection, reason: BaseException) -> None:
        conn.ready = False
        ops = [req.userdata for req in conn.tx.inflight.values()] if conn.tx is not None else []
        if conn.tx is not None:
            conn.tx.inflight.clear()
        if self._closing or self._closed or self._reconnect_delay <= 0 or isinstance(reason, ProtocolError):
            self._fail(ops, reason)
            if not self._closing and not self._closed:
                self._broken = reason
                self._ready.set()  # wake waiters so they see the failure
                for other in self._conns:
                    if other is not conn and other.transport is not None:
                        other.abort(DisconnectedError(str(reason)))  # one cause, one message
            return
        log.warning("%s: %s; reconnecting (requests wait up to %g s)", self.uri, reason, self._reconnect_delay)
        task = asyncio.get_running_loop().create_task(self._reconnect(conn, ops, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail(self, ops: Sequence[_Op], reason: BaseException) -> None:
        for op in ops:
            op = op.parent or op
            if op.seq:
                self._pending_writes.pop(op.seq, None)
            if not op.future.done():
                op.future.set_exception(_copy_exception(reason))

    async def _reconnect(self, old: _Connection, ops: list[_Op], reason: BaseException) -> None:
        """Wait for the old socket to be gone, then connect again and replay; give up after the delay."""
        try:
            await self._reconnect_loop(old, ops)
        except asyncio.CancelledError:
            self._fail(ops, DisconnectedError(f"{self.uri}: client closed while reconnecting ({reason})"))
            raise
        except BaseException as exc:
            self._fail(ops, exc)
            raise

    async def _reconnect_loop(self, old: _Connection, ops: list[_Op]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._reconnect_delay
        await old.closed  # the old connection is fully closed before anything is replayed
        while True:
            remaining = deadline - loop.time()
            try:
                timeout = min(self._connect_timeout, remaining) if remaining > 0 else self._connect_timeout
                conn, info = await self._open(self.uri, max(timeout, 0.1), list_contexts=False)
            except (OSError, NbdError, TimeoutError) as exc:
                if loop.time() >= deadline and not self._failing_fast:
                    self._failing_fast = True  # from now on new requests fail at once; we keep trying
                    self._fail(ops, DisconnectedError(f"{self.uri}: reconnect failed within the delay: {exc}"))
                    ops.clear()
                    self._ready.set()
                pause = _RETRY_INTERVAL if self._failing_fast else min(_RETRY_INTERVAL, max(remaining, 0.05))
                await asyncio.sleep(pause)
                continue
            if info.size != self.size:
                conn.abort(HandshakeError("export size changed"))
                self._broken = HandshakeError(f"{self.uri}: export size changed from {self.size} to {info.size}")
                self._fail(ops, self._broken)
                self._ready.set()
                return
            self._conns[self._conns.index(old)] = conn
            conn.on_replies = self._on_replies
            conn.on_lost = self._on_lost
            self._replay(conn, ops)
            self._failing_fast = False
            conn.ready = True
            self._ready.set()
            log.warning("%s: reconnected; replayed %d request(s)", self.uri, len(ops))
            return

    def _replay(self, conn: _Connection, ops: list[_Op]) -> None:
        """Send again what the server never acknowledged, oldest first, minus superseded write ranges."""
        for op in sorted(ops, key=lambda o: o.seq):
            parent = op.parent or op
            if parent.future.done():  # timed out or cancelled by its caller: nothing to replay
                if parent.seq:
                    self._pending_writes.pop(parent.seq, None)
                continue
            if op.buffer is not None and op.fresh:
                op.buffer[:] = bytes(len(op.buffer))  # holes rely on a zeroed buffer
            if not op.seq:
                conn.send(op)
                continue
            pieces = self._unsuperseded(op)
            if pieces == [(op.offset, op.offset + op.length)]:
                conn.send(op)
                continue
            # Split: the pieces count against the parent; an empty split completes this op at once.
            parent.parts += len(pieces) - (1 if op.parent is not None else 0)
            if not pieces:
                done = ClientRequest(0, op.cmd, op.flags, op.offset, op.length)
                if op.parent is not None:
                    parent.parts += 1  # undo the -1 above, then count this piece as done
                    self._piece_done(parent, done)
                else:
                    self._write_acked(op, ok=False)
                    op.future.set_result(done)
                continue
            for start, end in pieces:
                data = None
                if op.data is not None:
                    data = memoryview(op.data)[start - op.offset : end - op.offset]
                piece = _Op(op.cmd, start, end - start, op.flags, parent.future, data, None, op.seq, 0, parent)
                if op.source is not None:
                    piece.source, piece.source_offset = op.source, op.source_offset + start - op.offset
                conn.send(piece)

    def _unsuperseded(self, op: _Op) -> list[tuple[int, int]]:
        """Parts of ``op``'s range that no newer acknowledged write has covered."""
        newer = [(start, end) for seq, start, end in self._acked_log if seq > op.seq]
        return subtract_ranges(op.offset, op.offset + op.length, newer)

    # -- alignment helpers

    def _bounds(self, offset: int, length: int, *, write: bool) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.ENOSPC if write else errno.EINVAL, f"{self.uri}: request beyond the end of the export")
        if write and self._read_only:
            raise OSError(errno.EPERM, f"{self.uri}: export is read-only")

    # -- BlockDevice verbs

    async def pread(self, offset: int, length: int) -> bytes:
        self._bounds(offset, length, write=False)
        if length == 0:
            return b""
        minimum = self._minimum
        if minimum > 1 and (offset % minimum or length % minimum):
            start = offset - offset % minimum
            end = min(-(-(offset + length) // minimum) * minimum, self.size)
            data = await self.pread(start, end - start)
            return data[offset - start : offset - start + length]
        if length <= self._max_payload:
            req = await self._submit(c.Cmd.READ, offset, length)
            assert isinstance(req.buffer, bytearray)
            return cast(bytes, req.buffer)  # a fresh bytearray: bytes-like and ours to give; copying costs
        buffer = bytearray(length)
        await self._read_into(offset, memoryview(buffer), fresh=True)
        return cast(bytes, buffer)

    async def pread_into(self, offset: int, buffer: bytearray | memoryview) -> None:
        """Read ``len(buffer)`` bytes into the caller's (reused) buffer: no allocation, no extra copy.

        Not part of ``BlockDevice``; ``nbd-backup copy`` uses it when a device has it."""
        length = len(buffer)
        self._bounds(offset, length, write=False)
        if length == 0:
            return
        minimum = self._minimum
        if minimum > 1 and (offset % minimum or length % minimum):
            buffer[:] = await self.pread(offset, length)
            return
        await self._read_into(offset, memoryview(buffer).cast("B"), fresh=False)

    async def _read_into(self, offset: int, view: memoryview, *, fresh: bool) -> None:
        length, step = len(view), self._max_payload
        await _gather(
            self._submit(c.Cmd.READ, offset + pos, min(step, length - pos), buffer=view[pos : pos + step], fresh=fresh)
            for pos in range(0, length, step)
        )

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        length = len(data)
        self._bounds(offset, length, write=True)
        if fua:
            self._flush_latch.check()
        if length == 0:
            return
        minimum = self._minimum
        if minimum > 1 and (offset % minimum or length % minimum):
            await self._rmw(offset, data, fua=fua)
            return
        flags = c.CmdFlag.FUA if fua and self._capabilities.can_fua else 0
        if length <= self._max_payload:
            await self._submit(c.Cmd.WRITE, offset, length, flags, data=data)
        else:
            view = memoryview(data)
            step = self._max_payload
            await _gather(
                self._submit(c.Cmd.WRITE, offset + pos, min(step, length - pos), flags, data=view[pos : pos + step])
                for pos in range(0, length, step)
            )
        if fua and not self._capabilities.can_fua:
            await self.flush()

    async def pwrite_from_fd(self, offset: int, fd: int, file_offset: int, length: int, *, fua: bool = False) -> None:
        """Write ``length`` bytes of the file ``fd`` (from ``file_offset``; past its end: zeroes) at
        ``offset``, sent with ``sendfile`` from the page cache into the socket — no copy through Python.

        Not part of ``BlockDevice``; ``nbd-backup copy`` uses it when the source is a raw file. ``fd`` is
        duplicated: the caller may close its own once this returns or is cancelled."""
        self._bounds(offset, length, write=True)
        if fua:
            self._flush_latch.check()
        if length == 0:
            return
        minimum = self._minimum
        if minimum > 1 and (offset % minimum or length % minimum):
            await self.pwrite(offset, pread_padded(fd, file_offset, length), fua=fua)
            return
        flags = c.CmdFlag.FUA if fua and self._capabilities.can_fua else 0
        source = _Source(fd)
        try:
            step = self._max_payload
            await _gather(
                self._submit(
                    c.Cmd.WRITE,
                    offset + pos,
                    min(step, length - pos),
                    flags,
                    source=source,
                    source_offset=file_offset + pos,
                )
                for pos in range(0, length, step)
            )
        finally:
            source.release()
        if fua and not self._capabilities.can_fua:
            await self.flush()

    async def _rmw(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool) -> None:
        """An unaligned write on a server with a minimum block size: read the edge blocks, merge, write."""
        minimum = self._minimum
        start = offset - offset % minimum
        end = min(-(-(offset + len(data)) // minimum) * minimum, self.size)
        async with self._rmw_lock:
            merged = bytearray(await self.pread(start, end - start))
            merged[offset - start : offset - start + len(data)] = data
            await self.pwrite(start, merged, fua=fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        self._bounds(offset, length, write=True)
        if fua:
            self._flush_latch.check()
        if length == 0:
            return
        caps = self._capabilities
        if fast and not (caps.can_zero and caps.can_fast_zero):
            raise OSError(errno.ENOTSUP, f"{self.uri}: server cannot zero fast")
        minimum = self._minimum
        head = -offset % minimum if minimum > 1 else 0
        unaligned = minimum > 1 and bool(head or (offset + length) % minimum)
        if unaligned and fast:
            raise OSError(errno.ENOTSUP, f"{self.uri}: an unaligned zero needs writes, it cannot be fast")
        if unaligned:
            start = offset + min(head, length)
            end = max(start, offset + length - (offset + length) % minimum)
            if head:
                await self.pwrite(offset, _ZEROES[: min(head, length)], fua=fua)
            if end < offset + length:
                await self.pwrite(end, _ZEROES[: offset + length - end], fua=fua)
            offset, length = start, end - start
            if length == 0:
                return
        if not caps.can_zero:
            await self._write_zero_buffers(offset, length, fua=fua)
            return
        flags = 0 if may_trim else c.CmdFlag.NO_HOLE
        if fast:
            flags |= c.CmdFlag.FAST_ZERO
        if fua and caps.can_fua:
            flags |= c.CmdFlag.FUA
        await self._ranged(c.Cmd.WRITE_ZEROES, offset, length, flags)
        if fua and not caps.can_fua:
            await self.flush()

    async def _write_zero_buffers(self, offset: int, length: int, *, fua: bool) -> None:
        step = min(len(_ZEROES), self._max_payload)
        step -= step % self._minimum
        window = step * self._max_in_flight  # a few requests at a time, however big the range
        zeroes = memoryview(_ZEROES)
        for base in range(0, length, window):
            end = min(base + window, length)
            await _gather(
                self.pwrite(offset + pos, zeroes[: min(step, end - pos)], fua=fua) for pos in range(base, end, step)
            )

    async def _ranged(self, cmd: int, offset: int, length: int, flags: int = 0) -> None:
        step = self._max_length
        await _gather(self._submit(cmd, offset + pos, min(step, length - pos), flags) for pos in range(0, length, step))

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._bounds(offset, length, write=True)
        if fua:
            self._flush_latch.check()
        if not self._capabilities.can_trim:
            return  # advisory
        minimum = self._minimum
        start = -(-offset // minimum) * minimum
        end = (offset + length) - (offset + length) % minimum
        if end <= start:
            return
        flags = c.CmdFlag.FUA if fua and self._capabilities.can_fua else 0
        await self._ranged(c.Cmd.TRIM, start, end - start, flags)
        if fua and not self._capabilities.can_fua:
            await self.flush()

    async def flush(self) -> None:
        self._check_usable()
        self._flush_latch.check()
        if self._capabilities.can_flush:
            try:
                await self._submit(c.Cmd.FLUSH, 0, 0)
            except OSError as exc:  # an error reply, a lost connection, a timeout: durability unknown
                self._flush_latch.failed(exc)
                raise

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._bounds(offset, length, write=False)
        if length == 0:
            return []
        if not self._capabilities.can_extents:
            return [Extent(length, 0)]
        minimum = self._minimum
        start = offset - offset % minimum
        end = min(-(-(offset + length) // minimum) * minimum, self.size)
        end = min(end, start + self._max_length)
        req = await self._submit(c.Cmd.BLOCK_STATUS, start, end - start)
        extents: list[Extent] = []
        skip = offset - start
        budget = length
        for ext_length, flags in req.extents:
            if skip:
                cut = min(skip, ext_length)
                ext_length -= cut
                skip -= cut
            take = min(ext_length, budget)
            if take <= 0:
                continue
            extents.append(Extent(take, flags))
            budget -= take
            if budget == 0:
                break
        if not extents:
            raise NbdRequestError(errno.EIO, f"{self.uri}: block status did not cover the request")
        return extents

    async def cache(self, offset: int, length: int) -> None:
        self._bounds(offset, length, write=False)
        if length and self._capabilities.can_cache:
            await self._ranged(c.Cmd.CACHE, offset, length)

    async def close(self) -> None:
        """Wait for what is in flight, send ``NBD_CMD_DISC``, and close every connection; a connection
        that has not closed within ``CLOSE_GRACE`` (or when this is cancelled) is aborted."""
        if self._closed:
            return
        self._closing = True
        self._ready.set()  # requests waiting for a connection see the client closing
        for task in list(self._tasks):
            task.cancel()
        try:
            await self._drain_or_drop()
            for conn in self._conns:
                transport = conn.transport
                if transport is None or transport.is_closing():
                    continue
                if conn.ready and conn.tx is not None:
                    try:
                        conn.write_last(ClientTransmission.disconnect_request())
                    except (OSError, RuntimeError):
                        pass
                transport.close()
            self._closed = True
            if self._conns:
                await asyncio.wait([asyncio.ensure_future(conn.closed) for conn in self._conns], timeout=CLOSE_GRACE)
        finally:
            self._closed = True
            self._abort_unclosed()

    def _abort_unclosed(self) -> None:
        """Drop the sockets an orderly close could not finish (a server that stopped reading): a closed
        client holds no connection, whatever the server does."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        stuck = [conn for conn in self._conns if not conn.closed.done()]
        if stuck:
            log.warning("%s: aborting %d connection(s) that did not close", self.uri, len(stuck))
        for conn in stuck:
            conn.abort(DisconnectedError(f"{self.uri}: client closed"))

    async def _drain_or_drop(self) -> None:
        """Wait (up to the connect timeout) for the requests in flight, but not for those stuck on a
        connection that has been silent for ``CLOSE_GRACE`` (ten times that for FLUSH only, as for the
        request timeout): that one is dropped and they fail."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        drain = asyncio.ensure_future(self._drain())
        try:
            while not drain.done():
                self._drop_silent(CLOSE_GRACE, flush_factor=FLUSH_TIMEOUT_FACTOR)
                left = deadline - loop.time()
                if left <= 0:
                    log.warning("%s: closing with requests still in flight", self.uri)
                    return
                await asyncio.wait({drain}, timeout=min(left, CLOSE_GRACE / 4))
        finally:
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)

    async def _drain(self) -> None:
        """Wait until every request slot is free (then hand them back: late callers get EBADF, not a hang)."""
        taken = 0
        try:
            for _ in range(self._max_in_flight):
                await self._slots.acquire()
                taken += 1
        finally:
            for _ in range(taken):
                self._slots.release()

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def subtract_ranges(start: int, end: int, covers: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[start, end)`` minus every ``[a, b)`` of ``covers``, as sorted disjoint half-open ranges."""
    pieces = [(start, end)]
    for cover_start, cover_end in covers:
        remaining: list[tuple[int, int]] = []
        for a, b in pieces:
            if cover_end <= a or cover_start >= b:
                remaining.append((a, b))
                continue
            if a < cover_start:
                remaining.append((a, cover_start))
            if cover_end < b:
                remaining.append((cover_end, b))
        pieces = remaining
    return pieces


def _load(conn: _Connection) -> int:
    return conn.inflight


def _request_error(req: ClientRequest) -> NbdRequestError:
    err = nbd_to_errno(req.error)
    name = c.Cmd(req.cmd).name if req.cmd in c.Cmd._value2member_map_ else str(req.cmd)
    where = f" at offset {req.error_offset}" if req.error_offset is not None else ""
    detail = f" ({req.message})" if req.message else ""
    return NbdRequestError(err, f"{os.strerror(err)}: {name} [{req.offset}, +{req.length}){where}{detail}")


def _copy_exception(reason: BaseException) -> BaseException:
    if isinstance(reason, RequestTimeoutError):
        return RequestTimeoutError(str(reason))
    if isinstance(reason, DisconnectedError):
        return DisconnectedError(str(reason))
    if isinstance(reason, NbdError):
        return DisconnectedError(str(reason))
    return DisconnectedError(f"connection lost: {reason}")


async def _gather(coros: Iterable[Coroutine[Any, Any, Any]]) -> None:
    """Run the pieces of one split request; the first failure wins, the rest are awaited (no orphans).

    The usual case is one piece: it is awaited directly (a task per request would cost more than the rest)."""
    pieces = list(coros)
    if len(pieces) == 1:
        await pieces[0]
        return
    tasks = [asyncio.ensure_future(piece) for piece in pieces]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


__all__ = ["ExportEntry", "ExportInfo", "NbdClient"]
