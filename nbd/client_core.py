"""The client side of NBD without I/O: bytes in, events out (like h11).

Two machines, one per phase:

* :class:`ClientHandshake` — fixed newstyle negotiation. The caller builds option requests with its
  ``send_*`` methods (they return the bytes to write), feeds what the server sends to
  :meth:`ClientHandshake.receive_data` and pulls typed events with :meth:`ClientHandshake.next_event`.
  Which options to send and when is the caller's policy (``nbd.client_negotiate``); this class only knows
  what is legal on the wire and what the replies mean.
* :class:`ClientTransmission` — the transmission phase. :meth:`ClientTransmission.request` returns a
  :class:`ClientRequest` and the header to send; replies are fed either as bytes (:meth:`feed`) or through
  the zero-copy pair :meth:`get_buffer` / :meth:`buffer_updated` (the shape of
  ``asyncio.BufferedProtocol``), which lets read payloads land directly in the request's buffer.
  Finished requests come out of :meth:`ClientTransmission.pop_completed`.

Anything the server sends that the protocol does not allow raises :class:`~nbd.errors.ProtocolError`:
the connection must then be dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from nbd import constants as c
from nbd import wire
from nbd.errors import HandshakeError, ProtocolError
from nbd.runs import append_run

# Bounds on what we accept from a server, so a broken or hostile one cannot make us allocate freely.
MAX_OPTION_REPLY = 1 << 20
MAX_STATUS_CHUNK = 4 + 8 * (1 << 21)
MAX_ERROR_CHUNK = 4 + 2 + c.MAX_STRING + 8


# --- handshake ------------------------------------------------------------------------------------


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""Returned by :meth:`ClientHandshake.next_event` when more bytes are needed."""

# The events below say what arrived; the byte layouts of the same messages are the structs in ``nbd.wire``
# (``wire.InfoExport`` is the layout, :class:`InfoExportReceived` the event), hence the distinct names.


@dataclass(frozen=True, slots=True)
class Greeting:
    handshake_flags: int


@dataclass(frozen=True, slots=True)
class OptionAck:
    option: int


@dataclass(frozen=True, slots=True)
class OptionError:
    option: int
    reply: int
    message: str


@dataclass(frozen=True, slots=True)
class ServerEntry:
    """One ``NBD_REP_SERVER`` of ``NBD_OPT_LIST``."""

    name: str
    description: str


@dataclass(frozen=True, slots=True)
class MetaContext:
    context_id: int
    name: str


@dataclass(frozen=True, slots=True)
class InfoExportReceived:
    size: int
    transmission_flags: int


@dataclass(frozen=True, slots=True)
class InfoNameReceived:
    name: str


@dataclass(frozen=True, slots=True)
class InfoDescriptionReceived:
    description: str


@dataclass(frozen=True, slots=True)
class InfoBlockSizeReceived:
    minimum: int
    preferred: int
    maximum: int


@dataclass(frozen=True, slots=True)
class InfoUnknownReceived:
    """An ``NBD_REP_INFO`` type we do not know; the spec says to ignore it."""

    info: int


@dataclass(frozen=True, slots=True)
class ExportNameAccepted:
    """The reply to ``NBD_OPT_EXPORT_NAME``; transmission starts right after it."""

    size: int
    transmission_flags: int


HandshakeEvent = (
    Greeting
    | OptionAck
    | OptionError
    | ServerEntry
    | MetaContext
    | InfoExportReceived
    | InfoNameReceived
    | InfoDescriptionReceived
    | InfoBlockSizeReceived
    | InfoUnknownReceived
    | ExportNameAccepted
)


class HandshakeState(Enum):
    AWAIT_GREETING = auto()
    SEND_CLIENT_FLAGS = auto()
    READY = auto()  # may send an option
    AWAIT_REPLY = auto()  # an option was sent; its reply (possibly several messages) is pending
    AWAIT_EXPORT_NAME_REPLY = auto()
    TRANSMISSION = auto()
    CLOSED = auto()


