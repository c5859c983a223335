"""``nbd-backup qmp``: run one QMP command on a running daemon (or QEMU) and print the reply.

Arguments are ``key=value`` pairs as in qmp-shell (values are JSON when they parse as JSON, plain
strings otherwise; dotted keys build nested objects) or a single JSON object. ``--events`` then
follows the monitor's events, one JSON object per line, which makes the command usable in scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, TextIO

from nbd.loop import run
from server.addresses import parse_monitor_address
from server.errors import ArgumentError
from server.qmp.client import QmpClient, QmpClientError, QmpCommandError

DESCRIPTION = """\
Run one QMP command on an nbd-backup daemon (or on QEMU / qemu-storage-daemon) and print its reply.
The commands and their arguments are QEMU's (see the list below and QEMU's QMP reference)."""

EXAMPLES = """\
arguments:
  key=value ...   values are JSON when they parse as JSON (numbers, true/false/null, "quoted",
                  [lists], {objects}), plain strings otherwise; dotted keys nest:
                  addr.type=unix addr.data.path=/run/nbd.sock  →  {"addr": {"type": "unix", "data": {...}}}
  '{JSON}'        or the whole arguments object as one JSON argument

examples:
  nbd-backup qmp --qmp unix:/run/nbd-backup/qmp.sock query-block-jobs
  nbd-backup qmp --qmp unix:qmp.sock blockdev-add driver=raw node-name=disk0 file.driver=file file.filename=/vm/d0.img
  nbd-backup qmp --qmp unix:qmp.sock drive-backup device=disk0 target=/backups/disk0.img sync=full speed=10485760
  nbd-backup qmp --qmp tcp:127.0.0.1:4444 block-job-set-speed '{"device": "disk0", "speed": 0}'
  nbd-backup qmp --qmp unix:qmp.sock nbd-server-start addr.type=inet addr.data.host=127.0.0.1 addr.data.port=10809
  nbd-backup qmp --qmp unix:qmp.sock --events --until BLOCK_JOB_COMPLETED   # follow events
  nbd-backup qmp --qmp unix:qmp.sock --raw query-version                    # the whole reply message

output: the command's "return" value as JSON (indented unless --compact), or "ERROR CLASS: description"
on stderr. exit status: 0 on success, 1 when the command returned an error, 2 when the monitor
could not be reached or the arguments are malformed."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "qmp",
        help="run one QMP command on a running daemon and print the reply",
        description=DESCRIPTION,
        epilog=_command_list() + "\n\n" + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--qmp", required=True, metavar="ADDR", help="the monitor: unix:PATH or tcp:HOST:PORT (as given to serve)"
    )
    parser.add_argument("qmp_command", nargs="?", metavar="COMMAND", help="the QMP command (e.g. query-block-jobs)")
    parser.add_argument("arguments", nargs="*", metavar="ARG", help="key=value pairs or one JSON object")
    parser.add_argument("--events", action="store_true", help="after the command (if any), print events as they come")
    parser.add_argument("--until", metavar="EVENT", help="with --events: stop after the first event of this name")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="give up after this long")
    parser.add_argument("--raw", action="store_true", help="print the whole reply message, not just 'return'")
    parser.add_argument("--compact", action="store_true", help="one-line JSON output")
    parser.set_defaults(func=main)


def _command_list() -> str:
    """The daemon's commands with their one-line summaries (built from the command registry)."""
    try:
        from server.daemon import build_commands
        from server.qmp.server import QmpServer

        registry = build_commands()
        QmpServer(registry, None)  # adds the core commands
        lines = ["commands of nbd-backup serve (QEMU's names and arguments):"]
        lines.append("  qmp_capabilities".ljust(28) + "negotiate (done for you by this tool)")
        for cmd in sorted(registry, key=lambda c: c.name):
            lines.append(f"  {cmd.name}".ljust(28) + cmd.summary)
        return "\n".join(lines)
    except Exception as exc:  # the help must work even if a command module is broken
        return f"(the command list is unavailable: {exc})"


def parse_value(text: str) -> Any:
    """qmp-shell's rule: JSON if it parses as JSON, otherwise the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def build_arguments(items: list[str]) -> dict[str, Any] | None:
    """``["a=1", "b.c=x"]`` → ``{"a": 1, "b": {"c": "x"}}``; ``['{"a": 1}']`` → ``{"a": 1}``; ``[]`` → None."""
    if not items:
        return None
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            value = json.loads(items[0])
        except ValueError as exc:
            raise ArgumentError(f"arguments are not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ArgumentError("JSON arguments must be an object")
        return value
    args: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ArgumentError(f"expected key=value, got {item!r}")
        parts = key.split(".")
        node = args
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ArgumentError(f"cannot use '{'.'.join(parts[: i + 1])}' as both a value and an object")
            node = child
        leaf = parts[-1]
        if leaf in node:
            what = "an object" if isinstance(node[leaf], dict) else "a value"
            raise ArgumentError(f"'{key}' given twice (already {what})")
        node[leaf] = parse_value(raw)
    return args


def _dump(obj: Any, compact: bool) -> str:
    return json.dumps(obj, ensure_ascii=False) if compact else json.dumps(obj, indent=2, ensure_ascii=False)


async def run_qmp(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    arguments = build_arguments(args.arguments)
    client = await QmpClient.connect(args.qmp)
    status = 0
    try:
        if args.qmp_command:
            reply = await client.execute_raw(args.qmp_command, arguments)
            if "error" in reply:
                error = reply["error"]
                print(f"ERROR {error.get('class')}: {error.get('desc')}", file=err)
                if args.raw:
                    print(_dump(reply, args.compact), file=out)
                status = 1
            else:
                print(_dump(reply if args.raw else reply.get("return"), args.compact), file=out)
            out.flush()
        if args.events and status == 0:
            while True:
                event = await client.next_event()
                print(json.dumps(event, ensure_ascii=False), file=out, flush=True)
                if args.until and event.get("event") == args.until:
                    break
    finally:
        await client.close()
    return status


def main(args: argparse.Namespace) -> int:
    if not args.qmp_command and not args.events:
        print("nbd-backup qmp: give a COMMAND, or --events to follow events", file=sys.stderr)
        return 2
    if args.arguments and not args.qmp_command:
        print("nbd-backup qmp: arguments given without a COMMAND", file=sys.stderr)
        return 2
    try:
        parse_monitor_address(args.qmp)
        build_arguments(args.arguments)
    except ValueError as exc:
        print(f"nbd-backup qmp: {exc}", file=sys.stderr)
        return 2

    async def bounded() -> int:
        async with asyncio.timeout(args.timeout):
            return await run_qmp(args)

    try:
        return run(bounded())
    except QmpClientError as exc:
        print(f"nbd-backup qmp: {exc}", file=sys.stderr)
        return 2
    except QmpCommandError as exc:  # qmp_capabilities refused: not a server we can talk to
        print(f"nbd-backup qmp: {exc}", file=sys.stderr)
        return 2
    except TimeoutError:
        print(f"nbd-backup qmp: no answer within {args.timeout} s", file=sys.stderr)
        return 1 if args.events and args.until else 2
