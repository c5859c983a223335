"""The sans-I/O server core fed byte strings: the handshake, every option, request validation, the
reply formats (against the construct definitions), and hostile streams (hypothesis)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbd import constants as c
from nbd import wire
from nbd.constants import Cmd, CmdFlag, Errno, Opt, Rep, ReplyType, TransmissionFlag
from nbd.server_core import (
    TRANSITIONS,
    Closed,
    ExportEntry,
    Input,
    Negotiated,
    Pending,
    Phase,
    Request,
    Resolve,
    ServerCore,
)

SIZE = 1 << 20
RW_FLAGS = int(
    TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
    | TransmissionFlag.SEND_DF
    | TransmissionFlag.SEND_CACHE
    | TransmissionFlag.CAN_MULTI_CONN
)
EXPORTS = {
    "disk": ExportEntry("disk", SIZE, RW_FLAGS, description="the disk"),
    "ro": ExportEntry("ro", SIZE, RW_FLAGS | TransmissionFlag.READ_ONLY),
    "sectors": ExportEntry("sectors", SIZE, RW_FLAGS, minimum=512),
}


def make_core(**kwargs: object) -> ServerCore:
    return ServerCore(EXPORTS.get, lambda: EXPORTS.values(), **kwargs)  # type: ignore[arg-type]


def option(opt: int, data: bytes = b"") -> bytes:
    return wire.OptionHeader.build({"option": opt, "length": len(data)}) + data


def info_data(name: str, requests: tuple[int, ...] = ()) -> bytes:
    return wire.InfoRequest.build({"name": name, "requests": list(requests)})


def meta_data(name: str, queries: list[str]) -> bytes:
    return wire.MetaContextRequest.build({"name": name, "queries": queries})


def request(cmd: int, *, flags: int = 0, cookie: int = 7, offset: int = 0, length: int = 0) -> bytes:
    return wire.Request.build({"flags": flags, "type": cmd, "cookie": cookie, "offset": offset, "length": length})


def out(core: ServerCore) -> bytes:
    return b"".join(bytes(b) for b in core.data_to_send())


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, payload) of every option reply in ``data``."""
    replies = []
    pos = 0
    while pos < len(data):
        header = wire.OptionReplyHeader.parse(data[pos : pos + 20])
        pos += 20
        replies.append((header.option, header.reply, data[pos : pos + header.length]))
        pos += header.length
    return replies


def negotiate(
    *, export: str = "disk", structured: bool = True, meta: bool = True, core: ServerCore | None = None
) -> ServerCore:
    core = core or make_core()
    greeting = wire.ServerGreeting.parse(out(core))
    assert greeting.handshake_flags == c.HandshakeFlag.FIXED_NEWSTYLE | c.HandshakeFlag.NO_ZEROES
    stream = struct.pack(">I", c.ClientFlag.C_FIXED_NEWSTYLE | c.ClientFlag.C_NO_ZEROES)
    if structured:
        stream += option(Opt.STRUCTURED_REPLY)
        if meta:
            stream += option(Opt.SET_META_CONTEXT, meta_data(export, [c.META_BASE_ALLOCATION]))
    stream += option(Opt.GO, info_data(export))
    events = core.receive(stream)
    assert isinstance(events[-1], Negotiated)
    assert core.phase is Phase.REQUEST_HEADER
    out(core)
    return core


def simple_error(data: bytes) -> tuple[int, int]:
    reply = wire.SimpleReply.parse(data)
    return reply.error, reply.cookie


def chunk(data: bytes) -> tuple[int, int, int, bytes]:
    header = wire.StructuredReplyHeader.parse(data[:20])
    return header.flags, header.type, header.cookie, data[20 : 20 + header.length]


# --- the transition table --------------------------------------------------------------------------


def test_every_phase_can_close_and_closed_is_terminal() -> None:
    for phase in Phase:
        assert TRANSITIONS[(phase, Input.CLOSE)] is Phase.CLOSED
    assert {k for k in TRANSITIONS if k[0] is Phase.CLOSED} == {(Phase.CLOSED, Input.CLOSE)}


def test_undeclared_transition_is_refused() -> None:
    core = make_core()
    with pytest.raises(KeyError):
        core._goto(Input.GO)  # GO before the client flags is not in the table


# --- handshake -------------------------------------------------------------------------------------


