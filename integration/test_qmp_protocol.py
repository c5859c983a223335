"""The QMP protocol layer end to end: byte-level sequences against qemu-storage-daemon and against
``nbd-backup serve`` must get the same replies (differential); QEMU's client library and qmp-shell work
unchanged; hostile clients get the right error or a clean close while the daemon keeps serving; and
the ``nbd-backup qmp`` command line.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import nbd_backup_argv, require
from qmp_daemon import OurDaemon, our_daemon, qmp_shell
from qsd import Qsd

TIMEOUT = 30.0
END = b'\x01{"execute":"query-block-jobs","id":"__end"}'
Json = dict[str, Any]


# --- a raw client: exact bytes in, every message out -------------------------------------------


class Raw:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self.buf = b""
        self.greeting = self.recv()

    def recv(self) -> Json:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        msg: Json = json.loads(line)
        return msg

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until_end(self) -> list[Json]:
        """Send the end marker (a control character resets the lexer) and collect all replies before its reply."""
        self.send(END)
        out = []
        while (msg := self.recv()).get("id") != "__end":
            out.append(msg)
        return out

    def negotiate(self) -> None:
        self.send(b'{"execute":"qmp_capabilities"}')
        assert self.recv() == {"return": {}}

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def qsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qsd]:
    require("qemu-storage-daemon")
    with Qsd.start(tmp_path_factory.mktemp("qsd")) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OurDaemon]:
    with our_daemon(tmp_path_factory.mktemp("ours")) as daemon:
        yield daemon


def exchange(path: Path, payload: bytes, *, negotiate: bool) -> list[Json]:
    raw = Raw(path)
    try:
        if negotiate:
            raw.negotiate()
        raw.send(payload)
        return raw.until_end()
    finally:
        raw.close()


def normalise(replies: list[Json]) -> list[Json]:
    """Versions differ by design; everything else must be equal."""
    out = []
    for msg in replies:
        if isinstance(msg.get("return"), dict) and "qemu" in msg["return"]:
            msg = {**msg, "return": "<version>"}
        out.append(msg)
    return out


# (name, bytes sent, negotiate first)
SEQUENCES: list[tuple[str, bytes, bool]] = [
    ("before-negotiation", b'{"execute":"query-version","id":1}{"execute":"nope","id":2}', False),
    ("negotiate-enable-empty", b'{"execute":"qmp_capabilities","arguments":{"enable":[]},"id":1}', False),
    ("negotiate-bad-enum", b'{"execute":"qmp_capabilities","arguments":{"enable":["x"]},"id":1}', False),
    ("negotiate-bad-arg", b'{"execute":"qmp_capabilities","arguments":{"x":1},"id":1}', False),
    (
        "negotiate-twice",
        b'{"execute":"qmp_capabilities","id":3}{"execute":"qmp_capabilities","arguments":{"x":1},"id":4}'
        b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":5}',
        True,
    ),
    ("arguments-not-object-first", b'{"execute":"nope","arguments":5,"id":3}{"id":1,"execute":2}', False),
    ("unknown-command", b'{"execute":"nope","id":6}', True),
    ("execute-not-string", b'{"execute":1,"id":8}', True),
    ("lacks-execute", b'{"id":9}{}', True),
    ("not-objects", b'[1,2] "str" 13 ', True),
    ("parse-error", b'{"execute": }', True),
    ("garbage-then-command", b'garbage{"execute":"query-version","id":10}', True),
    ("stray-then-command", b'@abc"def" 12 {"execute":"query-block-jobs","id":2}', True),
    ("stray-inside-object", b'{"execute": @ "query-version", "id":3}', True),
    ("control-in-string", b'{"execute":"query-version","id":"a\x01b"}{"execute":"query-version","id":6}', True),
    ("extra-closers", b'{"execute":"query-block-jobs","id":7}}{"execute":"query-block-jobs","id":8}]', True),
    ("unexpected-member", b'{"execute":"query-version","id":"x","foo":1}', True),
    ("control-member", b'{"execute":"query-version","id":1,"control":{"run-oob":true}}', True),
    ("exec-oob", b'{"exec-oob":"query-block-jobs","id":1}', True),
    ("arguments-array", b'{"execute":"query-version","arguments":[],"id":11}', True),
    ("arguments-null", b'{"execute":"query-block-jobs","arguments":null,"id":22}', True),
    ("argument-unexpected", b'{"execute":"query-block-jobs","id":{"a":[1,2]},"arguments":{"q":1}}', True),
    (
        "ids",
        b"{\"execute\":\"query-block-jobs\",\"id\":{\"a\":[1,2]}}{'execute':'query-block-jobs','id':'it\\'s'}"
        b'{"execute":"query-block-jobs","id":2.5}{"execute":"query-block-jobs","id":"\\u00e9\\ud83d\\ude00"}',
        True,
    ),
    ("grammar-errors", b'{"a":1,}{"a":1 "b":2}{1:2}{"a" 2}[1 2]{"a":1]', True),
    ("lexical-errors", b'{"id":01}"abc\\q"\x01"\xff"tru{}', True),
    ("recovery-ends", b'@\x01{}@\n"x" {}@\t"x" {}@\r"y" {}@\x1f{}@\xfe{}"a\xfe" {}', True),
    ("duplicate-key", b'{"execute":"query-block-jobs","id":2, "id":3}', True),
    ("split-no-newline", b'{"execute":"query-block-jobs","id":9', True),
    ("nesting-limit", b"[" * 1100 + b"]" * 1100, True),
    (
        "argument-types",
        b'{"execute":"block-job-set-speed","arguments":{"device":1,"speed":1},"id":1}'
        b'{"execute":"block-job-set-speed","arguments":{"speed":1,"bogus":2},"id":2}'
        b'{"execute":"block-job-set-speed","arguments":{"device":"x","speed":"1"},"id":3}'
        b'{"execute":"block-job-set-speed","arguments":{"device":"x","speed":1.5},"id":4}'
        b'{"execute":"block-job-set-speed","arguments":{"device":"x","speed":9223372036854775808},"id":5}'
        b'{"execute":"block-job-cancel","arguments":{"device":"x","force":1},"id":6}'
        b'{"execute":"block-job-set-speed","arguments":{"device":"x","speed":-1},"id":7}',
        True,
    ),
    (
        "union-and-list-paths",
        b'{"execute":"blockdev-add","arguments":{"node-name":"a"},"id":1}'
        b'{"execute":"blockdev-add","arguments":{"driver":"foo","node-name":"a"},"id":2}'
        b'{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"a"},"id":3}'
        b'{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"a","file":{"driver":"file"}},"id":4}'
        b'{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"a","file":5},"id":5}'
        b'{"execute":"transaction","arguments":{"actions":{}},"id":6}'
        b'{"execute":"transaction","arguments":{"actions":[1]},"id":7}'
        b'{"execute":"transaction","arguments":{"actions":[{"type":"drive-backup","data":{"device":"x"}}]},"id":8}'
        b'{"execute":"drive-backup","arguments":{"device":"x","target":"/tmp/x","sync":"bogus"},"id":9}'
        b'{"execute":"nbd-server-start","arguments":{"addr":{"type":"inet","data":{"host":"h","port":1}}},"id":10}'
        b'{"execute":"nbd-server-start","arguments":{"addr":{"type":"inet","data":{"host":"h"}}},"id":11}'
        b'{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"/p"}},'
        b'"max-connections":-1},"id":12}',
        True,
    ),
]


@pytest.mark.parametrize(("name", "payload", "negotiate"), SEQUENCES, ids=[s[0] for s in SEQUENCES])
def test_same_replies_as_qemu_storage_daemon(
    qsd: Qsd, ours: OurDaemon, name: str, payload: bytes, negotiate: bool
) -> None:
    theirs = normalise(exchange(qsd.qmp_path, payload, negotiate=negotiate))
    mine = normalise(exchange(ours.qmp_path, payload, negotiate=negotiate))
    assert mine == theirs


FUZZ_PIECES = [
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b" ",
    b"\t",
    b"\n",
    b"\r",
    b"\x01",
    b"\xff",
    b"@",
    b"'",
    b'"',
    b"\\",
    b'"execute"',
    b'"query-block-jobs"',
    b'"id"',
    b"1",
    b"-",
    b"0",
    b".5",
    b"e3",
    b"true",
    b"nul",
    b"x",
    b'"\\u00e9"',
    b'"\\ud800"',
    b"\xc3\xa9",
    b'"arguments"',
    b"{}",
    b"[]",
    b"'id'",
    b'"\\q"',
    b"\xc0\x80",
    b'"\\ufffe"',
    b"\\'",
    b"1.",
    b"E",
    b"+",
    b"\x00",
    b"\x7f",
    b"\xfe",
    b"{{",
    b"]]",
    b'"\xef\xbf\xbe"',
    b"'\"'",
]


def fuzz_stream(seed: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randrange(5, 60)))


@pytest.mark.parametrize("seed", range(int(os.environ.get("QMP_FUZZ_CASES", "200"))))
def test_fuzzed_streams_same_as_qemu_storage_daemon(qsd: Qsd, ours: OurDaemon, seed: int) -> None:
    """Token soup (seeded, so reproducible): the lexer, the recovery and the parser errors match QEMU's."""
    payload = fuzz_stream(seed)
    assert normalise(exchange(ours.qmp_path, payload, negotiate=True)) == normalise(
        exchange(qsd.qmp_path, payload, negotiate=True)
    ), payload


