"""QMP backup and job commands: ``drive-backup``, ``blockdev-backup``, ``transaction``, the
``block-job-*`` and ``job-*`` verbs, ``query-block-jobs`` and ``query-jobs``.

Every backup command runs as a transaction (``backup.transaction.run_transaction``), as in QEMU: each
action's *prepare* checks everything, opens (or creates) the target, creates the job (``created``),
drains its source until the transaction ends and installs the copy-before-write filter — so all the
sources are quiet together and the point in time is common to every backup of the transaction; the
commits start every job with no ``await`` in between. If any action fails, every prepared job is
cancelled (aborting, concluded, null, as qemu-storage-daemon reports it) newest first, and every
target file the transaction created is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from backup.backup_job import BackupJob, BackupOptions
from backup.dirty_bitmap import DirtyBitmap
from backup.errors import BackupError, same_source_and_target
from backup.job import Job, JobStatus
from backup.node import BlockNode
from backup.targets import BackupTarget, Mode, create_file_target, open_device_target, open_file_target, open_nbd_target
from backup.transaction import AbortAction, Transaction, TransactionAction, run_transaction
from nbd.device import BlockDevice, backing_of, can_compress, file_path, format_name
from nbd.errors import NbdError
from nbd.uri import NbdUri, looks_like_uri, parse_uri
from server.errors import QmpError
from server.qmp.bitmap_actions import KINDS as BITMAP_ACTIONS
from server.qmp.bitmap_actions import BitmapAction
from server.qmp.bitmaps import BLOCK_DIRTY_BITMAP, BLOCK_DIRTY_BITMAP_ADD, BLOCK_DIRTY_BITMAP_MERGE
from server.qmp.block import confine_socket
from server.qmp.dispatch import CommandRegistry, Handler
from server.qmp.schema import Enum, Struct, Union
from server.registry import Registry, generic, same_image

log = logging.getLogger(__name__)

#: How long an aborted transaction waits for a prepared job to wind down.
ABORT_TIMEOUT = 10.0
#: How long ``pause``/``cancel`` wait for the job to act on the verb before replying. QEMU re-enters a
#: job that is not in the middle of I/O at once, so its events precede the reply; a job busy with a
#: slow request acts later (and its events follow the reply), in QEMU as here.
SETTLE_TIMEOUT = 0.5

SYNC_MODE = Enum("MirrorSyncMode", ["top", "full", "none", "incremental", "bitmap"])
ON_ERROR = Enum("BlockdevOnError", ["report", "ignore", "enospc", "stop", "auto"])

BACKUP_COMMON = Struct(
    "BackupCommon",
    {
        "*job-id": "str",
        "device": "str",
        "sync": SYNC_MODE,
        "*speed": "int",
        "*bitmap": "str",
        "*bitmap-mode": Enum("BitmapSyncMode", ["on-success", "never", "always"]),
        "*compress": "bool",
        "*on-source-error": ON_ERROR,
        "*on-target-error": ON_ERROR,
        # Our extension: QEMU's copy-before-write filter options (BlockdevOptionsCbw), "x-" as unstable.
        "*x-on-cbw-error": Enum("OnCbwError", ["break-guest-write", "break-snapshot"]),
        "*x-cbw-timeout": "uint32",
        "*auto-finalize": "bool",
        "*auto-dismiss": "bool",
        "*filter-node-name": "str",
        "*x-perf": {"*use-copy-range": "bool", "*max-workers": "int", "*max-chunk": "int64"},
    },
)
DRIVE_BACKUP = Struct(
    "DriveBackup",
    {"target": "str", "*format": "str", "*mode": Enum("NewImageMode", ["existing", "absolute-paths"])},
    base=BACKUP_COMMON,
)
BLOCKDEV_BACKUP = Struct("BlockdevBackup", {"target": "str"}, base=BACKUP_COMMON)
TRANSACTION_ACTION = Union(
    "TransactionAction",
    {"type": Enum("TransactionActionKind", ["abort", *BITMAP_ACTIONS, "blockdev-backup", "drive-backup"])},
    "type",
    {
        "abort": {"data": Struct("Abort", {})},
        "block-dirty-bitmap-add": {"data": BLOCK_DIRTY_BITMAP_ADD},
        "block-dirty-bitmap-remove": {"data": BLOCK_DIRTY_BITMAP},
        "block-dirty-bitmap-clear": {"data": BLOCK_DIRTY_BITMAP},
        "block-dirty-bitmap-enable": {"data": BLOCK_DIRTY_BITMAP},
        "block-dirty-bitmap-disable": {"data": BLOCK_DIRTY_BITMAP},
        "block-dirty-bitmap-merge": {"data": BLOCK_DIRTY_BITMAP_MERGE},
        "blockdev-backup": {"data": BLOCKDEV_BACKUP},
        "drive-backup": {"data": DRIVE_BACKUP},
    },
)
TRANSACTION_PROPERTIES = Struct(
    "TransactionProperties", {"*completion-mode": Enum("ActionCompletionMode", ["individual", "grouped"])}
)


@dataclass
class PreparedBackup:
    """A created (not started) backup job and the target it will write."""

    job: BackupJob
    target: BackupTarget
    target_node: BlockNode | None = None

    async def abort(self) -> None:
        """Undo the prepare: the job goes (aborting, concluded, null), a created target file is deleted."""
        job = self.job
        if job.status is JobStatus.CREATED:
            job.cancel(force=True)
        try:
            async with asyncio.timeout(ABORT_TIMEOUT):
                await job.wait()
        except TimeoutError:
            log.error("job %s did not wind down after an aborted transaction", job.id)
        self.target.owned = False  # the job's clean() closed it
        with contextlib.suppress(OSError):
            await self.target.discard()


def sync_bitmap(source: BlockNode, args: dict[str, Any]) -> tuple[str, DirtyBitmap | None, str]:
    """QEMU 7.2's ``do_backup_common`` bitmap rules, checks and texts in its order: the effective sync
    mode (``incremental`` is ``bitmap`` with ``on-success``), the bitmap (None: none given) and its mode."""
    sync: str = args["sync"]
    name: str | None = args.get("bitmap")
    mode: str | None = args.get("bitmap-mode")
    if sync in ("incremental", "bitmap") and name is None:
        raise generic(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if mode is not None and mode != "on-success":
            raise generic("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'")
        sync, mode = "bitmap", "on-success"
    if name is None:
        if mode is not None:
            raise generic("Cannot specify bitmap sync mode without a bitmap")
        return sync, None, "on-success"
    bitmap = source.bitmaps.get(name)
    if bitmap is None:
        raise generic(f"Bitmap '{name}' could not be found")
    if mode is None:
        raise generic("Bitmap sync mode must be given when providing a bitmap")
    try:
        bitmap.check_usable()
    except BackupError as exc:
        raise QmpError.from_backup_error(exc) from None
    if sync == "none":
        raise generic(f"sync mode '{sync}' does not produce meaningful bitmap outputs")
    if mode == "never" and sync != "bitmap":
        raise generic(f"Bitmap sync mode '{mode}' has no meaningful effect when combined with sync mode '{sync}'")
    return sync, bitmap, mode


def with_sync_bitmap(options: BackupOptions, source: BlockNode, args: dict[str, Any]) -> BackupOptions:
    """``options`` with the sync bitmap checked and resolved (called where QEMU checks it: after the target)."""
    sync, bitmap, mode = sync_bitmap(source, args)
    return replace(options, sync=sync, bitmap=bitmap, bitmap_mode=mode)


def backup_options(args: dict[str, Any]) -> BackupOptions:
    """``BackupCommon`` arguments as the engine's options (QEMU's checks and texts first); the bitmap
    comes later (``with_sync_bitmap``), ``incremental`` is already ``bitmap``."""
    sync = "bitmap" if args["sync"] == "incremental" else args["sync"]
    speed = args.get("speed", 0)
    if speed < 0:
        raise generic("Parameter 'speed' expects a non-negative value")
    perf = args.get("x-perf", {})
    options = BackupOptions(
        sync=sync,
        speed=speed,
        on_source_error=args.get("on-source-error", "report"),
        on_target_error=args.get("on-target-error", "report"),
        on_cbw_error=args.get("x-on-cbw-error", "break-guest-write"),
        cbw_timeout=float(args.get("x-cbw-timeout", 0)),
        compress=args.get("compress", False),
        auto_finalize=args.get("auto-finalize", True),
        auto_dismiss=args.get("auto-dismiss", True),
    )
    if "max-workers" in perf:
        if perf["max-workers"] < 1:
            raise generic("max-workers must be at least 1")
        options.max_workers = perf["max-workers"]
    if "max-chunk" in perf:
        if perf["max-chunk"] < 0:
            raise generic("max-chunk must not be negative")
        options.max_chunk = perf["max-chunk"] or options.max_chunk
    return options


def _job_id(reg: Registry, args: dict[str, Any]) -> str:
    job_id: str = args.get("job-id", args["device"])
    return reg.check_new_job_id(job_id)


def _check_filter_name(reg: Registry, args: dict[str, Any]) -> None:
    """``filter-node-name`` is accepted for compatibility (our filter is not a named node) but checked."""
    name = args.get("filter-node-name")
    if name is not None:
        reg.check_new_node_name(name)


@dataclass
class Backing:
    """The backing file a new target image gets (QEMU's ``absolute-paths`` for sync top/none)."""

    path: str
    format: str
    device: Any  # the already open image, read through instead of opening the file again


def new_image_backing(source: BlockNode, sync: str) -> Backing | None:
    """QEMU's drive-backup: ``sync=none`` backs the new image by the source itself (a fleecing
    image), ``sync=top`` by the source's backing file (or copies in full when there is none)."""
    bottom = source.image
    if sync == "none" and source.filename is not None and source.driver in ("raw", "file", "qcow2"):
        return Backing(source.filename, "qcow2" if source.driver == "qcow2" else "raw", bottom)
    if sync == "top":
        backing = backing_of(bottom)
        path = file_path(backing)
        if backing is not None and path is not None:
            fmt = "qcow2" if format_name(backing) == "qcow2" else "raw"
            return Backing(os.path.abspath(path), fmt, backing)
    return None


async def create_backed_target(path: str, size: int, backing: Backing, *, compress: bool = False) -> BackupTarget:
    """Create a qcow2 target over ``backing`` (under a temporary name until the job completes); it
    does not read as zeroes, so nothing is skipped. ``compress``: it stores compressed clusters."""
    from backup.images import create_image

    async def create(where: Path, in_place: bool) -> BlockDevice:
        device: BlockDevice = await create_image(
            where,
            size,
            format="qcow2",
            backing_file=backing.path,
            backing_format=backing.format,
            backing_device=backing.device,
            compress=compress,
        )
        return device

    target = await create_file_target(Path(path), create)
    target.zero_init = False
    return target


@dataclass(frozen=True)
class FileTarget:
    """``drive-backup`` into an image file: ``path`` as resolved under ``--allow-dir``, the format it is
    written in (None: an existing image's own), how it is opened, and the backing a new image gets."""

    given: str  # as the client wrote it (QEMU's error texts quote it)
    path: str
    format: str | None
    mode: Mode
    backing: Backing | None


@dataclass(frozen=True)
class NbdTarget:
    """``drive-backup`` to an NBD URI; ``connect_to`` has its unix socket confined like any path."""

    given: str
    connect_to: str
    uri: NbdUri | None = field(default=None, compare=False)  # None: does not parse (the opener says why)


@dataclass(frozen=True)
class NodeTarget:
    """``blockdev-backup`` to another block node."""

    node: BlockNode


Target = FileTarget | NbdTarget | NodeTarget


@dataclass
class BackupRequest:
    """A backup command's arguments, validated and resolved: what ``prepare_backup`` acts on."""

    job_id: str
    source: BlockNode
    options: BackupOptions
    target: Target


def resolve_drive_backup(reg: Registry, args: dict[str, Any]) -> BackupRequest:
    """``DriveBackup`` arguments as a request, refused with QEMU's texts in QEMU's order."""
    source = reg.node(args["device"])
    job_id = _job_id(reg, args)
    options = backup_options(args)
    _check_filter_name(reg, args)
    fmt = args.get("format")
    if fmt is not None and fmt not in ("raw", "qcow2"):
        raise generic(f"Unknown file format '{fmt}'")
    mode = args.get("mode", "absolute-paths")
    text = args["target"]
    target: Target
    if looks_like_uri(text):
        if fmt == "qcow2":
            raise generic("an NBD target is written as raw; 'format' must be 'raw'")
        target = _nbd_target(reg, text)
    else:
        target = FileTarget(text, str(reg.paths.resolve(text)), fmt, mode, None)
    _refuse_own_source(reg, source, target)
    if isinstance(target, FileTarget) and fmt is None and mode == "absolute-paths":
        fmt = source.driver if source.driver in ("raw", "qcow2") else "raw"
    if options.compress and fmt != "qcow2":
        raise generic(f"Compression is not supported for this drive {text}")
    if isinstance(target, FileTarget):
        backing = new_image_backing(source, options.sync) if mode == "absolute-paths" and fmt is not None else None
        if backing is not None and fmt != "qcow2":
            raise generic(f"Backing file not supported for file format '{fmt}'")
        target = replace(target, format=fmt, backing=backing)
    if args["sync"] == "top" and backing_of(source.image) is None:
        args = {**args, "sync": "full"}  # QEMU's drive-backup: a top without backing is a full backup
    return BackupRequest(job_id, source, with_sync_bitmap(options, source, args), target)


def resolve_blockdev_backup(reg: Registry, args: dict[str, Any]) -> BackupRequest:
    """``BlockdevBackup`` arguments as a request, refused with QEMU's texts in QEMU's order."""
    source = reg.node(args["device"])
    target = NodeTarget(reg.node(args["target"]))
    job_id = _job_id(reg, args)
    options = with_sync_bitmap(backup_options(args), source, args)
    _check_filter_name(reg, args)
    _refuse_own_source(reg, source, target)
    if options.compress and not can_compress(target.node.device):
        raise generic(f"Compression is not supported for this drive {target.node.name}")
    return BackupRequest(job_id, source, options, target)


def _nbd_target(reg: Registry, text: str) -> NbdTarget:
    """A URI that does not parse is kept as it is, for the opener to refuse with the parser's reason."""
    try:
        uri = parse_uri(text)
    except ValueError:
        return NbdTarget(text, text)
    confined = confine_socket(reg, uri)
    return NbdTarget(text, text if confined is uri else str(confined), uri)


def _refuse_own_source(reg: Registry, source: BlockNode, target: Target) -> None:
    """The one place a backup command finds out that its target is its source (the node itself, its
    image file, or one of our own exports of it) — or a file another node has open."""
    in_use: BlockNode | None = None
    if isinstance(target, NodeTarget):
        same = target.node is source
    elif isinstance(target, NbdTarget):
        exported = None if target.uri is None else reg.own_export_node(target.uri)
        same = exported is not None and same_image(exported, source)
    else:
        in_use = reg.filename_in_use(target.path)
        same = in_use is source
    if same:
        raise same_source_and_target()
    if in_use is not None:
        assert isinstance(target, FileTarget)
        raise generic(f"Target '{target.given}' is in use by block node '{in_use.name}'")


async def prepare_backup(reg: Registry, request: BackupRequest) -> PreparedBackup:
    """Open (or create) the request's target and create its job (``created``)."""
    source, target_spec = request.source, request.target
    if isinstance(target_spec, NodeTarget):
        node = target_spec.node
        target = await open_device_target(node, size=source.size, source_device=source)
        job = BackupJob(
            request.job_id, source, node, request.options, events=reg.events, target_zero_init=target.zero_init
        )
        node.hold(job)
        reg.add_job(job, cleanup=[lambda: node.release(job)])
        return PreparedBackup(job, target, node)
    target = await _open_new_target(reg, source, target_spec, compress=request.options.compress)
    try:
        reg.check_new_job_id(request.job_id)  # another client may have taken it while the target opened
        job = BackupJob(
            request.job_id,
            source,
            target.device,
            request.options,
            events=reg.events,
            target_zero_init=target.zero_init,
            owner=target if target.owned else None,
        )
    except BaseException:
        await target.discard()
        raise
    reg.add_job(job)
    return PreparedBackup(job, target)


async def _open_new_target(
    reg: Registry, source: BlockNode, spec: FileTarget | NbdTarget, *, compress: bool
) -> BackupTarget:
    """Connect to an NBD target or open (create) a file target, with QEMU's texts for what fails."""
    try:
        if isinstance(spec, NbdTarget):
            return await open_nbd_target(spec.connect_to, size=source.size)
        if spec.backing is not None:
            return await create_backed_target(spec.path, source.size, spec.backing, compress=compress)
        return await open_file_target(
            Path(spec.path),
            size=source.size,
            format=spec.format,
            mode=spec.mode,
            source_filename=source.filename,
            check_backing=reg.paths.check_backing,
            compress=compress,  # only a qcow2 target gets here with compress (checked when resolved)
        )
    except (BackupError, QmpError):
        raise
    except (NbdError, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(spec, NbdTarget):
            raise generic(f"Failed to connect to '{spec.given}': {reason}") from exc
        verb = "create" if spec.mode == "absolute-paths" else "open"
        raise generic(f"Could not {verb} '{spec.given}': {reason}") from exc


class BackupAction:
    """A ``drive-backup`` / ``blockdev-backup`` as a transaction action (QEMU's ``BlkActionOps``).

    ``prepare`` creates the job, then drains its source — held until ``clean``, so every source of
    the transaction is quiet at once — installs the copy-before-write filter (the point in time) and
    holds the job paused; ``commit`` starts it; ``clean`` ends the drain and lets it run. That gives
    QEMU's events: created, running, paused, running. ``abort`` cancels the job and deletes a target
    file it created.
    """

    def __init__(self, reg: Registry, kind: str, args: dict[str, Any], txn: Transaction) -> None:
        self.reg = reg
        self.kind = kind
        self.args = args
        self.txn = txn
        self.prepared: PreparedBackup | None = None
        self._drain: contextlib.AbstractAsyncContextManager[None] | None = None
        self._held = False
        self._committed = False

    async def prepare(self) -> None:
        resolve = resolve_drive_backup if self.kind == "drive-backup" else resolve_blockdev_backup
        self.prepared = await prepare_backup(self.reg, resolve(self.reg, self.args))
        job = self.prepared.job
        self.txn.add_job(job)
        drain = job.source.drained()
        await drain.__aenter__()
        self._drain = drain
        job.install_filter()
        job.pause_internal()
        self._held = True

    def commit(self) -> None:
        assert self.prepared is not None
        self.prepared.job.start()
        self._committed = True

    async def abort(self) -> None:
        if self.prepared is not None:
            await self.prepared.abort()

    async def clean(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None:
            await drain.__aexit__(None, None, None)
        if self._held and self._committed and self.prepared is not None:
            self.prepared.job.resume_internal()
        self._held = False


async def run_backups(
    reg: Registry, actions: list[tuple[str, dict[str, Any]]], *, completion_mode: str = "individual"
) -> None:
    """Run backup (and bitmap) actions as one transaction: every job starts at one point in time, and
    every bitmap changes at it, or nothing happens."""
    txn = Transaction(completion_mode)
    steps: list[TransactionAction] = []
    for kind, data in actions:
        if kind == "abort":
            steps.append(AbortAction())
        elif kind in BITMAP_ACTIONS:
            steps.append(BitmapAction(reg, kind, data, txn))
        else:
            steps.append(BackupAction(reg, kind, data, txn))
    await run_transaction(steps)


def _verb(call: Any) -> dict[str, Any]:
    """Run a job verb; the job layer raises ``JobStateError`` with QEMU's texts."""
    call()
    return {}


async def settle(reg: Registry, job: Job, until: Callable[[], bool], timeout: float = SETTLE_TIMEOUT) -> None:
    """Wait (bounded) until ``until()`` holds after one of ``job``'s status changes."""
    if until():
        return
    reached = asyncio.Event()

    def on_event(event: Any) -> None:
        if event.name == "JOB_STATUS_CHANGE" and event.data.get("id") == job.id and until():
            reached.set()

    unsubscribe = reg.events.subscribe(on_event)
    try:
        async with asyncio.timeout(timeout):
            await reached.wait()
    except TimeoutError:
        pass
    finally:
        unsubscribe()


async def pause_job(reg: Registry, job: Job) -> dict[str, Any]:
    job.pause()
    await settle(reg, job, lambda: job.status is not JobStatus.RUNNING)
    return {}


async def cancel_job(reg: Registry, job: Job, *, force: bool) -> dict[str, Any]:
    job.cancel(force=force)
    await settle(reg, job, lambda: job.status in (JobStatus.CONCLUDED, JobStatus.NULL))
    return {}


def register(commands: CommandRegistry) -> None:
    """Add the backup and job commands; handlers get the daemon's ``Registry`` as ``ctx``."""

    @commands.command("drive-backup", args=DRIVE_BACKUP)
    async def drive_backup(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Back a block node up to a file (created unless mode=existing) or an NBD URI."""
        await run_backups(reg, [("drive-backup", args)])
        return {}

    @commands.command("blockdev-backup", args=BLOCKDEV_BACKUP)
    async def blockdev_backup(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Back a block node up to another block node."""
        await run_backups(reg, [("blockdev-backup", args)])
        return {}

    @commands.command("transaction", args={"actions": [TRANSACTION_ACTION], "*properties": TRANSACTION_PROPERTIES})
    async def transaction(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Start several backups at one point in time; if one action fails, none happens."""
        mode = args.get("properties", {}).get("completion-mode", "individual")
        await run_backups(reg, [(a["type"], a["data"]) for a in args["actions"]], completion_mode=mode)
        return {}

    @commands.command("query-block-jobs")
    async def query_block_jobs(reg: Registry, args: dict[str, Any]) -> list[dict[str, Any]]:
        """Every block job, newest first (QEMU's order)."""
        return [job.query_block_job() for job in _newest_first(reg) if job.is_block_job]

    @commands.command("query-jobs")
    async def query_jobs(reg: Registry, args: dict[str, Any]) -> list[dict[str, Any]]:
        """Every job, newest first (QEMU's order)."""
        return [job.query_job() for job in _newest_first(reg)]

    # --- block-job-* (device = job id; "not found" is DeviceNotActive) ---

    @commands.command("block-job-cancel", args={"device": "str", "*force": "bool"})
    async def block_job_cancel(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Cancel a block job (BLOCK_JOB_CANCELLED follows); a paused one only with force=true."""
        job = reg.block_job(args["device"])
        force = args.get("force", False)
        if job.user_paused and not force:
            # QEMU's qmp_block_job_cancel: a paused job (by the user or by an on-*-error=stop error)
            # needs force, and stays paused otherwise; job-cancel always forces.
            raise generic(f"The block job for device '{args['device']}' is currently paused")
        return await cancel_job(reg, job, force=force)

    @commands.command("block-job-pause", args={"device": "str"})
    async def block_job_pause(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Pause a block job."""
        return await pause_job(reg, reg.block_job(args["device"]))

    @commands.command("block-job-set-speed", args={"device": "str", "speed": "int"})
    async def block_job_set_speed(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Change a block job's rate limit in bytes per second (0 = unlimited)."""
        job = reg.block_job(args["device"])
        return _verb(lambda: job.set_speed(args["speed"]))

    # --- job-* (id; "not found" is GenericError "Job not found") ---

    @commands.command("job-cancel", args={"id": "str"})
    async def job_cancel(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Cancel a job."""
        return await cancel_job(reg, reg.job(args["id"]), force=True)

    @commands.command("job-pause", args={"id": "str"})
    async def job_pause(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Pause a job."""
        return await pause_job(reg, reg.job(args["id"]))

    for name, key, method, summary in PLAIN_VERBS:
        commands.register(name, _plain_verb(name, key, method, summary), {key: "str"})


#: The verbs that only call the job's method and reply ``{}``: (command, id member, method, summary).
PLAIN_VERBS = (
    ("block-job-resume", "device", "resume", "Resume a paused block job (also after an error with on-*-error=stop)."),
    ("block-job-complete", "device", "complete", "Complete a ready job (backup jobs never are)."),
    ("block-job-finalize", "id", "finalize", "Finalize a pending job (auto-finalize=false)."),
    ("block-job-dismiss", "id", "dismiss", "Remove a concluded job (auto-dismiss=false)."),
    ("job-resume", "id", "resume", "Resume a paused job."),
    ("job-complete", "id", "complete", "Complete a ready job."),
    ("job-finalize", "id", "finalize", "Finalize a pending job."),
    ("job-dismiss", "id", "dismiss", "Remove a concluded job."),
)


def _plain_verb(name: str, key: str, method: str, summary: str) -> Handler:
    """The handler of one of ``PLAIN_VERBS``: ``block-job-*`` find the job as QEMU's block-job commands
    do (DeviceNotActive), ``job-*`` as its job commands (GenericError "Job not found")."""
    lookup = Registry.job if name.startswith("job-") else Registry.block_job

    async def handler(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        return _verb(getattr(lookup(reg, args[key]), method))

    handler.__doc__ = summary
    handler.__name__ = handler.__qualname__ = name.replace("-", "_")
    return handler


def _newest_first(reg: Registry) -> list[Job]:
    return list(reversed(list(reg.jobs.values())))
