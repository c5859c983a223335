"""``open_target``: turn what the user named as a backup target into a device the job can write.

A target is one of: a path (a raw image created at the source's size rounded up to 512 bytes, or an
existing image of the right size; qcow2 through ``backup.images``), an NBD URI (a remote export
through ``NbdClient``, with a request timeout: a target that stops answering fails the backup
instead of holding it, and its connections, forever), or any ``BlockDevice`` (a block node). The
result says whether the target is known to read as zeroes — only then may the job skip zero clusters
instead of writing zeroes — and what was created, so an aborted transaction or a failed start leaves
nothing behind.

A backup that did not complete must not look complete. A new file (and a file that ``absolute-paths``
recreates) is written under a temporary name next to it, ``.NAME.partial-XXXXXXXX``, and renamed to
NAME only by ``complete`` — after its last flush and close succeeded — with the directory fsynced
after the creation and after the rename; ``discard`` deletes it. (A file that existed keeps its old
contents until then.) An existing image written in place (``mode=existing``) cannot be renamed: a
qcow2 v3 image that the backup wrote to and did not complete is marked corrupt (incompatible feature
bit 1) — ``qemu-img info`` shows ``corrupt: true``, QEMU and we refuse to open it for writing until
``qemu-img check -r all`` clears the bit. Raw images, qcow2 v2 images, block devices and NBD targets
have no such mark: there, the job's error or cancel event is the only record.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from backup.errors import InvalidArgument, different_sizes, same_source_and_target
from backup.images import fsync_dir
from nbd.align import SECTOR, round_up
from nbd.constants import State
from nbd.device import BlockDevice, format_name

if TYPE_CHECKING:
    from backup.qcow2.backing import BackingCheck

log = logging.getLogger(__name__)

#: How many block-status replies ``reads_as_zeroes`` looks at before giving up (a fragmented target
#: is simply treated as not zero-initialised).
_FIRST_STATUS_WINDOW = 16 << 20
_MAX_STATUS_CALLS = 64
#: Seconds an NBD target may stay silent with requests in flight before its connection is dropped and
#: the requests fail with ETIMEDOUT (the job's on-target-error decides). Generous: a healthy target
#: answers in milliseconds, a busy one within seconds; a FLUSH-only wait gets ten times as long.
TARGET_REQUEST_TIMEOUT = 60.0

Mode = Literal["existing", "absolute-paths"]


@dataclass
class BackupTarget:
    """An opened target: the device, whether it reads as zeroes now, and what opening it created."""

    device: BlockDevice
    zero_init: bool
    created: Path | None = None  # a file this call created: deleted by ``discard``
    owned: bool = True  # opened here (closed by ``close``); False for a device handed in by the caller
    description: str = field(default="")
    closed: bool = field(default=False, repr=False)
    path: Path | None = None  # a file target's name
    partial: Path | None = None  # the temporary name it is written under until ``complete``
    mark_incomplete: bool = False  # an existing qcow2 image: marked corrupt unless the backup completes
    completed: bool = field(default=False, repr=False)

    async def close(self) -> None:
        """Close the device if it was opened here (once: the job may have closed it already)."""
        if self.owned and not self.closed:
            self.closed = True
            await self.device.close()

    def complete(self) -> None:
        """The backup succeeded and the device is closed: move a file written under a temporary name
        into place and make the rename durable. Raises OSError (the file then stays temporary)."""
        if self.partial is not None and self.path is not None:
            os.replace(self.partial, self.path)
            self.partial = None
            fsync_dir(self.path.parent)
        self.created = None  # in place and complete: the user's now
        self.completed = True

    async def discard(self, *, written: bool = False) -> None:
        """Undo ``open_target`` (transaction abort) or abandon a backup that did not complete: close,
        delete the file if this created it (or its temporary copy); when ``written``, mark an
        existing qcow2 image incomplete."""
        try:
            await self.close()
        finally:
            if self.partial is not None:
                _remove(self.partial)
                self.partial = None
                self.created = None
            elif self.created is not None:
                _remove(self.created)
                self.created = None
            if written and self.mark_incomplete and not self.completed and self.path is not None:
                mark_qcow2_incomplete(self.path)


async def reads_as_zeroes(device: BlockDevice) -> bool:
    """True when block status says every byte of ``device`` reads as zero (a fresh sparse image)."""
    if not device.capabilities.can_extents:
        return False
    pos, size = 0, device.size
    window = _FIRST_STATUS_WINDOW
    for _ in range(_MAX_STATUS_CALLS):
        if pos >= size:
            return True
        try:
            # A window that grows, not the whole device at once: an image with data (a backing file
            # full of it) answers on its first extent without walking every mapping table.
            extents = await device.block_status(pos, min(size - pos, window))
        except OSError:
            return False
        if not extents:
            return False
        for extent in extents:
            if not extent.flags & State.ZERO or extent.length <= 0:
                return False
            pos += extent.length
        window *= 8
    return pos >= size


def check_size(target_size: int, source_size: int, what: str) -> None:
    """QEMU insists on equal sizes; we also accept the 512-byte round-up of a created raw file."""
    if target_size not in (source_size, round_up(source_size, SECTOR)):
        raise different_sizes(what, target_size, source_size)


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str] | None) -> bool:
    if b is None:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


async def open_target(
    target: str | os.PathLike[str] | BlockDevice,
    *,
    size: int,
    format: str | None = None,
    mode: Mode | None = None,
    source_device: BlockDevice | None = None,
    source_filename: str | None = None,
    nbd_connections: int | None = None,
    nbd_request_timeout: float | None = TARGET_REQUEST_TIMEOUT,
    compress: bool = False,
    check_backing: BackingCheck | None = None,
) -> BackupTarget:
    """Open (or create) the target of a backup of ``size`` bytes.

    ``mode`` as QEMU's ``NewImageMode``: ``existing`` requires the image to exist; ``absolute-paths``
    creates a new one; ``None`` uses an existing image or creates a missing one. ``compress`` creates
    or opens a qcow2 target that stores compressed clusters (raw targets refuse it, as QEMU does). ``source_device`` /
    ``source_filename`` identify the source so that backing a disk up onto itself is refused.
    ``nbd_request_timeout``: for an NBD URI, the client's request timeout (None or 0: none).
    ``check_backing`` sees every backing file of an existing qcow2 target before it opens (the path policy).
    """
    if not isinstance(target, str | os.PathLike):
        return await open_device_target(target, size=size, source_device=source_device)

    text = os.fspath(target)
    from nbd.uri import looks_like_uri

    if looks_like_uri(text):
        return await open_nbd_target(text, size=size, connections=nbd_connections, request_timeout=nbd_request_timeout)
    return await open_file_target(
        Path(text),
        size=size,
        format=format,
        mode=mode,
        compress=compress,
        source_filename=source_filename,
        check_backing=check_backing,
    )


async def open_device_target(
    device: BlockDevice, *, size: int, source_device: BlockDevice | None = None
) -> BackupTarget:
    """A device the caller holds (a block node) as the target: not opened, nor closed, here."""
    if source_device is not None and device is source_device:
        raise same_source_and_target()
    check_size(device.size, size, "target")
    return BackupTarget(device, await reads_as_zeroes(device), owned=False, description=repr(device))


async def open_nbd_target(
    text: str, *, size: int, connections: int | None = None, request_timeout: float | None = TARGET_REQUEST_TIMEOUT
) -> BackupTarget:
    """An NBD URI as the target (a remote export), connected with a request timeout."""
    from nbd.client import NbdClient
    from nbd.uri import parse_uri

    uri = parse_uri(text)
    client = await NbdClient.connect(uri, connections=connections, request_timeout=request_timeout)
    try:
        if client.read_only:
            raise InvalidArgument(f"NBD target {text} is read-only")
        check_size(client.size, size, f"NBD target {text}")
        zero_init = await reads_as_zeroes(client)
    except BaseException:
        await client.close()
        raise
    return BackupTarget(client, zero_init, description=text)


def _exists(path: Path) -> bool:
    return path.exists()


def partial_path(final: Path) -> Path:
    """A fresh temporary name next to ``final``: the same directory, so the final rename is atomic."""
    return final.with_name(f".{final.name}.partial-{secrets.token_hex(4)}")


def renamable(final: Path) -> bool:
    """Whether a new ``final`` may be written elsewhere and renamed over it: not when an existing
    non-regular file (a block device) is the target itself."""
    try:
        return stat.S_ISREG(os.lstat(final).st_mode)
    except FileNotFoundError:
        return True


def mark_qcow2_incomplete(path: Path) -> None:
    """Set the corrupt bit of a qcow2 v3 image (a backup into it did not complete), durably; a
    failure is logged only: the job has already failed with its own error."""
    from backup.qcow2 import layout as q

    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        log.error("cannot mark '%s' incomplete: %s", path, exc)
        return
    try:
        head = os.pread(fd, q.INCOMPAT_OFFSET + 8, 0)
        if len(head) < q.INCOMPAT_OFFSET + 8 or head[:4] != q.MAGIC or q.U32.unpack_from(head, 4)[0] < 3:
            log.warning("'%s' did not receive a complete backup (a qcow2 v2 image cannot be marked so)", path)
            return
        incompatible = int.from_bytes(head[q.INCOMPAT_OFFSET : q.INCOMPAT_OFFSET + 8], "big") | q.INCOMPAT_CORRUPT
        os.pwrite(fd, incompatible.to_bytes(8, "big"), q.INCOMPAT_OFFSET)
        os.fsync(fd)
        log.warning("'%s' did not receive a complete backup: marked corrupt ('qemu-img check -r all' clears it)", path)
    except OSError as exc:
        log.error("cannot mark '%s' incomplete: %s", path, exc)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def open_file_target(
    path: Path,
    *,
    size: int,
    format: str | None = None,
    mode: Mode | None = None,
    compress: bool = False,
    source_filename: str | None = None,
    check_backing: BackingCheck | None = None,
) -> BackupTarget:
    """An image file as the target: created or opened as ``mode`` says (see ``open_target``)."""
    if source_filename is not None and _same_file(path, source_filename):
        raise same_source_and_target()
    exists = _exists(path)
    if mode == "existing" and not exists:
        raise InvalidArgument(f"Could not open '{path}': No such file or directory")
    create = mode == "absolute-paths" or not exists
    fmt = format or ("raw" if create else None)
    device: BlockDevice
    if create:
        target = await create_file_target(
            path, lambda where, in_place: _create_image(where, size, fmt or "raw", exists=in_place, compress=compress)
        )
        device = target.device
    else:
        device = await _open_image(path, fmt, check_backing, compress)
        qcow2 = format_name(device) == "qcow2"
        target = BackupTarget(device, False, description=str(path), path=path, mark_incomplete=qcow2)
    try:
        check_size(device.size, size, f"target '{path}'")
        target.zero_init = await reads_as_zeroes(device)
    except BaseException:
        await target.discard()
        raise
    return target


async def create_file_target(path: Path, create: Callable[[Path, bool], Awaitable[BlockDevice]]) -> BackupTarget:
    """Create the image file of a new target with ``create(where, in_place)``: under a temporary name
    (renamed by ``complete``) unless ``path`` is an existing block device, which is written in place.
    The directory is fsynced, so the new name survives a crash; a failure leaves nothing behind."""
    exists = _exists(path)
    if not renamable(path):
        device = await create(path, True)
        return BackupTarget(device, True, description=str(path), path=path)
    partial = partial_path(path)
    try:
        device = await create(partial, False)
    except BaseException:
        _remove(partial)
        raise
    target = BackupTarget(
        device, True, created=None if exists else path, description=str(path), path=path, partial=partial
    )
    try:
        fsync_dir(partial.parent)
    except BaseException:
        await target.discard()
        raise
    return target


async def _create_image(path: Path, size: int, fmt: str, *, exists: bool, compress: bool) -> BlockDevice:
    if fmt == "raw":
        if compress:
            raise InvalidArgument("Compression is not supported for raw targets; use format=qcow2")
        from backup.rawfile import RawFileDevice

        # exist_ok: QEMU's absolute-paths mode recreates an existing image (emptied, resized).
        return await RawFileDevice.create(str(path), size, exist_ok=exists)
    from backup.images import create_image

    device: BlockDevice = await create_image(str(path), size, format=fmt, compress=compress)
    return device


async def _open_image(
    path: Path, fmt: str | None, check_backing: BackingCheck | None, compress: bool = False
) -> BlockDevice:
    from backup import images

    device: BlockDevice = await images.open_image(str(path), format=fmt, check_backing=check_backing, compress=compress)
    return device


__all__ = [
    "BackupTarget",
    "check_size",
    "create_file_target",
    "mark_qcow2_incomplete",
    "open_device_target",
    "open_file_target",
    "open_nbd_target",
    "open_target",
    "reads_as_zeroes",
]