def test_greeting_has_qemu_shape(qsd: Qsd, ours: OurDaemon) -> None:
    theirs, mine = Raw(qsd.qmp_path), Raw(ours.qmp_path)
    try:
        assert mine.greeting.keys() == theirs.greeting.keys() == {"QMP"}
        assert mine.greeting["QMP"].keys() == theirs.greeting["QMP"].keys() == {"version", "capabilities"}
        assert mine.greeting["QMP"]["version"]["qemu"].keys() == theirs.greeting["QMP"]["version"]["qemu"].keys()
        assert mine.greeting["QMP"]["version"]["package"].startswith("nbd-backup ")
        assert mine.greeting["QMP"]["capabilities"] == []  # we have no out-of-band commands
    finally:
        theirs.close()
        mine.close()


def test_replies_are_crlf_lines_in_qemu_member_order(ours: OurDaemon) -> None:
    raw = Raw(ours.qmp_path)
    try:
        raw.negotiate()
        raw.send(b'{"execute":"query-block-jobs","id":1}{"execute":"nope","id":2}')
        while raw.buf.count(b"\r\n") < 2:
            raw.buf += raw.sock.recv(4096)
        assert raw.buf == (
            b'{"return": [], "id": 1}\r\n'
            b'{"id": 2, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}\r\n'
        )
    finally:
        raw.close()