_OPTION_REPLY_HEADER_SIZE = wire.OPTION_REPLY_HEADER_FAST.size
_EXPORT_NAME_REPLY_SIZE = 10
_ERROR_MEANINGS = {
    c.Rep.ERR_UNSUP: "option not supported by the server",
    c.Rep.ERR_POLICY: "refused by server policy",
    c.Rep.ERR_INVALID: "invalid request",
    c.Rep.ERR_PLATFORM: "not supported on the server's platform",
    c.Rep.ERR_TLS_REQD: "the server requires TLS",
    c.Rep.ERR_UNKNOWN: "no such export",
    c.Rep.ERR_SHUTDOWN: "the server is shutting down",
    c.Rep.ERR_BLOCK_SIZE_REQD: "the server requires block size negotiation",
    c.Rep.ERR_TOO_BIG: "request or reply too big",
    c.Rep.ERR_EXT_HEADER_REQD: "the server requires extended headers",
}


def describe_rep_error(reply: int) -> str:
    try:
        return f"{c.Rep(reply).name}: {_ERROR_MEANINGS.get(c.Rep(reply), 'error')}"
    except ValueError:
        return f"unknown error reply {reply:#x}"


class ClientHandshake:
    """Fixed newstyle negotiation, client side (one option in flight at a time, as the spec asks)."""

    def __init__(self) -> None:
        self.state = HandshakeState.AWAIT_GREETING
        self.handshake_flags = 0
        self.no_zeroes = False
        self._buffer = bytearray()
        self._option: int | None = None

    # -- input

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.state is HandshakeState.CLOSED:
            raise ProtocolError("data received after the handshake was closed")
        self._buffer += data

    @property
    def trailing_data(self) -> bytes:
        """Bytes received past the end of negotiation (the server must not send any)."""
        return bytes(self._buffer)

    def next_event(self) -> HandshakeEvent | _NeedData:
        state = self.state
        if state is HandshakeState.AWAIT_GREETING:
            return self._greeting()
        if state is HandshakeState.AWAIT_REPLY:
            return self._option_reply()
        if state is HandshakeState.AWAIT_EXPORT_NAME_REPLY:
            return self._export_name_reply()
        if self._buffer:
            raise ProtocolError(f"server sent {len(self._buffer)} unexpected bytes in state {state.name}")
        return NEED_DATA

    def _greeting(self) -> Greeting | _NeedData:
        if len(self._buffer) < 18:
            return NEED_DATA
        magic, ihaveopt = int.from_bytes(self._buffer[:8], "big"), int.from_bytes(self._buffer[8:16], "big")
        if magic != c.NBDMAGIC:
            raise ProtocolError("not an NBD server (bad greeting magic)")
        if ihaveopt == c.OLD_MAGIC:
            raise HandshakeError("the server speaks the oldstyle protocol, which is not supported")
        if ihaveopt != c.IHAVEOPT:
            raise ProtocolError(f"bad handshake magic {ihaveopt:#x}")
        flags = int.from_bytes(self._buffer[16:18], "big")
        if not flags & c.HandshakeFlag.FIXED_NEWSTYLE:
            raise HandshakeError("the server does not support fixed newstyle negotiation")
        del self._buffer[:18]
        self.handshake_flags = flags
        self.state = HandshakeState.SEND_CLIENT_FLAGS
        return Greeting(flags)

    def _option_reply(self) -> HandshakeEvent | _NeedData:
        if len(self._buffer) < _OPTION_REPLY_HEADER_SIZE:
            return NEED_DATA
        magic, option, reply, length = wire.OPTION_REPLY_HEADER_FAST.unpack_from(self._buffer)
        if magic != c.OPT_REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic {magic:#x}")
        if option != self._option:
            raise ProtocolError(f"reply for option {option} while option {self._option} is pending")
        if length > MAX_OPTION_REPLY:
            raise ProtocolError(f"option reply of {length} bytes is too long")
        end = _OPTION_REPLY_HEADER_SIZE + length
        if len(self._buffer) < end:
            return NEED_DATA
        payload = bytes(self._buffer[_OPTION_REPLY_HEADER_SIZE:end])
        del self._buffer[:end]
        if c.rep_is_error(reply):
            self._option_done()
            return OptionError(option, reply, payload.decode("utf-8", "replace"))
        if reply == c.Rep.ACK:
            if payload:
                raise ProtocolError("NBD_REP_ACK with a payload")
            self._option_done()
            return OptionAck(option)
        if reply == c.Rep.SERVER and option == c.Opt.LIST:
            return _parse_server(payload)
        if reply == c.Rep.META_CONTEXT and option in (c.Opt.LIST_META_CONTEXT, c.Opt.SET_META_CONTEXT):
            if len(payload) < 4:
                raise ProtocolError("short NBD_REP_META_CONTEXT")
            return MetaContext(int.from_bytes(payload[:4], "big"), _utf8(payload[4:]))
        if reply == c.Rep.INFO and option in (c.Opt.INFO, c.Opt.GO):
            return _parse_info(payload)
        raise ProtocolError(f"unexpected reply type {reply:#x} to option {option}")

    def _option_done(self) -> None:
        self._option = None
        self.state = HandshakeState.READY

    def _export_name_reply(self) -> ExportNameAccepted | _NeedData:
        need = _EXPORT_NAME_REPLY_SIZE + (0 if self.no_zeroes else 124)
        if len(self._buffer) < need:
            return NEED_DATA
        parsed = wire.ExportNameReply.parse(bytes(self._buffer[:_EXPORT_NAME_REPLY_SIZE]))
        size, flags = parsed.size, parsed.transmission_flags
        del self._buffer[:need]
        self.state = HandshakeState.TRANSMISSION
        return ExportNameAccepted(size, flags)

    def receive_eof(self) -> None:
        """The server closed the connection: explain it in terms of where negotiation was."""
        state = self.state
        self.state = HandshakeState.CLOSED
        if state is HandshakeState.AWAIT_EXPORT_NAME_REPLY:
            raise HandshakeError("the server closed the connection after NBD_OPT_EXPORT_NAME (no such export?)")
        if state is HandshakeState.AWAIT_GREETING:
            raise HandshakeError("the server closed the connection before its greeting")
        if state is not HandshakeState.TRANSMISSION:
            raise HandshakeError(f"the server closed the connection during negotiation ({state.name})")

    # -- output

    def send_client_flags(self) -> bytes:
        if self.state is not HandshakeState.SEND_CLIENT_FLAGS:
            raise ProtocolError(f"cannot send client flags in state {self.state.name}")
        flags = c.ClientFlag.C_FIXED_NEWSTYLE
        if self.handshake_flags & c.HandshakeFlag.NO_ZEROES:
            flags |= c.ClientFlag.C_NO_ZEROES
            self.no_zeroes = True
        self.state = HandshakeState.READY
        return int(flags).to_bytes(4, "big")

    def send_option(self, option: int, payload: bytes = b"") -> bytes:
        """Any option with a reply (all but ``EXPORT_NAME``); its reply events follow."""
        if self.state is not HandshakeState.READY:
            raise ProtocolError(f"cannot send an option in state {self.state.name}")
        if option == c.Opt.EXPORT_NAME:
            raise ValueError("use send_export_name()")
        self._option = option
        self.state = HandshakeState.AWAIT_REPLY
        return wire.OPTION_HEADER_FAST.pack(c.IHAVEOPT, option, len(payload)) + payload

    def send_go(self, name: str, info_requests: tuple[int, ...] = (c.Info.BLOCK_SIZE,), *, go: bool = True) -> bytes:
        _check_name(name)
        payload = wire.InfoRequest.build({"name": name, "requests": list(info_requests)})
        return self.send_option(c.Opt.GO if go else c.Opt.INFO, payload)

    def send_meta_context(self, name: str, queries: list[str], *, set_: bool) -> bytes:
        _check_name(name)
        payload = wire.MetaContextRequest.build({"name": name, "queries": queries})
        return self.send_option(c.Opt.SET_META_CONTEXT if set_ else c.Opt.LIST_META_CONTEXT, payload)

    def send_export_name(self, name: str) -> bytes:
        """The oldest way into transmission; the server closes the connection if it does not know ``name``."""
        if self.state is not HandshakeState.READY:
            raise ProtocolError(f"cannot send NBD_OPT_EXPORT_NAME in state {self.state.name}")
        _check_name(name)
        self.state = HandshakeState.AWAIT_EXPORT_NAME_REPLY
        data = name.encode()
        return wire.OPTION_HEADER_FAST.pack(c.IHAVEOPT, c.Opt.EXPORT_NAME, len(data)) + data

    def send_abort(self) -> bytes:
        """``NBD_OPT_ABORT``: we do not wait for its ack (servers may just close)."""
        data = self.send_option(c.Opt.ABORT)
        self.state = HandshakeState.CLOSED
        return data

    def enter_transmission(self) -> None:
        """Called after an ``NBD_OPT_GO`` ack."""
        if self.state is not HandshakeState.READY:
            raise ProtocolError(f"cannot start transmission in state {self.state.name}")
        self.state = HandshakeState.TRANSMISSION


def _check_name(name: str) -> None:
    if len(name.encode()) > c.MAX_STRING:
        raise ValueError(f"export name longer than {c.MAX_STRING} bytes")


def _utf8(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ProtocolError("string from the server is not valid UTF-8") from None


def _parse_server(payload: bytes) -> ServerEntry:
    if len(payload) < 4:
        raise ProtocolError("short NBD_REP_SERVER")
    name_length = int.from_bytes(payload[:4], "big")
    if 4 + name_length > len(payload):
        raise ProtocolError("NBD_REP_SERVER name overruns its reply")
    return ServerEntry(_utf8(payload[4 : 4 + name_length]), _utf8(payload[4 + name_length :]))


def _parse_info(payload: bytes) -> HandshakeEvent:
    if len(payload) < 2:
        raise ProtocolError("short NBD_REP_INFO")
    info = int.from_bytes(payload[:2], "big")
    if info == c.Info.EXPORT:
        if len(payload) != 12:
            raise ProtocolError("NBD_INFO_EXPORT of the wrong length")
        return InfoExportReceived(int.from_bytes(payload[2:10], "big"), int.from_bytes(payload[10:12], "big"))
    if info == c.Info.NAME:
        return InfoNameReceived(_utf8(payload[2:]))
    if info == c.Info.DESCRIPTION:
        return InfoDescriptionReceived(_utf8(payload[2:]))
    if info == c.Info.BLOCK_SIZE:
        if len(payload) != 14:
            raise ProtocolError("NBD_INFO_BLOCK_SIZE of the wrong length")
        parsed = wire.InfoBlockSize.parse(payload)
        minimum, preferred, maximum = parsed.minimum, parsed.preferred, parsed.maximum
        if not _power_of_two(minimum) or not _power_of_two(preferred) or minimum > 65536 or preferred < minimum:
            raise ProtocolError(f"invalid block sizes {minimum}/{preferred}/{maximum}")
        if maximum != 0xFFFFFFFF and (maximum < preferred or maximum % minimum):
            raise ProtocolError(f"invalid maximum payload {maximum} for minimum block {minimum}")
        return InfoBlockSizeReceived(minimum, preferred, maximum)
    return InfoUnknownReceived(info)


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


# --- transmission ---------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class ClientRequest:
    """One request in flight: what was asked, and what the replies said so far."""

    cookie: int
    cmd: int
    flags: int
    offset: int
    length: int
    buffer: bytearray | memoryview | None = None  # READ: the payload lands here (fresh, so holes are zeroes already)
    userdata: Any = None
    error: int = 0
    message: str = ""
    error_offset: int | None = None
    extents: list[tuple[int, int]] = field(default_factory=list)
    map_extents: list[tuple[int, int]] = field(default_factory=list)  # BLOCK_STATUS: the map context's runs
    received: int = 0  # READ: bytes covered by data and hole chunks
    seen_status: bool = False
    seen_map: bool = False
    fresh: bool = True  # READ: the buffer reads as zeroes already, so hole chunks need no filling


class _Rx(Enum):
    HEADER = auto()
    CHUNK = auto()  # a non-data structured chunk payload is being gathered
    DATA_OFFSET = auto()  # the 8-byte offset of an OFFSET_DATA chunk
    DATA = auto()  # read payload going into a request buffer


_SIMPLE = wire.SIMPLE_REPLY_FAST
_STRUCTURED = wire.STRUCTURED_REPLY_FAST
_SCRATCH_SIZE = 256 * 1024
_REQUEST = wire.REQUEST_FAST


class ClientTransmission:
    """Requests out, replies in; keeps the cookie → :class:`ClientRequest` table of one connection."""

    def __init__(
        self, *, structured: bool, meta_context_id: int | None = None, map_context_id: int | None = None
    ) -> None:
        self.structured = structured
        self.meta_context_id = meta_context_id  # base:allocation
        self.map_context_id = map_context_id  # a second context asked for by name (``qemu:dirty-bitmap:…``)
        self.inflight: dict[int, ClientRequest] = {}
        self._next_cookie = 1
        self._completed: list[ClientRequest] = []
        self._rx = _Rx.HEADER
        self._header = bytearray(20)
        self._header_have = 0
        self._header_need = 4
        self._chunk = bytearray()
        self._chunk_need = 0
        self._chunk_type = 0
        self._chunk_flags = 0
        self._req: ClientRequest | None = None
        self._data_view: memoryview | None = None
        self._data_pos = 0
        self._data_end = 0
        self._data_done_flag = 0
        self._scratch = bytearray(_SCRATCH_SIZE)
        self._scratch_view = memoryview(self._scratch)
        self._direct = False

    # -- requests

    def request(
        self,
        cmd: int,
        offset: int,
        length: int,
        flags: int = 0,
        *,
        buffer: bytearray | memoryview | None = None,
        userdata: Any = None,
        fresh: bool = True,
    ) -> tuple[ClientRequest, bytes]:
        """Register a request and return it with the 28-byte header to send (a WRITE's data follows)."""
        cookie = self._next_cookie
        self._next_cookie = cookie + 1 if cookie < 0xFFFFFFFFFFFFFFFF else 1
        req = ClientRequest(cookie, cmd, flags, offset, length, buffer, userdata)
        if cmd == c.Cmd.READ and buffer is None:
            req.buffer = bytearray(length)
        elif not fresh:
            req.fresh = False
        self.inflight[cookie] = req
        return req, _REQUEST.pack(c.REQUEST_MAGIC, flags, cmd, cookie, offset, length)

    @staticmethod
    def disconnect_request() -> bytes:
        """``NBD_CMD_DISC``: no reply; the server closes after finishing what is in flight."""
        return _REQUEST.pack(c.REQUEST_MAGIC, 0, c.Cmd.DISC, 0, 0, 0)

    def pop_completed(self) -> list[ClientRequest]:
        done = self._completed
        if done:
            self._completed = []
        return done

    # -- replies: zero-copy interface (asyncio.BufferedProtocol)

    def get_buffer(self) -> memoryview:
        """Where the next received bytes should go: the read buffer itself while a payload is due."""
        if self._rx is _Rx.DATA and self._data_view is not None:
            self._direct = True
            return self._data_view[self._data_pos : self._data_end]
        self._direct = False
        return self._scratch_view

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct:
            self._direct = False
            self._data_pos += nbytes
            if self._data_pos == self._data_end:
                self._data_finished()
            return
        self.feed(self._scratch_view[:nbytes])

    # -- replies: plain bytes

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = data if isinstance(data, memoryview) else memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            rx = self._rx
            if rx is _Rx.HEADER:
                pos = self._feed_header(view, pos, end)
            elif rx is _Rx.DATA:
                take = min(end - pos, self._data_end - self._data_pos)
                if self._data_view is not None:
                    self._data_view[self._data_pos : self._data_pos + take] = view[pos : pos + take]
                self._data_pos += take
                pos += take
                if self._data_pos == self._data_end:
                    self._data_finished()
            else:
                take = min(end - pos, self._chunk_need - len(self._chunk))
                self._chunk += view[pos : pos + take]
                pos += take
                if len(self._chunk) == self._chunk_need:
                    if rx is _Rx.DATA_OFFSET:
                        self._data_offset()
                    else:
                        self._chunk_finished()

    def _feed_header(self, view: memoryview, pos: int, end: int) -> int:
        have, need = self._header_have, self._header_need
        # Fast path: a whole header is in the view and nothing is half-gathered.
        if have == 0 and end - pos >= 20:
            magic = int.from_bytes(view[pos : pos + 4], "big")
            if magic == c.STRUCTURED_REPLY_MAGIC:
                self._structured_header(*_STRUCTURED.unpack_from(view, pos)[1:])
                return pos + 20
            if magic == c.SIMPLE_REPLY_MAGIC:
                _, error, cookie = _SIMPLE.unpack_from(view, pos)
                self._simple_reply(error, cookie)
                return pos + 16
            raise ProtocolError(f"bad reply magic {magic:#x}")
        take = min(end - pos, need - have)
        self._header[have : have + take] = view[pos : pos + take]
        have += take
        pos += take
        if have == 4 and need == 4:
            magic = int.from_bytes(self._header[:4], "big")
            if magic == c.STRUCTURED_REPLY_MAGIC:
                need = 20
            elif magic == c.SIMPLE_REPLY_MAGIC:
                need = 16
            else:
                raise ProtocolError(f"bad reply magic {magic:#x}")
        self._header_have, self._header_need = have, need
        if have == need and need > 4:
            self._header_have, self._header_need = 0, 4
            if need == 20:
                self._structured_header(*_STRUCTURED.unpack_from(self._header)[1:])
            else:
                _, error, cookie = _SIMPLE.unpack_from(self._header)
                self._simple_reply(error, cookie)
        return pos

    def _lookup(self, cookie: int) -> ClientRequest:
        req = self.inflight.get(cookie)
        if req is None:
            raise ProtocolError(f"reply for unknown cookie {cookie}")
        return req

    def _simple_reply(self, error: int, cookie: int) -> None:
        req = self._lookup(cookie)
        if error:
            req.error = error
            self._complete(req)
            return
        if req.cmd == c.Cmd.READ and req.length:
            if req.received:
                raise ProtocolError("simple reply to a read that already had structured chunks")
            self._start_data(req, 0, req.length, done=True)
            return
        self._complete(req)

    def _structured_header(self, flags: int, type_: int, cookie: int, length: int) -> None:
        if not self.structured:
            raise ProtocolError("structured reply that was not negotiated")
        req = self._lookup(cookie)
        self._req = req
        self._chunk_flags = flags
        self._chunk_type = type_
        if type_ == c.ReplyType.OFFSET_DATA:
            if req.cmd != c.Cmd.READ or length <= 8 or length - 8 > req.length:
                raise ProtocolError(f"bad OFFSET_DATA chunk of {length} bytes for cookie {cookie}")
            self._begin_chunk(_Rx.DATA_OFFSET, 8)
            self._data_end = length - 8  # remembered until the offset arrives
            return
        if type_ == c.ReplyType.NONE:
            if not flags & c.ReplyFlag.DONE or length:
                raise ProtocolError("NBD_REPLY_TYPE_NONE without the DONE flag, or with a payload")
            self._end_of_chunk()
            return
        limit = MAX_STATUS_CHUNK if type_ == c.ReplyType.BLOCK_STATUS else MAX_ERROR_CHUNK
        if type_ == c.ReplyType.OFFSET_HOLE:
            limit = 12
        if length > limit:
            raise ProtocolError(f"structured chunk type {type_} of {length} bytes is too long")
        self._begin_chunk(_Rx.CHUNK, length)
        if length == 0:
            self._chunk_finished()

    def _begin_chunk(self, rx: _Rx, need: int) -> None:
        self._rx = rx
        self._chunk_need = need
        self._chunk.clear()

    def _data_offset(self) -> None:
        req = self._req
        assert req is not None
        offset = int.from_bytes(self._chunk, "big")
        length = self._data_end
        start = offset - req.offset
        if start < 0 or start + length > req.length:
            raise ProtocolError(f"OFFSET_DATA chunk [{offset}, +{length}) outside the read request")
        self._start_data(req, start, length, done=bool(self._chunk_flags & c.ReplyFlag.DONE))

    def _start_data(self, req: ClientRequest, start: int, length: int, *, done: bool) -> None:
        self._req = req
        self._rx = _Rx.DATA
        self._data_view = memoryview(req.buffer) if req.buffer is not None else None
        self._data_pos = start
        self._data_end = start + length
        self._data_done_flag = int(done)
        req.received += length

    def _data_finished(self) -> None:
        self._data_view = None
        self._rx = _Rx.HEADER
        req = self._req
        assert req is not None
        if self._data_done_flag:
            self._complete(req)

    def _chunk_finished(self) -> None:
        req = self._req
        assert req is not None
        type_ = self._chunk_type
        payload = bytes(self._chunk)
        if type_ == c.ReplyType.OFFSET_HOLE:
            self._hole(req, payload)
        elif type_ == c.ReplyType.BLOCK_STATUS:
            self._block_status(req, payload)
        elif c.reply_type_is_error(type_):
            self._error_chunk(req, type_, payload)
        else:
            raise ProtocolError(f"unknown structured reply type {type_}")
        self._end_of_chunk()

    def _end_of_chunk(self) -> None:
        self._rx = _Rx.HEADER
        req = self._req
        assert req is not None
        if self._chunk_flags & c.ReplyFlag.DONE:
            self._complete(req)

    def _hole(self, req: ClientRequest, payload: bytes) -> None:
        if req.cmd != c.Cmd.READ or len(payload) != 12:
            raise ProtocolError("bad OFFSET_HOLE chunk")
        offset, length = int.from_bytes(payload[:8], "big"), int.from_bytes(payload[8:], "big")
        start = offset - req.offset
        if length == 0 or start < 0 or start + length > req.length:
            raise ProtocolError(f"OFFSET_HOLE chunk [{offset}, +{length}) outside the read request")
        req.received += length
        if not req.fresh and req.buffer is not None:
            memoryview(req.buffer)[start : start + length] = bytes(length)

    def _block_status(self, req: ClientRequest, payload: bytes) -> None:
        if req.cmd != c.Cmd.BLOCK_STATUS or len(payload) < 12 or (len(payload) - 4) % 8:
            raise ProtocolError("bad BLOCK_STATUS chunk")
        context_id = int.from_bytes(payload[:4], "big")
        if self.map_context_id is not None and context_id == self.map_context_id:
            if req.seen_map:
                raise ProtocolError("two block status chunks for one context")
            req.seen_map = True
            extents = req.map_extents
        elif self.meta_context_id is not None and context_id != self.meta_context_id:
            raise ProtocolError(f"block status for context {context_id}, which was not negotiated")
        else:
            if req.seen_status:
                raise ProtocolError("two block status chunks for one context")
            req.seen_status = True
            extents = req.extents
        remaining = req.length
        unpack = wire.BLOCK_STATUS_DESCRIPTOR_FAST.unpack_from
        for pos in range(4, len(payload), 8):
            length, flags = unpack(payload, pos)
            if length == 0:
                raise ProtocolError("zero-length extent in block status")
            if remaining <= 0:
                break  # only the last extent may pass the end; anything after it is ignored
            take = min(length, remaining)
            append_run(extents, take, flags)
            remaining -= take

    def _error_chunk(self, req: ClientRequest, type_: int, payload: bytes) -> None:
        if len(payload) < 6:
            raise ProtocolError("short error chunk")
        error = int.from_bytes(payload[:4], "big")
        message_length = int.from_bytes(payload[4:6], "big")
        if error == 0 or 6 + message_length > len(payload):
            raise ProtocolError("malformed error chunk")
        message = payload[6 : 6 + message_length].decode("utf-8", "replace")
        if type_ == c.ReplyType.ERROR_OFFSET:
            if len(payload) != 6 + message_length + 8:
                raise ProtocolError("malformed ERROR_OFFSET chunk")
            offset = int.from_bytes(payload[6 + message_length :], "big")
            if not req.offset <= offset < req.offset + max(req.length, 1):
                raise ProtocolError(f"ERROR_OFFSET {offset} outside the request")
            if req.error_offset is None or offset < req.error_offset:
                req.error_offset = offset
        if not req.error:
            req.error, req.message = error, message

    def _complete(self, req: ClientRequest) -> None:
        del self.inflight[req.cookie]
        if not req.error:
            if req.cmd == c.Cmd.READ and self.structured and req.received != req.length:
                req.error, req.message = 5, f"server returned {req.received} of {req.length} bytes"
            elif req.cmd == c.Cmd.BLOCK_STATUS and not req.extents:
                req.error, req.message = 5, "server sent no block status"
        self._completed.append(req)

    @property
    def mid_reply(self) -> bool:
        """True while a reply is partially received (an EOF now is a protocol violation)."""
        return self._rx is not _Rx.HEADER or self._header_have > 0
