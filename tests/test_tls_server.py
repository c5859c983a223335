"""STARTTLS in our server, per the spec's three modes, with our client over ``nbds://`` and with raw
streams that check the exact option replies. Certificates are made at test time (``tests.tlskit``)."""

from __future__ import annotations

import asyncio
import os
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backup.memory import MemoryDevice
from nbd import constants as c
from nbd.client import NbdClient
from nbd.errors import DisconnectedError, HandshakeError
from nbd.server import Export, NbdServer, ServerLimits
from nbd.tls import AuthzList, ServerTls, client_context, fixed_server_tls, server_context
from tests.sockkit import close_stream, run_on
from tests.tlskit import CLIENT_DN, Pki, make_pki

SIZE = 1 << 20
Opt, Rep = c.Opt, c.Rep
_REPLY = struct.Struct(">QIII")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _serve(tls: ServerTls | None, *, tls_only: bool = False) -> tuple[NbdServer, MemoryDevice, int]:
    server = NbdServer(tls=tls, limits=ServerLimits(handshake_timeout=5.0))
    device = MemoryDevice(SIZE)
    server.add_export(Export("d", device))
    server.add_export(Export("secret", MemoryDevice(SIZE), tls_only=tls_only))
    _, port = await server.listen_tcp("127.0.0.1", 0)
    return server, device, port


@pytest.fixture
async def required(pki: Pki) -> AsyncIterator[tuple[NbdServer, MemoryDevice, int]]:
    server, device, port = await _serve(fixed_server_tls("require", pki.server, authz=[CLIENT_DN]))
    try:
        yield server, device, port
    finally:
        await server.stop()


def nbds(port: int, pki_dir: Path, export: str = "d", extra: str = "") -> str:
    return f"nbds://localhost:{port}/{export}?tls-certificates={pki_dir}{extra}"


async def _round_trip(uri: str, device: MemoryDevice) -> None:
    data = bytes(range(256)) * 256
    async with await NbdClient.connect(uri, connections=2) as client:
        await client.pwrite(4096, data)
        assert await client.pread(4096, len(data)) == data
        await client.flush()
    assert device.data[4096 : 4096 + len(data)] == data


