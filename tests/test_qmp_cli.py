"""``nbd-backup qmp`` argument building (qmp-shell's key=value rules) and the client's address parsing."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from server.addresses import parse_monitor_address
from server.cli import build_parser
from server.commands.qmp import ArgumentError, build_arguments


def test_key_values_are_json_when_they_parse() -> None:
    assert build_arguments(["device=disk0", "speed=5", "force=true", "x=null", 'l=[1,"a"]', "s=5M", 'q="12"']) == {
        "device": "disk0",
        "speed": 5,
        "force": True,
        "x": None,
        "l": [1, "a"],
        "s": "5M",
        "q": "12",
    }


def test_dotted_keys_nest() -> None:
    assert build_arguments(["addr.type=unix", "addr.data.path=/run/n.sock", "empty="]) == {
        "addr": {"type": "unix", "data": {"path": "/run/n.sock"}},
        "empty": "",
    }


def test_json_object_argument() -> None:
    assert build_arguments(['{"device": "d", "speed": 0}']) == {"device": "d", "speed": 0}
    assert build_arguments([]) is None


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["novalue"], "expected key=value"),
        (["=1"], "expected key=value"),
        (["a=1", "a=2"], "given twice"),
        (["a=1", "a.b=2"], "both a value and an object"),
        (["a.b=1", "a=2"], "given twice"),
        (["{bad json"], "not valid JSON"),
        (["[1]", "x=1"], "expected key=value"),
    ],
)
def test_malformed(items: list[str], message: str) -> None:
    with pytest.raises(ArgumentError, match=message):
        build_arguments(items)


def test_json_array_alone_is_not_arguments() -> None:
    with pytest.raises(ArgumentError):
        build_arguments(["[1]"])


def test_addresses() -> None:
    assert parse_monitor_address("unix:/run/q.sock") == ("unix", "/run/q.sock")
    assert parse_monitor_address("/run/q.sock") == ("unix", "/run/q.sock")
    assert parse_monitor_address("tcp:127.0.0.1:4444") == ("tcp", ("127.0.0.1", 4444))
    assert parse_monitor_address("tcp:[::1]:4444") == ("tcp", ("::1", 4444))
    for bad in ("tcp:host", "tcp::1", "bogus", "tcp:h:99999", "unix:"):
        with pytest.raises(ValueError):
            parse_monitor_address(bad)


def test_subcommand_is_registered() -> None:
    args = build_parser().parse_args(["qmp", "--qmp", "unix:/x", "query-block-jobs"])
    assert args.command == "qmp" and args.qmp_command == "query-block-jobs" and args.func is not None


async def test_run_qmp_prints_reply_then_follows_events(tmp_path: Path) -> None:
    import argparse

    from backup.events import Event
    from server.commands.qmp import run_qmp
    from server.qmp import CommandRegistry, QmpServer

    srv = QmpServer(CommandRegistry(), object(), version="2.3.4")
    await srv.listen_unix(tmp_path / "s")
    out, err = io.StringIO(), io.StringIO()
    args = argparse.Namespace(
        qmp=f"unix:{tmp_path}/s",
        qmp_command="query-version",
        arguments=[],
        events=True,
        until="DONE",
        raw=False,
        compact=True,
        timeout=None,
    )
    try:
        task = asyncio.ensure_future(run_qmp(args, out, err))
        while not task.done():  # events reach only negotiated clients: repeat until the CLI has one
            srv.broadcast(Event("TICK", {"n": 1}, 1.0))
            srv.broadcast(Event("DONE", {}, 2.0))
            await asyncio.wait([task], timeout=0.05)
        assert task.result() == 0
    finally:
        await srv.stop()
    lines = out.getvalue().splitlines()
    assert json.loads(lines[0]) == {"qemu": {"micro": 4, "minor": 3, "major": 2}, "package": "nbd-backup 2.3.4"}
    assert json.loads(lines[-1])["event"] == "DONE"
    assert err.getvalue() == ""


async def test_run_qmp_error_reply(tmp_path: Path) -> None:
    import argparse

    from server.commands.qmp import run_qmp
    from server.qmp import CommandRegistry, QmpServer

    srv = QmpServer(CommandRegistry(), object())
    await srv.listen_unix(tmp_path / "s")
    out, err = io.StringIO(), io.StringIO()
    args = argparse.Namespace(
        qmp=f"unix:{tmp_path}/s",
        qmp_command="query-version",
        arguments=["x=1"],
        events=False,
        until=None,
        raw=True,
        compact=True,
        timeout=None,
    )
    try:
        assert await asyncio.wait_for(run_qmp(args, out, err), 10) == 1
    finally:
        await srv.stop()
    assert err.getvalue() == "ERROR GenericError: Parameter 'x' is unexpected\n"
    assert json.loads(out.getvalue())["error"]["class"] == "GenericError"
