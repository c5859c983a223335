"""STARTTLS in the sans-I/O server core: the three modes' option replies byte for byte, the phase while
the adapter runs the TLS handshake, and a fresh negotiation over TLS (nothing from clear text kept)."""

from __future__ import annotations

import struct

import pytest

from nbd import constants as c
from nbd.constants import Opt, Rep
from nbd.server_core import Closed, ExportEntry, Negotiated, Phase, ServerCore, StartTls
from tests.test_server_core import EXPORTS, RW_FLAGS, SIZE, info_data, meta_data, option, out, parse_option_replies

FLAGS = struct.pack(">I", c.ClientFlag.C_FIXED_NEWSTYLE | c.ClientFlag.C_NO_ZEROES)


def started(tls: str, exports: dict[str, ExportEntry] = EXPORTS) -> ServerCore:
    core = ServerCore(exports.get, lambda: exports.values(), tls=tls)
    out(core)
    assert core.receive(FLAGS) == []
    return core


def test_require_refuses_everything_before_tls() -> None:
    core = started("require")
    stream = b"".join(
        option(o, d)
        for o, d in [
            (Opt.STRUCTURED_REPLY, b""),
            (Opt.LIST, b""),
            (Opt.INFO, info_data("disk")),
            (Opt.GO, info_data("disk")),
            (Opt.SET_META_CONTEXT, meta_data("disk", ["base:allocation"])),
            (Opt.EXTENDED_HEADERS, b""),
            (77, b"x" * 10),
        ]
    )
    assert core.receive(stream) == []
    replies = parse_option_replies(out(core))
    assert [(o, r) for o, r, _ in replies] == [
        (o, Rep.ERR_TLS_REQD) for o in (Opt.STRUCTURED_REPLY, Opt.LIST, Opt.INFO, Opt.GO, Opt.SET_META_CONTEXT, 11, 77)
    ]
    assert replies[0][2] == b"Option 0x8 not permitted before TLS"
    assert not core.structured
    events = core.receive(option(Opt.EXPORT_NAME, b"disk"))
    assert isinstance(events[-1], Closed) and events[-1].error and core.phase is Phase.CLOSED
    assert out(core) == b""


def test_require_starttls_then_negotiation_over_tls() -> None:
    core = started("require")
    core.receive(option(Opt.STRUCTURED_REPLY))
    out(core)
    events = core.receive(option(Opt.STARTTLS))
    assert events == [StartTls()] and core.phase is Phase.TLS_HANDSHAKE
    assert parse_option_replies(out(core)) == [(Opt.STARTTLS, Rep.ACK, b"")]
    core.tls_started()
    assert core.tls_active and core.phase is Phase.OPTION_HEADER
    assert core.receive(option(Opt.STARTTLS)) == []
    assert parse_option_replies(out(core))[0][:2] == (Opt.STARTTLS, Rep.ERR_INVALID)
    events = core.receive(option(Opt.GO, info_data("disk")))
    assert isinstance(events[-1], Negotiated) and not events[-1].structured  # clear-text options are forgotten


@pytest.mark.parametrize("tls", ["on", "require"])
def test_bytes_pipelined_after_starttls_close(tls: str) -> None:
    core = started(tls)
    events = core.receive(option(Opt.STARTTLS) + b"\x16\x03\x01")
    assert [type(e) for e in events] == [Closed]  # no handshake is started on a stream out of step
    assert parse_option_replies(out(core)) == [(Opt.STARTTLS, Rep.ACK, b"")]


def test_starttls_with_data_is_invalid() -> None:
    core = started("on")
    assert core.receive(option(Opt.STARTTLS, b"x")) == []
    assert parse_option_replies(out(core))[0][:2] == (Opt.STARTTLS, Rep.ERR_INVALID)
    assert core.phase is Phase.OPTION_HEADER


def test_off_refuses_starttls_and_never_sends_tls_reqd() -> None:
    exports = {**EXPORTS, "secret": ExportEntry("secret", SIZE, RW_FLAGS, tls_only=True)}
    core = started("off", exports)
    core.receive(option(Opt.STARTTLS) + option(Opt.INFO, info_data("disk")))
    replies = parse_option_replies(out(core))
    assert replies[0] == (Opt.STARTTLS, Rep.ERR_POLICY, b"TLS is not configured on this server")
    assert replies[-1][:2] == (Opt.INFO, Rep.ACK)


def test_selective_tls_only_exports() -> None:
    exports = {**EXPORTS, "secret": ExportEntry("secret", SIZE, RW_FLAGS, tls_only=True)}
    core = started("on", exports)
    core.receive(option(Opt.LIST) + option(Opt.INFO, info_data("secret")) + option(Opt.GO, info_data("secret")))
    replies = parse_option_replies(out(core))
    assert b"secret" not in b"".join(p for _, r, p in replies if r == Rep.SERVER)
    assert [r for _, r, _ in replies[-2:]] == [Rep.ERR_TLS_REQD, Rep.ERR_TLS_REQD]
    events = core.receive(option(Opt.EXPORT_NAME, b"secret"))
    assert isinstance(events[-1], Closed)

    core = started("on", exports)
    core.receive(option(Opt.STARTTLS))
    out(core)
    core.tls_started()
    core.receive(option(Opt.LIST))
    assert b"secret" in out(core)
    events = core.receive(option(Opt.GO, info_data("secret")))
    assert isinstance(events[-1], Negotiated) and events[-1].export.name == "secret"
