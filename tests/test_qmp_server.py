"""QmpServer in-process: greeting, negotiation, replies and errors, events, several clients, hostile clients."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from sockkit import close_stream

from backup.errors import BackupError
from backup.events import Event
from server.errors import QmpError
from server.qmp import CommandRegistry, QmpServer
from server.qmp.dispatch import run_handler

TIMEOUT = 10


class NodeNotFound(BackupError):
    """A block-layer error that names its own QMP class, as the dispatcher must report it."""

    qmp_class = "DeviceNotFound"


class JobNotFound(BackupError):
    qmp_class = "DeviceNotActive"


class Ctx:
    def __init__(self) -> None:
        self.stops = 0
        self.calls: list[dict[str, Any]] = []
        self.gate = asyncio.Event()

    def request_stop(self) -> None:
        self.stops += 1


def make_registry() -> CommandRegistry:
    reg = CommandRegistry()

    @reg.command("echo", args={"msg": "str", "*n": "uint32"})
    async def echo(ctx: Ctx, args: dict[str, Any]) -> Any:
        """Return the arguments."""
        ctx.calls.append(args)
        return args

    @reg.command("fail-device")
    async def fail_device(ctx: Ctx, args: dict[str, Any]) -> Any:
        raise NodeNotFound("Cannot find device='x' nor node-name='x'")

    @reg.command("fail-job")
    async def fail_job(ctx: Ctx, args: dict[str, Any]) -> Any:
        raise JobNotFound("Block job 'j' not found")

    @reg.command("fail-qmp")
    async def fail_qmp(ctx: Ctx, args: dict[str, Any]) -> Any:
        raise QmpError("nope", "DeviceNotActive")

    @reg.command("crash")
    async def crash(ctx: Ctx, args: dict[str, Any]) -> Any:
        raise ZeroDivisionError("division by zero")

    @reg.command("bad-return")
    async def bad_return(ctx: Ctx, args: dict[str, Any]) -> Any:
        return {"x": object()}

    @reg.command("big")
    async def big(ctx: Ctx, args: dict[str, Any]) -> Any:
        return "x" * (4 << 20)

    @reg.command("wait-gate")
    async def wait_gate(ctx: Ctx, args: dict[str, Any]) -> Any:
        await ctx.gate.wait()
        return {}

    return reg


class Client:
    """A raw QMP client: exact bytes, no library help."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def recv(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), TIMEOUT)
        msg: dict[str, Any] = json.loads(line)
        return msg

    async def send(self, data: bytes | dict[str, Any]) -> None:
        self.writer.write(data if isinstance(data, bytes) else json.dumps(data).encode())
        await self.writer.drain()

    async def cmd(self, name: str, args: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        req: dict[str, Any] = {"execute": name, **extra}
        if args is not None:
            req["arguments"] = args
        await self.send(req)
        return await self.recv()

    async def negotiate(self) -> None:
        assert await self.cmd("qmp_capabilities") == {"return": {}}

    async def close(self) -> None:
        await close_stream(self.writer)


@pytest.fixture
async def ctx() -> Ctx:
    return Ctx()


@pytest.fixture
async def server(ctx: Ctx, tmp_path: Path) -> AsyncIterator[QmpServer]:
    srv = QmpServer(make_registry(), ctx, version="1.2.3", max_pending_output=1 << 20)
    await srv.listen_unix(tmp_path / "qmp.sock")
    yield srv
    await srv.stop()


async def connect(path: Path) -> Client:
    reader, writer = await asyncio.open_unix_connection(str(path))
    return Client(reader, writer)


@pytest.fixture
async def client(server: QmpServer, tmp_path: Path) -> AsyncIterator[Client]:
    c = await connect(tmp_path / "qmp.sock")
    greeting = await c.recv()
    assert greeting == {
        "QMP": {
            "version": {"qemu": {"micro": 3, "minor": 2, "major": 1}, "package": "nbd-backup 1.2.3"},
            "capabilities": [],
        }
    }
    yield c
    await c.close()


async def test_socket_is_private(server: QmpServer, tmp_path: Path) -> None:
    mode = os.stat(tmp_path / "qmp.sock").st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


async def test_negotiation(client: Client) -> None:
    assert await client.cmd("echo", {"msg": "x"}, id=1) == {
        "id": 1,
        "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
    }
    assert (await client.cmd("no-such", id=2))["error"]["class"] == "CommandNotFound"
    assert (await client.cmd("qmp_capabilities", {"enable": ["oob"]}, id=3))["error"] == {
        "class": "GenericError",
        "desc": "Capability oob not available",
    }
    assert (await client.cmd("qmp_capabilities", {"enable": ["x"]}, id=4))["error"]["desc"] == (
        "Parameter 'null' does not accept value 'x'"
    )
    assert await client.cmd("qmp_capabilities", {"enable": []}, id=5) == {"return": {}, "id": 5}
    assert await client.cmd("qmp_capabilities", id=6) == {
        "id": 6,
        "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"},
    }


