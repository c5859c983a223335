"""The construct definitions round-trip, and the struct fast paths are byte-identical to them."""

from __future__ import annotations

import pytest
from construct import ConstError
from hypothesis import given, settings
from hypothesis import strategies as st

from nbd import constants as c
from nbd import wire

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(flags=u16, type_=u16, cookie=u64, offset=u64, length=u32)
def test_request_fast_path_matches_construct(flags: int, type_: int, cookie: int, offset: int, length: int) -> None:
    built = wire.Request.build(dict(flags=flags, type=type_, cookie=cookie, offset=offset, length=length))
    packed = wire.REQUEST_FAST.pack(c.REQUEST_MAGIC, flags, type_, cookie, offset, length)
    assert built == packed
    assert wire.REQUEST_FAST.size == wire.Request.sizeof() == 28
    parsed = wire.Request.parse(packed)
    assert wire.REQUEST_FAST.unpack(built) == (
        c.REQUEST_MAGIC,
        parsed.flags,
        parsed.type,
        parsed.cookie,
        parsed.offset,
        parsed.length,
    )


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(error=u32, cookie=u64)
def test_simple_reply_fast_path_matches_construct(error: int, cookie: int) -> None:
    built = wire.SimpleReply.build(dict(error=error, cookie=cookie))
    assert built == wire.SIMPLE_REPLY_FAST.pack(c.SIMPLE_REPLY_MAGIC, error, cookie)
    assert wire.SimpleReply.parse(built).cookie == cookie


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(flags=u16, type_=u16, cookie=u64, length=u32, offset=u64, hole=u32)
def test_structured_reply_fast_paths_match_construct(
    flags: int, type_: int, cookie: int, length: int, offset: int, hole: int
) -> None:
    header = wire.StructuredReplyHeader.build(dict(flags=flags, type=type_, cookie=cookie, length=length))
    assert header == wire.STRUCTURED_REPLY_FAST.pack(c.STRUCTURED_REPLY_MAGIC, flags, type_, cookie, length)
    data = header + wire.OffsetDataHeader.build(dict(offset=offset))
    assert data == wire.OFFSET_DATA_FAST.pack(c.STRUCTURED_REPLY_MAGIC, flags, type_, cookie, length, offset)
    hole_chunk = header + wire.OffsetHole.build(dict(offset=offset, length=hole))
    assert hole_chunk == wire.OFFSET_HOLE_FAST.pack(
        c.STRUCTURED_REPLY_MAGIC, flags, type_, cookie, length, offset, hole
    )


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(option=u32, length=u32, reply=u32)
def test_option_headers_fast_paths_match_construct(option: int, length: int, reply: int) -> None:
    assert wire.OptionHeader.build(dict(option=option, length=length)) == wire.OPTION_HEADER_FAST.pack(
        c.IHAVEOPT, option, length
    )
    assert wire.OptionReplyHeader.build(
        dict(option=option, reply=reply, length=length)
    ) == wire.OPTION_REPLY_HEADER_FAST.pack(c.OPT_REPLY_MAGIC, option, reply, length)


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(name=st.text(max_size=64), requests=st.lists(u16, max_size=8))
def test_info_request_round_trip(name: str, requests: list[int]) -> None:
    built = wire.InfoRequest.build(dict(name=name, requests=requests))
    parsed = wire.InfoRequest.parse(built)
    assert (parsed.name, list(parsed.requests)) == (name, requests)


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(name=st.text(max_size=64), queries=st.lists(st.text(max_size=32), max_size=4))
def test_meta_context_request_round_trip(name: str, queries: list[str]) -> None:
    built = wire.MetaContextRequest.build(dict(name=name, queries=queries))
    parsed = wire.MetaContextRequest.parse(built)
    assert (parsed.name, list(parsed.queries)) == (name, queries)


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(ctx=u32, descriptors=st.lists(st.tuples(u32, u32), max_size=16))
def test_block_status_payload_round_trip(ctx: int, descriptors: list[tuple[int, int]]) -> None:
    built = wire.BlockStatusPayload.build(
        dict(context_id=ctx, descriptors=[dict(length=n, status_flags=f) for n, f in descriptors])
    )
    fast = wire.BLOCK_STATUS_DESCRIPTOR_FAST
    assert built[4:] == b"".join(fast.pack(n, f) for n, f in descriptors)
    parsed = wire.BlockStatusPayload.parse(built)
    assert [(d.length, d.status_flags) for d in parsed.descriptors] == descriptors


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(error=u32, message=st.text(max_size=100), offset=u64)
def test_error_chunks_round_trip(error: int, message: str, offset: int) -> None:
    parsed = wire.ErrorOffsetChunk.parse(wire.ErrorOffsetChunk.build(dict(error=error, message=message, offset=offset)))
    assert (parsed.error, parsed.message, parsed.offset) == (error, message, offset)
    assert wire.ErrorChunk.parse(wire.ErrorChunk.build(dict(error=error, message=message))).message == message


def test_info_replies_round_trip() -> None:
    export = wire.InfoExport.build(dict(size=1 << 40, transmission_flags=0x1ED))
    assert export == bytes.fromhex("0000") + (1 << 40).to_bytes(8, "big") + bytes.fromhex("01ed")
    block = wire.InfoBlockSize.parse(wire.InfoBlockSize.build(dict(minimum=1, preferred=4096, maximum=1 << 25)))
    assert (block.minimum, block.preferred, block.maximum) == (1, 4096, 1 << 25)


def test_bad_magic_is_refused() -> None:
    with pytest.raises(ConstError):
        wire.Request.parse(b"\x00" * 28)
    with pytest.raises(ConstError):
        wire.OptionHeader.parse(b"\x00" * 16)