def test_go_with_info_requests_and_structured_meta_context() -> None:
    core = make_core()
    out(core)
    stream = struct.pack(">I", 3) + option(Opt.STRUCTURED_REPLY)
    stream += option(Opt.SET_META_CONTEXT, meta_data("disk", ["base:allocation", "qemu:dirty-bitmap:x"]))
    stream += option(Opt.GO, info_data("disk", (c.Info.NAME, c.Info.DESCRIPTION, c.Info.BLOCK_SIZE)))
    events = core.receive(stream)
    replies = parse_option_replies(out(core))
    assert replies[0] == (Opt.STRUCTURED_REPLY, Rep.ACK, b"")
    assert replies[1][:2] == (Opt.SET_META_CONTEXT, Rep.META_CONTEXT)
    context = wire.RepMetaContext.parse(replies[1][2])
    assert context.name == b"base:allocation" and context.context_id != 0
    assert replies[2] == (Opt.SET_META_CONTEXT, Rep.ACK, b"")
    infos = {wire.InfoType.parse(p).info: p for (o, r, p) in replies[3:-1]}
    assert all(r == Rep.INFO for (o, r, p) in replies[3:-1])
    export = wire.InfoExport.parse(infos[c.Info.EXPORT])
    assert export.size == SIZE
    assert export.transmission_flags & TransmissionFlag.HAS_FLAGS
    assert export.transmission_flags & TransmissionFlag.CAN_MULTI_CONN
    assert export.transmission_flags & TransmissionFlag.SEND_DF
    assert wire.InfoName.parse(infos[c.Info.NAME]).name == b"disk"
    assert wire.InfoDescription.parse(infos[c.Info.DESCRIPTION]).description == b"the disk"
    block = wire.InfoBlockSize.parse(infos[c.Info.BLOCK_SIZE])
    assert (block.minimum, block.preferred, block.maximum) == (1, 4096, c.MAX_PAYLOAD)
    assert replies[-1] == (Opt.GO, Rep.ACK, b"")
    assert events == [Negotiated(EXPORTS["disk"], True, context.context_id, ((context.context_id, "base:allocation"),))]


def test_export_name_option_with_and_without_zeroes() -> None:
    for client_flags, padding in ((1, 124), (3, 0)):
        core = make_core()
        out(core)
        events = core.receive(struct.pack(">I", client_flags) + option(Opt.EXPORT_NAME, b"disk"))
        reply = out(core)
        assert len(reply) == 10 + padding
        parsed = wire.ExportNameReply.parse(reply[:10])
        assert parsed.size == SIZE
        # Without structured replies, DF must not be advertised.
        assert not parsed.transmission_flags & TransmissionFlag.SEND_DF
        assert isinstance(events[0], Negotiated) and not events[0].structured


def test_export_name_unknown_closes() -> None:
    core = make_core()
    out(core)
    events = core.receive(struct.pack(">I", 3) + option(Opt.EXPORT_NAME, b"nope"))
    assert events == [Closed("export 'nope' not found", True)]
    assert core.phase is Phase.CLOSED


def test_unknown_export_info_is_err_unknown_and_negotiation_continues() -> None:
    core = make_core()
    out(core)
    events = core.receive(struct.pack(">I", 3) + option(Opt.INFO, info_data("nope")) + option(Opt.GO, info_data("ro")))
    replies = parse_option_replies(out(core))
    assert replies[0][:2] == (Opt.INFO, Rep.ERR_UNKNOWN)
    assert b"nope" in replies[0][2]
    assert replies[-1] == (Opt.GO, Rep.ACK, b"")
    assert isinstance(events[-1], Negotiated) and events[-1].export.name == "ro"


def test_list_exports() -> None:
    core = make_core()
    out(core)
    core.receive(struct.pack(">I", 3) + option(Opt.LIST))
    replies = parse_option_replies(out(core))
    servers = [wire.RepServer.parse(p) for (o, r, p) in replies if r == Rep.SERVER]
    assert [(s.name, s.description) for s in servers] == [("disk", b"the disk"), ("ro", b""), ("sectors", b"")]
    assert replies[-1] == (Opt.LIST, Rep.ACK, b"")


def test_list_with_data_is_invalid() -> None:
    core = make_core()
    out(core)
    core.receive(struct.pack(">I", 3) + option(Opt.LIST, b"x"))
    assert parse_option_replies(out(core))[0][:2] == (Opt.LIST, Rep.ERR_INVALID)


def test_unknown_option_err_unsup_payload_discarded() -> None:
    core = make_core()
    out(core)
    events = core.receive(struct.pack(">I", 3) + option(99, b"\xff" * 300) + option(Opt.GO, info_data("disk")))
    replies = parse_option_replies(out(core))
    assert replies[0][:2] == (99, Rep.ERR_UNSUP)
    assert isinstance(events[-1], Negotiated)


