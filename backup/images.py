"""Opening disk images by format: probe the format from the image's first bytes, and refuse to open
an image as a format it is not (a qcow2 image exported as raw would hand its metadata to a guest)."""

from __future__ import annotations

import importlib
import os
from typing import Literal

from backup.errors import ImageFormatError
from nbd.device import BlockDevice

Format = Literal["raw", "qcow2"]
FORMATS: tuple[str, ...] = ("raw", "qcow2")
QCOW2_MAGIC = b"QFI\xfb"


def probe_format(path: str | os.PathLike[str]) -> Format:
    """``"qcow2"`` when the file starts with the qcow2 magic, else ``"raw"``."""
    with open(path, "rb") as f:
        head = f.read(len(QCOW2_MAGIC))
    return "qcow2" if head == QCOW2_MAGIC else "raw"


async def open_image(
    path: str | os.PathLike[str], *, format: str | None = None, read_only: bool = False
) -> BlockDevice:
    """Open ``path`` as ``format`` (probed when None) and return the device."""
    if format is not None and format not in FORMATS:
        raise ImageFormatError(f"unknown image format '{format}' (expected one of: {', '.join(FORMATS)})")
    try:
        probed = probe_format(path)
    except OSError as exc:
        raise ImageFormatError(f"cannot open '{os.fspath(path)}': {exc.strerror or exc}") from exc
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
        from backup.rawfile import RawFileDevice

        return await RawFileDevice.open(path, read_only=read_only)
    try:
        qcow2 = importlib.import_module("backup.qcow2")
    except ImportError as exc:
        raise ImageFormatError(f"'{os.fspath(path)}': qcow2 images are not supported by this build") from exc
    device: BlockDevice = await qcow2.Qcow2Device.open(path, read_only=read_only)
    return device
