"""Meta contexts beyond base:allocation in the protocol core: LIST/SET_META_CONTEXT with several
contexts and QEMU's prefix queries, context ids, and one BLOCK_STATUS chunk per selected context."""

from __future__ import annotations

import struct

from test_server_core import RW_FLAGS, SIZE, chunk, info_data, meta_data, option, out, parse_option_replies

from nbd import constants as c
from nbd import meta
from nbd.constants import Cmd, CmdFlag, Errno, Opt, Rep, ReplyType
from nbd.server_core import ExportEntry, Negotiated, Request, ServerCore

BITMAPS = ("qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1")
EXPORTS = {
    "plain": ExportEntry("plain", SIZE, RW_FLAGS),
    "pull": ExportEntry("pull", SIZE, RW_FLAGS, contexts=(meta.ALLOCATION_DEPTH, *BITMAPS)),
    "bitmaps": ExportEntry("bitmaps", SIZE, RW_FLAGS, contexts=BITMAPS),
}
ALL = ["base:allocation", meta.ALLOCATION_DEPTH, *BITMAPS]


def core() -> ServerCore:
    server = ServerCore(EXPORTS.get, lambda: EXPORTS.values())
    out(server)
    server.receive(struct.pack(">I", 3) + option(Opt.STRUCTURED_REPLY))
    assert parse_option_replies(out(server)) == [(Opt.STRUCTURED_REPLY, Rep.ACK, b"")]
    return server


def contexts(server: ServerCore, opt: int, export: str, queries: list[str]) -> list[tuple[int, str]] | int:
    """(id, name) of every context the server answers, or the error reply type."""
    server.receive(option(opt, meta_data(export, queries)))
    replies = parse_option_replies(out(server))
    if replies[-1][1] != Rep.ACK:
        return replies[-1][1]
    assert all(reply == Rep.META_CONTEXT for _, reply, _ in replies[:-1])
    return [(struct.unpack(">I", data[:4])[0], data[4:].decode()) for _, _, data in replies[:-1]]


def names(answer: list[tuple[int, str]] | int) -> list[str]:
    assert not isinstance(answer, int), answer
    return [name for _, name in answer]


def test_list_without_queries_lists_every_context_in_qemus_order() -> None:
    server = core()
    assert contexts(server, Opt.LIST_META_CONTEXT, "pull", []) == [(0, name) for name in ALL]
    assert names(contexts(server, Opt.LIST_META_CONTEXT, "plain", [])) == ["base:allocation"]


def test_list_prefix_queries_expand_as_qemu_does() -> None:
    server = core()
    assert names(contexts(server, Opt.LIST_META_CONTEXT, "pull", ["qemu:"])) == ALL[1:]
    assert names(contexts(server, Opt.LIST_META_CONTEXT, "pull", ["qemu:dirty-bitmap:"])) == list(BITMAPS)
    assert names(contexts(server, Opt.LIST_META_CONTEXT, "pull", ["base:"])) == ["base:allocation"]
    # the answer follows the server's order and names each context once, whatever the queries
    queries = ["qemu:dirty-bitmap:b1", "base:allocation", "qemu:", "qemu:dirty-bitmap:b1"]
    assert names(contexts(server, Opt.LIST_META_CONTEXT, "pull", queries)) == ALL
    # partial names, unknown bitmaps, other namespaces and depth on an export without it: nothing
    for query in ["qemu:dirty-bitmap:b", "qemu:dirty-", "qemu:allocation", "qemu:dirty-bitmap:nope", "x-nbd:"]:
        assert names(contexts(server, Opt.LIST_META_CONTEXT, "pull", [query])) == [], query
    assert names(contexts(server, Opt.LIST_META_CONTEXT, "bitmaps", [meta.ALLOCATION_DEPTH])) == []


def test_set_selects_several_contexts_with_distinct_ids_and_no_prefix_expansion() -> None:
    server = core()
    assert contexts(server, Opt.SET_META_CONTEXT, "pull", ["qemu:", "qemu:dirty-bitmap:", "base:"]) == []
    answer = contexts(server, Opt.SET_META_CONTEXT, "pull", ["qemu:dirty-bitmap:b1", "base:allocation"])
    assert isinstance(answer, list)
    assert names(answer) == ["base:allocation", "qemu:dirty-bitmap:b1"]
    ids = [context_id for context_id, _ in answer]
    assert len(set(ids)) == 2 and 0 not in ids
    events = server.receive(option(Opt.GO, info_data("pull")))
    assert isinstance(events[-1], Negotiated) and events[-1].meta_contexts == tuple(answer)
    assert server.meta_context == ids[0]  # base:allocation


def test_set_without_base_allocation_still_allows_block_status() -> None:
    server = core()
    answer = contexts(server, Opt.SET_META_CONTEXT, "pull", [meta.ALLOCATION_DEPTH])
    assert names(answer) == [meta.ALLOCATION_DEPTH]
    events = server.receive(option(Opt.GO, info_data("pull")))
    assert isinstance(events[-1], Negotiated) and events[-1].meta_context == 0
    out(server)
    assert server.meta_contexts == tuple(answer)  # type: ignore[arg-type]
    events = server.receive(_request(Cmd.BLOCK_STATUS, length=4096))
    assert [repr(e) for e in events] == [repr(Request(Cmd.BLOCK_STATUS, 0, 7, 0, 4096))]


