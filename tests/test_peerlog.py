"""Per-connection loggers: the NBD server's and the QMP monitor's connections name their peer once,
in a ``PeerLog``, and every message about the connection carries it."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

from nbd.peerlog import PeerLog
from nbd.server import NbdServer
from server.qmp.dispatch import CommandRegistry
from server.qmp.server import QmpServer


def test_prefix_and_record_field(caplog: pytest.LogCaptureFixture) -> None:
    log = PeerLog(logging.getLogger("t.peerlog"), "NBD client", "10.0.0.1:5")
    with caplog.at_level(logging.INFO, logger="t.peerlog"):
        log.info("export '%s'", "disk0")
    (record,) = caplog.records
    assert record.getMessage() == "NBD client 10.0.0.1:5: export 'disk0'"
    assert record.__dict__["peer"] == "10.0.0.1:5"


async def test_nbd_connection_logs_through_its_peer_log(caplog: pytest.LogCaptureFixture) -> None:
    server = NbdServer()
    host, port = await server.listen_tcp("127.0.0.1", 0)
    try:
        with caplog.at_level(logging.DEBUG, logger="nbd.server"):
            reader, writer = await asyncio.open_connection(host, port)
            await reader.readexactly(18)  # the greeting
            local = writer.get_extra_info("sockname")
            writer.close()
            await writer.wait_closed()
            for _ in range(200):
                if any("gone" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.01)
    finally:
        await server.stop()
    peer = f"{local[0]}:{local[1]}"
    gone = [r for r in caplog.records if r.getMessage() == f"NBD client {peer}: gone"]
    assert gone and gone[0].__dict__["peer"] == peer


async def test_qmp_session_logs_through_its_peer_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    monitor = QmpServer(CommandRegistry(), None)
    monitor.max_pending_output = 1  # the greeting alone is more: the session is dropped at once
    path = await monitor.listen_unix(str(tmp_path / "q.sock"))
    try:
        with caplog.at_level(logging.DEBUG, logger="server.qmp.server"):
            sock = socket.socket(socket.AF_UNIX)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, path)
            for _ in range(200):
                if caplog.records:
                    break
                await asyncio.sleep(0.01)
            sock.close()
    finally:
        await monitor.stop()
    messages = [r.getMessage() for r in caplog.records if "peer" in r.__dict__]
    assert "QMP client unix: does not read its output; disconnecting it" in messages
