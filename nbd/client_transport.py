"""The client's sockets: one :class:`ClientConnection` per socket, and what moves bytes through it.

* Each connection is an ``asyncio.BufferedProtocol``, so read payloads are received straight into the
  caller's buffer (no intermediate copies), and the cookie → future table is the core's in-flight map.
* Requests issued in one loop iteration leave corked in one write; large payloads go at once.
* A write whose payload is in a file (``NbdClient.pwrite_from_fd``) is sent with ``sendfile`` straight from
  the file into the socket (no copy through Python). Only while the transport holds nothing do we write
  to the socket ourselves; when the socket is full mid-payload, later requests wait in the connection's
  own queue and the rest follows once a duplicate of the socket's descriptor polls writable, so nothing
  interleaves with a payload.
* :class:`RequestWatchdog`: a connection with requests in flight that receives nothing for the request
  timeout is dropped (its requests fail with ``ETIMEDOUT``), whether or not anyone still waits for them; a
  slow server that keeps answering is never cut off, and a connection waiting only for a FLUSH (which may
  take minutes on a large dirty cache) gets ``FLUSH_TIMEOUT_FACTOR`` times as long.

Which requests to send, and what to do when a connection is lost, is ``nbd.client``'s business; the
handshake is ``nbd.client_negotiate``'s.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

from nbd import constants as c
from nbd.client_core import ClientHandshake, ClientRequest, ClientTransmission, HandshakeEvent, _NeedData
from nbd.device import pread_padded
from nbd.errors import DisconnectedError, HandshakeError, ProtocolError, RequestTimeoutError
from nbd.uri import NbdUri

log = logging.getLogger(__name__)

_UNCORK_PAYLOAD = 64 * 1024
SOCKET_BUFFER = 4 * 1024 * 1024
#: A connection waiting only for FLUSH replies is dead after this many request timeouts.
FLUSH_TIMEOUT_FACTOR = 10


@dataclass(slots=True, eq=False)
class Op:
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
    parent: Op | None = None  # set on such a piece
    fresh: bool = True  # READ into a buffer known to be zeroed (holes need no filling)
    source: PayloadSource | None = None  # WRITE: the payload is in this file, from source_offset (``pwrite_from_fd``)
    source_offset: int = 0


class PayloadSource:
    """A private duplicate of a caller's file descriptor for ``pwrite_from_fd``, closed when its last user
    lets go: the payload of a cancelled write may still be going out after the caller closed its own
    descriptor, whose number a newly opened file may already have taken."""

    __slots__ = ("fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = os.dup(fd)
        self.users = 1

    def hold(self) -> PayloadSource:
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

    op: Op
    source: PayloadSource
    offset: int
    length: int


_Out = bytes | bytearray | memoryview | _FilePayload
_SOCKET_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNABORTED})
_IOV_MAX = 512


class ClientConnection(asyncio.BufferedProtocol):
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
        self.on_lost: Callable[[ClientConnection, BaseException], None] = lambda conn, exc: None
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

    def start_transmission(self, tx: ClientTransmission) -> None:
        self.tx = tx
        leftover = self.hs.trailing_data
        if leftover:
            raise ProtocolError("server sent data before any request")

    def send(self, op: Op) -> None:
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
                self.on_replies(
                    [ClientRequest(0, op.cmd, op.flags, op.offset, op.length, userdata=op, error=c.Errno.EIO)]
                )
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


async def open_socket(uri: NbdUri, label: str) -> ClientConnection:
    loop = asyncio.get_running_loop()
    if uri.socket is not None:
        path = uri.socket
        if path.startswith("\0"):
            path = "\0" + path[1:]
        _, proto = await loop.create_unix_connection(lambda: ClientConnection(label), path)
    else:
        _, proto = await loop.create_connection(lambda: ClientConnection(label), uri.host or "localhost", uri.port)
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


def drop_silent(conns: Iterable[ClientConnection], limit: float, *, label: str, flush_factor: float = 1) -> None:
    """Abort the connections that have had requests in flight and received nothing for ``limit``
    seconds (``limit * flush_factor`` when they wait only for FLUSH replies)."""
    now = asyncio.get_running_loop().time()
    for conn in conns:
        tx = conn.tx
        if tx is None or not tx.inflight or conn.reason is not None or conn.closed.done():
            continue
        silent = now - conn.last_progress
        if silent < limit:
            continue
        if silent < limit * flush_factor and all(r.cmd == c.Cmd.FLUSH for r in tx.inflight.values()):
            continue
        message = f"{label}: request timed out: no reply for {silent:.0f} s ({len(tx.inflight)} in flight)"
        log.warning("%s", message)
        conn.abort(RequestTimeoutError(message))


class RequestWatchdog:
    """The request timeout: a periodic check rather than a timer per request, so it costs nothing per
    request and also covers requests whose caller stopped waiting (a cancelled copy still holds the
    connection). ``conns`` is the client's own list: connections added or replaced later are watched."""

    def __init__(self, conns: list[ClientConnection], timeout: float, label: str) -> None:
        self._conns = conns
        self._timeout = timeout
        self._label = label
        self._handle: asyncio.TimerHandle | None = None
        self._stopped = False

    def arm(self) -> None:
        if self._handle is not None or self._stopped:
            return
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(min(self._timeout / 4, 1.0), self._watch)

    def stop(self) -> None:
        self._stopped = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _watch(self) -> None:
        self._handle = None
        if self._stopped:
            return
        drop_silent(self._conns, self._timeout, label=self._label, flush_factor=FLUSH_TIMEOUT_FACTOR)
        self.arm()


__all__ = [
    "FLUSH_TIMEOUT_FACTOR",
    "ClientConnection",
    "Op",
    "PayloadSource",
    "RequestWatchdog",
    "drop_silent",
    "open_socket",
]
