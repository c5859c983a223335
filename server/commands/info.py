"""``nbd-backup info URI``: what an NBD server says about an export (like ``nbdinfo``).

Prints size, transmission flags, block sizes and meta contexts; ``--list`` does it for every export the
server lists; ``--map`` prints the allocation map (``base:allocation``), ``--map=CONTEXT`` the map of
another meta context the export offers (``qemu:dirty-bitmap:NAME``: which blocks changed since the bitmap
started; ``qemu:allocation-depth``: where in a backing chain each block lives), in nbdinfo's words.
``--json`` uses the key names of ``nbdinfo --json``, so scripts written for one read the other.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from nbd import constants as c
from nbd.client import ExportInfo, NbdClient
from nbd.errors import NbdError
from nbd.meta import DIRTY_BITMAP_PREFIX
from nbd.runs import append_run
from nbd.uri import NbdUri, parse_uri

MAP_SPAN = 1 << 30

_FLAG_KEYS = (
    ("is_rotational", c.TransmissionFlag.ROTATIONAL),
    ("is_read_only", c.TransmissionFlag.READ_ONLY),
    ("can_cache", c.TransmissionFlag.SEND_CACHE),
    ("can_df", c.TransmissionFlag.SEND_DF),
    ("can_fast_zero", c.TransmissionFlag.SEND_FAST_ZERO),
    ("can_flush", c.TransmissionFlag.SEND_FLUSH),
    ("can_fua", c.TransmissionFlag.SEND_FUA),
    ("can_multi_conn", c.TransmissionFlag.CAN_MULTI_CONN),
    ("can_trim", c.TransmissionFlag.SEND_TRIM),
    ("can_zero", c.TransmissionFlag.SEND_WRITE_ZEROES),
)


def export_record(info: ExportInfo, uri: NbdUri) -> dict[str, Any]:
    """One export as ``nbdinfo --json`` spells it (without ``content``, which needs file(1))."""
    record: dict[str, Any] = {"export-name": info.name}
    if info.description:
        record["description"] = info.description
    record["uri"] = str(uri.with_export(info.name))
    record["contexts"] = list(info.contexts)
    for key, flag in _FLAG_KEYS:
        record[key] = bool(info.flags & flag)
    if info.block_minimum is not None:
        record["block_size_minimum"] = info.block_minimum
        record["block_size_preferred"] = info.block_preferred
        record["block_size_maximum"] = info.block_maximum
    record["export-size"] = info.size
    return record


def describe_dirty(flags: int) -> str:
    """``qemu:dirty-bitmap:…`` flags as nbdinfo words them."""
    return {0: "clean", 1: "dirty"}.get(flags, f"unknown({flags:#x})")


def describe_depth(depth: int) -> str:
    """``qemu:allocation-depth`` values as nbdinfo words them."""
    return {0: "absent", 1: "local"}.get(depth, f"backing depth {depth}")


def describer(context: str) -> Callable[[int], str]:
    """How ``--map`` words the flags of ``context``."""
    if context == c.META_BASE_ALLOCATION:
        return describe_state
    if context.startswith(DIRTY_BITMAP_PREFIX):
        return describe_dirty
    if context == "qemu:allocation-depth":
        return describe_depth
    return str


def describe_state(flags: int) -> str:
    """``nbdinfo --map``'s words for ``base:allocation`` flags."""
    words = []
    if flags & c.State.HOLE:
        words.append("hole")
    if flags & c.State.ZERO:
        words.append("zero")
    unknown = flags & ~int(c.State.HOLE | c.State.ZERO)
    if unknown:
        words.append(f"unknown({unknown:#x})")
    return ",".join(words) or "data"


async def context_map(client: NbdClient, context: str = c.META_BASE_ALLOCATION) -> list[dict[str, Any]]:
    """The whole export's map in ``context`` (``base:allocation`` unless the client was connected with
    another ``map_context``), merged where adjacent runs share flags."""
    runs: list[tuple[int, int]] = []
    offset, size = 0, client.size
    while offset < size:
        span = min(size - offset, MAP_SPAN)
        if context == c.META_BASE_ALLOCATION:
            answer = [(extent.length, extent.flags) for extent in await client.block_status(offset, span)]
        else:
            answer = await client.context_map(offset, span)
        for length, flags in answer:
            append_run(runs, length, flags)
            offset += length
    describe = describer(context)
    entries: list[dict[str, Any]] = []
    offset = 0
    for length, flags in runs:
        entries.append({"offset": offset, "length": length, "type": flags, "description": describe(flags)})
        offset += length
    return entries


