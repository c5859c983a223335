"""The server core and the client core paired in memory, no sockets: random request sequences over a
memory device must read back what a plain bytearray model says, in both reply modes (hypothesis)."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from backup.memory import MemoryDevice
from nbd import client_core as cc
from nbd.constants import Cmd, CmdFlag, Opt, State, TransmissionFlag
from nbd.errors import errno_to_nbd
from nbd.server_core import ExportEntry, Negotiated, Request, ServerCore

SIZE = 256 * 1024
FLAGS = int(
    TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_DF
)


def handshake(server: ServerCore, structured: bool) -> tuple[cc.ClientHandshake, list[object]]:
    client = cc.ClientHandshake()
    server_events: list[object] = []

    def exchange(data: bytes) -> list[object]:
        server_events.extend(server.receive(data))
        for chunk in server.data_to_send():
            client.receive_data(chunk)
        events: list[object] = []
        while (event := client.next_event()) is not cc.NEED_DATA:
            events.append(event)
            if isinstance(event, cc.OptionAck | cc.OptionError):
                break
        return events

    for chunk in server.data_to_send():
        client.receive_data(chunk)
    assert isinstance(client.next_event(), cc.Greeting)
    server_events.extend(server.receive(client.send_client_flags()))
    if structured:
        assert exchange(client.send_option(Opt.STRUCTURED_REPLY)) == [cc.OptionAck(Opt.STRUCTURED_REPLY)]
        events = exchange(client.send_meta_context("d", ["base:allocation"], set_=True))
        assert isinstance(events[0], cc.MetaContext) and events[0].name == "base:allocation"
    events = exchange(client.send_go("d"))
    assert events[-1] == cc.OptionAck(Opt.GO)
    export = next(e for e in events if isinstance(e, cc.InfoExport))
    assert export.size == SIZE
    client.enter_transmission()
    return client, server_events


async def serve_request(server: ServerCore, device: MemoryDevice, req: Request) -> list[Any]:
    """What the asyncio adapter does for one request, minus the sockets."""
    try:
        if req.cmd == Cmd.READ:
            extents = await device.block_status(req.offset, req.length) if server.structured else []
            if any(e.flags & State.ZERO for e in extents) and not req.flags & CmdFlag.DF:
                pieces: list[tuple[int, bytes | None]] = []
                pos = req.offset
                for extent in extents:
                    data = None if extent.flags & State.ZERO else await device.pread(pos, extent.length)
                    pieces.append((extent.length, data))
                    pos += extent.length
                return server.reply_read_sparse(req.cookie, req.offset, pieces)
            return list(server.reply_read(req.cookie, req.offset, await device.pread(req.offset, req.length)))
        if req.cmd == Cmd.WRITE:
            assert req.payload is not None
            await device.pwrite(req.offset, req.payload, fua=bool(req.flags & CmdFlag.FUA))
        elif req.cmd == Cmd.WRITE_ZEROES:
            await device.zero(req.offset, req.length, may_trim=not req.flags & CmdFlag.NO_HOLE)
        elif req.cmd == Cmd.TRIM:
            await device.trim(req.offset, req.length)
        elif req.cmd == Cmd.FLUSH:
            await device.flush()
        elif req.cmd == Cmd.BLOCK_STATUS:
            extents = await device.block_status(req.offset, req.length)
            return [server.reply_block_status(req.cookie, [(e.length, e.flags) for e in extents])]
        return [server.reply_ok(req.cookie)]
    except OSError as exc:
        return [server.reply_error(req.cmd, req.cookie, errno_to_nbd(exc.errno, req.flags))]


operations = st.lists(
    st.tuples(
        st.sampled_from(["read", "write", "zero", "trim", "flush", "status", "bad-read"]),
        st.integers(min_value=0, max_value=SIZE // 512 - 1),
        st.integers(min_value=1, max_value=160),
        st.integers(min_value=0, max_value=255),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(ops=operations, structured=st.booleans(), batch=st.integers(min_value=1, max_value=6))
def test_paired_cores_agree_with_a_model(ops: list[tuple[str, int, int, int]], structured: bool, batch: int) -> None:
    asyncio.run(_run(ops, structured, batch))


async def _run(ops: list[tuple[str, int, int, int]], structured: bool, batch: int) -> None:
    device = MemoryDevice(SIZE)
    model = bytearray(SIZE)
    server = ServerCore(
        lambda name: ExportEntry("d", SIZE, FLAGS) if name == "d" else None,
        lambda: [ExportEntry("d", SIZE, FLAGS)],
    )
    _, events = handshake(server, structured)
    assert isinstance(events[-1], Negotiated)
    tx = cc.ClientTransmission(structured=structured, meta_context_id=server.meta_context or None)
    # Requests go out in batches (pipelined); the server answers each batch in reverse order.
    for start in range(0, len(ops), batch):
        wire_out = b""
        expected: dict[int, tuple[str, int, int, bytes]] = {}
        for kind, sector, count, fill in ops[start : start + batch]:
            offset = sector * 512
            length = min(count * 512, SIZE - offset)
            if kind in ("read", "bad-read"):
                if kind == "bad-read":
                    offset, length = SIZE - 512, 1024  # past the end: EINVAL, model untouched
                req, header = tx.request(Cmd.READ, offset, length)
                wire_out += header
                expected[req.cookie] = (kind, offset, length, bytes(model[offset : offset + length]))
            elif kind == "write":
                data = bytes([fill]) * length
                req, header = tx.request(Cmd.WRITE, offset, length, CmdFlag.FUA if fill & 1 else 0)
                wire_out += header + data
                model[offset : offset + length] = data
                expected[req.cookie] = (kind, offset, length, b"")
            elif kind == "zero":
                flags = CmdFlag.NO_HOLE if fill & 1 else 0
                req, header = tx.request(Cmd.WRITE_ZEROES, offset, length, flags)
                wire_out += header
                model[offset : offset + length] = bytes(length)
                expected[req.cookie] = (kind, offset, length, b"")
            elif kind == "trim":
                req, header = tx.request(Cmd.TRIM, offset, length)
                wire_out += header
                model[offset : offset + length] = bytes(length)  # MemoryDevice trims to zeroes
                expected[req.cookie] = (kind, offset, length, b"")
            elif kind == "status" and structured:
                req, header = tx.request(Cmd.BLOCK_STATUS, offset, length)
                wire_out += header
                expected[req.cookie] = (kind, offset, length, b"")
            else:
                req, header = tx.request(Cmd.FLUSH, 0, 0)
                wire_out += header
                expected[req.cookie] = ("flush", 0, 0, b"")
        # The server may see the stream in any cut; a 7-byte cut is a hard one.
        requests: list[Request] = []
        for i in range(0, len(wire_out), 7):
            for event in server.receive(wire_out[i : i + 7]):
                assert isinstance(event, Request), event
                requests.append(event)
        replies: list[list[Any]] = []
        for server_request in requests:
            replies.append(await serve_request(server, device, server_request))
        for chunk in server.data_to_send():  # the core's own refusals
            tx.feed(chunk)
        for reply in reversed(replies):  # out of order, as a concurrent server may answer
            for part in reply:
                tx.feed(part)
        done = {r.cookie: r for r in tx.pop_completed()}
        assert set(done) == set(expected)
        for cookie, (kind, _offset, length, want) in expected.items():
            got = done[cookie]
            if kind == "bad-read":
                assert got.error == 22
            elif kind == "read":
                assert got.error == 0 and bytes(got.buffer or b"") == want
            elif kind == "status":
                assert got.error == 0 and sum(length for length, _ in got.extents) >= 1
            else:
                assert got.error == 0, (kind, got)
    assert device.data == bytes(model)
