"""``nbd-backup copy SRC DST``: copy a disk between files and NBD exports — also the restore path.

Each side is a file (opened through ``backup.images``, so every image format it knows works) or an NBD
URI. The copy is sparse-aware: the source's block status says where the data is; zero and hole ranges
become ``zero`` requests on the destination (or nothing at all when the destination was just created
and so reads as zeroes), and data chunks that turn out to be all zeroes are zeroed rather than written.
Memory stays bounded: at most ``--requests`` chunks of ``--request-size`` bytes are in flight (per worker;
by default 4 MiB worth from a local source, 16 requests from an NBD server across a network).
When both sides allow it (raw files, NBD exports advertising multi-conn) the range is split into aligned
stripes copied by ``--workers`` processes, since one event loop is the limit; qcow2 images (a single
metadata writer) and servers without multi-conn are always copied by one process.
``--dirty-bitmap NAME`` copies only what an NBD source's ``qemu:dirty-bitmap:NAME`` context marks dirty
(pull-mode incremental backups: qemu-nbd ``-B``, qemu-storage-daemon's or our ``block-export-add``
``bitmaps``); with ``--backing PREVIOUS`` the destination is a new qcow2 overlay of the previous backup, so it
holds only the changed clusters and reads as the whole disk.
The exit status is non-zero on any error, with a one-line message saying what failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from typing import Any

from backup.copy_engine import DEFAULT_REQUEST_SIZE
from backup.errors import BackupError
from nbd.errors import NbdError
from server.progress import add_progress_options, progress_from_args

log = logging.getLogger(__name__)

_MIN_REQUEST = 4096


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "copy",
        help="copy a disk between files and NBD exports (also: restore a backup)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SRC", help="image file or NBD URI (nbd://HOST[:PORT]/EXPORT …)")
    parser.add_argument("destination", metavar="DST", help="image file (created when missing) or NBD URI")
    parser.add_argument("-f", "--src-format", choices=("raw", "qcow2"), help="source image format (default: probe)")
    parser.add_argument("-O", "--dst-format", choices=("raw", "qcow2"), help="destination image format")
    add_progress_options(parser)
    parser.add_argument(
        "--requests",
        type=_positive,
        default=None,
        help="requests in flight (default: 4 MiB worth of requests, 4 at the default size; 16 when a raw file "
        "is sent to an NBD export, which holds no buffers, or when the source is an NBD server across a network)",
    )
    parser.add_argument(
        "--request-size", type=_size, default=DEFAULT_REQUEST_SIZE, help="bytes per request (1M; K/M suffixes)"
    )
    parser.add_argument("--connections", type=_positive, default=None, help="NBD connections (multi-conn servers)")
    parser.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="processes copying disjoint stripes in parallel (default: half the CPUs, at most 4, for copies of 256 MiB "
        "or more when both sides are raw files or multi-conn NBD exports; always 1 for qcow2 and other servers)",
    )
    parser.add_argument(
        "--target-is-zero", action="store_true", help="the existing destination already reads as zeroes"
    )
    parser.add_argument(
        "--dirty-bitmap",
        metavar="NAME",
        help="copy only what the NBD source's qemu:dirty-bitmap:NAME context marks dirty (an incremental backup "
        "pulled from an export that publishes the bitmap)",
    )
    parser.add_argument(
        "--backing",
        metavar="PREVIOUS",
        help="create the destination as a qcow2 overlay whose backing file is PREVIOUS (the chain's last backup): "
        "with --dirty-bitmap, the new image holds only the changed clusters",
    )
    parser.add_argument(
        "--no-detect-zeroes",
        dest="detect_zeroes",
        action="store_false",
        help="write all-zero data chunks instead of zeroing them",
    )
    parser.set_defaults(func=main)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = text[-1] if text and text[-1] in units else ""
    try:
        value = int(text[: len(text) - len(suffix)] if suffix else text) * units[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < _MIN_REQUEST or value > 32 << 20 or value & (value - 1):
        raise argparse.ArgumentTypeError("must be a power of two between 4K and 32M")
    return value


def main(args: argparse.Namespace) -> int:
    from nbd.loop import run
    from server.copy_run import run_copy
    from server.copy_sides import CopyRequest, failure_message

    # the parser's destinations are named after the request's fields
    request = CopyRequest(**{field.name: getattr(args, field.name) for field in fields(CopyRequest)})
    try:
        stats = run(run_copy(request, lambda total: progress_from_args(args, total, "copy")))
    except (OSError, NbdError, BackupError, TimeoutError) as exc:
        print(f"nbd-backup copy: {failure_message(exc)}", file=sys.stderr)
        return 1
    log.info(
        "copied %d bytes: %d data, %d zeroed, %d skipped",
        stats.size,
        stats.data_bytes,
        stats.zero_bytes,
        stats.skipped_bytes,
    )
    return 0
