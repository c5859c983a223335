"""The client's handshake: which options to send and what to make of the answers.

The protocol itself (what is legal, what the replies mean) is the sans-I/O ``nbd.client_core``; this
module is the policy over it — structured replies, ``base:allocation``, then ``NBD_OPT_GO`` falling
back to ``NBD_OPT_EXPORT_NAME`` — run over a :class:`~nbd.client_transport.ClientConnection` until the
connection enters transmission.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from nbd import constants as c
from nbd.client_core import (
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
    ServerEntry,
    describe_rep_error,
)
from nbd.client_transport import ClientConnection, open_socket
from nbd.errors import HandshakeError, NbdError, ProtocolError
from nbd.tls import TlsConfigError, client_context
from nbd.uri import NbdUri

_MAX_OPTION_REPLIES = 100_000  # e.g. exports in one NBD_OPT_LIST: a bound against endless replies


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
    map_context: str | None = None  # the second context selected by name, when one was asked for
    structured: bool = False
    handshake_flags: int = 0
    used_go: bool = True

    def has(self, flag: c.TransmissionFlag) -> bool:
        return bool(self.flags & flag)


@dataclass(frozen=True)
class ListedExport:
    """One export from ``NBD_OPT_LIST`` (the server's own export table entry is ``server_core.ExportEntry``)."""

    name: str
    description: str = ""


async def _option(conn: ClientConnection, data: bytes) -> list[HandshakeEvent]:
    """Send one option and gather its replies up to the final ack or error."""
    conn.write(data)
    events: list[HandshakeEvent] = []
    while True:
        event = await conn.next_event()
        events.append(event)
        if isinstance(event, OptionAck | OptionError):
            return events
        if len(events) > _MAX_OPTION_REPLIES:
            raise ProtocolError(f"{conn.label}: more than {_MAX_OPTION_REPLIES} replies to one option")


async def _greet(conn: ClientConnection) -> None:
    event = await conn.next_event()
    if not isinstance(event, Greeting):
        raise ProtocolError(f"expected the server greeting, got {event!r}")
    conn.write(conn.hs.send_client_flags())


async def starttls(conn: ClientConnection, uri: NbdUri) -> None:
    """STARTTLS as the first option, then the TLS handshake on the same socket. A server that does not
    acknowledge it is an error (an ``nbds`` URI never falls back to clear text), and so is a
    certificate that the CA did not sign or that does not carry the host name."""
    tls = uri.tls
    assert tls is not None
    try:
        context = client_context(tls.certificates, verify_peer=tls.verify_peer)
    except TlsConfigError as exc:
        raise HandshakeError(f"{conn.label}: {exc}") from None
    events = await _option(conn, conn.hs.send_option(c.Opt.STARTTLS))
    if isinstance(events[-1], OptionError):
        raise _option_error(conn, "TLS (NBD_OPT_STARTTLS)", events[-1])
    if conn.hs.trailing_data:
        raise ProtocolError(f"{conn.label}: the server sent data after acknowledging STARTTLS")
    hostname = tls.hostname or uri.host
    if hostname is None:
        context.check_hostname = False  # a unix socket without tls-hostname: the CA's signature only
    assert conn.transport is not None
    try:
        transport = await asyncio.get_running_loop().start_tls(conn.transport, conn, context, server_hostname=hostname)
    except (OSError, EOFError) as exc:
        raise HandshakeError(f"{conn.label}: TLS handshake failed: {exc or type(exc).__name__}") from None
    if transport is None:
        raise HandshakeError(f"{conn.label}: connection closed during the TLS handshake")
    conn.transport = transport


def _option_error(conn: ClientConnection, what: str, event: OptionError, export: str | None = None) -> HandshakeError:
    meaning = describe_rep_error(event.reply)
    target = f" for export {export!r}" if export is not None else ""
    detail = f" ({event.message})" if event.message else ""
    return HandshakeError(f"{conn.label}: {what}{target} refused: {meaning}{detail}", event.reply)


async def negotiate(
    conn: ClientConnection,
    export: str,
    *,
    list_contexts: bool,
    map_context: str | None = None,
    uri_tls: NbdUri | None = None,
) -> ExportInfo:
    """Structured replies, base:allocation (and ``map_context``, a second meta context by name, such as
    ``qemu:dirty-bitmap:NAME``: refused with ``HandshakeError`` when the export does not offer it), then
    GO (falling back to EXPORT_NAME). ``uri_tls``: an ``nbds`` URI, whose TLS starts first."""
    await _greet(conn)
    if uri_tls is not None:
        await starttls(conn, uri_tls)
    hs = conn.hs
    structured = False
    events = await _option(conn, hs.send_option(c.Opt.STRUCTURED_REPLY))
    if isinstance(events[-1], OptionAck):
        structured = True
    contexts: list[str] = []
    if structured and list_contexts:
        events = await _option(conn, hs.send_meta_context(export, [], set_=False))
        contexts = [e.name for e in events if isinstance(e, MetaContext)]
    context_id: int | None = None
    map_context_id: int | None = None
    if map_context is not None and not structured:
        raise HandshakeError(f"{conn.label}: meta context {map_context!r} needs structured replies, refused")
    if structured:
        wanted = [c.META_BASE_ALLOCATION]
        if map_context is not None and map_context != c.META_BASE_ALLOCATION:
            wanted.append(map_context)
        events = await _option(conn, hs.send_meta_context(export, wanted, set_=True))
        for event in events:
            if isinstance(event, MetaContext) and event.name == c.META_BASE_ALLOCATION:
                context_id = event.context_id
            elif isinstance(event, MetaContext) and event.name == map_context:
                map_context_id = event.context_id
        if isinstance(events[-1], OptionError) and events[-1].reply == c.Rep.ERR_UNKNOWN:
            raise _option_error(conn, "NBD_OPT_SET_META_CONTEXT", events[-1], export)
        if map_context == c.META_BASE_ALLOCATION:
            map_context_id = context_id
        if map_context is not None and map_context_id is None:
            raise HandshakeError(f"{conn.label}: export {export!r} does not offer meta context {map_context!r}")
    if not contexts and context_id is not None:
        contexts = [c.META_BASE_ALLOCATION]

    requests = (c.Info.BLOCK_SIZE, c.Info.DESCRIPTION)
    events = await _option(conn, hs.send_go(export, requests))
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
    conn.start_transmission(
        ClientTransmission(
            structured=structured,
            meta_context_id=context_id,
            map_context_id=map_context_id if map_context_id != context_id else None,
        )
    )
    return ExportInfo(
        name=export,
        size=size,
        flags=flags,
        description=description,
        block_minimum=block.minimum if block else None,
        block_preferred=block.preferred if block else None,
        block_maximum=block.maximum if block else None,
        contexts=tuple(contexts),
        map_context=map_context,
        structured=structured,
        handshake_flags=hs.handshake_flags,
        used_go=used_go,
    )


async def open_session(
    uri: NbdUri, timeout: float, *, list_contexts: bool, map_context: str | None = None
) -> tuple[ClientConnection, ExportInfo]:
    """Connect and negotiate within ``timeout``; on any failure the socket is dropped, never left open."""
    conn: ClientConnection | None = None

    async def attempt() -> tuple[ClientConnection, ExportInfo]:
        nonlocal conn
        conn = await open_socket(uri, str(uri))
        return conn, await negotiate(
            conn,
            uri.export,
            list_contexts=list_contexts,
            map_context=map_context,
            uri_tls=uri if uri.tls is not None else None,
        )

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


async def list_exports(target: NbdUri, timeout: float) -> list[ListedExport]:
    """``NBD_OPT_LIST`` (the export in ``target`` is ignored)."""

    async def run() -> list[ListedExport]:
        conn = await open_socket(target, str(target))
        try:
            await _greet(conn)
            if target.tls is not None:
                await starttls(conn, target)
            events = await _option(conn, conn.hs.send_option(c.Opt.LIST))
            if isinstance(events[-1], OptionError):
                raise _option_error(conn, "NBD_OPT_LIST", events[-1])
            conn.write(conn.hs.send_abort())
            return [ListedExport(e.name, e.description) for e in events if isinstance(e, ServerEntry)]
        finally:
            if conn.transport is not None:
                conn.transport.close()

    try:
        return await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        raise TimeoutError(f"{target}: no export list within {timeout:g} s") from None


__all__ = ["ExportInfo", "ListedExport", "list_exports", "negotiate", "open_session"]