async def test_commands_and_ids(client: Client) -> None:
    await client.negotiate()
    assert await client.cmd("echo", {"msg": "hi", "n": 7}, id={"a": [1, 2]}) == {
        "return": {"msg": "hi", "n": 7},
        "id": {"a": [1, 2]},
    }
    assert await client.cmd("echo", {"msg": "no id"}) == {"return": {"msg": "no id"}}
    assert await client.cmd("query-version", id=2.5) == {
        "return": {"qemu": {"micro": 3, "minor": 2, "major": 1}, "package": "nbd-backup 1.2.3"},
        "id": 2.5,
    }
    names = [c["name"] for c in (await client.cmd("query-commands"))["return"]]
    assert {"qmp_capabilities", "query-version", "query-commands", "quit", "echo"} <= set(names)
    assert await client.cmd("nope", id="x") == {
        "id": "x",
        "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
    }


@pytest.mark.parametrize(
    ("request_", "reply"),
    [
        (b'{"execute":1,"id":8}', {"id": 8, "error": "QMP input member 'execute' must be a string"}),
        (b'{"id":9}', {"id": 9, "error": "QMP input lacks member 'execute'"}),
        (b"[1,2]", {"error": "QMP input must be a JSON object"}),
        (b'"str"', {"error": "QMP input must be a JSON object"}),
        (b'{"execute": }', {"error": "JSON parse error, expecting value"}),
        (b'{"execute":"echo","id":"x","foo":1}', {"id": "x", "error": "QMP input member 'foo' is unexpected"}),
        (
            b'{"execute":"echo","arguments":[],"id":11}',
            {"id": 11, "error": "QMP input member 'arguments' must be an object"},
        ),
        (
            b'{"execute":"echo","arguments":null,"id":12}',
            {"id": 12, "error": "QMP input member 'arguments' must be an object"},
        ),
        (b'{"exec-oob":"echo","id":1}', {"id": 1, "error": "QMP input member 'exec-oob' is unexpected"}),
        (b'{"execute":"echo","id":7,"arguments":{"msg":"a","x":1}}', {"id": 7, "error": "Parameter 'x' is unexpected"}),
        (b'{"execute":"echo","id":7,"arguments":{"n":1}}', {"id": 7, "error": "Parameter 'msg' is missing"}),
        (
            b'{"execute":"echo","id":7,"arguments":{"msg":"a","n":-1}}',
            {"id": 7, "error": "Parameter 'n' expects uint32_t"},
        ),
        (b"\x01", {"error": "JSON parse error, stray '\x01'"}),
    ],
)
async def test_malformed_requests(client: Client, ctx: Ctx, request_: bytes, reply: dict[str, Any]) -> None:
    await client.negotiate()
    await client.send(request_)
    got = await client.recv()
    expected: dict[str, Any] = dict(reply)
    expected["error"] = {"class": "GenericError", "desc": reply["error"]}
    assert got == expected
    assert ctx.calls == []  # refused before any side effect
    assert (await client.cmd("echo", {"msg": "still here"}, id=99))["return"] == {"msg": "still here"}


