"""``nbd-backup repo …``: a deduplicated backup repository, without a daemon (design §3.6).

A repository is a directory holding many disks' backups as snapshots: fixed-size chunks named by their
SHA-256, zstd-compressed, stored once however many snapshots (or disks) contain them; all-zero chunks are
not stored. Every snapshot is a complete restore point, whether it was a full backup or an incremental
one. The on-disk format is backup/repo/FORMAT.md.

  repo init DIR [--chunk-size 4M]           a new repository in a missing or empty directory
  repo list DIR [DISK] [--json]             the snapshots, oldest first
  repo backup DIR DISK SOURCE               back up a file (raw, qcow2) or an NBD URI as a new snapshot
  repo restore DIR DISK[@SNAP] TARGET       write a snapshot to a file or an NBD export
  repo verify DIR [DISK[@SNAP]] [--json]    read and check every chunk (exit 0 clean, 1 corrupt, 2 error)
  repo prune DIR [DISK] --keep-last N …     remove the snapshots the keep rules do not keep
  repo gc DIR                               free the chunks no snapshot and no running backup needs

DIR may be s3://BUCKET[/PREFIX][?endpoint=URL&region=R] (a repository in object storage). An
encrypted repository (init --key-file FILE) needs --key-file FILE on every command; a repository in
a bucket with Object Lock may retain every snapshot for N days (init --object-lock-days N).

Every command prints one line on stderr and exits non-zero when it fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from server.progress import add_progress_options, progress_from_args

PROG = "nbd-backup repo"
_T = TypeVar("_T")

#: Exit status of ``verify`` when it cannot run (not a repository, bad arguments): 1 means corruption.
VERIFY_CANNOT_RUN = 2

_INIT = """\
Create a repository in DIR, which must be missing or empty. The chunk size is fixed for the
repository's life: a power of two from 64K to 16M (default 4M; K/M/G are binary).

--key-file FILE encrypts the repository (AES-256-GCM; chunk names are keyed HMACs of the data): FILE
holds its 256-bit key and is created (mode 0600, a random key) when missing. Keep a copy elsewhere:
without it nothing in the repository can be read. Every later command needs --key-file FILE.

--object-lock-days N (S3 only, the bucket created with Object Lock): every chunk and manifest
written carries N days of COMPLIANCE retention; nobody can delete a snapshot before that (prune says
until when), and gc keeps its chunks."""

_LIST = """\
List the snapshots of every disk (or of DISK), oldest first. --json prints a JSON array of objects
with disk, id, created, size, parent and new-bytes (a disk without snapshots lists [])."""

_BACKUP = """\
Back up SOURCE as a new snapshot of DISK. SOURCE is an image file (raw or qcow2, probed) or an NBD
URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH …). Zero extents are neither read nor
stored; chunks the repository holds already are not stored again. The snapshot is published only
once every chunk is durable: an interrupted backup leaves nothing behind but chunks for `repo gc`.

--parent (latest, a snapshot id, or none) names the snapshot this one is written on top of; latest
without any snapshot is a full backup. --dirty-bitmap NAME reads only the chunks that the NBD source's
qemu:dirty-bitmap:NAME context marks dirty (read whole), and takes every other chunk from the parent:
it needs a parent snapshot of the same size. Prints DISK@ID and the snapshot's statistics."""

_RESTORE = """\
Write snapshot DISK[@SNAP] (default: the latest) to TARGET. A file TARGET is written as a sparse raw
image into a temporary file that is renamed into place once complete; an existing file is replaced only
with --force. An NBD TARGET must be at least as large as the disk (the rest is left alone); after a
failure it holds part of the snapshot, and the error says so. Every chunk is verified as it is read:
a corrupt or missing chunk fails the restore, naming the chunk."""

_VERIFY = """\
Read and check every chunk that the selected snapshots need (all of them, every snapshot of DISK, or
DISK@SNAP), each distinct chunk once. The report on stdout names every bad chunk and every snapshot it
breaks (--json: by full SHA-256). Exit status: 0 clean, 1 corruption found, 2 could not run."""

