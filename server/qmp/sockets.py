"""QAPI's ``SocketAddress`` (flat: ``blockdev-add`` driver ``nbd``'s ``server``) and
``SocketAddressLegacy`` (each branch under ``data``: ``nbd-server-start``'s ``addr``), from one table of
branches, and the checks both commands make on what they hold."""

from __future__ import annotations

from typing import Any

from server.qmp.schema import Enum, Union
from server.registry import generic

SOCKET_ADDRESS_TYPE = Enum("SocketAddressType", ["inet", "unix", "vsock", "fd"])

_BRANCHES: dict[str, dict[str, Any]] = {
    "inet": {
        "host": "str",
        "port": "str",
        "*numeric": "bool",
        "*to": "uint16",
        "*ipv4": "bool",
        "*ipv6": "bool",
        "*keep-alive": "bool",
    },
    "unix": {"path": "str", "*abstract": "bool", "*tight": "bool"},
    "vsock": {"cid": "str", "port": "str"},
    "fd": {"str": "str"},
}

SOCKET_ADDRESS = Union("SocketAddress", {"type": SOCKET_ADDRESS_TYPE}, "type", _BRANCHES)
SOCKET_ADDRESS_LEGACY = Union(
    "SocketAddressLegacy",
    {"type": SOCKET_ADDRESS_TYPE},
    "type",
    {kind: {"data": members} for kind, members in _BRANCHES.items()},
)


def port_number(text: str) -> int:
    """An inet branch's ``port`` (a string in QAPI) as a number, refused with QEMU's text."""
    try:
        return int(text)
    except ValueError:
        raise generic(f"Invalid port '{text}'") from None


def unix_path(data: dict[str, Any]) -> str:
    """A unix branch's ``path``; abstract sockets (Linux's nameless namespace) are not supported."""
    if data.get("abstract"):
        raise generic("abstract unix sockets are not supported")
    path: str = data["path"]
    return path