# --- every command's argument checks, generated from our schemas, against QEMU's ---------------


def _wrong_values(qtype: Any) -> list[Any]:
    from server.qmp.schema import BUILTINS, Alternate, Enum, Int, List, ObjectType

    if isinstance(qtype, Enum):
        return [12345, "__bogus__"]
    if qtype is BUILTINS["str"]:
        return [12345]
    if isinstance(qtype, Int):
        return ["x", 1.5, -1]
    if qtype is BUILTINS["bool"]:
        return ["x"]
    if isinstance(qtype, ObjectType | List):
        return [5]
    if isinstance(qtype, Alternate):
        return [[]]
    return []


def _argument_probes() -> list[Any]:
    """For each command: no arguments (if some are required), each member with wrong values, an
    unknown member. Each probe fails validation on both sides, so nothing runs (``quit`` excluded)."""
    from server.daemon import build_commands
    from server.qmp.repo import COMMANDS as OUR_OWN
    from server.qmp.schema import Struct, Union

    registry = build_commands()
    probes = []
    for cmd in registry:
        if cmd.name in OUR_OWN:  # QEMU has no such command to compare with
            continue
        members = (
            cmd.args.members if isinstance(cmd.args, Struct) else cmd.args.base if isinstance(cmd.args, Union) else ()
        )
        cases: list[dict[str, Any]] = [{}] if any(not m.optional for m in members) else []
        cases += [{m.name: w} for m in members for w in _wrong_values(m.type)]
        cases.append({"__unknown__": 1})
        if isinstance(cmd.args, Union):  # each branch's own members (blockdev-add's drivers)
            for value, branch in cmd.args.variants.items():
                chosen = {cmd.args.discriminator: value}
                if any(not m.optional for m in branch):
                    cases.append(chosen)
                cases += [{**chosen, m.name: w} for m in branch for w in _wrong_values(m.type)]
        for args in cases:
            probes.append(pytest.param(cmd.name, args, id=f"{cmd.name}-{json.dumps(args)}"))
    return probes


