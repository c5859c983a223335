"""Sans-I/O core of the NBD server: bytes in → events out, replies in → bytes out.

The core owns every protocol decision — the fixed-newstyle handshake, option negotiation, request
validation and the bytes of every reply — and does no I/O, so it is tested by feeding it byte strings
(``tests/test_server_core.py``, including hostile streams). The asyncio adapter (``nbd.server``) feeds
it what the socket delivers, writes what it produces, and runs the device verbs for the ``Request``
events it emits. Requests the core can refuse on its own (bad flags, out of bounds, read-only, no
meta context) never reach the adapter: the core writes their error replies itself, and consumes a
refused write's payload so the stream stays in sync.

One table (``TRANSITIONS``) lists every allowed phase change; anything else is a bug and closes the
connection. Memory per connection is bounded: option data over ``max_option_data`` is discarded as it
streams in (or the connection is closed when absurd), and request payloads are capped at
``MAX_PAYLOAD``.
"""

from __future__ import annotations

import enum
import mmap
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from nbd import constants as c
from nbd import meta, wire
from nbd.constants import Cmd, CmdFlag, Errno, Opt, Rep, ReplyFlag, ReplyType, TransmissionFlag

# Replies without construct on the hot path (proven equal to the construct definitions in tests).
_REQUEST = wire.REQUEST_FAST
_SIMPLE = wire.SIMPLE_REPLY_FAST
_CHUNK = wire.STRUCTURED_REPLY_FAST
_DATA = wire.OFFSET_DATA_FAST
_HOLE = wire.OFFSET_HOLE_FAST
_OPTION_HEADER = wire.OPTION_HEADER_FAST
_OPTION_REPLY = wire.OPTION_REPLY_HEADER_FAST
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U16_U64_U16 = struct.Struct(">HQH")
_U16_U32X3 = struct.Struct(">HIII")
_U64_U16 = struct.Struct(">QH")
_ERROR = struct.Struct(">IH")

REQUEST_MAGIC = c.REQUEST_MAGIC
SIMPLE_MAGIC = c.SIMPLE_REPLY_MAGIC
STRUCTURED_MAGIC = c.STRUCTURED_REPLY_MAGIC
DONE = int(ReplyFlag.DONE)

SPARE_MIN = 64 * 1024  # write payload buffers at least this big are reused
SPARE_MAX = 8
SPARE_BYTES = 16 << 20
LAZY_MIN = 1 << 20  # payload buffers at least this big are mapped: memory is used as bytes arrive
META_CONTEXT_ID = 1  # the id of base:allocation once selected (any non-zero value would do)

CMD_READ = int(Cmd.READ)
CMD_WRITE = int(Cmd.WRITE)
CMD_DISC = int(Cmd.DISC)
CMD_FLUSH = int(Cmd.FLUSH)
CMD_TRIM = int(Cmd.TRIM)
CMD_CACHE = int(Cmd.CACHE)
CMD_WRITE_ZEROES = int(Cmd.WRITE_ZEROES)
CMD_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)

FLAG_FUA = int(CmdFlag.FUA)
FLAG_NO_HOLE = int(CmdFlag.NO_HOLE)
FLAG_DF = int(CmdFlag.DF)
FLAG_REQ_ONE = int(CmdFlag.REQ_ONE)
FLAG_FAST_ZERO = int(CmdFlag.FAST_ZERO)

_KNOWN_CLIENT_FLAGS = int(c.ClientFlag.C_FIXED_NEWSTYLE | c.ClientFlag.C_NO_ZEROES)


class Phase(enum.Enum):
    """What the core expects next from the client."""

    CLIENT_FLAGS = "client-flags"
    OPTION_HEADER = "option-header"
    OPTION_DATA = "option-data"
    OPTION_DISCARD = "option-discard"
    REQUEST_HEADER = "request-header"
    WRITE_PAYLOAD = "write-payload"
    PAYLOAD_DISCARD = "payload-discard"
    TLS_HANDSHAKE = "tls-handshake"  # STARTTLS acknowledged: the adapter runs the TLS handshake
    CLOSED = "closed"


class Input(enum.Enum):
    """What just happened, as far as the phase is concerned."""

    FLAGS = "flags"
    OPTION = "option"  # an option header whose data is to be collected
    OPTION_TOO_BIG = "option-too-big"  # an option header whose data is to be discarded
    OPTION_DONE = "option-done"  # an option was answered; negotiation goes on
    GO = "go"  # an export was selected: transmission begins
    REQUEST = "request"  # a request without payload
    WRITE = "write"  # a write whose payload is to be collected
    REFUSED_WRITE = "refused-write"  # a write whose payload is to be discarded
    PAYLOAD_DONE = "payload-done"
    STARTTLS = "starttls"  # STARTTLS acknowledged
    TLS_DONE = "tls-done"  # the TLS handshake succeeded: options go on, encrypted
    CLOSE = "close"