async def gather(args: argparse.Namespace) -> dict[str, Any]:
    uri = parse_uri(args.uri)
    timeout = args.timeout
    names: list[tuple[str, str]]
    if args.list:
        names = [(e.name, e.description) for e in await NbdClient.list_exports(uri, connect_timeout=timeout)]
    else:
        names = [(uri.export, "")]
    result: dict[str, Any] = {"protocol": "newstyle-fixed", "TLS": uri.tls is not None}
    exports: list[dict[str, Any]] = []
    context = args.map
    for name, description in names:
        client = await NbdClient.connect(
            uri.with_export(name),
            connections=1,
            connect_timeout=timeout,
            map_context=context if context not in (None, c.META_BASE_ALLOCATION) else None,
        )
        try:
            record = export_record(client.export_info, uri)
            if description and "description" not in record:
                record["description"] = description
            result["structured"] = client.export_info.structured
            if context:
                record["map"] = await context_map(client, context)
            exports.append(record)
        finally:
            await client.close()
    result.setdefault("structured", False)
    result["exports"] = exports
    return result


def format_text(result: dict[str, Any], *, show_map: bool) -> str:
    structured = "using structured packets" if result["structured"] else "using simple packets"
    tls = "with TLS" if result["TLS"] else "without TLS"
    lines = [f"protocol: {result['protocol']} {tls}, {structured}"]
    for export in result["exports"]:
        lines.append(f"export={json.dumps(export['export-name'])}:")
        if "description" in export:
            lines.append(f"\tdescription: {export['description']}")
        lines.append(f"\texport-size: {export['export-size']}")
        lines.append(f"\turi: {export['uri']}")
        if export["contexts"]:
            lines.append("\tcontexts:")
            lines.extend(f"\t\t{context}" for context in export["contexts"])
        for key, _ in _FLAG_KEYS:
            lines.append(f"\t{key}: {str(export[key]).lower()}")
        for key in ("block_size_minimum", "block_size_preferred", "block_size_maximum"):
            if key in export:
                lines.append(f"\t{key}: {export[key]}")
        if show_map:
            lines.append("\tmap:")
            for entry in export["map"]:
                lines.append(
                    f"\t{entry['offset']:>16} {entry['length']:>16} {entry['type']:>4}  {entry['description']}"
                )
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show what an NBD server says about an export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "uri", metavar="URI", nargs="?", help="nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, …"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (nbdinfo --json key names)")
    parser.add_argument("-L", "--list", action="store_true", help="every export the server lists")
    parser.add_argument(
        "--map",
        nargs="?",
        const=c.META_BASE_ALLOCATION,
        metavar="CONTEXT",
        help="include the map of a meta context: base:allocation (the default), qemu:dirty-bitmap:NAME,"
        " qemu:allocation-depth",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="connect timeout in seconds (30)")
    parser.set_defaults(func=main)


def settle_map_argument(args: argparse.Namespace) -> str | None:
    """``--map`` takes an optional CONTEXT (nbdinfo spells it ``--map=CONTEXT``), so ``--map URI`` puts the
    URI there: a context never contains ``://``, a URI always does. Returns an error, or None."""
    if args.map is not None and "://" in args.map and args.uri is None:
        args.uri, args.map = args.map, c.META_BASE_ALLOCATION
    if args.uri is None:
        return "the URI is missing"
    return None


def main(args: argparse.Namespace) -> int:
    from nbd.loop import run

    problem = settle_map_argument(args)
    if problem is not None:
        print(f"nbd-backup info: {problem}", file=sys.stderr)
        return 2

    try:
        result = run(gather(args))
    except (OSError, NbdError, TimeoutError) as exc:
        print(f"nbd-backup info: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_text(result, show_map=bool(args.map)))
    return 0
