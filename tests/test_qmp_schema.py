"""QAPI-style argument validation: every message below was observed from qemu-storage-daemon 7.2."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.errors import QmpError
from server.qmp.schema import Alternate, Enum, List, Struct, Union, resolve, resolve_arguments, validate_arguments

SYNC = Enum("MirrorSyncMode", ["top", "full", "none", "incremental", "bitmap"])
ON_ERROR = Enum("BlockdevOnError", ["report", "ignore", "enospc", "stop", "auto"])
FILE = {"filename": "str", "*aio": Enum("BlockdevAioOptions", ["threads", "native", "io_uring"])}
CACHE = {"*direct": "bool", "*no-flush": "bool"}
BLOCKDEV_OPTIONS = Union(
    "BlockdevOptions",
    {
        "driver": Enum("BlockdevDriver", ["file", "raw", "qcow2", "nbd", "null-co"]),
        "*node-name": "str",
        "*cache": CACHE,
    },
    "driver",
    {"file": FILE, "raw": {}},
)
BLOCKDEV_REF = Alternate("BlockdevRef", [BLOCKDEV_OPTIONS, "str"])
BLOCKDEV_OPTIONS.set_variant("raw", {"file": BLOCKDEV_REF})

DRIVE_BACKUP = Struct(
    "DriveBackup",
    {
        "*job-id": "str",
        "device": "str",
        "target": "str",
        "*format": "str",
        "sync": SYNC,
        "*speed": "int",
        "*on-target-error": ON_ERROR,
        "*auto-finalize": "bool",
    },
)
TRANSACTION_ACTION = Union(
    "TransactionAction",
    {"type": Enum("TransactionActionKind", ["abort", "drive-backup"])},
    "type",
    {"abort": {"data": {}}, "drive-backup": {"data": DRIVE_BACKUP}},
)
TRANSACTION = {"actions": [TRANSACTION_ACTION]}
INET = {"host": "str", "port": "str"}
NBD_SERVER_START = {
    "addr": Union(
        "SocketAddressLegacy",
        {"type": Enum("SocketAddressType", ["inet", "unix"])},
        "type",
        {"inet": {"data": INET}, "unix": {"data": {"path": "str"}}},
    ),
    "*max-connections": "uint32",
}
SET_SPEED = {"device": "str", "speed": "int"}
EXPORT_ADD = {
    "type": "str",
    "id": "str",
    "node-name": "str",
    "*name": "str",
    "*bitmaps": [Alternate("BlockDirtyBitmapOrStr", ["str", {"node": "str", "name": "str"}])],
}


def check(spec: Any, args: Any) -> dict[str, Any]:
    return validate_arguments(resolve_arguments(spec), args)


def refused(spec: Any, args: Any) -> str:
    with pytest.raises(QmpError) as info:
        check(spec, args)
    assert info.value.error_class == "GenericError"
    return info.value.desc


@pytest.mark.parametrize(
    ("spec", "args", "desc"),
    [
        (SET_SPEED, {"device": 1, "speed": 1}, "Invalid parameter type for 'device', expected: string"),
        (SET_SPEED, {"speed": 1}, "Parameter 'device' is missing"),
        (SET_SPEED, {"speed": 1, "bogus": 2}, "Parameter 'device' is missing"),
        (SET_SPEED, {"device": "x", "speed": "1"}, "Invalid parameter type for 'speed', expected: integer"),
        (SET_SPEED, {"device": "x", "speed": 1.5}, "Invalid parameter type for 'speed', expected: integer"),
        (SET_SPEED, {"device": "x", "speed": 1.0}, "Invalid parameter type for 'speed', expected: integer"),
        (SET_SPEED, {"device": "x", "speed": 2**63}, "Invalid parameter type for 'speed', expected: integer"),
        (SET_SPEED, {"device": "x", "speed": 1, "q": 1}, "Parameter 'q' is unexpected"),
        ({"*force": "bool"}, {"force": 1}, "Invalid parameter type for 'force', expected: boolean"),
        (BLOCKDEV_OPTIONS, {"node-name": "a"}, "Parameter 'driver' is missing"),
        (BLOCKDEV_OPTIONS, {"driver": "foo"}, "Parameter 'driver' does not accept value 'foo'"),
        (BLOCKDEV_OPTIONS, {"driver": "file", "node-name": "a"}, "Parameter 'filename' is missing"),
        (BLOCKDEV_OPTIONS, {"driver": "raw", "file": {"driver": "file"}}, "Parameter 'file.filename' is missing"),
        (BLOCKDEV_OPTIONS, {"driver": "raw", "file": 5}, "Invalid parameter type for 'file', expected: BlockdevRef"),
        (
            BLOCKDEV_OPTIONS,
            {"driver": "raw", "file": None},
            "Invalid parameter type for 'file', expected: BlockdevRef",
        ),
        (
            BLOCKDEV_OPTIONS,
            {"driver": "raw", "file": {"driver": "file", "filename": "/x", "bogus": 1}},
            "Parameter 'file.bogus' is unexpected",
        ),
        (
            BLOCKDEV_OPTIONS,
            {"driver": "raw", "file": {"driver": "file", "filename": "/x", "aio": "x"}},
            "Parameter 'aio' does not accept value 'x'",
        ),
        (
            BLOCKDEV_OPTIONS,
            {"driver": "raw", "file": {"driver": "file", "filename": "/x", "cache": {"direct": "yes"}}},
            "Invalid parameter type for 'file.cache.direct', expected: boolean",
        ),
        (TRANSACTION, {"actions": [{"type": "abort"}, {"type": "nope"}]}, "Parameter 'actions[0].data' is missing"),
        (TRANSACTION, {"actions": {}}, "Invalid parameter type for 'actions', expected: array"),
        (
            TRANSACTION,
            {"actions": [{"type": "drive-backup", "data": {"device": "x"}}]},
            "Parameter 'actions[0].data.target' is missing",
        ),
        (TRANSACTION, {"actions": [1]}, "Invalid parameter type for 'actions[0]', expected: object"),
        (
            TRANSACTION,
            {"actions": [{"type": "abort", "data": {}}, {"type": "nope"}]},
            "Parameter 'type' does not accept value 'nope'",
        ),
        (
            DRIVE_BACKUP,
            {"device": "x", "target": "/tmp/x", "sync": "bogus"},
            "Parameter 'sync' does not accept value 'bogus'",
        ),
        (
            DRIVE_BACKUP,
            {"device": "x", "target": "/tmp/x", "sync": "full", "format": None},
            "Invalid parameter type for 'format', expected: string",
        ),
        (
            NBD_SERVER_START,
            {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": 1}}},
            "Invalid parameter type for 'addr.data.port', expected: string",
        ),
        (
            NBD_SERVER_START,
            {"addr": {"type": "inet", "data": {"host": "127.0.0.1"}}},
            "Parameter 'addr.data.port' is missing",
        ),
        (
            NBD_SERVER_START,
            {"addr": {"type": "unix", "data": {"path": "/p"}}, "max-connections": -1},
            "Parameter 'max-connections' expects uint32_t",
        ),
        (
            NBD_SERVER_START,
            {"addr": {"type": "unix", "data": {"path": "/p"}}, "max-connections": 2**32},
            "Parameter 'max-connections' expects uint32_t",
        ),
        (
            EXPORT_ADD,
            {"type": "nbd", "id": "e", "node-name": "n", "name": None},
            "Invalid parameter type for 'name', expected: string",
        ),
        (
            EXPORT_ADD,
            {"type": "nbd", "id": "e", "node-name": "n", "bitmaps": [1]},
            "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr",
        ),
        (
            EXPORT_ADD,
            {"type": "nbd", "id": "e", "node-name": "n", "bitmaps": "a"},
            "Invalid parameter type for 'bitmaps', expected: array",
        ),
    ],
)
def test_refusals_match_qemu(spec: Any, args: Any, desc: str) -> None:
    assert refused(spec, args) == desc


def test_accepts_and_copies() -> None:
    args = {"actions": [{"type": "drive-backup", "data": {"device": "d", "target": "/t", "sync": "full"}}]}
    out = check(TRANSACTION, args)
    assert out == args
    assert out is not args and out["actions"][0] is not args["actions"][0]


def test_alternate_picks_branch_by_json_kind() -> None:
    assert check(BLOCKDEV_OPTIONS, {"driver": "raw", "file": "node0"}) == {"driver": "raw", "file": "node0"}
    nested = {"driver": "raw", "file": {"driver": "file", "filename": "/x", "aio": "threads"}}
    assert check(BLOCKDEV_OPTIONS, nested) == nested


def test_str_or_null() -> None:
    spec = {"*backing": Alternate("StrOrNull", ["str", "null"])}
    assert check(spec, {"backing": None}) == {"backing": None}
    assert check(spec, {"backing": "n"}) == {"backing": "n"}
    assert refused(spec, {"backing": 3}) == "Invalid parameter type for 'backing', expected: StrOrNull"


def test_unsigned_wraps_negative_int64_like_qemu() -> None:
    assert check({"s": "size"}, {"s": -1}) == {"s": 2**64 - 1}
    assert check({"s": "uint64"}, {"s": 2**64 - 1}) == {"s": 2**64 - 1}
    assert refused({"s": "uint64"}, {"s": "1"}) == "Parameter 's' expects uint64"
    assert refused({"s": "uint64"}, {"s": 2**64}) == "Parameter 's' expects uint64"


def test_ranges_in_lists_name_null() -> None:
    assert refused({"l": ["uint8"]}, {"l": [1, 256]}) == "Parameter 'null' expects uint8_t"
    assert refused({"l": [SYNC]}, {"l": ["x"]}) == "Parameter 'null' does not accept value 'x'"
    assert refused({"l": ["str"]}, {"l": ["a", 2]}) == "Invalid parameter type for 'l[1]', expected: string"


def test_number_accepts_int_and_float_not_bool() -> None:
    assert check({"n": "number"}, {"n": 1}) == {"n": 1.0}
    assert refused({"n": "number"}, {"n": True}) == "Invalid parameter type for 'n', expected: number"
    assert refused({"n": "int"}, {"n": False}) == "Invalid parameter type for 'n', expected: integer"


def test_union_branch_without_members() -> None:
    u = Union("U", {"kind": Enum("K", ["a", "b"])}, "kind", {"a": {"x": "int"}})
    assert check(u, {"kind": "b"}) == {"kind": "b"}
    assert refused(u, {"kind": "b", "x": 1}) == "Parameter 'x' is unexpected"


def test_bad_specs_are_programming_errors() -> None:
    with pytest.raises(ValueError):
        resolve("float128")
    with pytest.raises(ValueError):
        Alternate("A", ["str", Enum("E", ["x"])])  # two string branches
    with pytest.raises(ValueError):
        Union("U", {"*kind": "str"}, "kind", {})
    with pytest.raises(ValueError):
        resolve_arguments(["str"])
    assert isinstance(resolve(["int"]), List)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=10,
)


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(json_values)
def test_validation_never_raises_anything_but_qmp_errors(value: Any) -> None:
    for spec in (TRANSACTION, NBD_SERVER_START, BLOCKDEV_OPTIONS, EXPORT_ADD, DRIVE_BACKUP):
        for args in (value, {"actions": value}, {"addr": value}, {"driver": "raw", "file": value}):
            try:
                check(spec, args)
            except QmpError as exc:
                assert exc.error_class == "GenericError"