async def test_error_mapping(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    await client.negotiate()
    assert (await client.cmd("fail-device", id=1))["error"] == {
        "class": "DeviceNotFound",
        "desc": "Cannot find device='x' nor node-name='x'",
    }
    assert (await client.cmd("fail-job", id=2))["error"] == {
        "class": "DeviceNotActive",
        "desc": "Block job 'j' not found",
    }
    assert (await client.cmd("fail-qmp", id=3))["error"] == {"class": "DeviceNotActive", "desc": "nope"}
    with caplog.at_level(logging.ERROR):
        err = (await client.cmd("crash", id=4))["error"]
        assert err["class"] == "GenericError" and "ZeroDivisionError" in err["desc"]
        assert any("crash" in r.getMessage() for r in caplog.records)
        err = (await client.cmd("bad-return", id=5))["error"]
        assert err["class"] == "GenericError" and "not JSON" in err["desc"]
    assert (await client.cmd("query-version", id=6))["id"] == 6


async def test_back_to_back_and_split_input(client: Client) -> None:
    """qemu.qmp sends no newlines; TCP may split anywhere."""
    await client.negotiate()
    data = b"".join(json.dumps({"execute": "echo", "arguments": {"msg": str(i)}, "id": i}).encode() for i in range(20))
    for i in range(0, len(data), 7):
        await client.send(data[i : i + 7])
    for i in range(20):
        assert await client.recv() == {"return": {"msg": str(i)}, "id": i}


async def test_events_go_to_negotiated_clients_only(server: QmpServer, client: Client, tmp_path: Path) -> None:
    other = await connect(tmp_path / "qmp.sock")
    await other.recv()
    await client.negotiate()
    server.broadcast(Event("JOB_STATUS_CHANGE", {"id": "j", "status": "running"}, 1700000000.25))
    assert await client.recv() == {
        "timestamp": {"seconds": 1700000000, "microseconds": 250000},
        "event": "JOB_STATUS_CHANGE",
        "data": {"id": "j", "status": "running"},
    }
    # The un-negotiated client got nothing: its next line is the reply to its command.
    assert (await other.cmd("query-version", id=1))["error"]["class"] == "CommandNotFound"
    await other.negotiate()
    server.broadcast(Event("BLOCK_JOB_PENDING", {"type": "backup", "id": "j"}, 1.0))
    for c in (client, other):
        assert (await c.recv())["event"] == "BLOCK_JOB_PENDING"
    await other.close()


async def test_events_interleave_while_a_command_runs(server: QmpServer, client: Client, ctx: Ctx) -> None:
    await client.negotiate()
    await client.send({"execute": "wait-gate", "id": "slow"})
    await asyncio.sleep(0)
    server.broadcast(Event("JOB_STATUS_CHANGE", {"id": "j", "status": "paused"}, 2.0))
    assert (await client.recv())["event"] == "JOB_STATUS_CHANGE"
    ctx.gate.set()
    assert await client.recv() == {"return": {}, "id": "slow"}


async def test_many_clients(server: QmpServer, tmp_path: Path) -> None:
    clients = [await connect(tmp_path / "qmp.sock") for _ in range(8)]
    for c in clients:
        await c.recv()
        await c.negotiate()
    replies = await asyncio.gather(*(c.cmd("echo", {"msg": str(i)}, id=i) for i, c in enumerate(clients)))
    assert replies == [{"return": {"msg": str(i)}, "id": i} for i in range(8)]
    assert server.client_count == 8
    for c in clients:
        await c.close()


async def test_client_vanishing_mid_reply_does_not_disturb_others(
    server: QmpServer, client: Client, tmp_path: Path
) -> None:
    await client.negotiate()
    rude = await connect(tmp_path / "qmp.sock")
    await rude.recv()
    await rude.negotiate()
    # Ask for a 4 MiB reply and hang up without reading it (RST on close with unread data).
    await rude.send({"execute": "big", "id": 1})
    rude.writer.transport.abort()
    for i in range(3):
        server.broadcast(Event("X", {"i": i}, 1.0))
        assert (await client.recv())["data"] == {"i": i}
    assert (await client.cmd("echo", {"msg": "ok"}, id=2))["return"] == {"msg": "ok"}


async def test_client_that_never_reads_is_dropped(server: QmpServer, client: Client, tmp_path: Path) -> None:
    """A client that stops reading cannot make the daemon buffer without bound."""
    await client.negotiate()
    lazy = await connect(tmp_path / "qmp.sock")
    await lazy.recv()
    await lazy.negotiate()
    cast(asyncio.Transport, lazy.writer.transport).pause_reading()
    payload = {"blob": "y" * 4096}
    # ~8 MiB of events against a 1 MiB budget (+ socket buffers), in batches the good client keeps up with.
    for _ in range(40):
        for _ in range(50):
            server.broadcast(Event("X", payload, 1.0))
        for _ in range(50):
            assert (await client.recv())["event"] == "X"
    for _ in range(100):
        if server.client_count == 1:
            break
        await asyncio.sleep(0.05)
    assert server.client_count == 1
    lazy.writer.transport.abort()
    assert (await client.cmd("echo", {"msg": "ok"}, id=1))["return"] == {"msg": "ok"}


async def test_quit_replies_then_calls_back(client: Client, ctx: Ctx) -> None:
    await client.negotiate()
    assert await client.cmd("quit", id=1) == {"return": {}, "id": 1}
    await asyncio.sleep(0)
    assert ctx.stops == 1


async def test_quit_with_explicit_callback(tmp_path: Path) -> None:
    stopped = asyncio.Event()
    srv = QmpServer(CommandRegistry(), object(), on_quit=stopped.set)
    host, port = await srv.listen_tcp("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(host, port)
        c = Client(reader, writer)
        await c.recv()
        await c.negotiate()
        assert await c.cmd("quit") == {"return": {}}
        await asyncio.wait_for(stopped.wait(), TIMEOUT)
        await c.close()
    finally:
        await srv.stop()


async def test_quit_without_a_way_to_stop(tmp_path: Path) -> None:
    srv = QmpServer(CommandRegistry(), object())
    await srv.listen_unix(tmp_path / "s")
    try:
        c = await connect(tmp_path / "s")
        await c.recv()
        await c.negotiate()
        assert (await c.cmd("quit"))["error"]["class"] == "GenericError"
        await c.close()
    finally:
        await srv.stop()


async def test_stop_closes_clients_and_removes_socket(ctx: Ctx, tmp_path: Path) -> None:
    srv = QmpServer(make_registry(), ctx)
    await srv.listen_unix(tmp_path / "s")
    c = await connect(tmp_path / "s")
    await c.recv()
    await c.negotiate()
    await c.send({"execute": "wait-gate", "id": 1})  # a command still running at stop()
    await asyncio.sleep(0.05)
    await asyncio.wait_for(srv.stop(), TIMEOUT)
    assert not (tmp_path / "s").exists()
    assert await asyncio.wait_for(c.reader.read(), TIMEOUT) == b""
    await c.close()


async def test_stale_socket_replaced_but_not_live_sockets_or_regular_files(ctx: Ctx, tmp_path: Path) -> None:
    srv = QmpServer(make_registry(), ctx)
    await srv.listen_unix(tmp_path / "s")
    srv2 = QmpServer(make_registry(), ctx)
    with pytest.raises(OSError, match="listening"):
        await srv2.listen_unix(tmp_path / "s")  # the first one answers there: its socket is not taken over
    c = await connect(tmp_path / "s")
    assert "QMP" in await c.recv()
    await c.close()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "t"))
    stale.close()  # the file stays, nothing listens: replaced
    await srv2.listen_unix(tmp_path / "t")
    (tmp_path / "f").write_text("keep me")
    with pytest.raises(OSError):
        await srv2.listen_unix(tmp_path / "f")
    assert (tmp_path / "f").read_text() == "keep me"
    for _ in range(1000):  # the probe's and the client's sessions end (EOF), so stop has nothing to flush
        if srv.client_count == 0:
            break
        await asyncio.sleep(0.005)
    await srv.stop()
    await srv2.stop()
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