_PRUNE = """\
Remove the snapshots that no keep rule keeps, for DISK or for each disk separately. Each rule keeps the
newest snapshot of each of its N most recent days/ISO weeks/months (UTC) that hold one, --keep-last the
N newest. Prune removes snapshots only: run `repo gc` to free their chunks. --dry-run prints what would
be removed and removes nothing."""

_GC = """\
Free the chunks that no snapshot needs any more, and what interrupted backups left behind. Safe while
backups run: a running backup holds a lease that gc honours; a killed backup's lease is void."""


class _Parser(argparse.ArgumentParser):
    """An argument error is one line on stderr (design §3.6); exit 2 like argparse (verify's "could not run")."""

    def error(self, message: str) -> NoReturn:
        self.exit(VERIFY_CANNOT_RUN, f"{self.prog}: {message}\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Unknown arguments are this action's error (else the top-level parser reports them, with usage)."""
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "repo",
        help="a deduplicated backup repository: init, list, backup, restore, verify, prune, gc",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="repo_command", metavar="ACTION", required=True, parser_class=_Parser)

    def add(name: str, summary: str, text: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(
            name, help=summary, description=text, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sub.set_defaults(func=_guarded(name, func))
        return sub

    init = add("init", "create a repository", _INIT, _init)
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--chunk-size", default="4M", metavar="SIZE", help="chunk size (default 4M)")
    init.add_argument(
        "--object-lock-days", type=_count, metavar="N", help="retain every snapshot N days (S3 Object Lock)"
    )

    lst = add("list", "list snapshots", _LIST, _list)
    lst.add_argument("dir", metavar="DIR")
    lst.add_argument("disk", metavar="DISK", nargs="?")
    lst.add_argument("--json", action="store_true", help="print JSON")

    backup = add("backup", "back up a file or an NBD export as a new snapshot", _BACKUP, _backup)
    backup.add_argument("dir", metavar="DIR")
    backup.add_argument("disk", metavar="DISK")
    backup.add_argument("source", metavar="SOURCE", help="image file or NBD URI")
    backup.add_argument("--parent", default="latest", metavar="latest|ID|none", help="the parent snapshot")
    backup.add_argument("--dirty-bitmap", metavar="NAME", help="read only what qemu:dirty-bitmap:NAME marks")
    backup.add_argument("-f", "--format", choices=("raw", "qcow2"), help="SOURCE's image format (default: probe)")
    add_progress_options(backup)

    restore = add("restore", "write a snapshot to a file or an NBD export", _RESTORE, _restore)
    restore.add_argument("dir", metavar="DIR")
    restore.add_argument("snapshot", metavar="DISK[@SNAP]")
    restore.add_argument("target", metavar="TARGET", help="file or NBD URI")
    restore.add_argument("--force", action="store_true", help="replace an existing target file")
    add_progress_options(restore)

    verify = add("verify", "check every chunk of the selected snapshots", _VERIFY, _verify)
    verify.add_argument("dir", metavar="DIR")
    verify.add_argument("snapshot", metavar="DISK[@SNAP]", nargs="?")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    add_progress_options(verify)

    prune = add("prune", "remove the snapshots the keep rules do not keep", _PRUNE, _prune)
    prune.add_argument("dir", metavar="DIR")
    prune.add_argument("disk", metavar="DISK", nargs="?")
    for rule in ("last", "daily", "weekly", "monthly"):
        prune.add_argument(f"--keep-{rule}", type=_count, default=0, metavar="N")
    prune.add_argument("--dry-run", action="store_true", help="only print what would be removed")

    gc = add("gc", "free the chunks nothing needs", _GC, _gc)
    gc.add_argument("dir", metavar="DIR")
    gc.add_argument("--json", action="store_true", help="print the report as JSON")

    for sub in (init, lst, backup, restore, verify, prune, gc):
        sub.add_argument(
            "--key-file",
            metavar="FILE",
            help="the key of an encrypted repository (init: encrypt it, creating FILE when missing)",
        )


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("cannot be negative")
    return value


class CannotRun(Exception):
    """``verify`` could not look at the repository at all (exit 2, not 1)."""


def _guarded(name: str, func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run one action: a failure the user can act on is one line on stderr and a non-zero status."""

    def run(args: argparse.Namespace) -> int:
        from backup.errors import BackupError
        from nbd.errors import NbdError

        if not args.verbose:
            # the error line names a bad chunk already; the store's log line would make it two
            logging.getLogger("nbd_backup.repo").setLevel(logging.CRITICAL)
        failed = VERIFY_CANNOT_RUN if name == "verify" else 1
        try:
            return func(args)
        except CannotRun as exc:
            message = str(exc)
        except (OSError, NbdError, BackupError, TimeoutError) as exc:
            from server.copy_sides import describe  # loaded only for a failure (it brings the copy engine)

            message = describe(exc) if not _is_repo_error(exc) else str(exc)
        print(f"{PROG} {name}: {message}", file=sys.stderr)
        return failed

    return run


def _is_repo_error(exc: BaseException) -> bool:
    from backup.repo.errors import RepoError

    return isinstance(exc, RepoError)


def _open(args: argparse.Namespace) -> Any:
    from backup.repo.repository import LOCK_WAIT, Repository

    key = None
    if args.key_file:
        from backup.repo.crypt import load_key_file  # cryptography loads slowly: only for a key

        key = load_key_file(args.key_file)
    repo = Repository.open(args.dir, key=key)
    repo.lock_wait = LOCK_WAIT  # a prune beside a backup start: wait for it rather than fail
    return repo


# --- the actions ------------------------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    from backup.repo import objectlock
    from backup.repo.crypt import load_key_file
    from backup.repo.location import is_s3
    from backup.repo.names import parse_size
    from backup.repo.repository import Repository
    from server.progress import human_bytes

    chunk_size = parse_size(args.chunk_size)
    if args.object_lock_days is not None and not is_s3(args.dir):
        raise objectlock.refuse_local(args.dir)  # before a key file is made for nothing
    key = load_key_file(args.key_file, create=True) if args.key_file else None
    repo = Repository.init(args.dir, chunk_size, key=key, object_lock_days=args.object_lock_days)
    extras = ", encrypted" if key is not None else ""
    if args.object_lock_days is not None:
        extras += f", Object Lock {args.object_lock_days} days"
    print(f"created repository {repo.location} (chunks of {human_bytes(repo.chunk_size)}{extras})")
    return 0


def _list(args: argparse.Namespace) -> int:
    from backup.repo.names import validate_disk
    from server.repo_report import snapshot_table

    repo = _open(args)
    disks = [validate_disk(args.disk)] if args.disk is not None else repo.disks()
    manifests = [m for disk in disks for m in repo.snapshots(disk)]
    if args.json:
        print(json.dumps([m.info() for m in manifests]))
    else:
        for line in snapshot_table(manifests):
            print(line)
    return 0


def _with_progress(
    args: argparse.Namespace, total: int, what: str, work: Callable[[Callable[[int], None] | None], _T]
) -> _T:
    """``work(on_progress)`` — worker threads of a file backup or restore — with the progress bar the
    options ask for (fed by the workers under a lock)."""
    progress = progress_from_args(args, total, what)
    on_progress = None
    if progress is not None:
        lock = threading.Lock()
        advance = progress.advance

        def on_progress(nbytes: int) -> None:
            with lock:
                advance(nbytes)

    ok = False
    try:
        result = work(on_progress)
        ok = True
        return result
    finally:
        if progress is not None:
            progress.finish(ok=ok)


def _backup(args: argparse.Namespace) -> int:
    from backup.repo.names import validate_disk, validate_snapshot_id
    from nbd.uri import looks_like_uri
    from server.repo_report import backup_line

    disk = validate_disk(args.disk)
    if args.parent not in ("latest", "none"):
        validate_snapshot_id(args.parent)
    repo = _open(args)
    if args.dirty_bitmap is None and not looks_like_uri(args.source):
        from backup.repo.backup_file import RawSource, backup_file

        source = RawSource.open(args.source, args.format)
        if source is not None:  # a raw file: worker threads, no event loop (and none to import)
            try:
                manifest = _with_progress(
                    args,
                    source.size,
                    "backup",
                    lambda on_progress: backup_file(
                        repo,
                        disk,
                        source.fd,
                        source.size,
                        parent=args.parent,
                        holes=source.holes,
                        on_progress=on_progress,
                    ),
                )
            finally:
                source.close()
            assert manifest is not None  # nothing stops it from outside
            print(backup_line(manifest))
            return 0
    from nbd.loop import run
    from server.repo_transfer import run_backup

    manifest = run(
        run_backup(
            repo,
            disk,
            args.source,
            parent=args.parent,
            fmt=args.format,
            dirty_bitmap=args.dirty_bitmap,
            make_progress=lambda total: progress_from_args(args, total, "backup"),
        )
    )
    print(backup_line(manifest))
    return 0


def _restore(args: argparse.Namespace) -> int:
    from backup.repo.names import parse_snapshot_ref
    from nbd.uri import looks_like_uri

    disk, snap = parse_snapshot_ref(args.snapshot)
    repo = _open(args)
    manifest = repo.resolve(disk, snap)
    if not looks_like_uri(args.target):  # a file: worker threads, no event loop (and none to import)
        from pathlib import Path

        from backup.repo.restore import restore_file

        _with_progress(
            args,
            manifest.size,
            "restore",
            lambda on_progress: restore_file(
                repo, manifest, Path(args.target), force=args.force, on_progress=on_progress
            ),
        )
        return 0
    from nbd.loop import run
    from server.repo_transfer import run_restore

    run(
        run_restore(
            repo,
            manifest,
            args.target,
            force=args.force,
            make_progress=lambda total: progress_from_args(args, total, "restore"),
        )
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from backup.repo.errors import RepoError
    from backup.repo.names import parse_snapshot_ref
    from backup.repo.verify import verify
    from server.repo_report import verify_lines

    try:
        disk: str | None = None
        snap: str | None = None
        if args.snapshot is not None:
            disk, snap = parse_snapshot_ref(args.snapshot)
            if "@" not in args.snapshot:
                snap = None  # every snapshot of the disk
        repo = _open(args)
        if disk is not None and snap is not None:
            repo.resolve(disk, snap)
    except RepoError as exc:
        raise CannotRun(str(exc)) from None
    progress = progress_from_args(args, 0, "verify")
    ok = False
    try:
        report = verify(repo, disk, snap, progress=_feed(progress) if progress is not None else None)
        ok = True
    finally:
        if progress is not None:
            progress.finish(ok=ok)
    if args.json:
        print(report.to_json())
    else:
        for line in verify_lines(report):
            print(line)
    return 0 if report.ok else 1


def _prune(args: argparse.Namespace) -> int:
    from backup.repo.errors import RepoError
    from backup.repo.names import validate_disk
    from backup.repo.prune import PruneRules, prune

    rules = PruneRules(args.keep_last, args.keep_daily, args.keep_weekly, args.keep_monthly)
    if rules.empty():
        raise RepoError("prune needs a keep rule (--keep-last, --keep-daily, --keep-weekly or --keep-monthly)")
    disk = validate_disk(args.disk) if args.disk is not None else None
    repo = _open(args)
    removed = prune(repo, disk, rules, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for m in removed:
        print(f"{verb} {m.ref}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    from backup.repo.gc import collect_garbage
    from server.repo_report import gc_line

    repo = _open(args)
    report = collect_garbage(repo)
    print(report.to_json() if args.json else gc_line(report))
    return 0


# --- progress ---------------------------------------------------------------------------------------


def _feed(progress: Any) -> Callable[[int, int], None]:
    """verify's ``progress(done, total)`` callback driving a ``Progress`` (its total is known only then)."""

    def update(done: int, total: int) -> None:
        if progress.total != total:
            progress.set_total(total)
        progress.update(done)

    return update