@pytest.mark.parametrize(
    ("opt", "reply"),
    [(Opt.EXTENDED_HEADERS, Rep.ERR_UNSUP), (Opt.STARTTLS, Rep.ERR_POLICY), (Opt.PEEK_EXPORT, Rep.ERR_UNSUP)],
)
def test_unsupported_options(opt: int, reply: Rep) -> None:
    core = make_core()
    out(core)
    core.receive(struct.pack(">I", 3) + option(opt))
    assert parse_option_replies(out(core))[0][:2] == (opt, reply)
    assert core.phase is Phase.OPTION_HEADER


def test_structured_reply_twice_and_with_data() -> None:
    core = make_core()
    out(core)
    core.receive(struct.pack(">I", 3) + option(Opt.STRUCTURED_REPLY) + option(Opt.STRUCTURED_REPLY))
    core.receive(option(Opt.STRUCTURED_REPLY, b"x"))
    replies = parse_option_replies(out(core))
    assert [r for (o, r, p) in replies] == [Rep.ACK, Rep.ERR_INVALID, Rep.ERR_INVALID]


def test_meta_context_needs_structured_replies() -> None:
    core = make_core()
    out(core)
    core.receive(struct.pack(">I", 3) + option(Opt.SET_META_CONTEXT, meta_data("disk", ["base:allocation"])))
    assert parse_option_replies(out(core))[0][:2] == (Opt.SET_META_CONTEXT, Rep.ERR_INVALID)


def test_list_meta_context() -> None:
    core = make_core()
    out(core)
    stream = struct.pack(">I", 3) + option(Opt.STRUCTURED_REPLY)
    stream += option(Opt.LIST_META_CONTEXT, meta_data("disk", []))
    stream += option(Opt.LIST_META_CONTEXT, meta_data("disk", ["base:"]))
    stream += option(Opt.LIST_META_CONTEXT, meta_data("disk", ["qemu:dirty-bitmap:"]))
    stream += option(Opt.LIST_META_CONTEXT, meta_data("disk", ["nonamespace"]))
    stream += option(Opt.LIST_META_CONTEXT, meta_data("nope", []))
    core.receive(stream)
    replies = [(o, r) for (o, r, p) in parse_option_replies(out(core))[1:]]
    L = Opt.LIST_META_CONTEXT
    assert replies == [
        (L, Rep.META_CONTEXT),
        (L, Rep.ACK),
        (L, Rep.META_CONTEXT),
        (L, Rep.ACK),
        (L, Rep.ACK),
        (L, Rep.ERR_INVALID),
        (L, Rep.ERR_UNKNOWN),
    ]


def test_meta_context_for_another_export_is_not_active() -> None:
    core = make_core()
    out(core)
    stream = struct.pack(">I", 3) + option(Opt.STRUCTURED_REPLY)
    stream += option(Opt.SET_META_CONTEXT, meta_data("ro", ["base:allocation"]))
    stream += option(Opt.GO, info_data("disk"))
    events = core.receive(stream)
    assert isinstance(events[-1], Negotiated) and events[-1].meta_context == 0
    out(core)
    core.receive(request(Cmd.BLOCK_STATUS, length=4096))
    _flags, rtype, _cookie, payload = chunk(out(core))
    assert rtype == ReplyType.ERROR and wire.ErrorChunk.parse(payload).error == Errno.EINVAL


def test_abort() -> None:
    core = make_core()
    out(core)
    events = core.receive(struct.pack(">I", 3) + option(Opt.ABORT))
    assert parse_option_replies(out(core)) == [(Opt.ABORT, Rep.ACK, b"")]
    assert events == [Closed("client aborted the handshake", False)]


def test_bad_client_flags_and_magic_close() -> None:
    core = make_core()
    out(core)
    assert isinstance(core.receive(struct.pack(">I", 0x80))[0], Closed)
    core = make_core()
    out(core)
    assert isinstance(core.receive(struct.pack(">I", 2))[0], Closed)  # not fixed newstyle
    core = make_core()
    out(core)
    events = core.receive(struct.pack(">I", 3) + b"NOTMAGIC" + bytes(8))
    assert isinstance(events[0], Closed) and core.phase is Phase.CLOSED


def test_long_export_name_refused() -> None:
    core = make_core()
    out(core)
    long_name = "x" * 5000
    core.receive(struct.pack(">I", 3) + option(Opt.GO, info_data(long_name)))
    reply = parse_option_replies(out(core))[0]
    assert reply[:2] == (Opt.GO, Rep.ERR_INVALID) and b"4096" in reply[2]
    assert core.phase is Phase.OPTION_HEADER
    events = core.receive(option(Opt.EXPORT_NAME, long_name.encode()))
    assert isinstance(events[0], Closed)