@pytest.mark.parametrize(("command", "arguments"), _argument_probes())
def test_argument_refusals_same_as_qemu_storage_daemon(
    qsd: Qsd, ours: OurDaemon, command: str, arguments: Json
) -> None:
    payload = json.dumps({"execute": command, "arguments": arguments, "id": 1}).encode()
    mine = exchange(ours.qmp_path, payload, negotiate=True)
    assert "return" not in mine[0]  # a probe must never run a command
    assert mine == exchange(qsd.qmp_path, payload, negotiate=True)


# --- hostile clients: the right error or a clean close, and the daemon keeps serving -----------


def served(path: Path) -> bool:
    raw = Raw(path)
    try:
        raw.negotiate()
        raw.send(b'{"execute":"query-block-jobs","id":"ok"}')
        return raw.recv() == {"return": [], "id": "ok"}
    finally:
        raw.close()


def test_huge_object_is_refused_and_the_connection_recovers(ours: OurDaemon) -> None:
    """65 MiB in one object: over QEMU's 64 MiB limit. The same connection, and others, keep working."""
    bystander = Raw(ours.qmp_path)
    bystander.negotiate()
    raw = Raw(ours.qmp_path)
    try:
        raw.negotiate()
        raw.send(b'{"execute":"query-block-jobs","id":"' + b"a" * (65 << 20) + b'"}')
        assert raw.recv() == {"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}
        bystander.send(b'{"execute":"query-block-jobs","id":"b"}')
        assert bystander.recv() == {"return": [], "id": "b"}
        rest = raw.until_end()  # the tail of the huge object ('"}') is answered as QEMU would
        assert all(m["error"]["class"] == "GenericError" for m in rest)
        raw.send(b'{"execute":"query-block-jobs","id":"after"}')
        assert raw.recv() == {"return": [], "id": "after"}
    finally:
        raw.close()
        bystander.close()


def test_many_pipelined_commands_and_abrupt_disconnects(ours: OurDaemon) -> None:
    """Clients that hang up with replies and events in flight (RST) do not disturb the daemon."""
    burst = b"".join(b'{"execute":"query-named-block-nodes","id":%d}' % i for i in range(300))
    for _ in range(10):
        raw = Raw(ours.qmp_path)
        raw.negotiate()
        raw.send(burst)
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        raw.close()  # RST: the daemon's writes now fail
    for _ in range(5):  # a client that connects and leaves without a word
        socket.socket(socket.AF_UNIX).connect(str(ours.qmp_path))
    assert served(ours.qmp_path)
    assert "Traceback" not in ours.stderr()


def test_wrong_types_and_commands_before_negotiation(ours: OurDaemon) -> None:
    raw = Raw(ours.qmp_path)
    try:
        raw.send(b'{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"early"},"id":1}')
        assert raw.recv()["error"]["class"] == "CommandNotFound"
        raw.negotiate()
        raw.send(b'{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":7},"id":2}')
        assert raw.recv() == {
            "id": 2,
            "error": {"class": "GenericError", "desc": "Invalid parameter type for 'node-name', expected: string"},
        }
        raw.send(b'{"execute":"query-named-block-nodes","id":3}')
        assert raw.recv() == {"return": [], "id": 3}  # nothing was created by the refused commands
    finally:
        raw.close()


def test_many_clients_at_once(ours: OurDaemon) -> None:
    clients = [Raw(ours.qmp_path) for _ in range(12)]
    try:
        for c in clients:
            c.negotiate()
        for i, c in enumerate(clients):
            c.send(b'{"execute":"query-block-jobs","id":%d}' % i)
        for i, c in enumerate(clients):
            assert c.recv() == {"return": [], "id": i}
    finally:
        for c in clients:
            c.close()


# --- QEMU's own client library and qmp-shell ---------------------------------------------------


def start_small_backup(path: Path, tmp_path: Path, job: str) -> None:
    raw = Raw(path)
    try:
        raw.negotiate()
        node = f"src-{job}"
        for cmd in (
            {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": node, "size": 1 << 20}},
            {
                "execute": "drive-backup",
                "arguments": {"job-id": job, "device": node, "target": str(tmp_path / f"{job}.img"), "sync": "full"},
            },
        ):
            raw.send(json.dumps(cmd).encode())
            reply = raw.recv()
            while "event" in reply:
                reply = raw.recv()
            assert reply == {"return": {}}, reply
    finally:
        raw.close()


def job_statuses_from(events: list[Json], job: str) -> list[str]:
    return [e["data"]["status"] for e in events if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job]


def test_qemu_qmp_client_negotiates_runs_commands_and_receives_events(ours: OurDaemon, tmp_path: Path) -> None:
    from qemu.qmp import EventListener, ExecuteError, QMPClient

    async def main() -> None:
        client = QMPClient("e1")
        await asyncio.wait_for(client.connect(str(ours.qmp_path)), TIMEOUT)
        try:
            version: Any = await client.execute("query-version")
            assert version["package"].startswith("nbd-backup ")
            commands: Any = await client.execute("query-commands")
            names = {c["name"] for c in commands}
            assert {"qmp_capabilities", "drive-backup", "transaction", "quit"} <= names
            with pytest.raises(ExecuteError) as info:
                await client.execute("block-job-pause", {"device": "nope"})
            assert info.value.error_class == "DeviceNotActive"
            with pytest.raises(ExecuteError) as info:
                await client.execute("query-block-jobs", {"bogus": 1})
            assert info.value.error_class == "GenericError"

            listener = EventListener()
            events: list[Json] = []
            with client.listen(listener):
                await asyncio.to_thread(start_small_backup, ours.qmp_path, tmp_path, "qj")
                while job_statuses_from(events, "qj")[-1:] != ["null"]:
                    event = await asyncio.wait_for(listener.get(), TIMEOUT)
                    assert {"event", "timestamp", "data"} <= event.keys()
                    events.append(dict(event))
            assert job_statuses_from(events, "qj")[:2] == ["created", "running"]
            completed = [e for e in events if e["event"] == "BLOCK_JOB_COMPLETED"]
            assert len(completed) == 1 and "error" not in completed[0]["data"]
        finally:
            await client.disconnect()

    asyncio.run(main())


def test_qemu_legacy_client_and_a_second_client_both_get_events(ours: OurDaemon, tmp_path: Path) -> None:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    legacy = QEMUMonitorProtocol(str(ours.qmp_path))
    other = Raw(ours.qmp_path)
    try:
        legacy.connect(negotiate=True)
        other.negotiate()
        version: Any = legacy.cmd("query-version")
        assert version["package"].startswith("nbd-backup")
        assert legacy.cmd_raw("query-block-jobs") == {"return": []}
        bad = legacy.cmd_obj({"execute": "block-job-cancel", "arguments": {"device": 1}, "id": "x"})
        assert bad == {
            "id": "x",
            "error": {"class": "GenericError", "desc": "Invalid parameter type for 'device', expected: string"},
        }
        start_small_backup(ours.qmp_path, tmp_path, "lj")
        seen: list[Json] = []
        while job_statuses_from(seen, "lj")[-1:] != ["null"]:
            event = legacy.pull_event(wait=TIMEOUT)
            assert event is not None
            seen.append(event)
        other_seen: list[Json] = []
        while job_statuses_from(other_seen, "lj")[-1:] != ["null"]:
            other_seen.append(other.recv())
        assert job_statuses_from(seen, "lj") == job_statuses_from(other_seen, "lj")
        assert [e["event"] for e in seen] == [e["event"] for e in other_seen]
    finally:
        legacy.close()
        other.close()


def test_qmp_shell_connects_and_runs_a_command(ours: OurDaemon, tmp_path: Path) -> None:
    script = "query-version\nblock-job-set-speed device=nope speed=5\nquery-block-jobs\n"
    proc = qmp_shell(ours, script, tmp_path, "-p")
    assert proc.returncode == 0, proc.stderr
    assert '"package": "nbd-backup' in proc.stdout
    assert '"class": "DeviceNotActive"' in proc.stdout
    assert '"return": []' in proc.stdout


# --- nbd-backup qmp ------------------------------------------------------------------------------


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nbd_backup_argv(*args), capture_output=True, text=True, timeout=timeout)


def test_cli_runs_commands_and_prints_replies(ours: OurDaemon, tmp_path: Path) -> None:
    addr = f"unix:{ours.qmp_path}"
    proc = cli("qmp", "--qmp", addr, "query-version")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["package"].startswith("nbd-backup ")

    proc = cli("qmp", "--qmp", addr, "blockdev-add", "driver=null-co", "node-name=cli0", "size=1048576")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {}
    proc = cli("qmp", "--qmp", addr, "--compact", "query-named-block-nodes")
    assert "cli0" in proc.stdout and proc.stdout.count("\n") == 1

    proc = cli("qmp", "--qmp", addr, "block-job-set-speed", '{"device": "nope", "speed": 1}')
    assert proc.returncode == 1
    assert proc.stderr.strip() == "ERROR DeviceNotActive: Block job 'nope' not found"

    proc = cli("qmp", "--qmp", addr, "--raw", "blockdev-del", "node-name=nope")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"]["class"] in ("GenericError", "DeviceNotFound")

    proc = cli("qmp", "--qmp", addr, "blockdev-add", "driver=null-co", "node-name=7")
    assert proc.returncode == 1 and "expected: string" in proc.stderr  # JSON values are JSON: 7 is a number


def test_cli_follows_events(ours: OurDaemon, tmp_path: Path) -> None:
    addr = f"unix:{ours.qmp_path}"
    assert cli("qmp", "--qmp", addr, "blockdev-add", "driver=null-co", "node-name=ev0", "size=1048576").returncode == 0
    target = tmp_path / "ev0.img"
    proc = cli(
        "qmp",
        "--qmp",
        addr,
        "--compact",
        "--events",
        "--until",
        "BLOCK_JOB_COMPLETED",
        "drive-backup",
        "job-id=evjob",
        "device=ev0",
        f"target={target}",
        "sync=full",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert json.loads(lines[0]) == {}
    events = [json.loads(line) for line in lines[1:]]
    assert events[-1]["event"] == "BLOCK_JOB_COMPLETED" and events[-1]["data"]["device"] == "evjob"
    statuses = [e["data"]["status"] for e in events if e["event"] == "JOB_STATUS_CHANGE"]
    assert statuses[:2] == ["created", "running"]


def test_cli_connection_and_usage_errors(tmp_path: Path) -> None:
    proc = cli("qmp", "--qmp", f"unix:{tmp_path}/none.sock", "query-version")
    assert proc.returncode == 2 and "cannot connect" in proc.stderr
    proc = cli("qmp", "--qmp", "bogus", "query-version")
    assert proc.returncode == 2 and "bad QMP address" in proc.stderr
    proc = cli("qmp", "--qmp", f"unix:{tmp_path}/none.sock", "query-version", "novalue")
    assert proc.returncode == 2 and "key=value" in proc.stderr
    proc = cli("qmp", "--help")
    assert proc.returncode == 0 and "drive-backup" in proc.stdout and "examples:" in proc.stdout


def test_cli_timeout_on_a_silent_server(tmp_path: Path) -> None:
    """A socket that accepts but never greets: --timeout bounds the wait."""
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(path))
        srv.listen()
        proc = cli("qmp", "--qmp", f"unix:{path}", "--timeout", "1", "query-version")
        assert proc.returncode == 2 and "no answer" in proc.stderr


def test_quit_replies_then_the_daemon_exits_cleanly(tmp_path: Path) -> None:
    with our_daemon(tmp_path) as daemon:
        other = Raw(daemon.qmp_path)
        other.negotiate()
        proc = cli("qmp", "--qmp", f"unix:{daemon.qmp_path}", "quit")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {}
        assert daemon.proc.wait(TIMEOUT) == 0
        with pytest.raises(ConnectionError):  # the other client is disconnected, not left hanging
            other.recv()
        other.close()
        assert not daemon.qmp_path.exists()