P, In = Phase, Input
TRANSITIONS: dict[tuple[Phase, Input], Phase] = {
    (P.CLIENT_FLAGS, In.FLAGS): P.OPTION_HEADER,
    (P.OPTION_HEADER, In.OPTION): P.OPTION_DATA,
    (P.OPTION_HEADER, In.OPTION_TOO_BIG): P.OPTION_DISCARD,
    (P.OPTION_DATA, In.OPTION_DONE): P.OPTION_HEADER,
    (P.OPTION_DATA, In.GO): P.REQUEST_HEADER,
    (P.OPTION_DATA, In.STARTTLS): P.TLS_HANDSHAKE,
    (P.TLS_HANDSHAKE, In.TLS_DONE): P.OPTION_HEADER,
    (P.OPTION_DISCARD, In.OPTION_DONE): P.OPTION_HEADER,
    (P.REQUEST_HEADER, In.REQUEST): P.REQUEST_HEADER,
    (P.REQUEST_HEADER, In.WRITE): P.WRITE_PAYLOAD,
    (P.REQUEST_HEADER, In.REFUSED_WRITE): P.PAYLOAD_DISCARD,
    (P.WRITE_PAYLOAD, In.PAYLOAD_DONE): P.REQUEST_HEADER,
    (P.PAYLOAD_DISCARD, In.PAYLOAD_DONE): P.REQUEST_HEADER,
}
for _phase in Phase:
    TRANSITIONS[(_phase, In.CLOSE)] = P.CLOSED
del P, In, _phase


# --- write payload buffers ---------------------------------------------------------------------------


def _allocate(size: int) -> bytearray | memoryview:
    """A zeroed buffer for a write payload. A big one is an anonymous mapping, so the pages of a
    payload that stalls halfway are never touched, never resident (a bytearray is zero-filled at once)."""
    if size >= LAZY_MIN:
        return memoryview(mmap.mmap(-1, size))
    return bytearray(size)


class SparePool:
    """Finished write payload buffers kept for reuse, at most ``max_count`` and ``max_bytes``; one pool
    may serve every connection of a server, so what idle buffers hold is bounded server-wide."""

    def __init__(self, max_bytes: int = SPARE_BYTES, max_count: int = SPARE_MAX) -> None:
        self.max_bytes = max_bytes
        self.max_count = max_count
        self._spares: list[bytearray | mmap.mmap] = []
        self._bytes = 0

    @property
    def held(self) -> int:
        """Bytes the pool holds."""
        return self._bytes

    def take(self, size: int) -> bytearray | memoryview | None:
        spares = self._spares
        for i in range(len(spares)):
            spare = spares[i]
            # Reused only when nothing else references it any more (the list, ``spare`` and
            # getrefcount's own argument are the three references expected; a view of a mapping
            # anyone still holds keeps one more on it).
            if len(spare) == size and sys.getrefcount(spare) == 3:
                del spares[i]
                self._bytes -= size
                return spare if type(spare) is bytearray else memoryview(spare)
        return None

    def give(self, payload: bytes | bytearray | memoryview) -> None:
        spare: bytearray | mmap.mmap
        if type(payload) is bytearray:
            spare = payload
        elif type(payload) is memoryview and type(payload.obj) is mmap.mmap:
            spare = payload.obj  # views given out keep a reference on it, not on this view
        else:
            return
        size = len(spare)
        if size < SPARE_MIN or size > self.max_bytes:
            return
        spares = self._spares
        if any(s is spare for s in spares):
            return
        while spares and (len(spares) >= self.max_count or self._bytes + size > self.max_bytes):
            self._bytes -= len(spares.pop(0))  # the oldest goes first
        spares.append(spare)
        self._bytes += size


# --- what the core needs to know about exports -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportEntry:
    """A snapshot of an export as the handshake presents it; ``handle`` is the adapter's own object."""

    name: str
    size: int
    flags: int  # transmission flags (HAS_FLAGS is added by the core)
    description: str = ""
    minimum: int = c.MIN_BLOCK_SIZE
    preferred: int = c.PREFERRED_BLOCK_SIZE
    maximum: int = c.MAX_PAYLOAD
    handle: object = None
    contexts: tuple[str, ...] = ()  # meta contexts besides base:allocation (``nbd.meta.context_names``)
    tls_only: bool = False  # served only after STARTTLS (SELECTIVETLS; with ``tls="require"`` all are)


Lookup = Callable[[str], "ExportEntry | None"]
Lister = Callable[[], Iterable[ExportEntry]]


class Pending(Exception):
    """Raised by a ``Lookup`` or ``Lister`` whose answer needs blocking work (a repository in object
    storage): the core emits ``Resolve(work)`` and waits; the adapter runs ``work`` off the event loop,
    then calls ``resume`` — and the lookup, asked again, answers from what ``work`` found."""

    def __init__(self, work: Callable[[], object]) -> None:
        super().__init__("export lookup pending")
        self.work = work


# --- events ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The handshake is over: requests for ``export`` follow."""

    export: ExportEntry
    structured: bool
    meta_context: int  # the base:allocation context id, 0 when none was selected
    meta_contexts: tuple[tuple[int, str], ...] = ()  # every selected context: (id, name), by id


class Request:
    """A validated request the adapter must carry out (and answer with one of the ``reply_*``)."""

    __slots__ = ("cmd", "cookie", "flags", "length", "offset", "payload")

    def __init__(
        self,
        cmd: int,
        flags: int,
        cookie: int,
        offset: int,
        length: int,
        payload: bytes | bytearray | memoryview | None = None,
    ) -> None:
        self.cmd = cmd
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.payload = payload

    def __repr__(self) -> str:
        return (
            f"Request(cmd={self.cmd}, flags={self.flags:#x}, cookie={self.cookie}, "
            f"offset={self.offset}, length={self.length})"
        )