def test_info_request_length_mismatch_is_invalid() -> None:
    core = make_core()
    out(core)
    core.receive(struct.pack(">I", 3) + option(Opt.INFO, info_data("disk") + b"\x00"))
    assert parse_option_replies(out(core))[0][:2] == (Opt.INFO, Rep.ERR_INVALID)


def test_too_many_options() -> None:
    core = make_core(max_options=5)
    out(core)
    events = core.receive(struct.pack(">I", 3) + option(Opt.LIST) * 10)
    replies = parse_option_replies(out(core))
    assert [r for (o, r, p) in replies if r != Rep.SERVER][-1] == Rep.ERR_POLICY
    assert isinstance(events[-1], Closed) and core.phase is Phase.CLOSED


def test_oversized_option_is_discarded_and_absurd_one_closes() -> None:
    core = make_core(max_option_data=1024, max_option_discard=1 << 16)
    out(core)
    # A big known option: the data is skipped as it streams in (never buffered), then refused.
    core.receive(struct.pack(">I", 3) + wire.OptionHeader.build({"option": Opt.GO, "length": 5000}))
    for _ in range(5):
        core.receive(b"\x00" * 1000)
    assert len(core._record) == 0
    assert parse_option_replies(out(core))[0][:2] == (Opt.GO, Rep.ERR_TOO_BIG)
    events = core.receive(wire.OptionHeader.build({"option": 77, "length": 0xFFFFFFFF}))
    assert parse_option_replies(out(core))[0][:2] == (77, Rep.ERR_TOO_BIG)
    assert isinstance(events[0], Closed)


def test_refusing_core_answers_err_policy() -> None:
    core = make_core(refuse="too many connections (limit 1)")
    out(core)
    events = core.receive(struct.pack(">I", 3) + option(Opt.STRUCTURED_REPLY) + option(Opt.GO, info_data("disk")))
    replies = parse_option_replies(out(core))
    assert [r[:2] for r in replies] == [(Opt.STRUCTURED_REPLY, Rep.ERR_POLICY), (Opt.GO, Rep.ERR_POLICY)]
    assert b"too many connections" in replies[1][2]
    assert events == []
    events = core.receive(option(Opt.ABORT))
    assert parse_option_replies(out(core)) == [(Opt.ABORT, Rep.ACK, b"")]
    assert isinstance(events[0], Closed)
    core = make_core(refuse="too many connections (limit 1)")
    out(core)
    assert isinstance(core.receive(struct.pack(">I", 3) + option(Opt.EXPORT_NAME, b"disk"))[0], Closed)


# --- transmission ----------------------------------------------------------------------------------


def test_read_request_and_replies() -> None:
    core = negotiate()
    events = core.receive(request(Cmd.READ, cookie=42, offset=512, length=1024))
    assert len(events) == 1 and isinstance(events[0], Request)
    r = events[0]
    assert (r.cmd, r.cookie, r.offset, r.length, r.flags) == (Cmd.READ, 42, 512, 1024, 0)
    header, data = core.reply_read(42, 512, b"\xaa" * 1024)
    flags, rtype, cookie, payload = chunk(bytes(header) + bytes(data))
    assert (flags, rtype, cookie) == (c.ReplyFlag.DONE, ReplyType.OFFSET_DATA, 42)
    assert payload[:8] == struct.pack(">Q", 512) and payload[8:] == b"\xaa" * 1024


def test_simple_read_reply_without_structured() -> None:
    core = negotiate(structured=False)
    header, data = core.reply_read(5, 0, b"xyz")
    assert simple_error(bytes(header)) == (0, 5) and data == b"xyz"
    assert simple_error(core.reply_error(Cmd.READ, 5, Errno.EIO)) == (Errno.EIO, 5)


def test_sparse_read_reply() -> None:
    core = negotiate()
    parts = core.reply_read_sparse(9, 4096, [(4096, b"\x01" * 4096), (8192, None)])
    data = b"".join(bytes(p) for p in parts)
    flags, rtype, cookie, payload = chunk(data)
    assert (flags, rtype, cookie) == (0, ReplyType.OFFSET_DATA, 9)
    rest = data[20 + len(payload) :]
    flags, rtype, cookie, payload = chunk(rest)
    assert (flags, rtype) == (c.ReplyFlag.DONE, ReplyType.OFFSET_HOLE)
    hole = wire.OffsetHole.parse(payload)
    assert (hole.offset, hole.length) == (8192, 8192)


def test_block_status_reply() -> None:
    core = negotiate()
    flags, rtype, cookie, payload = chunk(core.reply_block_status(3, [(4096, 0), (8192, 3)]))
    assert (flags, rtype, cookie) == (c.ReplyFlag.DONE, ReplyType.BLOCK_STATUS, 3)
    parsed = wire.BlockStatusPayload.parse(payload)
    assert parsed.context_id == core.meta_context
    assert [(d.length, d.status_flags) for d in parsed.descriptors] == [(4096, 0), (8192, 3)]


