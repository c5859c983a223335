"""``nbd-backup backup``: start a backup on a running daemon over QMP and follow it to the end.

It sends ``drive-backup`` (or ``blockdev-backup`` with ``--to-node``), shows a progress bar from
``query-block-jobs`` while the job runs, and exits 0 only if the job's ``BLOCK_JOB_COMPLETED``
event carries no error. Ctrl-C cancels the job (and waits for it to go) before exiting 130.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import Any

from nbd.loop import run
from server.daemon import parse_qmp_address
from server.errors import ConfigError
from server.progress import Progress

EPILOG = """\
TARGET is a file (created at the source's size unless --mode existing), an NBD URI
(nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH), or with --to-node another block node.

examples:
  nbd-backup backup --qmp unix:/run/nbd-backup/qmp.sock disk0 /backups/disk0-monday.qcow2 --format qcow2
  nbd-backup backup --qmp tcp:127.0.0.1:4444 disk0 nbd://backup-host/disk0 --speed 50M
  nbd-backup backup --qmp unix:qmp.sock disk0 /backups/disk0.raw --progress=3 3>progress.log

exit status: 0 when the backup completed; 1 when it could not start, failed, or was cancelled;
130 after Ctrl-C (the job is cancelled first).
"""

#: How often the progress bar asks the daemon for the job's offset.
POLL_INTERVAL = 0.2
CONNECT_TIMEOUT = 10.0
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class BackupFailed(Exception):
    """The backup could not be started or did not complete; the message says why."""


def parse_size(text: str) -> int:
    """``50M`` → 52428800 (binary suffixes K, M, G, T; optional trailing ``B``/``iB``)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = value[-1:] if value[-1:] in _SUFFIXES and value[-1:] else ""
    number = value[: -len(suffix)] if suffix else value
    try:
        result = float(number) * _SUFFIXES[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1048576, 512K, 50M, 1G)") from None
    if result < 0:
        raise argparse.ArgumentTypeError("a size cannot be negative")
    return int(result)


class QmpConnection:
    """A minimal asyncio QMP client: one command at a time, events queued for the caller."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._next_id = 0

    @classmethod
    async def open(cls, address: str) -> QmpConnection:
        kind, where = parse_qmp_address(address)
        if kind == "unix":
            assert isinstance(where, str)
            opening = asyncio.open_unix_connection(where, limit=1 << 24)
        else:
            assert isinstance(where, tuple)
            opening = asyncio.open_connection(*where, limit=1 << 24)
        reader, writer = await asyncio.wait_for(opening, CONNECT_TIMEOUT)
        conn = cls(reader, writer)
        greeting = await asyncio.wait_for(conn._read(), CONNECT_TIMEOUT)
        if "QMP" not in greeting:
            raise BackupFailed(f"{address} is not a QMP monitor")
        await conn.execute("qmp_capabilities")
        return conn

    async def _read(self) -> dict[str, Any]:
        line = await self.reader.readline()
        if not line:
            raise BackupFailed("the daemon closed the QMP connection")
        message: dict[str, Any] = json.loads(line)
        return message

    async def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a command; its ``return`` value, or ``BackupFailed`` with the error's ``desc``."""
        self._next_id += 1
        request: dict[str, Any] = {"execute": name, "id": self._next_id}
        if arguments:
            request["arguments"] = arguments
        self.writer.write(json.dumps(request).encode())
        await self.writer.drain()
        while True:
            message = await self._read()
            if "event" in message:
                self.events.put_nowait(message)
            elif message.get("id") == self._next_id:
                if "error" in message:
                    raise BackupFailed(f"{name}: {message['error'].get('desc', message['error'])}")
                return message.get("return")

    async def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next event (queued or read from the socket), or None after ``timeout`` seconds."""
        if not self.events.empty():
            return self.events.get_nowait()
        try:
            message = await asyncio.wait_for(self._read(), timeout)
        except TimeoutError:
            return None
        if "event" in message:
            return message
        return None  # a stray reply: nothing is pending, ignore it

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()


def backup_arguments(args: argparse.Namespace, job_id: str) -> tuple[str, dict[str, Any]]:
    arguments: dict[str, Any] = {"job-id": job_id, "device": args.device, "target": args.target, "sync": args.sync}
    if args.speed:
        arguments["speed"] = args.speed
    if args.on_source_error:
        arguments["on-source-error"] = args.on_source_error
    if args.on_target_error:
        arguments["on-target-error"] = args.on_target_error
    if args.compress:
        arguments["compress"] = True
    if args.to_node:
        return "blockdev-backup", arguments
    if args.format:
        arguments["format"] = args.format
    if args.mode:
        arguments["mode"] = args.mode
    return "drive-backup", arguments


async def follow(conn: QmpConnection, job_id: str, progress: Progress | None, log: Any) -> None:
    """Show progress until the job's final event; raise ``BackupFailed`` unless it completed."""
    while True:
        event = await conn.next_event(POLL_INTERVAL)
        if event is None:
            if progress is not None:
                for job in await conn.execute("query-block-jobs"):
                    if job.get("device") == job_id:
                        progress.set_total(job["len"])
                        progress.update(job["offset"])
            continue
        name, data = event["event"], event.get("data", {})
        if data.get("device") != job_id:
            continue
        if name == "BLOCK_JOB_ERROR":
            hint = f" (resume: nbd-backup qmp block-job-resume device={job_id})" if data["action"] == "stop" else ""
            print(f"\nnbd-backup backup: {data['operation']} error, action: {data['action']}{hint}", file=log)
        elif name == "BLOCK_JOB_COMPLETED":
            if progress is not None:
                progress.set_total(data["len"])
                progress.update(data["offset"])
                progress.finish(ok="error" not in data)
            if "error" in data:
                raise BackupFailed(f"backup failed: {data['error']}")
            return
        elif name == "BLOCK_JOB_CANCELLED":
            if progress is not None:
                progress.finish(ok=False)
            raise BackupFailed("backup was cancelled")


async def run_backup(args: argparse.Namespace, log: Any = sys.stderr) -> None:
    conn = await QmpConnection.open(args.qmp)
    job_id = args.job_id or args.device
    try:
        command, arguments = backup_arguments(args, job_id)
        await conn.execute(command, arguments)
        progress = _make_progress(args)
        try:
            await follow(conn, job_id, progress, log)
        except asyncio.CancelledError:
            with contextlib.suppress(BackupFailed, OSError, ConnectionError, TimeoutError):
                await asyncio.wait_for(_cancel(conn, job_id), 10)
            raise
        if not args.quiet:
            print(f"nbd-backup backup: {args.device} → {args.target}: completed", file=log)
    finally:
        await conn.close()


async def _cancel(conn: QmpConnection, job_id: str) -> None:
    await conn.execute("block-job-cancel", {"device": job_id, "force": True})
    while True:
        event = await conn.next_event(1.0)
        if (
            event is not None
            and event["event"] in ("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED")
            and event.get("data", {}).get("device") == job_id
        ):
            return


def _make_progress(args: argparse.Namespace) -> Progress | None:
    if args.no_progress or args.quiet:
        return None
    if args.progress not in (None, "tty"):
        try:
            fd = int(args.progress)
        except ValueError:
            raise ConfigError(f"--progress=FD needs a file descriptor number, not {args.progress!r}") from None
        return Progress(0, fd=fd)
    return Progress(0, label="backup", enabled=True if args.progress == "tty" else None)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "backup",
        help="back up a disk of a running daemon (over QMP) and show its progress",
        description="Start a live backup of block node DEVICE on a running 'nbd-backup serve' (or any QMP "
        "monitor with drive-backup, such as QEMU's) and follow it until it ends.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--qmp", required=True, metavar="unix:PATH|tcp:HOST:PORT", help="the daemon's QMP monitor")
    parser.add_argument("device", metavar="DEVICE", help="the block node to back up")
    parser.add_argument("target", metavar="TARGET", help="a file, an NBD URI, or (--to-node) a block node")
    parser.add_argument("--sync", choices=("full", "top", "none"), default="full", help="what to copy (default full)")
    parser.add_argument("--format", choices=("raw", "qcow2"), help="the target's format (default: the source's)")
    parser.add_argument(
        "--mode", choices=("existing", "absolute-paths"), help="'existing' writes into an existing image"
    )
    parser.add_argument("--speed", type=parse_size, default=0, metavar="BYTES/S", help="rate limit, e.g. 50M")
    parser.add_argument("--job-id", metavar="ID", help="the job's id (default: DEVICE)")
    parser.add_argument("--to-node", action="store_true", help="TARGET is a block node (blockdev-backup)")
    parser.add_argument("--compress", action="store_true", help="compress the (qcow2) target")
    parser.add_argument("--on-source-error", choices=("report", "ignore", "stop", "enospc"), metavar="ACTION")
    parser.add_argument("--on-target-error", choices=("report", "ignore", "stop", "enospc"), metavar="ACTION")
    parser.add_argument(
        "--progress",
        nargs="?",
        const="tty",
        metavar="FD",
        help="show a progress bar; --progress=FD writes 'N/100' lines to file descriptor FD instead",
    )
    parser.add_argument("--no-progress", action="store_true", help="never show progress, even on a terminal")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        run(run_backup(args))
    except KeyboardInterrupt:
        print("\nnbd-backup backup: interrupted; the job was cancelled", file=sys.stderr)
        return 130
    except (BackupFailed, ConfigError) as exc:
        print(f"nbd-backup backup: {exc}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError) as exc:
        print(f"nbd-backup backup: cannot reach the daemon at {args.qmp}: {exc}", file=sys.stderr)
        return 1
    return 0
