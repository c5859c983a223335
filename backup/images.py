"""Opening disk images by format: probe the format from the image's first bytes, and refuse to open
an image as a format it is not (a qcow2 image exported as raw would hand its metadata to a guest).

A probed image is guarded as QEMU guards one: its writers must not be able to choose its format or
what it reads through. A probed raw image refuses first-sector writes that would make it probe as
another format (``backup.probed_raw``), and a probed qcow2 image that names a backing file is
refused (the name came from whoever wrote the file; ``format=qcow2`` says the user trusts it)."""

from __future__ import annotations

import errno
import functools
import importlib
import os
from typing import TYPE_CHECKING, Literal

from backup.errors import ImageFormatError
from nbd.device import BlockDevice

if TYPE_CHECKING:
    from backup.qcow2.backing import BackingCheck

Format = Literal["raw", "qcow2"]
FORMATS: tuple[str, ...] = ("raw", "qcow2")
QCOW2_MAGIC = b"QFI\xfb"


def probe_format(path: str | os.PathLike[str]) -> Format:
    """``"qcow2"`` when the file starts with the qcow2 magic, else ``"raw"``."""
    with open(path, "rb") as f:
        head = f.read(len(QCOW2_MAGIC))
    return "qcow2" if head == QCOW2_MAGIC else "raw"


async def open_image(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    read_only: bool = False,
    check_backing: BackingCheck | None = None,
    guard_probed: bool = True,
    compress: bool = False,
    backing_device: BlockDevice | None = None,
) -> BlockDevice:
    """Open ``path`` as ``format`` (probed when None) and return the device; ``check_backing`` sees
    every file of a qcow2 image's backing chain before it is opened (see ``backup.qcow2.backing``).
    ``compress``: a qcow2 image stores the clusters written from now on compressed (raw refuses it).
    ``backing_device``: a qcow2 image reads unallocated clusters from it (see ``Qcow2Device.open``).

    A probed image is guarded (see the module docstring) unless ``guard_probed`` is False: for the
    user's own command-line copies, which trust their files as ``qemu-img`` does.
    """
    if format is not None and format not in FORMATS:
        raise ImageFormatError(f"unknown image format '{format}' (expected one of: {', '.join(FORMATS)})")
    try:
        probed = probe_format(path)
    except OSError as exc:
        raise ImageFormatError(f"cannot open '{os.fspath(path)}': {exc.strerror or exc}") from exc
    guard = guard_probed and format is None
    if format is None:
        format = probed
    if format == "raw" and probed == "qcow2":
        raise ImageFormatError(
            f"'{os.fspath(path)}' is a qcow2 image (it starts with the qcow2 magic); opening it as raw would "
            "expose its metadata as disk contents — open it with format=qcow2"
        )
    if format == "qcow2" and probed != "qcow2":
        raise ImageFormatError(f"'{os.fspath(path)}' is not a qcow2 image (no qcow2 magic); open it with format=raw")
    if format == "raw":
        if compress:
            raise ImageFormatError("Compression is not supported for raw images; use format=qcow2")
        if backing_device is not None:
            raise ImageFormatError("a raw image cannot have a backing file; use format=qcow2")
        from backup.rawfile import RawFileDevice

        raw = await RawFileDevice.open(path, read_only=read_only)
        if guard and not read_only:
            from backup.probed_raw import ProbedRawGuard

            return ProbedRawGuard(raw)
        return raw
    if guard:
        check_backing = functools.partial(_refuse_backing_of_probed, check_backing)
    try:
        qcow2 = importlib.import_module("backup.qcow2")
    except ImportError as exc:
        raise ImageFormatError(f"'{os.fspath(path)}': qcow2 images are not supported by this build") from exc
    device: BlockDevice = await qcow2.Qcow2Device.open(
        path, read_only=read_only, compress=compress, check_backing=check_backing, backing_device=backing_device
    )
    return device


def _refuse_backing_of_probed(check: BackingCheck | None, backing: str, image: str) -> str:
    """The ``BackingCheck`` of a probed image: the caller's check first (its error is the more
    precise one), then the refusal."""
    if check is not None:
        backing = check(backing, image)
    raise ImageFormatError(
        f"'{image}' was opened without a format (probed as qcow2) and names a backing file "
        f"('{os.path.normpath(backing)}'); "
        "the backing file of a probed image is never followed — open it with format=qcow2 to use its backing chain"
    )


async def create_image(
    path: str | os.PathLike[str],
    size: int | None,
    *,
    format: str = "raw",
    backing_file: str | None = None,
    backing_format: str | None = None,
    cluster_size: int | None = None,
    compress: bool = False,
    compression_type: str = "zlib",
    backing_device: BlockDevice | None = None,
) -> BlockDevice:
    """Create (or recreate, as ``qemu-img create`` does) an image and return it open for writing;
    its directory is fsynced, so the new file survives a crash as its contents will.

    qcow2 takes a ``backing_file`` (the fleecing schemes of ``sync=none``/``top``; ``size`` None
    means the backing file's size), a cluster size, and ``compress`` for compressed backups; raw
    images can do none of these and refuse them, as QEMU does. ``backing_device`` reads the backing
    file through a device already open in this process (a live fleecing source) instead of reopening it.
    """
    if format not in FORMATS:
        raise ImageFormatError(f"unknown image format '{format}' (expected one of: {', '.join(FORMATS)})")
    if format == "raw":
        if backing_file is not None or backing_device is not None:
            raise ImageFormatError("a raw image cannot have a backing file; use format=qcow2")
        if compress:
            raise ImageFormatError("Compression is not supported for raw images; use format=qcow2")
        if backing_device is not None:
            raise ImageFormatError("a raw image cannot have a backing file; use format=qcow2")
        if size is None:
            raise ImageFormatError("creating a raw image needs a size")
        from backup.rawfile import RawFileDevice

        raw = await RawFileDevice.create(path, size, exist_ok=True)
        return await _synced_dir(path, raw)
    from backup.qcow2 import Qcow2Device

    qcow2 = await Qcow2Device.create(
        path,
        size,
        cluster_size=cluster_size or 65536,
        backing_file=backing_file,
        backing_format=backing_format,
        compress=compress,
        compression_type=compression_type,
        backing_device=backing_device,
    )
    return await _synced_dir(path, qcow2)


async def _synced_dir(path: str | os.PathLike[str], device: BlockDevice) -> BlockDevice:
    """``device`` once ``path``'s directory is fsynced (closed if that fails)."""
    try:
        fsync_parent_dir(path)
    except BaseException:
        await device.close()
        raise
    return device


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make the creation, removal or rename of a name in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a file system that cannot sync a directory: nothing to do
            raise
    finally:
        os.close(fd)


def fsync_parent_dir(path: str | os.PathLike[str]) -> None:
    """Make the directory entry of ``path`` (a file just created or renamed) durable."""
    fsync_dir(os.path.dirname(os.path.abspath(path)))