def test_write_payload_in_pieces() -> None:
    core = negotiate()
    payload = bytes(range(256)) * 64
    stream = request(Cmd.WRITE, cookie=1, offset=4096, length=len(payload), flags=CmdFlag.FUA) + payload
    stream += request(Cmd.FLUSH, cookie=2)
    events: list[object] = []
    for i in range(0, len(stream), 7):
        events += core.receive(stream[i : i + 7])
    assert [type(e) for e in events] == [Request, Request]
    write = events[0]
    assert isinstance(write, Request)
    assert bytes(write.payload or b"") == payload and write.flags == CmdFlag.FUA
    assert isinstance(events[1], Request) and events[1].cmd == Cmd.FLUSH
    assert simple_error(core.reply_ok(1)) == (0, 1)


@pytest.mark.parametrize(
    ("req", "error"),
    [
        (request(Cmd.READ, offset=SIZE - 512, length=1024), Errno.EINVAL),
        (request(Cmd.READ, length=c.MAX_PAYLOAD + 1), Errno.EOVERFLOW),
        (request(Cmd.READ, flags=CmdFlag.FUA, length=512), Errno.EINVAL),
        (request(Cmd.TRIM, offset=SIZE, length=1), Errno.EINVAL),
        (request(Cmd.WRITE_ZEROES, offset=SIZE, length=1), Errno.ENOSPC),
        (request(Cmd.WRITE_ZEROES, flags=CmdFlag.REQ_ONE, length=1), Errno.EINVAL),
        (request(Cmd.CACHE, offset=SIZE, length=1), Errno.EINVAL),
        (request(Cmd.BLOCK_STATUS, offset=SIZE, length=1), Errno.EINVAL),
        (request(Cmd.BLOCK_STATUS, length=0), Errno.EINVAL),
        (request(Cmd.FLUSH, flags=CmdFlag.FUA), Errno.EINVAL),
        # The spec: FLUSH offset and length MUST be zero (nbdkit answers EINVAL too).
        (request(Cmd.FLUSH, offset=512), Errno.EINVAL),
        (request(Cmd.FLUSH, length=512), Errno.EINVAL),
        (request(Cmd.RESIZE, length=1), Errno.EINVAL),
        (request(200, length=1), Errno.EINVAL),
    ],
)
def test_invalid_requests_answered_by_core(req: bytes, error: int) -> None:
    core = negotiate()
    events = core.receive(req + request(Cmd.FLUSH, cookie=99))
    assert len(events) == 1 and isinstance(events[0], Request) and events[0].cookie == 99
    reply = out(core)
    if reply[:4] == struct.pack(">I", c.STRUCTURED_REPLY_MAGIC):
        flags, rtype, _cookie, payload = chunk(reply)
        assert rtype == ReplyType.ERROR and flags == c.ReplyFlag.DONE
        assert wire.ErrorChunk.parse(payload).error == error
    else:
        assert simple_error(reply) == (error, 7)


@pytest.mark.parametrize(
    ("export", "offset", "length", "flags", "error"),
    [
        ("disk", SIZE - 100, 200, 0, Errno.ENOSPC),
        ("ro", 0, 200, 0, Errno.EPERM),
        ("disk", 0, 200, CmdFlag.NO_HOLE, Errno.EINVAL),
        ("disk", 0, 0, CmdFlag.DF, Errno.EINVAL),
    ],
)
def test_refused_write_payload_is_consumed(export: str, offset: int, length: int, flags: int, error: int) -> None:
    core = negotiate(export=export)
    stream = request(Cmd.WRITE, offset=offset, length=length, flags=flags) + b"\x07" * length
    stream += request(Cmd.READ, cookie=8, length=512)
    events = core.receive(stream)
    assert simple_error(out(core)) == (error, 7)
    assert len(events) == 1 and isinstance(events[0], Request) and events[0].cookie == 8


def test_readonly_trim_and_zero_eperm() -> None:
    core = negotiate(export="ro")
    core.receive(request(Cmd.TRIM, length=512) + request(Cmd.WRITE_ZEROES, length=512, cookie=8))
    data = out(core)
    assert simple_error(data[:16]) == (Errno.EPERM, 7)
    assert simple_error(data[16:]) == (Errno.EPERM, 8)