async def test_huge_object_is_refused_and_the_session_continues(ctx: Ctx, tmp_path: Path) -> None:
    srv = QmpServer(make_registry(), ctx, max_message_size=1 << 20)
    await srv.listen_unix(tmp_path / "s")
    try:
        c = await connect(tmp_path / "s")
        await c.recv()
        await c.negotiate()
        await c.send(b'{"execute":"echo","arguments":{"msg":"' + b"z" * (3 << 20) + b'"},"id":1}')
        first = await c.recv()
        assert first == {"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}
        # Whatever the remainder of the huge object produced, a fresh command is answered.
        await c.send(b'\x01{"execute":"echo","arguments":{"msg":"after"},"id":2}')
        while (msg := await c.recv()).get("id") != 2:
            assert msg["error"]["class"] == "GenericError"
        assert msg == {"return": {"msg": "after"}, "id": 2}
        assert ctx.calls == [{"msg": "after"}]
        await c.close()
    finally:
        await srv.stop()


async def test_registry_dispatch_and_duplicates(ctx: Ctx) -> None:
    reg = make_registry()
    assert await reg.dispatch(ctx, "echo", {"msg": "m"}) == {"msg": "m"}
    with pytest.raises(QmpError) as info:
        await reg.dispatch(ctx, "echo", {"msg": 1})
    assert info.value.desc == "Invalid parameter type for 'msg', expected: string"
    with pytest.raises(ValueError):
        reg.register("echo", run_handler)  # type: ignore[arg-type]
    other = CommandRegistry()

    @other.command("extra")
    async def extra(ctx: Any, args: dict[str, Any]) -> Any:
        """An extra command."""
        return 1

    reg.update(other)
    assert "extra" in reg and reg.lookup("extra").summary == "An extra command."
    with pytest.raises(ValueError):
        reg.update(other)


async def test_cancellation_is_not_swallowed(ctx: Ctx) -> None:
    reg = CommandRegistry()

    @reg.command("hang")
    async def hang(ctx: Any, args: dict[str, Any]) -> Any:
        await asyncio.sleep(3600)

    task = asyncio.ensure_future(reg.dispatch(ctx, "hang", None))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_client_limit(ctx: Ctx, tmp_path: Path) -> None:
    srv = QmpServer(make_registry(), ctx, max_clients=2)
    await srv.listen_unix(tmp_path / "s")
    try:
        first, second = await connect(tmp_path / "s"), await connect(tmp_path / "s")
        await first.recv()
        await second.recv()
        third = await connect(tmp_path / "s")
        assert await asyncio.wait_for(third.reader.read(), TIMEOUT) == b""  # refused
        await third.close()
        await first.close()
        for _ in range(100):  # the server notices the departure asynchronously
            if srv.client_count < 2:
                break
            await asyncio.sleep(0.02)
        fourth = await connect(tmp_path / "s")
        assert "QMP" in await fourth.recv()
        await fourth.close()
        await second.close()
    finally:
        await srv.stop()


async def test_qemu_qmp_client_over_tcp(ctx: Ctx) -> None:
    """QEMU's own asyncio client (no newlines between requests) against the in-process server."""
    from qemu.qmp import EventListener, ExecuteError, QMPClient

    srv = QmpServer(make_registry(), ctx)
    host, port = await srv.listen_tcp("127.0.0.1", 0)
    client = QMPClient("unit")
    try:
        await asyncio.wait_for(client.connect((host, port)), TIMEOUT)
        assert await client.execute("echo", {"msg": "x", "n": 1}) == {"msg": "x", "n": 1}
        with pytest.raises(ExecuteError) as info:
            await client.execute("fail-device")
        assert info.value.error_class == "DeviceNotFound"
        listener = EventListener()
        with client.listen(listener):
            srv.broadcast(
                Event("BLOCK_JOB_COMPLETED", {"device": "j", "len": 1, "offset": 1, "speed": 0, "type": "backup"}, 5.5)
            )
            event = await asyncio.wait_for(listener.get(), TIMEOUT)
        assert event["event"] == "BLOCK_JOB_COMPLETED" and event["timestamp"] == {"seconds": 5, "microseconds": 500000}
    finally:
        await client.disconnect()
        await srv.stop()


async def test_events_emitted_by_a_command_precede_its_reply(ctx: Ctx, tmp_path: Path) -> None:
    """As in QEMU: drive-backup's JOB_STATUS_CHANGE "created" arrives before drive-backup's return."""
    reg = CommandRegistry()
    srv = QmpServer(reg, ctx)

    @reg.command("start-job")
    async def start_job(ctx: Any, args: dict[str, Any]) -> Any:
        srv.broadcast(Event("JOB_STATUS_CHANGE", {"id": "j", "status": "created"}, 1.0))
        srv.broadcast(Event("JOB_STATUS_CHANGE", {"id": "j", "status": "running"}, 1.0))
        return {}

    await srv.listen_unix(tmp_path / "s")
    try:
        c = await connect(tmp_path / "s")
        await c.recv()
        await c.negotiate()
        await c.send({"execute": "start-job", "id": 1})
        got = [await c.recv() for _ in range(3)]
        assert [m.get("event") or m.get("return") for m in got] == ["JOB_STATUS_CHANGE", "JOB_STATUS_CHANGE", {}]
        await c.close()
    finally:
        await srv.stop()


async def test_client_gone_before_its_greeting_is_written_ends_its_session(
    ctx: Ctx, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that connects and leaves at once (a liveness probe of the socket) must not leave a
    session waiting for output that can never be written (which held stop() up)."""
    import server.qmp.server as qmp_server

    monkeypatch.setattr(qmp_server, "STOP_FLUSH_TIMEOUT", 600.0)
    srv = QmpServer(make_registry(), ctx)
    await srv.listen_unix(tmp_path / "s")
    try:
        for _ in range(3):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            probe.connect(str(tmp_path / "s"))
            probe.close()
        for _ in range(2000):  # bounded: a lingering session would stay for STOP_FLUSH_TIMEOUT (600 s)
            await asyncio.sleep(0.005)
            if srv.client_count == 0:
                break
        assert srv.client_count == 0
    finally:
        monkeypatch.setattr(qmp_server, "STOP_FLUSH_TIMEOUT", 0.1)  # a failure must not hang stop()
        await srv.stop()
