"""The sans-I/O client core: handshake events from server bytes, and replies parsed into requests —
fed whole, byte by byte, at random boundaries, and through the zero-copy get_buffer/buffer_updated path."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbd import constants as c
from nbd import wire
from nbd.client_core import (
    NEED_DATA,
    ClientHandshake,
    ClientRequest,
    ClientTransmission,
    ExportNameAccepted,
    Greeting,
    HandshakeState,
    InfoBlockSizeReceived,
    InfoDescriptionReceived,
    InfoExportReceived,
    InfoUnknownReceived,
    MetaContext,
    OptionAck,
    OptionError,
    ServerEntry,
)
from nbd.errors import HandshakeError, ProtocolError

GREETING = wire.ServerGreeting.build({"handshake_flags": c.HandshakeFlag.FIXED_NEWSTYLE | c.HandshakeFlag.NO_ZEROES})


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return wire.OPTION_REPLY_HEADER_FAST.pack(c.OPT_REPLY_MAGIC, option, reply, len(payload)) + payload


def events(hs: ClientHandshake) -> list[object]:
    out: list[object] = []
    while (event := hs.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def greeted() -> ClientHandshake:
    hs = ClientHandshake()
    hs.receive_data(GREETING)
    assert events(hs) == [Greeting(3)]
    assert hs.send_client_flags() == (c.ClientFlag.C_FIXED_NEWSTYLE | c.ClientFlag.C_NO_ZEROES).to_bytes(4, "big")
    return hs


def test_greeting_byte_by_byte() -> None:
    hs = ClientHandshake()
    for byte in GREETING[:-1]:
        hs.receive_data(bytes([byte]))
        assert hs.next_event() is NEED_DATA
    hs.receive_data(GREETING[-1:])
    assert hs.next_event() == Greeting(3)
    assert hs.state is HandshakeState.SEND_CLIENT_FLAGS


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"NOTNBD!!" + bytes(10), ProtocolError),
        (wire.ServerGreeting.build({"handshake_flags": 0}), HandshakeError),
        (c.NBDMAGIC.to_bytes(8, "big") + c.OLD_MAGIC.to_bytes(8, "big") + bytes(2), HandshakeError),
    ],
)
def test_bad_greetings(data: bytes, error: type[Exception]) -> None:
    hs = ClientHandshake()
    hs.receive_data(data)
    with pytest.raises(error):
        hs.next_event()


def test_go_with_info_replies() -> None:
    hs = greeted()
    request = hs.send_go("disk", (c.Info.BLOCK_SIZE, c.Info.DESCRIPTION))
    magic, option, length = wire.OPTION_HEADER_FAST.unpack_from(request)
    parsed = wire.InfoRequest.parse(request[16:])
    assert (magic, option, length, parsed.name, list(parsed.requests)) == (
        c.IHAVEOPT,
        c.Opt.GO,
        len(request) - 16,
        "disk",
        [c.Info.BLOCK_SIZE, c.Info.DESCRIPTION],
    )
    hs.receive_data(
        option_reply(c.Opt.GO, c.Rep.INFO, wire.InfoExport.build({"size": 1 << 30, "transmission_flags": 0x1ED}))
        + option_reply(
            c.Opt.GO, c.Rep.INFO, wire.InfoBlockSize.build({"minimum": 512, "preferred": 4096, "maximum": 1 << 25})
        )
        + option_reply(c.Opt.GO, c.Rep.INFO, wire.InfoDescription.build({"description": b"hello"}))
        + option_reply(c.Opt.GO, c.Rep.INFO, (99).to_bytes(2, "big") + b"future")
        + option_reply(c.Opt.GO, c.Rep.ACK)
    )
    assert events(hs) == [
        InfoExportReceived(1 << 30, 0x1ED),
        InfoBlockSizeReceived(512, 4096, 1 << 25),
        InfoDescriptionReceived("hello"),
        InfoUnknownReceived(99),
        OptionAck(c.Opt.GO),
    ]
    hs.enter_transmission()
    assert hs.state is HandshakeState.TRANSMISSION


def test_option_errors_list_and_meta_contexts() -> None:
    hs = greeted()
    hs.send_option(c.Opt.STRUCTURED_REPLY)
    hs.receive_data(option_reply(c.Opt.STRUCTURED_REPLY, c.Rep.ERR_UNSUP, b"no thanks"))
    assert events(hs) == [OptionError(c.Opt.STRUCTURED_REPLY, c.Rep.ERR_UNSUP, "no thanks")]
    hs.send_option(c.Opt.LIST)
    entry = wire.RepServer.build({"name": "a", "description": b"first"})
    hs.receive_data(option_reply(c.Opt.LIST, c.Rep.SERVER, entry) + option_reply(c.Opt.LIST, c.Rep.ACK))
    assert events(hs) == [ServerEntry("a", "first"), OptionAck(c.Opt.LIST)]
    hs.send_meta_context("a", ["base:allocation"], set_=True)
    context = (7).to_bytes(4, "big") + b"base:allocation"
    hs.receive_data(option_reply(c.Opt.SET_META_CONTEXT, c.Rep.META_CONTEXT, context))
    hs.receive_data(option_reply(c.Opt.SET_META_CONTEXT, c.Rep.ACK))
    assert events(hs) == [MetaContext(7, "base:allocation"), OptionAck(c.Opt.SET_META_CONTEXT)]


@pytest.mark.parametrize(
    "reply",
    [
        option_reply(c.Opt.INFO, c.Rep.ACK),  # a reply to an option we did not send
        option_reply(c.Opt.GO, c.Rep.SERVER, b"\0\0\0\0"),  # SERVER is for LIST only
        option_reply(c.Opt.GO, c.Rep.ACK, b"x"),  # ACK with a payload
        option_reply(c.Opt.GO, c.Rep.INFO, b"\0\3" + bytes(12)[:11]),  # block size too short
        option_reply(
            c.Opt.GO, c.Rep.INFO, wire.InfoBlockSize.build({"minimum": 3, "preferred": 4096, "maximum": 4096})
        ),
        b"\xff" * 20,  # bad magic
    ],
)
def test_option_protocol_errors(reply: bytes) -> None:
    hs = greeted()
    hs.send_go("")
    hs.receive_data(reply)
    with pytest.raises(ProtocolError):
        events(hs)


def test_export_name_fallback_and_eof() -> None:
    hs = greeted()
    assert hs.send_export_name("x") == wire.OPTION_HEADER_FAST.pack(c.IHAVEOPT, c.Opt.EXPORT_NAME, 1) + b"x"
    hs.receive_data((4096).to_bytes(8, "big") + (3).to_bytes(2, "big"))  # NO_ZEROES agreed: no padding
    assert events(hs) == [ExportNameAccepted(4096, 3)]
    assert hs.state is HandshakeState.TRANSMISSION
    hs = greeted()
    hs.send_export_name("missing")
    with pytest.raises(HandshakeError, match="no such export"):
        hs.receive_eof()


def test_export_name_reply_with_zero_padding() -> None:
    hs = ClientHandshake()
    hs.receive_data(wire.ServerGreeting.build({"handshake_flags": c.HandshakeFlag.FIXED_NEWSTYLE}))
    events(hs)
    assert hs.send_client_flags() == c.ClientFlag.C_FIXED_NEWSTYLE.to_bytes(4, "big")
    hs.send_export_name("")
    hs.receive_data((512).to_bytes(8, "big") + (1).to_bytes(2, "big") + bytes(100))
    assert hs.next_event() is NEED_DATA
    hs.receive_data(bytes(24))
    assert hs.next_event() == ExportNameAccepted(512, 1)


def test_options_only_in_order() -> None:
    hs = ClientHandshake()
    with pytest.raises(ProtocolError):
        hs.send_option(c.Opt.LIST)
    hs = greeted()
    hs.send_option(c.Opt.LIST)
    with pytest.raises(ProtocolError):
        hs.send_option(c.Opt.LIST)  # one option at a time


# --- transmission ---------------------------------------------------------------------------------------


def structured(cookie: int, type_: int, payload: bytes, *, done: bool) -> bytes:
    flags = c.ReplyFlag.DONE if done else 0
    return wire.STRUCTURED_REPLY_FAST.pack(c.STRUCTURED_REPLY_MAGIC, flags, type_, cookie, len(payload)) + payload


def simple(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return wire.SIMPLE_REPLY_FAST.pack(c.SIMPLE_REPLY_MAGIC, error, cookie) + data


def error_chunk(error: int, message: str, offset: int | None = None) -> bytes:
    body = error.to_bytes(4, "big") + len(message.encode()).to_bytes(2, "big") + message.encode()
    return body + (offset.to_bytes(8, "big") if offset is not None else b"")


def feed_in_pieces(tx: ClientTransmission, data: bytes, rng: random.Random, *, zero_copy: bool) -> None:
    pos = 0
    while pos < len(data):
        if zero_copy:
            buffer = tx.get_buffer()
            n = min(len(buffer), rng.randint(1, 70_000), len(data) - pos)
            buffer[:n] = data[pos : pos + n]
            tx.buffer_updated(n)
        else:
            n = min(rng.randint(1, 70_000), len(data) - pos)
            tx.feed(data[pos : pos + n])
        pos += n


def test_request_header_and_disconnect() -> None:
    tx = ClientTransmission(structured=True)
    req, header = tx.request(c.Cmd.WRITE, 4096, 512, c.CmdFlag.FUA)
    assert wire.Request.parse(header) == wire.Request.parse(
        wire.Request.build({"flags": 1, "type": c.Cmd.WRITE, "cookie": req.cookie, "offset": 4096, "length": 512})
    )
    assert tx.inflight == {req.cookie: req}
    assert wire.REQUEST_FAST.unpack(ClientTransmission.disconnect_request())[2] == c.Cmd.DISC


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), zero_copy=st.booleans())
def test_structured_read_chunks_in_any_order_and_split(seed: int, zero_copy: bool) -> None:
    rng = random.Random(seed)
    tx = ClientTransmission(structured=True, meta_context_id=1)
    length = rng.randint(1, 300_000)
    expected = bytearray(length)
    req, _ = tx.request(c.Cmd.READ, 10_000, length)
    other, _ = tx.request(c.Cmd.WRITE, 0, 10)
    # Cut the range into data and hole chunks, send them shuffled, interleaved with another reply.
    cuts = sorted(rng.sample(range(1, length), min(length - 1, rng.randint(0, 6))))
    chunks = []
    for start, end in zip([0, *cuts], [*cuts, length], strict=True):
        if rng.random() < 0.4:
            chunks.append(
                (c.ReplyType.OFFSET_HOLE, (10_000 + start).to_bytes(8, "big") + (end - start).to_bytes(4, "big"))
            )
        else:
            data = rng.randbytes(end - start)
            expected[start:end] = data
            chunks.append((c.ReplyType.OFFSET_DATA, (10_000 + start).to_bytes(8, "big") + data))
    rng.shuffle(chunks)
    stream = b"".join(structured(req.cookie, t, p, done=False) for t, p in chunks[:-1])
    stream += simple(other.cookie)
    stream += structured(req.cookie, chunks[-1][0], chunks[-1][1], done=True)
    feed_in_pieces(tx, stream, rng, zero_copy=zero_copy)
    done = tx.pop_completed()
    assert [r.cookie for r in done] == [other.cookie, req.cookie]
    assert (req.error, req.received, bytes(req.buffer or b"")) == (0, length, bytes(expected))
    assert not tx.inflight and not tx.mid_reply


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(seed=st.integers(0, 2**32), zero_copy=st.booleans())
def test_simple_read_replies(seed: int, zero_copy: bool) -> None:
    rng = random.Random(seed)
    tx = ClientTransmission(structured=False)
    reqs = [tx.request(c.Cmd.READ, i * 4096, rng.randint(1, 50_000))[0] for i in range(5)]
    failed, _ = tx.request(c.Cmd.READ, 0, 100)
    payloads = {r.cookie: rng.randbytes(r.length) for r in reqs}
    order = reqs[:]
    rng.shuffle(order)
    stream = simple(failed.cookie, c.Errno.EIO) + b"".join(simple(r.cookie, 0, payloads[r.cookie]) for r in order)
    feed_in_pieces(tx, stream, rng, zero_copy=zero_copy)
    done = tx.pop_completed()
    assert done[0] is failed and failed.error == c.Errno.EIO
    assert all(bytes(r.buffer or b"") == payloads[r.cookie] for r in reqs)


def test_read_into_caller_buffer_view() -> None:
    tx = ClientTransmission(structured=True)
    big = bytearray(b"\xff" * 100)
    req, _ = tx.request(c.Cmd.READ, 0, 50, buffer=memoryview(big)[25:75])
    tx.feed(structured(req.cookie, c.ReplyType.OFFSET_DATA, (0).to_bytes(8, "big") + b"a" * 50, done=True))
    assert tx.pop_completed() == [req]
    assert big == b"\xff" * 25 + b"a" * 50 + b"\xff" * 25


def test_block_status_is_clipped_and_merged() -> None:
    tx = ClientTransmission(structured=True, meta_context_id=5)
    req, _ = tx.request(c.Cmd.BLOCK_STATUS, 0, 10_000)
    descriptors = [(4096, 0), (4096, 0), (4096, 3), (1 << 20, 0)]
    payload = (5).to_bytes(4, "big") + b"".join(wire.BLOCK_STATUS_DESCRIPTOR_FAST.pack(*d) for d in descriptors)
    tx.feed(structured(req.cookie, c.ReplyType.BLOCK_STATUS, payload, done=True))
    assert tx.pop_completed() == [req]
    assert req.extents == [(8192, 0), (1808, 3)]


def status_chunk(context_id: int, *descriptors: tuple[int, int]) -> bytes:
    return context_id.to_bytes(4, "big") + b"".join(wire.BLOCK_STATUS_DESCRIPTOR_FAST.pack(*d) for d in descriptors)


def test_block_status_of_two_contexts_in_one_reply() -> None:
    """base:allocation and a context selected by name (a dirty bitmap) answer in chunks of one reply,
    in either order; each lands in its own list."""
    tx = ClientTransmission(structured=True, meta_context_id=5, map_context_id=7)
    req, _ = tx.request(c.Cmd.BLOCK_STATUS, 0, 8192)
    tx.feed(structured(req.cookie, c.ReplyType.BLOCK_STATUS, status_chunk(7, (4096, 1), (4096, 0)), done=False))
    tx.feed(structured(req.cookie, c.ReplyType.BLOCK_STATUS, status_chunk(5, (8192, 3)), done=True))
    assert tx.pop_completed() == [req]
    assert req.extents == [(8192, 3)]
    assert req.map_extents == [(4096, 1), (4096, 0)]
    again, _ = tx.request(c.Cmd.BLOCK_STATUS, 0, 4096)
    tx.feed(structured(again.cookie, c.ReplyType.BLOCK_STATUS, status_chunk(7, (4096, 1)), done=False))
    with pytest.raises(ProtocolError, match="two block status chunks"):
        tx.feed(structured(again.cookie, c.ReplyType.BLOCK_STATUS, status_chunk(7, (4096, 1)), done=True))


@pytest.mark.parametrize(
    "payload",
    [
        (9).to_bytes(4, "big") + wire.BLOCK_STATUS_DESCRIPTOR_FAST.pack(512, 0),  # context not negotiated
        (5).to_bytes(4, "big") + wire.BLOCK_STATUS_DESCRIPTOR_FAST.pack(0, 0),  # zero-length extent
        (5).to_bytes(4, "big") + b"\0\0\0",  # ragged
    ],
)
def test_bad_block_status(payload: bytes) -> None:
    tx = ClientTransmission(structured=True, meta_context_id=5)
    req, _ = tx.request(c.Cmd.BLOCK_STATUS, 0, 4096)
    with pytest.raises(ProtocolError):
        tx.feed(structured(req.cookie, c.ReplyType.BLOCK_STATUS, payload, done=True))


def test_error_chunks() -> None:
    tx = ClientTransmission(structured=True)
    read, _ = tx.request(c.Cmd.READ, 1000, 1000)
    write, _ = tx.request(c.Cmd.WRITE, 0, 10)
    unknown_error_type = 0x8000 + 77
    tx.feed(
        structured(read.cookie, c.ReplyType.ERROR_OFFSET, error_chunk(c.Errno.EIO, "bad sector", 1500), done=False)
        + structured(read.cookie, c.ReplyType.OFFSET_DATA, (1000).to_bytes(8, "big") + b"x" * 500, done=True)
        + structured(write.cookie, unknown_error_type, error_chunk(c.Errno.ENOSPC, "full"), done=True)
    )
    assert tx.pop_completed() == [read, write]
    assert (read.error, read.message, read.error_offset) == (c.Errno.EIO, "bad sector", 1500)
    assert (write.error, write.message) == (c.Errno.ENOSPC, "full")


def test_short_structured_read_is_an_error() -> None:
    tx = ClientTransmission(structured=True)
    req, _ = tx.request(c.Cmd.READ, 0, 100)
    tx.feed(structured(req.cookie, c.ReplyType.OFFSET_DATA, (0).to_bytes(8, "big") + b"x" * 50, done=False))
    tx.feed(structured(req.cookie, c.ReplyType.NONE, b"", done=True))
    assert tx.pop_completed() == [req]
    assert req.error == c.Errno.EIO and "50 of 100" in req.message


@pytest.mark.parametrize(
    "make",
    [
        lambda r: simple(r.cookie + 1000),  # unknown cookie
        lambda r: b"\x12\x34\x56\x78" + bytes(16),  # bad magic
        lambda r: structured(r.cookie, c.ReplyType.OFFSET_DATA, (50).to_bytes(8, "big") + b"x" * 60, done=True),
        lambda r: structured(
            r.cookie, c.ReplyType.OFFSET_HOLE, (0).to_bytes(8, "big") + (0).to_bytes(4, "big"), done=True
        ),
        lambda r: structured(r.cookie, c.ReplyType.NONE, b"", done=False),
        lambda r: structured(r.cookie, 42, b"", done=True),  # unknown non-error type
        lambda r: structured(r.cookie, c.ReplyType.ERROR, error_chunk(0, "no error?"), done=True),
        lambda r: structured(r.cookie, c.ReplyType.BLOCK_STATUS, bytes(12), done=True),  # not a status request
    ],
)
def test_protocol_violations(make: object) -> None:
    tx = ClientTransmission(structured=True)
    req, _ = tx.request(c.Cmd.READ, 0, 100)
    with pytest.raises(ProtocolError):
        tx.feed(make(req))  # type: ignore[operator]


def test_structured_reply_without_negotiation() -> None:
    tx = ClientTransmission(structured=False)
    req, _ = tx.request(c.Cmd.FLUSH, 0, 0)
    with pytest.raises(ProtocolError, match="not negotiated"):
        tx.feed(structured(req.cookie, c.ReplyType.NONE, b"", done=True))


def test_mid_reply_is_visible() -> None:
    tx = ClientTransmission(structured=False)
    req, _ = tx.request(c.Cmd.READ, 0, 100)
    tx.feed(simple(req.cookie)[:10])
    assert tx.mid_reply
    tx.feed(simple(req.cookie)[10:] + b"y" * 99)
    assert tx.mid_reply and not tx.pop_completed()
    tx.feed(b"y")
    assert not tx.mid_reply
    done = tx.pop_completed()
    assert done == [req] and isinstance(done[0], ClientRequest)


def test_hole_in_a_reused_buffer_is_zeroed() -> None:
    tx = ClientTransmission(structured=True)
    buffer = bytearray(b"\xff" * 100)
    req, _ = tx.request(c.Cmd.READ, 1000, 100, buffer=buffer, fresh=False)
    hole = (1000).to_bytes(8, "big") + (60).to_bytes(4, "big")
    tx.feed(structured(req.cookie, c.ReplyType.OFFSET_HOLE, hole, done=False))
    tx.feed(structured(req.cookie, c.ReplyType.OFFSET_DATA, (1060).to_bytes(8, "big") + b"d" * 40, done=True))
    assert tx.pop_completed() == [req]
    assert buffer == bytes(60) + b"d" * 40