def test_oversized_write_is_refused_and_consumed() -> None:
    core = negotiate()
    big = c.MAX_PAYLOAD + 1
    core.receive(request(Cmd.WRITE, length=big))
    assert core.phase is Phase.PAYLOAD_DISCARD
    for _ in range(big // (1 << 20)):
        core.receive(bytes(1 << 20))
    events = core.receive(bytes(big % (1 << 20)) + request(Cmd.FLUSH, cookie=2))
    assert simple_error(out(core)) == (Errno.EINVAL, 7)
    assert len(events) == 1 and isinstance(events[0], Request)


def test_disconnect_and_bad_request_magic() -> None:
    core = negotiate()
    events = core.receive(request(Cmd.DISC) + request(Cmd.READ, length=1))
    assert events == [Closed("client disconnected", False)]
    core = negotiate()
    events = core.receive(b"\x00" * 28)
    assert isinstance(events[0], Closed) and events[0].error


def test_fast_header_matches_construct() -> None:
    values = {"flags": 5, "type": 1, "cookie": 2**63 + 3, "offset": 2**40, "length": 65536}
    built = wire.Request.build(values)
    assert wire.REQUEST_FAST.unpack(built) == (c.REQUEST_MAGIC, 5, 1, 2**63 + 3, 2**40, 65536)
    core = negotiate()
    assert core.reply_ok(77) == wire.SimpleReply.build({"error": 0, "cookie": 77})


# --- hostile streams -------------------------------------------------------------------------------

HANDSHAKE_PREFIXES = [
    b"",
    struct.pack(">I", 3),
    struct.pack(">I", 3) + option(Opt.STRUCTURED_REPLY),
    struct.pack(">I", 3)
    + option(Opt.STRUCTURED_REPLY)
    + option(Opt.SET_META_CONTEXT, meta_data("disk", ["base:allocation"]))
    + option(Opt.GO, info_data("disk")),
    struct.pack(">I", 1) + option(Opt.EXPORT_NAME, b"ro"),
]


def _feed(core: ServerCore, stream: bytes, cuts: list[int]) -> tuple[list[object], bytes]:
    events: list[object] = []
    output = bytearray()
    pos = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        if cut <= pos:
            continue
        events += core.receive(stream[pos:cut])
        output += out(core)
        pos = cut
        assert len(core._record) <= max(core.max_option_data, 28)
    return events, bytes(output)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from(HANDSHAKE_PREFIXES),
    garbage=st.binary(max_size=600),
    cuts=st.lists(st.integers(min_value=0, max_value=800), max_size=12),
)
def test_hostile_bytes_never_crash(prefix: bytes, garbage: bytes, cuts: list[int]) -> None:
    stream = prefix + garbage
    core = make_core(max_option_data=256, max_option_discard=4096)
    out(core)
    events, output = _feed(core, stream, cuts)
    # Bounded: the core never answers more than a small multiple of what it was sent.
    assert len(output) <= 64 + 40 * len(stream)
    for event in events:
        assert isinstance(event, Negotiated | Request | Closed)
        if isinstance(event, Request):
            assert event.offset + event.length <= SIZE
            if event.payload is not None:
                assert len(event.payload) == event.length
    closed = [e for e in events if isinstance(e, Closed)]
    assert len(closed) <= 1
    if closed:
        assert isinstance(events[-1], Closed) and core.phase is Phase.CLOSED


@settings(max_examples=150, deadline=None)
@given(
    prefix=st.sampled_from(HANDSHAKE_PREFIXES),
    garbage=st.binary(max_size=400),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=10),
)
def test_chunking_does_not_change_the_outcome(prefix: bytes, garbage: bytes, cuts: list[int]) -> None:
    whole_core = make_core(max_option_data=256, max_option_discard=4096)
    out(whole_core)
    whole = _feed(whole_core, prefix + garbage, [])
    cut_core = make_core(max_option_data=256, max_option_discard=4096)
    out(cut_core)
    pieces = _feed(cut_core, prefix + garbage, cuts)
    assert _summary(whole[0]) == _summary(pieces[0])
    assert whole[1] == pieces[1]


@settings(max_examples=100, deadline=None)
@given(
    requests=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=9),
            st.integers(min_value=0, max_value=0xFFFF),
            st.integers(min_value=0, max_value=2 * SIZE),
            st.integers(min_value=0, max_value=70000),
        ),
        max_size=20,
    )
)
def test_random_requests_keep_the_stream_in_sync(requests: list[tuple[int, int, int, int]]) -> None:
    """Whatever the requests, a trailing FLUSH is still recognised: refused payloads were consumed."""
    core = negotiate()
    stream = b""
    for i, (cmd, flags, offset, length) in enumerate(requests):
        if cmd == Cmd.DISC:
            continue
        stream += request(cmd, flags=flags, offset=offset, length=length, cookie=i)
        if cmd == Cmd.WRITE and length <= c.MAX_PAYLOAD:
            stream += b"\x01" * length
    stream += request(Cmd.FLUSH, cookie=10**6)
    events = core.receive(stream)
    assert core.phase is Phase.REQUEST_HEADER
    assert isinstance(events[-1], Request) and events[-1].cookie == 10**6


