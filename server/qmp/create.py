"""QMP ``blockdev-create``: make an image over QMP (QEMU's command, job based), drivers ``file`` and ``qcow2``.

As in qemu-storage-daemon 7.2 (integration/test_blockdev_create_diff.py runs the same sequences
against both): the command checks the job id and the driver and starts a job of type ``create``,
which is a plain job (``query-jobs``, ``JOB_STATUS_CHANGE`` created, running, waiting, pending,
concluded; no ``BLOCK_JOB_*`` events, not in ``query-block-jobs``), auto-finalized but never
auto-dismissed: a client reads the outcome (``error`` in ``query-jobs``) and then runs ``job-dismiss``.
Everything else — the node to write on, sizes, the cluster size — is checked inside the job, and a
failure is the job's ``error``, with QEMU's texts.

``file`` creates (or empties and resizes) a file; ``qcow2`` writes an empty qcow2 image onto a
``file`` node added before (the usual sequence: create the file, ``blockdev-add`` it, create qcow2
on it, ``blockdev-add`` the qcow2 node). QEMU has no ``raw`` creation ("Driver does not support
blockdev-create"): a raw image is a ``file`` of the wanted size. Unlike QEMU, the file's path goes
through ``--allow-dir`` at once (the command is refused, nothing is created), and so does the
backing file a qcow2 image names.
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any, ClassVar

from backup.events import EventBus
from backup.job import Job
from backup.rawfile import RawFileDevice
from server.qmp.block import BLOCKDEV_REF
from server.qmp.dispatch import CommandRegistry
from server.qmp.schema import Enum, Union
from server.registry import Registry, generic

#: QEMU 7.2's ``BlockdevDriver`` (the union's discriminator: every driver passes the schema, and the
#: ones without image creation fail as QEMU's do).
BLOCKDEV_DRIVERS = [
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
]
#: Drivers QEMU can create images for that we cannot (a clear refusal instead of QEMU's schema errors).
OTHER_CREATORS = ("gluster", "luks", "nfs", "parallels", "qcow", "qed", "rbd", "ssh", "vdi", "vhdx", "vmdk", "vpc")
PREALLOC = Enum("PreallocMode", ["off", "metadata", "falloc", "full"])
ZERO_CHUNK = 1 << 20

CREATE_OPTIONS = Union(
    "BlockdevCreateOptions",
    {"driver": Enum("BlockdevDriver", BLOCKDEV_DRIVERS)},
    "driver",
    {
        "file": {
            "filename": "str",
            "size": "size",
            "*preallocation": PREALLOC,
            "*nocow": "bool",
            "*extent-size-hint": "size",
        },
        "qcow2": {
            "file": BLOCKDEV_REF,
            "*data-file": BLOCKDEV_REF,
            "*data-file-raw": "bool",
            "*extended-l2": "bool",
            "size": "size",
            "*version": Enum("BlockdevQcow2Version", ["v2", "v3"]),
            "*backing-file": "str",
            "*backing-fmt": Enum("BlockdevDriver", BLOCKDEV_DRIVERS),
            "*encrypt": "any",
            "*cluster-size": "size",
            "*preallocation": PREALLOC,
            "*lazy-refcounts": "bool",
            "*refcount-bits": "int",
            "*compression-type": Enum("Qcow2CompressionType", ["zlib", "zstd"]),
        },
    },
)


class CreateError(Exception):
    """Why the image could not be made: the job's ``error`` text, as QEMU words it."""


class CreateJob(Job):
    """QEMU's ``create`` job: one step (progress 0/1, then 1/1), kept until ``job-dismiss``."""

    job_type: ClassVar[str] = "create"
    is_block_job: ClassVar[bool] = False

    def __init__(self, job_id: str, reg: Registry, options: dict[str, Any], *, events: EventBus) -> None:
        super().__init__(job_id, events=events, auto_finalize=True, auto_dismiss=False)
        self.reg = reg
        self.options = options
        self.total_progress = 1

    async def run(self) -> None:
        try:
            if self.options["driver"] == "file":
                await create_file(self.reg, self.options)
            else:
                await create_qcow2(self.reg, self.options)
        finally:
            self.progress_done(1)  # QEMU's create job counts its one step done, failed or not


async def create_file(reg: Registry, options: dict[str, Any]) -> None:
    """A file of ``size`` bytes (emptied first when it exists, as QEMU's file-posix does)."""
    path = options["resolved"]
    prealloc = options.get("preallocation", "off")
    if prealloc == "metadata":
        raise CreateError("Unsupported preallocation mode 'metadata'")
    if options.get("nocow"):
        raise CreateError("nocow is not supported (btrfs only, and not by nbd-backup)")
    other = reg.filename_in_use(path)
    if other is not None:
        raise CreateError(f"Failed to get \"write\" lock: '{path}' is open as node '{other.name}'")
    size = options["size"]
    if size >= 1 << 63:
        raise CreateError("Could not resize file: Invalid argument")
    await asyncio.to_thread(_write_file, path, size, prealloc)


