"""``nbd-backup backup``: start a backup on a running daemon over QMP and follow it to the end.

It sends ``drive-backup`` (or ``blockdev-backup`` with ``--to-node``), shows a progress bar from
``query-block-jobs`` while the job runs, and exits 0 only if the job's ``BLOCK_JOB_COMPLETED``
event carries no error. Ctrl-C cancels the job (and waits for it to go) before exiting 130.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

from nbd.loop import run
from server.errors import BackupFailed, ConfigError
from server.job_follow import cancel as _cancel
from server.job_follow import execute, follow
from server.progress import Progress, add_progress_options, progress_from_args
from server.qmp.client import QmpClient, QmpClientError
from server.repo_backup import parse_repo_target, run_repo_backup

EPILOG = """\
TARGET is a file (created at the source's size unless --mode existing), an NBD URI
(nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH), with --to-node another block node, or
repo:[ID:]DISK, a new snapshot of DISK in a repository the daemon has open (serve --repo [ID=]DIR):
repo-snapshot-begin, blockdev-backup into it, repo-snapshot-commit. With --bitmap the backup is
incremental from the latest snapshot (full, starting the bitmap, when there is none yet); a failure
or Ctrl-C aborts the snapshot, nothing is published.
An NBD target that leaves requests unanswered for 60 s is dropped: they fail with ETIMEDOUT (as a
write error: --on-target-error decides);
--cbw-timeout bounds how long guest writes wait for a slow or stalled target meanwhile.

examples:
  nbd-backup backup --qmp unix:/run/nbd-backup/qmp.sock disk0 /backups/disk0-monday.qcow2 --format qcow2
  nbd-backup backup --qmp tcp:127.0.0.1:4444 disk0 nbd://backup-host/disk0 --speed 50M
  nbd-backup backup --qmp unix:qmp.sock disk0 /backups/disk0.raw --progress=3 3>progress.log
  nbd-backup backup --qmp unix:qmp.sock disk0 nbd://backup-host/disk0 --cbw-timeout 10 --on-cbw-error break-snapshot
  nbd-backup backup --qmp unix:qmp.sock disk0 repo:vm1/disk0 --bitmap nightly

exit status: 0 when the backup completed; 1 when it could not start, failed, or was cancelled;
130 after Ctrl-C (the job is cancelled first).
"""

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


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


def seconds(text: str) -> int:
    """A whole number of seconds, 0 or more (QEMU's ``cbw-timeout`` is a uint32)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds: {text!r}") from None
    if not 0 <= value < 1 << 32:
        raise argparse.ArgumentTypeError(f"out of range: {text!r}")
    return value


def backup_arguments(args: argparse.Namespace, job_id: str) -> tuple[str, dict[str, Any]]:
    arguments: dict[str, Any] = {"job-id": job_id, "device": args.device, "target": args.target, "sync": args.sync}
    if args.speed:
        arguments["speed"] = args.speed
    if args.bitmap:
        arguments["bitmap"] = args.bitmap
    if args.bitmap_mode:
        arguments["bitmap-mode"] = args.bitmap_mode
    if args.on_source_error:
        arguments["on-source-error"] = args.on_source_error
    if args.on_target_error:
        arguments["on-target-error"] = args.on_target_error
    if args.compress:
        arguments["compress"] = True
    if args.cbw_timeout is not None:
        arguments["x-cbw-timeout"] = args.cbw_timeout
    if args.on_cbw_error:
        arguments["x-on-cbw-error"] = args.on_cbw_error
    if args.to_node:
        return "blockdev-backup", arguments
    if args.format:
        arguments["format"] = args.format
    if args.mode:
        arguments["mode"] = args.mode
    return "drive-backup", arguments


async def run_backup(args: argparse.Namespace, log: Any = sys.stderr) -> None:
    repo_target = parse_repo_target(args.target)
    conn = await QmpClient.connect(args.qmp)
    job_id = args.job_id or args.device
    try:
        if repo_target is not None:
            result = await run_repo_backup(
                conn,
                args.device,
                repo_target,
                bitmap=args.bitmap,
                job_id=job_id,
                progress=_make_progress(args),
                log=log,
                speed=args.speed,
            )
            if not args.quiet:
                snapshot = f"{result['disk']}@{result['snapshot']}"
                print(
                    f"nbd-backup backup: {args.device} → {snapshot}: completed, {result['new-bytes']} new bytes",
                    file=log,
                )
            return
        command, arguments = backup_arguments(args, job_id)
        progress = _make_progress(args)
        try:
            await execute(conn, command, arguments)
            await follow(conn, job_id, progress, log)
        except asyncio.CancelledError:
            # Ctrl-C, possibly before the command's reply arrived: the job may exist, cancel it
            # (a refusal because it does not is fine) and wait for it to go before exiting.
            with contextlib.suppress(BackupFailed, QmpClientError, OSError, ConnectionError, TimeoutError):
                async with asyncio.timeout(10):
                    await _cancel(conn, job_id)
            raise
        if not args.quiet:
            print(f"nbd-backup backup: {args.device} → {args.target}: completed", file=log)
    finally:
        await conn.close()


def _make_progress(args: argparse.Namespace) -> Progress | None:
    return None if args.quiet else progress_from_args(args, 0, "backup")


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
    parser.add_argument(
        "--sync",
        choices=("full", "top", "none", "incremental", "bitmap"),
        default="full",
        help="what to copy (default full; incremental and bitmap: what --bitmap marks dirty)",
    )
    parser.add_argument("--bitmap", metavar="NAME", help="the dirty bitmap of DEVICE (QEMU's 'bitmap')")
    parser.add_argument(
        "--bitmap-mode",
        choices=("on-success", "never", "always"),
        help="what happens to --bitmap when the job ends (QEMU's 'bitmap-mode')",
    )
    parser.add_argument("--format", choices=("raw", "qcow2"), help="the target's format (default: the source's)")
    parser.add_argument(
        "--mode", choices=("existing", "absolute-paths"), help="'existing' writes into an existing image"
    )
    parser.add_argument("--speed", type=parse_size, default=0, metavar="BYTES/S", help="rate limit, e.g. 50M")
    parser.add_argument("--job-id", metavar="ID", help="the job's id (default: DEVICE)")
    parser.add_argument("--to-node", action="store_true", help="TARGET is a block node (blockdev-backup)")
    parser.add_argument("--compress", action="store_true", help="compress the (qcow2) target")
    for side in ("source", "target"):
        parser.add_argument(
            f"--on-{side}-error",
            choices=("report", "ignore", "stop", "enospc"),
            metavar="ACTION",
            help=f"on a {side} I/O error: report (fail; the default), ignore (retry), stop (pause until "
            "block-job-resume), enospc (stop on ENOSPC, else report)",
        )
    parser.add_argument(
        "--cbw-timeout",
        type=seconds,
        metavar="SECONDS",
        help="how long a guest write may wait for its old data to reach the target (copy-before-write); "
        "0 or unset: no limit. Sent as our QMP extension x-cbw-timeout",
    )
    parser.add_argument(
        "--on-cbw-error",
        choices=("break-guest-write", "break-snapshot"),
        metavar="ACTION",
        help="when that copy fails or times out: break-guest-write (the guest write fails with EIO and the "
        "backup goes on; the default) or break-snapshot (the guest write proceeds and the backup fails). "
        "Sent as x-on-cbw-error",
    )
    add_progress_options(parser)
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
    except (QmpClientError, OSError) as exc:
        print(f"nbd-backup backup: cannot reach the daemon: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a malformed --qmp address
        print(f"nbd-backup backup: {exc}", file=sys.stderr)
        return 1
    return 0