def _feed_buffered(core: ServerCore, stream: bytes, chunk: int) -> tuple[list[object], bytes]:
    """Feed like the asyncio adapter does: into the payload buffer when the core offers one, else
    through a reused receive buffer that is scribbled over after every call."""
    events: list[object] = []
    output = bytearray()
    rbuf = bytearray(chunk)
    pos = 0
    while pos < len(stream) and core.phase is not Phase.CLOSED:
        target = core.payload_buffer()
        if target is not None:
            n = min(len(target), chunk, len(stream) - pos)
            target[:n] = stream[pos : pos + n]
            events += core.payload_received(n)
        else:
            n = min(chunk, len(stream) - pos)
            rbuf[:n] = stream[pos : pos + n]
            events += core.receive(memoryview(rbuf)[:n], reused=True)
            rbuf[:] = b"\xee" * len(rbuf)  # the adapter reuses it: nothing may still point into it
        output += out(core)
        pos += n
    return events, bytes(output)


def _summary(events: list[object]) -> list[object]:
    return [
        (e.cmd, e.flags, e.cookie, e.offset, e.length, bytes(e.payload) if e.payload is not None else None)
        if isinstance(e, Request)
        else e
        for e in events
    ]


@settings(max_examples=150, deadline=None)
@given(
    prefix=st.sampled_from(HANDSHAKE_PREFIXES[3:]),
    writes=st.lists(
        st.tuples(st.integers(0, 4096), st.integers(1, 3000), st.binary(min_size=1, max_size=1)), max_size=8
    ),
    chunk=st.integers(min_value=1, max_value=5000),
)
def test_buffered_receive_matches_plain_receive(
    prefix: bytes, writes: list[tuple[int, int, bytes]], chunk: int
) -> None:
    stream = prefix
    for i, (offset, length, fill) in enumerate(writes):
        stream += request(Cmd.WRITE, cookie=i, offset=offset, length=length) + fill * length
        stream += request(Cmd.READ, cookie=100 + i, offset=offset, length=16)
    plain = make_core()
    out(plain)
    expected = _feed(plain, stream, [])
    buffered = make_core()
    out(buffered)
    got = _feed_buffered(buffered, stream, chunk)
    assert _summary(got[0]) == _summary(expected[0])
    assert got[1] == expected[1]


def test_payload_buffers_are_reused_only_when_free() -> None:
    core = negotiate()
    size = 128 * 1024
    core.receive(request(Cmd.WRITE, length=size))
    first = core.payload_buffer()
    assert first is not None
    first[:] = b"\x01" * size
    (write,) = core.payload_received(size)
    assert isinstance(write, Request) and isinstance(write.payload, bytearray)
    buffer = write.payload
    del first
    core.recycle(buffer)
    # Still referenced (here, as a device might keep it): a fresh buffer is used.
    core.receive(request(Cmd.WRITE, length=size))
    second = core.payload_buffer()
    assert second is not None and second.obj is not buffer
    second[:] = b"\x02" * size
    (write2,) = core.payload_received(size)
    del second
    assert isinstance(write2, Request) and isinstance(write2.payload, bytearray)
    core.recycle(write2.payload)
    write2.payload = None
    # Nobody holds the second one any more: it is reused.
    core.receive(request(Cmd.WRITE, length=size))
    third = core.payload_buffer()
    assert third is not None and len(third) == size
    assert bytes(third[:1]) == b"\x02"  # the recycled buffer, not a zero-filled new one
    assert buffer == b"\x01" * size  # the one still referenced was never touched


def test_minimum_block_size_is_enforced() -> None:
    core = negotiate(export="sectors")
    stream = request(Cmd.READ, offset=100, length=512) + request(Cmd.TRIM, cookie=8, offset=512, length=100)
    stream += request(Cmd.WRITE, cookie=9, offset=0, length=100) + b"\x01" * 100
    stream += request(Cmd.WRITE, cookie=10, offset=512, length=512) + b"\x02" * 512
    events = core.receive(stream)
    assert [e.cookie for e in events if isinstance(e, Request)] == [10]
    data = out(core)
    _flags, rtype, cookie, payload = chunk(data)
    assert (rtype, cookie) == (ReplyType.ERROR, 7) and wire.ErrorChunk.parse(payload).error == Errno.EINVAL
    rest = data[20 + len(payload) :]
    assert simple_error(rest[:16]) == (Errno.EINVAL, 8)
    assert simple_error(rest[16:]) == (Errno.EINVAL, 9)