class Raw:
    """A client that speaks the handshake byte by byte (to see the exact option replies)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        greeting = await reader.readexactly(18)
        assert greeting[:16] == struct.pack(">QQ", c.NBDMAGIC, c.IHAVEOPT)
        writer.write(struct.pack(">I", c.ClientFlag.C_FIXED_NEWSTYLE | c.ClientFlag.C_NO_ZEROES))
        return cls(reader, writer)

    async def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send one option; its replies (type, payload) up to the final one."""
        self.writer.write(struct.pack(">QII", c.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, rep, length = _REPLY.unpack(await self.reader.readexactly(20))
            assert (magic, opt) == (c.OPT_REPLY_MAGIC, option)
            replies.append((rep, await self.reader.readexactly(length)))
            if rep == Rep.ACK or rep & 0x80000000:
                return replies

    async def starttls(self, context: ssl.SSLContext) -> None:
        assert await self.option(Opt.STARTTLS) == [(Rep.ACK, b"")]
        await self.writer.start_tls(context, server_hostname="localhost")

    async def closed(self) -> bytes:
        """Whatever the server still sent before it closed (raises TimeoutError if it does not)."""
        try:
            return await asyncio.wait_for(self.reader.read(), 20)
        except ConnectionError:
            return b""

    async def close(self) -> None:
        await close_stream(self.writer)


def _name(export: str) -> bytes:
    return struct.pack(">I", len(export)) + export.encode() + struct.pack(">H", 0)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_nbds_round_trip_with_authz(pki: Pki, loop_name: str) -> None:
    async def main() -> None:
        server, device, port = await _serve(fixed_server_tls("require", pki.server, authz=["C=GB,O=*,CN=client"]))
        try:
            await _round_trip(nbds(port, pki.client), device)
            names = [e.name for e in await NbdClient.list_exports(nbds(port, pki.client, ""))]
            assert names == ["d", "secret"]
            # TLS connections never take the sendfile path (bytes must go through the TLS layer).
            async with await NbdClient.connect(nbds(port, pki.client)):
                conns = list(server._connections)
                assert conns and all(conn._sock_fd == -1 and conn._tls() for conn in conns)
        finally:
            await server.stop()

    run_on(loop_name, main(), timeout=60)


async def test_nbds_unix_with_tls_hostname(pki: Pki, tmp_path: Path) -> None:
    server = NbdServer(tls=fixed_server_tls("require", pki.server))
    device = MemoryDevice(SIZE)
    server.add_export(Export("d", device))
    await server.listen_unix(tmp_path / "s.sock")
    try:
        base = f"nbds+unix:///d?socket={tmp_path}/s.sock&tls-certificates={pki.client}"
        await _round_trip(base + "&tls-hostname=localhost", device)
        with pytest.raises(HandshakeError, match=r"TLS handshake failed.*(?i:hostname)"):
            await NbdClient.connect(base + "&tls-hostname=other.example", connect_timeout=10)
        await _round_trip(base, device)  # no name to check on a unix socket: the CA's signature only
    finally:
        await server.stop()


async def test_require_refuses_every_option_but_starttls(
    required: tuple[NbdServer, MemoryDevice, int], pki: Pki
) -> None:
    _, device, port = required
    raw = await Raw.open(port)
    for option, data in [
        (Opt.STRUCTURED_REPLY, b""),
        (Opt.LIST, b""),
        (Opt.INFO, _name("d")),
        (Opt.GO, _name("d")),
        (Opt.SET_META_CONTEXT, b"x"),
        (99, b"unknown option"),
        (Opt.LIST_META_CONTEXT, bytes(100_000)),  # over the option data limit: discarded, same reply
    ]:
        assert await raw.option(option, data) == [
            (Rep.ERR_TLS_REQD, f"Option {option:#x} not permitted before TLS".encode())
        ]
    raw.writer.write(struct.pack(">QII", c.IHAVEOPT, Opt.EXPORT_NAME, 1) + b"d")
    assert await raw.closed() == b""  # NBD_OPT_EXPORT_NAME cannot be refused: the server closes
    await raw.close()
    raw = await Raw.open(port)
    assert await raw.option(Opt.ABORT) == [(Rep.ACK, b"")]
    await raw.close()
    # Over TLS the same options work, and STARTTLS a second time is invalid.
    raw = await Raw.open(port)
    await raw.starttls(client_context(pki.client))
    assert await raw.option(Opt.STRUCTURED_REPLY) == [(Rep.ACK, b"")]
    assert (await raw.option(Opt.STARTTLS))[-1][0] == Rep.ERR_INVALID
    assert (await raw.option(Opt.INFO, _name("d")))[-1] == (Rep.ACK, b"")
    await raw.close()
    await _round_trip(nbds(port, pki.client), device)


async def test_selective_tls_only_exports(pki: Pki) -> None:
    server, device, port = await _serve(fixed_server_tls("on", pki.server, verify_peer=False), tls_only=True)
    try:
        raw = await Raw.open(port)
        replies = await raw.option(Opt.LIST)
        assert [p[4:] for r, p in replies if r == Rep.SERVER] == [b"d"]  # the TLS-only export is not listed
        assert (await raw.option(Opt.GO, _name("secret")))[-1] == (Rep.ERR_TLS_REQD, b"export 'secret' requires TLS")
        assert (await raw.option(Opt.INFO, _name("secret")))[-1][0] == Rep.ERR_TLS_REQD
        assert (await raw.option(Opt.INFO, _name("d")))[-1] == (Rep.ACK, b"")
        await raw.starttls(client_context(pki.client))
        assert (await raw.option(Opt.INFO, _name("secret")))[-1] == (Rep.ACK, b"")
        await raw.close()
        # The plain export serves clear-text clients, and TLS ones; the TLS-only one TLS clients only.
        await _round_trip(f"nbd://127.0.0.1:{port}/d", device)
        await _round_trip(nbds(port, pki.client), device)
        with pytest.raises(HandshakeError, match="ERR_TLS_REQD"):
            await NbdClient.connect(f"nbd://127.0.0.1:{port}/secret", connect_timeout=10)
        async with await NbdClient.connect(nbds(port, pki.client, "secret")) as client:
            assert client.size == SIZE
    finally:
        await server.stop()


async def test_off_refuses_starttls_and_nbds_is_never_downgraded(pki: Pki) -> None:
    server, device, port = await _serve(None)
    try:
        raw = await Raw.open(port)
        assert await raw.option(Opt.STARTTLS) == [(Rep.ERR_POLICY, b"TLS is not configured on this server")]
        assert (await raw.option(Opt.INFO, _name("d")))[-1] == (Rep.ACK, b"")  # the session goes on in clear
        await raw.close()
        with pytest.raises(HandshakeError, match=r"STARTTLS.*ERR_POLICY"):
            await NbdClient.connect(nbds(port, pki.client), connect_timeout=10)
        with pytest.raises(HandshakeError, match=r"STARTTLS.*ERR_POLICY"):
            await NbdClient.list_exports(nbds(port, pki.client))
        await _round_trip(f"nbd://127.0.0.1:{port}/d", device)
    finally:
        await server.stop()


async def test_refusals_cost_only_their_connection(required: tuple[NbdServer, MemoryDevice, int], pki: Pki) -> None:
    server, device, port = required
    # A client certificate from another CA: the server's handshake fails.
    with pytest.raises(HandshakeError, match=r"TLS handshake failed|closed"):
        await NbdClient.connect(nbds(port, pki.rogue), connect_timeout=10)
    await _round_trip(nbds(port, pki.client), device)
    # STARTTLS, then garbage instead of a TLS hello.
    raw = await Raw.open(port)
    assert await raw.option(Opt.STARTTLS) == [(Rep.ACK, b"")]
    raw.writer.write(b"GET / HTTP/1.0\r\n\r\n" * 10)
    assert not (await raw.closed()).startswith(b"HTTP")
    await raw.close()
    await _round_trip(nbds(port, pki.client), device)
    # STARTTLS with garbage pipelined behind it, in the same segment.
    raw = await Raw.open(port)
    raw.writer.write(struct.pack(">QII", c.IHAVEOPT, Opt.STARTTLS, 0) + b"\x16\x03\x01garbage")
    assert await raw.closed() == _REPLY.pack(c.OPT_REPLY_MAGIC, Opt.STARTTLS, Rep.ACK, 0)
    await raw.close()
    # A client that drops mid-handshake (after its hello).
    raw = await Raw.open(port)
    assert await raw.option(Opt.STARTTLS) == [(Rep.ACK, b"")]
    raw.writer.write(bytes.fromhex("16030100"))
    await raw.close()
    await _round_trip(nbds(port, pki.client), device)
    # No client certificate at all, while the server verifies peers.
    anonymous = pki.client.parent / "anonymous"
    anonymous.mkdir(exist_ok=True)
    (anonymous / "ca-cert.pem").write_bytes((pki.client / "ca-cert.pem").read_bytes())
    with pytest.raises(HandshakeError):
        await NbdClient.connect(nbds(port, anonymous), connect_timeout=10)
    await _round_trip(nbds(port, pki.client), device)
    assert server.connections == 0


async def test_authz_is_consulted_per_connection(pki: Pki) -> None:
    context = server_context(pki.server)
    authz: list[AuthzList | None] = [AuthzList.from_patterns(["CN=someone-else"])]
    server, device, port = await _serve(ServerTls("require", lambda: context, lambda: authz[0]))
    try:
        with pytest.raises(HandshakeError, match="closed"):
            await NbdClient.connect(nbds(port, pki.client), connect_timeout=10)
        authz[0] = AuthzList.from_patterns(["CN=someone-else", "C=GB,O=Example,CN=*"])
        await _round_trip(nbds(port, pki.client), device)
        authz[0] = None  # the authz object was deleted: nobody gets in
        with pytest.raises(HandshakeError, match="closed"):
            await NbdClient.connect(nbds(port, pki.client), connect_timeout=10)
    finally:
        await server.stop()


async def test_client_checks_the_server_certificate(required: tuple[NbdServer, MemoryDevice, int], pki: Pki) -> None:
    _, device, port = required
    with pytest.raises(HandshakeError, match=r"TLS handshake failed.*(?i:hostname|match)"):
        await NbdClient.connect(nbds(port, pki.client, extra="&tls-hostname=nbd.example"), connect_timeout=10)
    distrust = pki.client.parent / "distrust"  # trusts only the second CA, which did not sign the server
    distrust.mkdir(exist_ok=True)
    (distrust / "ca-cert.pem").write_bytes((pki.client.parent / "ca" / "other-ca-cert.pem").read_bytes())
    with pytest.raises(HandshakeError, match=r"TLS handshake failed.*CERTIFICATE_VERIFY_FAILED"):
        await NbdClient.connect(nbds(port, distrust, extra="&tls-hostname=localhost"), connect_timeout=10)
    await _round_trip(nbds(port, pki.client).replace("localhost", "127.0.0.1"), device)  # the IP in the SAN
    await _round_trip(nbds(port, pki.client, extra="&tls-verify-peer=0"), device)


async def test_reconnect_and_replay_over_tls(required: tuple[NbdServer, MemoryDevice, int], pki: Pki) -> None:
    """A dropped TLS connection is reopened with STARTTLS again, and the requests in flight are replayed."""
    server, device, port = required
    await device.pwrite(0, b"\x42" * 8192)
    client = await NbdClient.connect(nbds(port, pki.client), connections=1, reconnect_delay=20)
    try:
        first = client._conns[0]
        pending = [
            asyncio.ensure_future(client.pread(0, 4096)),
            asyncio.ensure_future(client.pwrite(8192, b"\x17" * 4096)),
        ]
        await asyncio.sleep(0)
        first.abort(DisconnectedError("dropped"))
        assert await asyncio.wait_for(pending[0], 20) == b"\x42" * 4096
        await asyncio.wait_for(pending[1], 20)
        assert device.data[8192:12288] == b"\x17" * 4096
        assert client._conns[0] is not first
        assert client._conns[0].transport is not None
        assert client._conns[0].transport.get_extra_info("ssl_object") is not None
        assert all(conn._tls() for conn in server._connections)
    finally:
        await client.close()


async def test_a_silent_tls_handshake_is_timed_out(pki: Pki) -> None:
    """A client that takes the ACK and never starts (or never finishes) its TLS hello is dropped by the
    handshake timeout; the next client is served."""
    server = NbdServer(tls=fixed_server_tls("require", pki.server), limits=ServerLimits(handshake_timeout=0.5))
    device = MemoryDevice(SIZE)
    server.add_export(Export("d", device))
    _, port = await server.listen_tcp("127.0.0.1", 0)
    try:
        silent = await Raw.open(port)
        assert await silent.option(Opt.STARTTLS) == [(Rep.ACK, b"")]
        half = await Raw.open(port)
        assert await half.option(Opt.STARTTLS) == [(Rep.ACK, b"")]
        half.writer.write(bytes.fromhex("160301020001"))  # the start of a ClientHello
        assert await silent.closed() == b""  # within Raw.closed's bound, far above the timeout
        assert await half.closed() == b""
        await silent.close()
        await half.close()
        await _round_trip(nbds(port, pki.client), device)
    finally:
        await server.stop()


async def test_file_payloads_go_through_tls(
    required: tuple[NbdServer, MemoryDevice, int], pki: Pki, tmp_path: Path
) -> None:
    """A write from a file (sendfile on a clear-text socket) is sent through the TLS layer instead."""
    _, device, port = required
    payload = bytes(range(256)) * 1024 * 2  # 512 KiB: over the sendfile threshold
    source = tmp_path / "payload"
    source.write_bytes(b"x" * 4096 + payload)
    async with await NbdClient.connect(nbds(port, pki.client), connections=1) as client:
        fd = os.open(source, os.O_RDONLY)
        try:
            await client.pwrite_from_fd(0, fd, 4096, len(payload))
        finally:
            os.close(fd)
        assert not client._conns[0]._plain_socket()
        assert await client.pread(0, len(payload)) == payload
    assert device.data[: len(payload)] == payload