def test_set_for_another_export_or_a_failed_set_selects_nothing() -> None:
    server = core()
    assert names(contexts(server, Opt.SET_META_CONTEXT, "pull", list(BITMAPS))) == list(BITMAPS)
    assert contexts(server, Opt.SET_META_CONTEXT, "nope", list(BITMAPS)) == Rep.ERR_UNKNOWN
    server.receive(option(Opt.GO, info_data("pull")))
    out(server)
    assert server.meta_contexts == ()
    server.receive(_request(Cmd.BLOCK_STATUS, length=4096))
    assert chunk(out(server))[1] == ReplyType.ERROR


def test_bad_queries_are_refused() -> None:
    server = core()
    assert contexts(server, Opt.LIST_META_CONTEXT, "pull", ["nonamespace"]) == Rep.ERR_INVALID
    truncated = meta_data("pull", ["qemu:"])[:-2]
    server.receive(option(Opt.SET_META_CONTEXT, truncated))
    assert parse_option_replies(out(server))[-1][1] == Rep.ERR_INVALID


def _request(cmd: int, *, flags: int = 0, offset: int = 0, length: int = 0) -> bytes:
    return struct.pack(">IHHQQI", c.REQUEST_MAGIC, flags, cmd, 7, offset, length)


def test_block_status_chunks_one_per_context_last_done() -> None:
    server = core()
    contexts(server, Opt.SET_META_CONTEXT, "pull", ALL)
    server.receive(option(Opt.GO, info_data("pull")))
    out(server)
    ids = [context_id for context_id, _ in server.meta_contexts]
    assert len(ids) == 4
    events = server.receive(_request(Cmd.BLOCK_STATUS, flags=CmdFlag.REQ_ONE, length=8192))
    assert [repr(e) for e in events] == [repr(Request(Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 7, 0, 8192))]
    chunks = [(ids[0], [(4096, 0), (4096, 3)]), (ids[1], [(8192, 2)]), (ids[2], [(8192, 1)]), (ids[3], [(8192, 0)])]
    data = server.reply_block_status_contexts(7, chunks)
    pos, seen = 0, []
    while pos < len(data):
        flags, rtype, cookie, body = chunk(data[pos:])
        pos += 20 + len(body)
        assert (rtype, cookie) == (ReplyType.BLOCK_STATUS, 7)
        (context_id,) = struct.unpack(">I", body[:4])
        descriptors = [struct.unpack(">II", body[i : i + 8]) for i in range(4, len(body), 8)]
        seen.append((flags, context_id, descriptors))
    assert [flags for flags, _, _ in seen] == [0, 0, 0, 1]
    assert [(i, d) for _, i, d in seen] == chunks


def test_block_status_without_any_context_is_einval() -> None:
    server = core()
    server.receive(option(Opt.GO, info_data("pull")))
    out(server)
    server.receive(_request(Cmd.BLOCK_STATUS, length=4096))
    _, rtype, _, body = chunk(out(server))
    assert rtype == ReplyType.ERROR and struct.unpack(">I", body[:4])[0] == Errno.EINVAL


def test_descriptor_helpers_merge_clip_and_honour_req_one() -> None:
    assert meta.clip([(10, 1), (5, 1), (5, 0), (100, 2)], 30, False) == [(15, 1), (5, 0), (10, 2)]
    assert meta.clip([(10, 1), (5, 1), (5, 0)], 30, True) == [(15, 1)]

    class Fake:
        name = "b0"

        def dirty_runs(self, offset: int, length: int) -> list[tuple[int, bool]]:
            return [(4096, False), (length - 4096, True)]

    assert meta.dirty_descriptors(Fake(), 0, 65536, False) == [(4096, 0), (61440, meta.DIRTY)]
    assert meta.context_names([Fake()], True) == (meta.ALLOCATION_DEPTH, "qemu:dirty-bitmap:b0")


def test_a_context_published_twice_is_listed_twice_and_set_once() -> None:
    twice = {"twice": ExportEntry("twice", SIZE, RW_FLAGS, contexts=("qemu:dirty-bitmap:b", "qemu:dirty-bitmap:b"))}
    server = ServerCore(twice.get, lambda: twice.values())
    out(server)
    server.receive(struct.pack(">I", 3) + option(Opt.STRUCTURED_REPLY))
    out(server)
    assert names(contexts(server, Opt.LIST_META_CONTEXT, "twice", ["qemu:"])) == ["qemu:dirty-bitmap:b"] * 2
    assert contexts(server, Opt.SET_META_CONTEXT, "twice", ["qemu:dirty-bitmap:b"]) == [(2, "qemu:dirty-bitmap:b")]
