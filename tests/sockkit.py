"""Pieces shared by the tests that talk NBD or QMP over a socket: running a coroutine on a named event
loop, a device served on a unix socket, the export-name handshake of a minimal fake server, closing a
raw stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from nbd import constants as c
from nbd import wire
from nbd.device import BlockDevice
from nbd.server import Export, NbdServer


def run_on(loop_name: str, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
    """Run ``coro`` on a fresh ``asyncio`` or ``uvloop`` loop (skipped without uvloop), bounded by ``timeout``."""
    factory = None
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro if timeout is None else asyncio.wait_for(coro, timeout))


@asynccontextmanager
async def serve_unix(tmp_path: Path, device: BlockDevice, release: asyncio.Event | None = None) -> AsyncIterator[str]:
    """The URI of ``device`` (export "d") served on a unix socket; on the way out ``release`` is set
    (so a stalled request ends) and the server stopped."""
    server = NbdServer()
    server.add_export(Export("d", device))
    path = tmp_path / "s.sock"
    await server.listen_unix(path)
    try:
        yield f"nbd+unix:///d?socket={path}"
    finally:
        if release is not None:
            release.set()
        await server.stop()


async def export_name_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> None:
    """The handshake of an old server: every option but NBD_OPT_EXPORT_NAME is unsupported, and the
    export (``size`` bytes) offers flush only."""
    writer.write(wire.ServerGreeting.build({"handshake_flags": c.HandshakeFlag.FIXED_NEWSTYLE}))
    await reader.readexactly(4)
    while True:
        _, option, length = wire.OPTION_HEADER_FAST.unpack(await reader.readexactly(16))
        await reader.readexactly(length)
        if option == c.Opt.EXPORT_NAME:
            flags = c.TransmissionFlag.HAS_FLAGS | c.TransmissionFlag.SEND_FLUSH
            writer.write(size.to_bytes(8, "big") + int(flags).to_bytes(2, "big") + bytes(124))
            return
        writer.write(wire.OPTION_REPLY_HEADER_FAST.pack(c.OPT_REPLY_MAGIC, option, c.Rep.ERR_UNSUP, 0))


async def close_stream(writer: asyncio.StreamWriter) -> None:
    """Close a raw client stream; the peer may have dropped it first."""
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass
