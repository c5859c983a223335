"""``nbd-backup qmp`` argument building (qmp-shell's key=value rules) and the client's address parsing."""

from __future__ import annotations

import pytest

from server.cli import build_parser
from server.commands.qmp import ArgumentError, build_arguments
from server.qmp.client import parse_address


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
    assert parse_address("unix:/run/q.sock") == ("unix", "/run/q.sock")
    assert parse_address("/run/q.sock") == ("unix", "/run/q.sock")
    assert parse_address("tcp:127.0.0.1:4444") == ("tcp", ("127.0.0.1", 4444))
    assert parse_address("tcp:[::1]:4444") == ("tcp", ("::1", 4444))
    for bad in ("tcp:host", "tcp::1", "bogus", "tcp:h:99999", "unix:"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_subcommand_is_registered() -> None:
    args = build_parser().parse_args(["qmp", "--qmp", "unix:/x", "query-block-jobs"])
    assert args.command == "qmp" and args.qmp_command == "query-block-jobs" and args.func is not None