@pytest.mark.parametrize("size", [20 << 20, 32 << 20])
def test_recycling_a_payload_bigger_than_the_spare_budget(size: int) -> None:
    """A write payload over the spare budget (16 MiB) is not kept, and recycling it never fails."""
    big = {"disk": ExportEntry("disk", 64 << 20, RW_FLAGS)}
    core = negotiate(core=ServerCore(big.get, lambda: big.values()))
    for cookie in (1, 2):
        core.receive(request(Cmd.WRITE, cookie=cookie, length=size))
        target = core.payload_buffer()
        assert target is not None
        (write,) = core.payload_received(len(target))
        del target
        assert isinstance(write, Request) and write.payload is not None
        core.recycle(write.payload)  # raised IndexError with nothing kept yet
        write.payload = None
    # A small one is still kept.
    core.receive(request(Cmd.WRITE, cookie=3, length=1 << 20))
    target = core.payload_buffer()
    assert target is not None
    (write,) = core.payload_received(len(target))
    del target
    assert isinstance(write, Request) and write.payload is not None
    core.recycle(write.payload)


def test_big_payloads_are_mapped_and_spares_are_shared() -> None:
    """A big payload buffer is an anonymous mapping (pages used only as bytes arrive); finished ones
    go to a pool several connections share, bounded in bytes."""
    import mmap

    from nbd.server_core import SparePool

    big = {"disk": ExportEntry("disk", 64 << 20, RW_FLAGS)}
    pool = SparePool(max_bytes=4 << 20, max_count=4)
    first, second = (negotiate(core=ServerCore(big.get, lambda: big.values(), spares=pool)) for _ in range(2))
    first.receive(request(Cmd.WRITE, length=2 << 20) + b"\x01")  # one byte of the payload
    target = first.payload_buffer()
    assert target is not None and isinstance(target.obj, mmap.mmap) and len(target) == (2 << 20) - 1
    (write,) = first.payload_received(len(target))
    del target
    assert isinstance(write, Request) and write.payload is not None and write.payload[:1] == b"\x01"
    first.recycle(write.payload)
    write.payload = None
    assert pool.held == 2 << 20
    second.receive(request(Cmd.WRITE, length=2 << 20))
    reused = second.payload_buffer()
    assert reused is not None and reused[:1] == b"\x01"  # the first connection's buffer
    assert pool.held == 0
    # Never more than the pool's bytes.
    for _ in range(3):
        pool.give(memoryview(mmap.mmap(-1, 2 << 20)))
    assert pool.held == 4 << 20


def test_a_pending_lookup_holds_the_pipelined_options_until_resume() -> None:
    """A lookup that must block (``Pending``) stops the handshake at its option: the adapter runs the work
    off the loop and resumes; the options pipelined behind it wait, and each name is asked for again."""
    resolved: dict[str, ExportEntry | None] = {}
    asked: list[str] = []

    def lookup(name: str) -> ExportEntry | None:
        asked.append(name)
        if name not in resolved:
            raise Pending(lambda: resolved.__setitem__(name, EXPORTS.get(name)))
        return resolved[name]

    def listing() -> list[ExportEntry]:
        if "*" not in resolved:
            raise Pending(lambda: resolved.__setitem__("*", None))
        return list(EXPORTS.values())

    core = ServerCore(lookup, listing)
    out(core)
    stream = struct.pack(">I", c.ClientFlag.C_FIXED_NEWSTYLE | c.ClientFlag.C_NO_ZEROES)
    stream += option(Opt.STRUCTURED_REPLY) + option(Opt.LIST)
    events = core.receive(stream + option(Opt.SET_META_CONTEXT, meta_data("disk", [c.META_BASE_ALLOCATION])))
    assert len(events) == 1 and isinstance(events[0], Resolve)
    assert [r for _, r, _ in parse_option_replies(out(core))] == [Rep.ACK]  # STRUCTURED_REPLY only
    assert core.receive(option(Opt.GO, info_data("disk"))) == []  # held while the option waits
    events[0].work()
    events = core.resume()  # LIST answered, then SET_META_CONTEXT waits for "disk"
    assert len(events) == 1 and isinstance(events[0], Resolve) and asked == ["disk"]
    assert [r for o, r, _ in parse_option_replies(out(core)) if o == Opt.LIST][-1] == Rep.ACK
    events[0].work()
    events = core.resume()
    assert isinstance(events[-1], Negotiated) and events[-1].export.name == "disk" and events[-1].meta_context
    assert asked == ["disk", "disk", "disk"] and core.phase is Phase.REQUEST_HEADER
