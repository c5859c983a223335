"""``open_target``: turn what the user named as a backup target into a device the job can write.

A target is one of: a path (a raw image created at the source's size rounded up to 512 bytes, or an
existing image of the right size; qcow2 through ``backup.images``), an NBD URI (a remote export
through ``NbdClient``), or any ``BlockDevice`` (a block node). The result says whether the target is
known to read as zeroes — only then may the job skip zero clusters instead of writing zeroes — and
what was created, so an aborted transaction or a failed start leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from backup.errors import InvalidArgument
from nbd.constants import State
from nbd.device import BlockDevice

if TYPE_CHECKING:
    from backup.qcow2.backing import BackingCheck

log = logging.getLogger(__name__)

SECTOR = 512
#: How many block-status replies ``reads_as_zeroes`` looks at before giving up (a fragmented target
#: is simply treated as not zero-initialised).
_MAX_STATUS_CALLS = 64

Mode = Literal["existing", "absolute-paths"]


def round_up(size: int, unit: int = SECTOR) -> int:
    return (size + unit - 1) // unit * unit


@dataclass
class BackupTarget:
    """An opened target: the device, whether it reads as zeroes now, and what opening it created."""

    device: BlockDevice
    zero_init: bool
    created: Path | None = None  # a file this call created: deleted by ``discard``
    owned: bool = True  # opened here (closed by ``close``); False for a device handed in by the caller
    description: str = field(default="")
    closed: bool = field(default=False, repr=False)

    async def close(self) -> None:
        """Close the device if it was opened here (once: the job may have closed it already)."""
        if self.owned and not self.closed:
            self.closed = True
            await self.device.close()

    async def discard(self) -> None:
        """Undo ``open_target``: close, and delete the file if this created it (transaction abort)."""
        try:
            await self.close()
        finally:
            if self.created is not None:
                _remove(self.created)
                self.created = None


async def reads_as_zeroes(device: BlockDevice) -> bool:
    """True when block status says every byte of ``device`` reads as zero (a fresh sparse image)."""
    if not device.capabilities.can_extents:
        return False
    pos, size = 0, device.size
    for _ in range(_MAX_STATUS_CALLS):
        if pos >= size:
            return True
        try:
            extents = await device.block_status(pos, size - pos)
        except OSError:
            return False
        if not extents:
            return False
        for extent in extents:
            if not extent.flags & State.ZERO or extent.length <= 0:
                return False
            pos += extent.length
    return pos >= size


def check_size(target_size: int, source_size: int, what: str) -> None:
    """QEMU insists on equal sizes; we also accept the 512-byte round-up of a created raw file."""
    if target_size not in (source_size, round_up(source_size)):
        raise InvalidArgument(
            f"Source and target image have different sizes ({what}: {target_size} bytes, source: {source_size} bytes)"
        )


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
    compress: bool = False,
    check_backing: BackingCheck | None = None,
) -> BackupTarget:
    """Open (or create) the target of a backup of ``size`` bytes.

    ``mode`` as QEMU's ``NewImageMode``: ``existing`` requires the image to exist; ``absolute-paths``
    creates a new one; ``None`` uses an existing image or creates a missing one. ``compress`` creates
    a qcow2 target that stores compressed clusters (raw targets refuse it, as QEMU does). ``source_device`` /
    ``source_filename`` identify the source so that backing a disk up onto itself is refused.
    ``check_backing`` sees every backing file of an existing qcow2 target before it opens (the path policy).
    """
    if not isinstance(target, str | os.PathLike):
        if source_device is not None and target is source_device:
            raise InvalidArgument("Source and target cannot be the same")
        check_size(target.size, size, "target")
        return BackupTarget(target, await reads_as_zeroes(target), owned=False, description=repr(target))

    text = os.fspath(target)
    from nbd.uri import looks_like_uri

    if looks_like_uri(text):
        return await _open_nbd(text, size=size, connections=nbd_connections)
    if source_filename is not None and _same_file(text, source_filename):
        raise InvalidArgument("Source and target cannot be the same")
    return await _open_file(
        Path(text), size=size, format=format, mode=mode, compress=compress, check_backing=check_backing
    )


async def _open_nbd(text: str, *, size: int, connections: int | None) -> BackupTarget:
    from nbd.client import NbdClient
    from nbd.uri import parse_uri

    uri = parse_uri(text)
    client = await NbdClient.connect(uri, connections=connections)
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


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def _open_file(
    path: Path,
    *,
    size: int,
    format: str | None,
    mode: Mode | None,
    compress: bool,
    check_backing: BackingCheck | None = None,
) -> BackupTarget:
    exists = _exists(path)
    if mode == "existing" and not exists:
        raise InvalidArgument(f"Could not open '{path}': No such file or directory")
    create = mode == "absolute-paths" or not exists
    fmt = format or ("raw" if create else None)
    created: Path | None = None
    device: BlockDevice
    if create:
        try:
            device = await _create_image(path, size, fmt or "raw", exists=exists, compress=compress)
        except BaseException:
            if not exists:
                _remove(path)
            raise
        if not exists:
            created = path
    else:
        device = await _open_image(path, fmt, check_backing)
    try:
        check_size(device.size, size, f"target '{path}'")
        zero_init = await reads_as_zeroes(device)
    except BaseException:
        await device.close()
        if created is not None:
            _remove(created)
        raise
    return BackupTarget(device, zero_init, created=created, description=str(path))


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


async def _open_image(path: Path, fmt: str | None, check_backing: BackingCheck | None) -> BlockDevice:
    from backup import images

    device: BlockDevice = await images.open_image(str(path), format=fmt, check_backing=check_backing)
    return device


__all__ = ["BackupTarget", "check_size", "open_target", "reads_as_zeroes", "round_up"]