@dataclass(frozen=True, slots=True)
class StartTls:
    """STARTTLS was acknowledged: run the TLS handshake on the socket, then call ``tls_started``."""


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection must end: the client said so (``error`` False) or broke the protocol."""

    reason: str
    error: bool


@dataclass(frozen=True, slots=True)
class Resolve:
    """The option being handled waits for ``work`` (blocking): run it off the event loop, then ``resume``.
    Bytes received meanwhile are held, not handled."""

    work: Callable[[], object]


Event = Negotiated | Request | StartTls | Closed | Resolve


# --- the core ----------------------------------------------------------------------------------------


class _Refusal(Exception):
    """An option is answered with an error reply (internal control flow of option handlers)."""

    def __init__(self, reply: Rep, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


class ServerCore:
    """One connection's protocol state. Feed it bytes with ``receive``; send what ``data_to_send``
    returns; answer each ``Request`` with the ``reply_*`` method of its command."""

    def __init__(
        self,
        lookup: Lookup,
        list_exports: Lister,
        *,
        max_options: int = 64,
        max_option_data: int = 65536,
        max_option_discard: int = 1 << 20,
        refuse: str | None = None,
        spares: SparePool | None = None,
        tls: str = "off",
    ) -> None:
        """``tls``: the spec's mode — ``off`` (NOTLS: STARTTLS refused with ERR_POLICY), ``on``
        (SELECTIVETLS: TLS offered, required only by ``tls_only`` exports) or ``require`` (FORCEDTLS:
        nothing but STARTTLS and ABORT before TLS)."""
        self._lookup = lookup
        self._list = list_exports
        self.max_options = max_options
        self.max_option_data = max_option_data
        self.max_option_discard = max_option_discard
        self._refuse = refuse  # every option is refused with ERR_POLICY and this message
        self.tls_mode = tls
        self.tls_active = False
        self.phase = Phase.CLIENT_FLAGS
        self._out: list[bytes | bytearray | memoryview] = [
            wire.ServerGreeting.build(
                {"handshake_flags": int(c.HandshakeFlag.FIXED_NEWSTYLE | c.HandshakeFlag.NO_ZEROES)}
            )
        ]
        self._want = 4  # bytes the current phase needs
        self._record = bytearray()  # a fixed-size record that straddles chunks
        self.no_zeroes = False
        self.options_seen = 0
        self.structured = False
        self._meta_export: str | None = None  # export name of the last successful SET_META_CONTEXT
        self._meta_set: tuple[tuple[int, str], ...] = ()  # (id, name) the last SET_META_CONTEXT selected
        self._option = 0
        self._option_length = 0
        self.export: ExportEntry | None = None
        self.meta_context = 0
        self.meta_contexts: tuple[tuple[int, str], ...] = ()
        self._flags = 0
        self._size = 0
        self._read_only = True
        self._max_payload = c.MAX_PAYLOAD
        self._align = 0
        self._payload: bytearray | memoryview | None = None
        self._spares = spares if spares is not None else SparePool()
        self._payload_have = 0
        self._pending_write: Request | None = None
        self._discard_then: tuple[int, int, int] | None = None  # (cmd, cookie, error) of a refused write
        self._blocked: bytes | None = None  # the data of an option waiting for a Resolve's work
        self._held = bytearray()  # bytes received while an option waits

    # --- plumbing ----------------------------------------------------------------------------------

    def _goto(self, what: Input) -> None:
        self.phase = TRANSITIONS[(self.phase, what)]

    def data_to_send(self) -> list[bytes | bytearray | memoryview]:
        """Bytes produced since the last call (handshake replies and the core's own error replies)."""
        out, self._out = self._out, []
        return out

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    def receive(self, data: bytes | bytearray | memoryview, *, reused: bool = False) -> list[Event]:
        """Consume bytes from the client; return the events they complete, in order.

        ``reused`` says ``data`` is a receive buffer the caller will overwrite: whatever the core keeps
        (a write payload) is then copied out of it instead of referenced."""
        events: list[Event] = []
        if self._blocked is not None:
            self._held += data
            return events
        n = len(data)
        pos = 0
        view: memoryview | None = None
        while pos < n:
            phase = self.phase
            if phase is Phase.REQUEST_HEADER and not self._record and n - pos >= 28:
                # The hot path: a whole request header in this chunk.
                magic, flags, cmd, cookie, offset, length = _REQUEST.unpack_from(data, pos)
                pos += 28
                if magic != REQUEST_MAGIC:
                    self._close(events, f"bad request magic {magic:#x}", error=True)
                    break
                self._request(events, flags, cmd, cookie, offset, length)
                continue
            if phase is Phase.WRITE_PAYLOAD:
                if view is None:
                    view = memoryview(data)
                pos = self._take_payload(events, view, pos, n, reused)
                continue
            if phase is Phase.PAYLOAD_DISCARD or phase is Phase.OPTION_DISCARD:
                take = min(n - pos, self._want)
                pos += take
                self._want -= take
                if self._want == 0:
                    self._discard_done(events)
                continue
            if phase is Phase.CLOSED:
                break
            if phase is Phase.TLS_HANDSHAKE:
                # The client must wait for the ACK before its TLS hello: bytes pipelined after
                # STARTTLS are neither NBD nor part of a handshake we started.
                events[:] = [event for event in events if type(event) is not StartTls]
                self._close(events, "data after NBD_OPT_STARTTLS before the TLS handshake", error=True)
                break
            # A fixed-size record: client flags, option header or data, request header.
            need = self._want - len(self._record)
            if need > n - pos:
                self._record += data[pos:]
                break
            if self._record:
                self._record += data[pos : pos + need]
                record: bytes | bytearray | memoryview = self._record
                self._record = bytearray()
            else:
                record = data[pos : pos + need]
            pos += need
            self._dispatch_record(events, record)
            if self._blocked is not None:
                self._held += data[pos:]
                break
        return events

    def resume(self) -> list[Event]:
        """The work of the last ``Resolve`` is done: handle its option again, then the bytes held meanwhile."""
        data, self._blocked = self._blocked, None
        events: list[Event] = []
        if data is None or self.phase is Phase.CLOSED:
            return events
        self._option_data(events, data)
        if self._blocked is None and self._held:
            held, self._held = self._held, bytearray()
            events += self.receive(held)
        return events

    def tls_started(self) -> None:
        """The TLS handshake succeeded: negotiation starts afresh over TLS (nothing negotiated in
        clear text before it is kept)."""
        self._goto(Input.TLS_DONE)
        self._want = 16
        self.tls_active = True
        self.structured = False
        self._meta_export = None
        self._meta_set = ()

    @property
    def tls_required(self) -> bool:
        """FORCEDTLS and not upgraded yet: every option but STARTTLS and ABORT is refused."""
        return self.tls_mode == "require" and not self.tls_active

    def payload_buffer(self) -> memoryview | None:
        """Where the rest of the current write payload should be received to (no copy), or None
        when no payload is being collected. Follow with ``payload_received``."""
        if self.phase is not Phase.WRITE_PAYLOAD:
            return None
        if self._payload is None:
            self._payload = self._new_payload(self._want)
            self._payload_have = 0
        return memoryview(self._payload)[self._payload_have :]

    def _new_payload(self, size: int) -> bytearray | memoryview:
        return self._spares.take(size) or _allocate(size)

    def recycle(self, payload: bytes | bytearray | memoryview) -> None:
        """Offer a finished write payload for reuse: the next write of the same size is received into
        it instead of a fresh (zero-filled) allocation — once nothing else references it."""
        self._spares.give(payload)

    @property
    def pending_write_length(self) -> int:
        """The payload length of the write being received (0: none)."""
        request = self._pending_write
        return request.length if request is not None and self.phase is Phase.WRITE_PAYLOAD else 0

    def payload_received(self, nbytes: int) -> list[Event]:
        """``nbytes`` arrived in the buffer ``payload_buffer`` returned."""
        events: list[Event] = []
        self._payload_have += nbytes
        if self._payload is not None and self._payload_have >= self._want:
            payload = self._payload
            self._payload = None
            self._finish_write(events, payload)
        return events

    def _dispatch_record(self, events: list[Event], record: bytes | bytearray | memoryview) -> None:
        phase = self.phase
        if phase is Phase.REQUEST_HEADER:
            magic, flags, cmd, cookie, offset, length = _REQUEST.unpack(record)
            if magic != REQUEST_MAGIC:
                self._close(events, f"bad request magic {magic:#x}", error=True)
                return
            self._request(events, flags, cmd, cookie, offset, length)
        elif phase is Phase.OPTION_HEADER:
            self._option_header(events, record)
        elif phase is Phase.OPTION_DATA:
            self._option_data(events, bytes(record))
        elif phase is Phase.CLIENT_FLAGS:
            self._client_flags(events, record)

    def _close(self, events: list[Event], reason: str, *, error: bool) -> None:
        self._goto(Input.CLOSE)
        self._record = bytearray()
        self._payload = None
        events.append(Closed(reason, error))

    # --- handshake ---------------------------------------------------------------------------------

    def _client_flags(self, events: list[Event], record: bytes | bytearray | memoryview) -> None:
        (flags,) = _U32.unpack(record)
        if flags & ~_KNOWN_CLIENT_FLAGS:
            self._close(events, f"unknown client flags {flags:#x}", error=True)
            return
        if not flags & c.ClientFlag.C_FIXED_NEWSTYLE:
            self._close(events, "client does not support fixed newstyle negotiation", error=True)
            return
        self.no_zeroes = bool(flags & c.ClientFlag.C_NO_ZEROES)
        self._goto(Input.FLAGS)
        self._want = 16

    def _option_header(self, events: list[Event], record: bytes | bytearray | memoryview) -> None:
        magic, option, length = _OPTION_HEADER.unpack(record)
        if magic != c.IHAVEOPT:
            self._close(events, f"bad option magic {magic:#x}", error=True)
            return
        self.options_seen += 1
        self._option, self._option_length = option, length
        if self.options_seen > self.max_options:
            self._reply_error(option, Rep.ERR_POLICY, f"too many options (limit {self.max_options})")
            self._close(events, "too many options", error=True)
            return
        if option == Opt.EXPORT_NAME and length > c.MAX_STRING:
            self._close(events, f"export name of {length} bytes is over the {c.MAX_STRING} byte limit", error=True)
            return
        if length > self.max_option_data:
            if length > self.max_option_discard:
                self._reply_error(option, Rep.ERR_TOO_BIG, f"option data of {length} bytes is too large")
                self._close(events, f"option data of {length} bytes", error=True)
                return
            self._goto(Input.OPTION_TOO_BIG)
            self._want = length
            return
        self._goto(Input.OPTION)
        self._want = length
        if length == 0:
            self._option_data(events, b"")

    def _discard_done(self, events: list[Event]) -> None:
        if self.phase is Phase.OPTION_DISCARD:
            option = self._option
            if self.tls_required:
                self._reply_error(option, Rep.ERR_TLS_REQD, _tls_required(option))
            elif option in _KNOWN_OPTIONS:
                self._reply_error(option, Rep.ERR_TOO_BIG, f"option data of {self._option_length} bytes is too large")
            else:
                self._reply_error(option, Rep.ERR_UNSUP, f"option {option} is not supported")
            self._goto(Input.OPTION_DONE)
            self._want = 16
            return
        assert self._discard_then is not None
        cmd, cookie, err = self._discard_then
        self._discard_then = None
        self._out.append(self.reply_error(cmd, cookie, err))
        self._goto(Input.PAYLOAD_DONE)
        self._want = 28

    def _option_data(self, events: list[Event], data: bytes) -> None:
        option = self._option
        if self._refuse is not None and option != Opt.ABORT:
            # Every option is refused with the reason (so the client can show it when it asks for an
            # export); EXPORT_NAME has no error reply, so that one closes.
            if option == Opt.EXPORT_NAME:
                self._close(events, self._refuse, error=True)
                return
            self._reply_error(option, Rep.ERR_POLICY, self._refuse)
            self._goto(Input.OPTION_DONE)
            self._want = 16
            return
        if self.tls_required and option != Opt.STARTTLS and option != Opt.ABORT:
            if option == Opt.EXPORT_NAME:  # no error reply exists: the spec says to close
                self._close(events, "NBD_OPT_EXPORT_NAME before TLS on a server that requires TLS", error=True)
                return
            self._reply_error(option, Rep.ERR_TLS_REQD, _tls_required(option))
            self._goto(Input.OPTION_DONE)
            self._want = 16
            return
        handler = _OPTION_HANDLERS.get(option)
        try:
            if handler is None:
                raise _Refusal(Rep.ERR_UNSUP, f"option {option} is not supported")
            result = handler(self, events, data)
        except _Refusal as refusal:
            self._reply_error(option, refusal.reply, refusal.message)
            result = False
        except Pending as pending:  # handlers ask before they reply or change state: safe to run again
            self._blocked = data
            events.append(Resolve(pending.work))
            return
        if self.phase is Phase.CLOSED:
            return
        if result is None:
            return  # STARTTLS: the phase is already TLS_HANDSHAKE
        if result:
            self._goto(Input.GO)
            self._want = 28
        else:
            self._goto(Input.OPTION_DONE)
            self._want = 16

    def _reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self._out.append(_OPTION_REPLY.pack(c.OPT_REPLY_MAGIC, option, reply, len(payload)) + payload)

    def _reply_error(self, option: int, reply: Rep, message: str) -> None:
        self._reply(option, reply, message.encode()[: c.MAX_STRING])

    def _select(self, events: list[Event], entry: ExportEntry) -> None:
        """Enter transmission with ``entry``: fix the flags and limits the requests are checked against."""
        self.export = entry
        self._flags = self._transmission_flags(entry)
        self._size = entry.size
        self._read_only = bool(self._flags & TransmissionFlag.READ_ONLY)
        self._max_payload = entry.maximum
        # Requests must be multiples of the advertised minimum block size (a power of two).
        self._align = entry.minimum - 1 if entry.minimum > 1 and not entry.minimum & (entry.minimum - 1) else 0
        chosen = self._meta_set if self._meta_export == entry.name else ()
        names = meta.all_names(entry.contexts)
        # Only what still has the same id (an export replaced between SET and GO may publish others).
        self.meta_contexts = tuple(
            (i, name) for i, name in chosen if i - META_CONTEXT_ID < len(names) and names[i - META_CONTEXT_ID] == name
        )
        base = self.meta_contexts[:1] == ((META_CONTEXT_ID, c.META_BASE_ALLOCATION),)
        self.meta_context = META_CONTEXT_ID if base else 0
        events.append(Negotiated(entry, self.structured, self.meta_context, self.meta_contexts))

    def _transmission_flags(self, entry: ExportEntry) -> int:
        flags = entry.flags | TransmissionFlag.HAS_FLAGS
        if not self.structured:
            flags &= ~TransmissionFlag.SEND_DF
        if flags & TransmissionFlag.READ_ONLY:
            flags &= ~(
                TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.SEND_FAST_ZERO
            )
        if not flags & TransmissionFlag.SEND_WRITE_ZEROES:
            flags &= ~TransmissionFlag.SEND_FAST_ZERO
        return int(flags)

    def _find(self, name: str) -> ExportEntry:
        entry = self._lookup(name)
        if entry is None:
            raise _Refusal(Rep.ERR_UNKNOWN, f"export '{name}' not found")
        if entry.tls_only and not self.tls_active:
            raise _Refusal(Rep.ERR_TLS_REQD, f"export '{name}' requires TLS")
        return entry

    def _opt_export_name(self, events: list[Event], data: bytes) -> bool:
        try:
            name = data.decode()
        except UnicodeDecodeError:
            self._close(events, "export name is not UTF-8", error=True)
            return False
        entry = self._lookup(name)
        if entry is None or (entry.tls_only and not self.tls_active):
            # NBD_OPT_EXPORT_NAME has no error reply: the spec says to close the connection.
            why = "not found" if entry is None else "requires TLS"
            self._close(events, f"export '{name}' {why}", error=True)
            return False
        flags = self._transmission_flags(entry)
        reply = _U64_U16.pack(entry.size, flags)
        self._out.append(reply if self.no_zeroes else reply + bytes(124))
        self._select(events, entry)
        return True

    def _opt_abort(self, events: list[Event], data: bytes) -> bool:
        self._reply(Opt.ABORT, Rep.ACK)
        self._close(events, "client aborted the handshake", error=False)
        return False

    def _opt_list(self, events: list[Event], data: bytes) -> bool:
        if data:
            raise _Refusal(Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
        for entry in self._list():
            if entry.tls_only and not self.tls_active:
                continue  # the spec lets SELECTIVETLS servers omit TLS-only exports before TLS
            name = entry.name.encode()
            self._reply(Opt.LIST, Rep.SERVER, _U32.pack(len(name)) + name + entry.description.encode()[: c.MAX_STRING])
        self._reply(Opt.LIST, Rep.ACK)
        return False

    def _opt_starttls(self, events: list[Event], data: bytes) -> bool | None:
        if data:
            raise _Refusal(Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if self.tls_mode == "off":
            raise _Refusal(Rep.ERR_POLICY, "TLS is not configured on this server")
        if self.tls_active:
            raise _Refusal(Rep.ERR_INVALID, "TLS is already negotiated")
        self._reply(Opt.STARTTLS, Rep.ACK)
        self._goto(Input.STARTTLS)
        events.append(StartTls())
        return None

    def _opt_structured_reply(self, events: list[Event], data: bytes) -> bool:
        if data:
            raise _Refusal(Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        if self.structured:
            raise _Refusal(Rep.ERR_INVALID, "structured replies are already negotiated")
        self.structured = True
        self._reply(Opt.STRUCTURED_REPLY, Rep.ACK)
        return False

    def _opt_extended_headers(self, events: list[Event], data: bytes) -> bool:
        raise _Refusal(Rep.ERR_UNSUP, "extended headers are not supported")

    def _opt_info(self, events: list[Event], data: bytes) -> bool:
        option = self._option
        name, requests = _parse_info_request(data)
        entry = self._find(name)
        flags = self._transmission_flags(entry)
        self._reply(option, Rep.INFO, _U16_U64_U16.pack(c.Info.EXPORT, entry.size, flags))
        if c.Info.NAME in requests:
            self._reply(option, Rep.INFO, _U16.pack(c.Info.NAME) + entry.name.encode())
        if c.Info.DESCRIPTION in requests and entry.description:
            self._reply(option, Rep.INFO, _U16.pack(c.Info.DESCRIPTION) + entry.description.encode()[: c.MAX_STRING])
        self._reply(option, Rep.INFO, _U16_U32X3.pack(c.Info.BLOCK_SIZE, entry.minimum, entry.preferred, entry.maximum))
        self._reply(option, Rep.ACK)
        if option == Opt.GO:
            self._select(events, entry)
            return True
        return False

    def _opt_meta_context(self, events: list[Event], data: bytes) -> bool:
        option = self._option
        is_set = option == Opt.SET_META_CONTEXT
        if is_set:
            # "Issuing this command replaces all previously-set metadata contexts (including when it fails)."
            self._meta_set = ()
            self._meta_export = None
        if not self.structured:
            raise _Refusal(Rep.ERR_INVALID, "negotiate structured replies before meta contexts")
        name, queries = _parse_meta_request(data)
        entry = self._find(name)  # "" may stand for the default export
        names = meta.all_names(entry.contexts)
        chosen = meta.select(queries, names, listing=not is_set)
        for index in chosen:
            # Context i has id i + 1 (base:allocation is META_CONTEXT_ID); a listing carries id 0.
            context_id = index + META_CONTEXT_ID if is_set else 0
            self._reply(option, Rep.META_CONTEXT, _U32.pack(context_id) + names[index].encode())
        if is_set:
            self._meta_set = tuple((index + META_CONTEXT_ID, names[index]) for index in chosen)
            self._meta_export = entry.name
        self._reply(option, Rep.ACK)
        return False

    # --- transmission ------------------------------------------------------------------------------

    def _request(self, events: list[Event], flags: int, cmd: int, cookie: int, offset: int, length: int) -> None:
        err: int
        if cmd == CMD_READ:
            bad = flags & ~FLAG_DF or (flags and not self.structured)
            if bad:
                err = Errno.EINVAL
            elif length > self._max_payload:
                err = Errno.EOVERFLOW if self.structured else Errno.EINVAL
            elif offset + length > self._size or (offset | length) & self._align:
                err = Errno.EINVAL
            else:
                events.append(Request(cmd, flags, cookie, offset, length))
                return
            self._out.append(self.reply_error(cmd, cookie, err))
            return
        if cmd == CMD_WRITE:
            if (
                flags & ~FLAG_FUA
                or (flags and not self._flags & TransmissionFlag.SEND_FUA)
                or length > self._max_payload
                or (offset | length) & self._align
            ):
                err = Errno.EINVAL
            elif self._read_only:
                err = Errno.EPERM
            elif offset + length > self._size:
                err = Errno.ENOSPC
            else:
                err = 0
            if err:
                # The payload follows whatever we think of the request: consume it to stay in sync.
                self._discard_then = (cmd, cookie, err)
                if length == 0:
                    self._goto(Input.REFUSED_WRITE)
                    self._want = 0
                    self._discard_done(events)
                    return
                self._goto(Input.REFUSED_WRITE)
                self._want = length
                return
            if length == 0:
                events.append(Request(cmd, flags, cookie, offset, 0, b""))
                return
            self._pending_write = Request(cmd, flags, cookie, offset, length)
            self._payload = None
            self._payload_have = 0
            self._goto(Input.WRITE)
            self._want = length
            return
        if cmd == CMD_DISC:
            self._close(events, "client disconnected", error=False)
            return
        err = self._check_other(cmd, flags, offset, length)
        if not err and cmd != CMD_FLUSH and (offset | length) & self._align:
            err = Errno.EINVAL
        if err:
            self._out.append(self.reply_error(cmd, cookie, err))
        else:
            events.append(Request(cmd, flags, cookie, offset, length))

    def _check_other(self, cmd: int, flags: int, offset: int, length: int) -> int:
        advertised = self._flags
        if cmd == CMD_FLUSH:
            # The spec: offset and length MUST be zero (nbdkit answers others with EINVAL too).
            return Errno.EINVAL if flags or offset or length or not advertised & TransmissionFlag.SEND_FLUSH else 0
        if cmd in (CMD_TRIM, CMD_WRITE_ZEROES):
            allowed = FLAG_FUA if advertised & TransmissionFlag.SEND_FUA else 0
            if cmd == CMD_WRITE_ZEROES:
                allowed |= FLAG_NO_HOLE
                if advertised & TransmissionFlag.SEND_FAST_ZERO:
                    allowed |= FLAG_FAST_ZERO
            if flags & ~allowed:
                return Errno.EINVAL
            if self._read_only:
                return Errno.EPERM
            if offset + length > self._size:
                return Errno.ENOSPC if cmd == CMD_WRITE_ZEROES else Errno.EINVAL
            return 0
        if cmd == CMD_CACHE:
            if flags or offset + length > self._size:
                return Errno.EINVAL
            return 0
        if cmd == CMD_BLOCK_STATUS:
            if flags & ~FLAG_REQ_ONE or not self.meta_contexts or length == 0 or offset + length > self._size:
                return Errno.EINVAL
            return 0
        return Errno.EINVAL  # unknown command

    def _take_payload(self, events: list[Event], view: memoryview, pos: int, n: int, reused: bool) -> int:
        want = self._want
        avail = n - pos
        if self._payload is None:
            if avail >= want:
                # The whole payload is in this chunk: reference it (or copy it out of a reused buffer).
                self._finish_write(events, bytes(view[pos : pos + want]) if reused else view[pos : pos + want])
                return pos + want
            self._payload = self._new_payload(want)
            self._payload_have = 0
        take = min(avail, want - self._payload_have)
        have = self._payload_have
        self._payload[have : have + take] = view[pos : pos + take]
        self._payload_have = have + take
        if self._payload_have == want:
            payload = self._payload
            self._payload = None
            self._finish_write(events, payload)
        return pos + take

    def _finish_write(self, events: list[Event], payload: bytes | bytearray | memoryview) -> None:
        request = self._pending_write
        assert request is not None
        self._pending_write = None
        request.payload = payload
        events.append(request)
        self._goto(Input.PAYLOAD_DONE)
        self._want = 28

    # --- replies (called by the adapter) -------------------------------------------------------------

    def reply_ok(self, cookie: int) -> bytes:
        """Success of any command but READ and BLOCK_STATUS (always a simple reply)."""
        return _SIMPLE.pack(SIMPLE_MAGIC, 0, cookie)

    def reply_error(self, cmd: int, cookie: int, error: int, message: str = "") -> bytes:
        """Failure with an NBD error value; READ and BLOCK_STATUS get an error chunk once structured."""
        if self.structured and cmd in (CMD_READ, CMD_BLOCK_STATUS):
            text = message.encode()[:4096]
            return (
                _CHUNK.pack(STRUCTURED_MAGIC, DONE, ReplyType.ERROR, cookie, 6 + len(text))
                + _ERROR.pack(error, len(text))
                + text
            )
        return _SIMPLE.pack(SIMPLE_MAGIC, error, cookie)

    def reply_read(
        self, cookie: int, offset: int, data: bytes | bytearray | memoryview
    ) -> tuple[bytes, bytes | bytearray | memoryview]:
        """A successful read as (header, data) — one data chunk, or a simple reply."""
        if self.structured:
            if not data:
                return _CHUNK.pack(STRUCTURED_MAGIC, DONE, ReplyType.NONE, cookie, 0), b""
            return _DATA.pack(STRUCTURED_MAGIC, DONE, ReplyType.OFFSET_DATA, cookie, 8 + len(data), offset), data
        return _SIMPLE.pack(SIMPLE_MAGIC, 0, cookie), data

    def read_header(self, cookie: int, offset: int, length: int) -> bytes:
        """The header of a successful read reply whose ``length`` data bytes the caller sends itself."""
        if self.structured:
            return _DATA.pack(STRUCTURED_MAGIC, DONE, ReplyType.OFFSET_DATA, cookie, 8 + length, offset)
        return _SIMPLE.pack(SIMPLE_MAGIC, 0, cookie)

    def reply_read_sparse(
        self, cookie: int, offset: int, pieces: Sequence[tuple[int, bytes | bytearray | memoryview | None]]
    ) -> list[bytes | bytearray | memoryview]:
        """A successful structured read as data and hole chunks; ``pieces`` are consecutive
        (length, data) runs from ``offset``, ``data`` None for a hole."""
        assert self.structured
        out: list[bytes | bytearray | memoryview] = []
        last = len(pieces) - 1
        for i, (length, data) in enumerate(pieces):
            flags = DONE if i == last else 0
            if data is None:
                out.append(_HOLE.pack(STRUCTURED_MAGIC, flags, ReplyType.OFFSET_HOLE, cookie, 12, offset, length))
            else:
                out.append(_DATA.pack(STRUCTURED_MAGIC, flags, ReplyType.OFFSET_DATA, cookie, 8 + length, offset))
                out.append(data)
            offset += length
        if not out:
            out.append(_CHUNK.pack(STRUCTURED_MAGIC, DONE, ReplyType.NONE, cookie, 0))
        return out

    def reply_block_status(self, cookie: int, descriptors: Sequence[tuple[int, int]]) -> bytes:
        """The one BLOCK_STATUS chunk for base:allocation: (length, flags) descriptors."""
        body = bytearray(_U32.pack(self.meta_context))
        pack = wire.BLOCK_STATUS_DESCRIPTOR_FAST.pack
        for length, flags in descriptors:
            body += pack(length, flags)
        return _CHUNK.pack(STRUCTURED_MAGIC, DONE, ReplyType.BLOCK_STATUS, cookie, len(body)) + body

    def reply_block_status_contexts(
        self, cookie: int, chunks: Sequence[tuple[int, Sequence[tuple[int, int]]]]
    ) -> bytes:
        """BLOCK_STATUS with several contexts: one chunk per ``(context id, descriptors)``, the last
        one flagged done (the spec allows them in any order; we send them by id, as QEMU does)."""
        out = bytearray()
        pack = wire.BLOCK_STATUS_DESCRIPTOR_FAST.pack
        last = len(chunks) - 1
        for i, (context_id, descriptors) in enumerate(chunks):
            body = bytearray(_U32.pack(context_id))
            for length, flags in descriptors:
                body += pack(length, flags)
            flag = DONE if i == last else 0
            out += _CHUNK.pack(STRUCTURED_MAGIC, flag, ReplyType.BLOCK_STATUS, cookie, len(body))
            out += body
        return bytes(out)


def _parse_string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    if pos + 4 > len(data):
        raise _Refusal(Rep.ERR_INVALID, f"{what}: truncated length")
    (length,) = _U32.unpack_from(data, pos)
    pos += 4
    if length > c.MAX_STRING:
        raise _Refusal(Rep.ERR_INVALID, f"{what} of {length} bytes is over the {c.MAX_STRING} byte limit")
    if pos + length > len(data):
        raise _Refusal(Rep.ERR_INVALID, f"{what}: length beyond the option data")
    try:
        text = data[pos : pos + length].decode()
    except UnicodeDecodeError:
        raise _Refusal(Rep.ERR_INVALID, f"{what} is not UTF-8") from None
    return text, pos + length


def _parse_info_request(data: bytes) -> tuple[str, set[int]]:
    name, pos = _parse_string(data, 0, "export name")
    if pos + 2 > len(data):
        raise _Refusal(Rep.ERR_INVALID, "NBD_OPT_INFO/GO: truncated information request count")
    (count,) = _U16.unpack_from(data, pos)
    pos += 2
    if pos + 2 * count != len(data):
        raise _Refusal(Rep.ERR_INVALID, "NBD_OPT_INFO/GO: information requests do not match the option length")
    requests = {_U16.unpack_from(data, pos + 2 * i)[0] for i in range(count)}
    return name, requests


MAX_META_QUERIES = 128


def _parse_meta_request(data: bytes) -> tuple[str, list[str]]:
    name, pos = _parse_string(data, 0, "export name")
    if pos + 4 > len(data):
        raise _Refusal(Rep.ERR_INVALID, "meta context request: truncated query count")
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    if count > MAX_META_QUERIES:
        raise _Refusal(Rep.ERR_TOO_BIG, f"{count} queries are more than the {MAX_META_QUERIES} allowed")
    queries = []
    for _ in range(count):
        query, pos = _parse_string(data, pos, "query")
        if ":" not in query:
            raise _Refusal(Rep.ERR_INVALID, f"query '{query}' has no namespace")
        queries.append(query)
    if pos != len(data):
        raise _Refusal(Rep.ERR_INVALID, "meta context request: trailing data")
    return name, queries


def _tls_required(option: int) -> str:
    return f"Option {option:#x} not permitted before TLS"  # QEMU's text


_OPTION_HANDLERS: dict[int, Callable[[ServerCore, list[Event], bytes], bool | None]] = {
    Opt.EXPORT_NAME: ServerCore._opt_export_name,
    Opt.ABORT: ServerCore._opt_abort,
    Opt.LIST: ServerCore._opt_list,
    Opt.STARTTLS: ServerCore._opt_starttls,
    Opt.INFO: ServerCore._opt_info,
    Opt.GO: ServerCore._opt_info,
    Opt.STRUCTURED_REPLY: ServerCore._opt_structured_reply,
    Opt.LIST_META_CONTEXT: ServerCore._opt_meta_context,
    Opt.SET_META_CONTEXT: ServerCore._opt_meta_context,
    Opt.EXTENDED_HEADERS: ServerCore._opt_extended_headers,
}
_KNOWN_OPTIONS = frozenset(int(o) for o in _OPTION_HANDLERS if o != Opt.EXTENDED_HEADERS)