def _write_file(path: str, size: int, prealloc: str) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise CreateError(f"Could not create '{path}': {os.strerror(exc.errno or errno.EIO)}") from exc
    try:
        try:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
        except OSError as exc:
            raise CreateError(f"Could not resize file: {os.strerror(exc.errno or errno.EIO)}") from exc
        try:
            if prealloc == "falloc" and size:
                os.posix_fallocate(fd, 0, size)
            elif prealloc == "full":
                zeros = bytes(ZERO_CHUNK)
                for offset in range(0, size, ZERO_CHUNK):
                    os.pwrite(fd, zeros[: min(ZERO_CHUNK, size - offset)], offset)
            os.fsync(fd)
        except OSError as exc:
            raise CreateError(f"Could not preallocate data for the new file: {os.strerror(exc.errno or 0)}") from exc
    finally:
        os.close(fd)
    from backup.images import fsync_parent_dir

    fsync_parent_dir(path)


async def create_qcow2(reg: Registry, options: dict[str, Any]) -> None:
    """An empty qcow2 image written onto the ``file`` node ``options["file"]``, checks in QEMU's order."""
    ref = options["file"]
    if not isinstance(ref, str):
        raise CreateError("give 'file' as the node-name of a 'file' node added with blockdev-add")
    node = reg.nodes.get(ref)
    if node is None:
        raise CreateError(f"Cannot find device='{ref}' nor node-name='{ref}'")
    size = options["size"]
    if size % 512:
        raise CreateError("Image size must be a multiple of 512 bytes")
    cluster_size = options.get("cluster-size", 65536)
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 << 20:
        raise CreateError("Cluster size must be a power of two between 512 and 2048k")
    unsupported = [key for key in ("data-file", "data-file-raw", "encrypt", "lazy-refcounts") if options.get(key)]
    if options.get("extended-l2"):
        unsupported.append("extended-l2")
    if options.get("version", "v3") != "v3":
        unsupported.append("version v2")
    if options.get("refcount-bits", 16) != 16:
        unsupported.append("refcount-bits other than 16")
    if options.get("preallocation", "off") != "off":
        unsupported.append(f"preallocation {options['preallocation']}")
    if unsupported:
        raise CreateError(f"qcow2 creation here does not support: {', '.join(unsupported)}")
    if node.driver != "file" or not isinstance(node.device, RawFileDevice) or node.filename is None:
        raise CreateError(f"qcow2 images are created on a 'file' node; '{ref}' is a '{node.driver}' node")
    if node.read_only:
        raise CreateError(f"Block node is read-only: '{ref}'")
    if node.users:
        raise CreateError(f"Node '{ref}' is in use: a qcow2 image is created on a node nothing else uses")
    path = node.filename
    backing = options.get("backing-file")
    if backing is not None:
        where = backing if os.path.isabs(backing) else os.path.join(os.path.dirname(path), backing)
        try:
            reg.paths.check_backing(where, path)
        except Exception as exc:
            raise CreateError(str(exc)) from exc
    from backup.errors import BackupError
    from backup.qcow2 import Qcow2Device

    try:
        image = await Qcow2Device.create(
            path,
            size,
            cluster_size=cluster_size,
            backing_file=backing,
            backing_format=options.get("backing-fmt"),
            compression_type=options.get("compression-type", "zlib"),
        )
        await image.close()
    except (BackupError, OSError) as exc:
        raise CreateError(f"Could not create the qcow2 image on '{ref}': {exc}") from exc
    node.device.refresh_size()


def check_create(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
    """What the command itself checks before the job exists: the job id, the driver, a file's path
    (``--allow-dir``); returns the options the job works from (the file's resolved path added)."""
    reg.check_new_job_id(args["job-id"])
    options = dict(args["options"])
    driver = options["driver"]
    if driver in OTHER_CREATORS:
        raise generic(f"Driver '{driver}' is not supported by blockdev-create here (file, qcow2)")
    if driver not in ("file", "qcow2"):
        raise generic("Driver does not support blockdev-create")
    if driver == "file":
        options["resolved"] = str(reg.paths.resolve(options["filename"]))
    return options


def register(commands: CommandRegistry) -> None:
    """Add ``blockdev-create``; the handler gets the daemon's ``Registry`` as ``ctx``."""

    @commands.command("blockdev-create", args={"job-id": "str", "options": CREATE_OPTIONS})
    async def blockdev_create(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Start a job that creates an image (file, qcow2); job-dismiss it once concluded."""
        options = check_create(reg, args)
        job = CreateJob(args["job-id"], reg, options, events=reg.events)
        reg.add_job(job)
        job.start()
        return {}
