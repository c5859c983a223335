"""Backing files: resolving, checking and probing the read-only chain below a qcow2 image, and
reading a raw one (``Qcow2Device`` opens the qcow2 ones: this module does not know it).

``locate_backing`` is handed the list of files already in the chain, so that a cycle (an image
that is, directly or not, its own backing file) is refused instead of recursing forever, and so
that an absurdly deep chain is refused too. A ``BackingCheck`` handed down from the caller sees
every backing file before it is opened: the daemon's ``--allow-dir`` policy (which lives above this
package) confines a whole chain that way, as it confines named files.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Protocol

from backup.errors import ImageFormatError
from backup.qcow2 import layout as q
from nbd.constants import State
from nbd.device import Extent

MAX_CHAIN_DEPTH = 64

BackingCheck = Callable[[str, str], str]
"""``(backing file path as QEMU resolves it, path of the image naming it) -> the path to open``; it
raises to refuse the file (and the whole image with it)."""


class BackingImage(Protocol):
    """What an image needs from its backing file: sized reads and allocation status."""

    @property
    def size(self) -> int: ...

    async def pread(self, offset: int, length: int) -> bytes: ...

    async def block_status(self, offset: int, length: int) -> list[Extent]: ...

    async def close(self) -> None: ...


class RawBacking:
    """A raw backing file, read-only; reads past its end are zeroes as QEMU makes them."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._size = os.lseek(fd, 0, os.SEEK_END)

    @property
    def size(self) -> int:
        return self._size

    async def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self._size)
        if offset >= end:
            return [Extent(length, State.HOLE | State.ZERO)]
        try:
            data = os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = end  # no data after offset
        if data > offset:
            return [Extent(min(data, end) - offset, State.HOLE | State.ZERO)]
        hole = os.lseek(self._fd, offset, os.SEEK_HOLE)
        return [Extent(min(hole, end) - offset, 0)]

    async def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def resolve_backing_path(name: str, image_path: str) -> str:
    """QEMU's rule: a relative backing file name is relative to the image's directory."""
    if "://" in name or name.startswith("json:"):
        raise ImageFormatError(f"{image_path}: backing file {name!r} is not a local file (protocols are not supported)")
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)


def chain_key(path: str) -> str:
    """How a file is recognised in a chain (symlinks and relative names resolved)."""
    return os.path.realpath(path)


def locate_backing(name: str, image_path: str, chain: tuple[str, ...], check: BackingCheck | None = None) -> str:
    """The backing file's path, refusing what ``check`` refuses, cycles, over-deep chains and missing files."""
    path = resolve_backing_path(name, image_path)
    if check is not None:
        path = check(path, image_path)
    real = chain_key(path)
    if real in chain:
        shown = " -> ".join([*chain, real])
        raise ImageFormatError(f"{image_path}: backing file chain has a cycle: {shown}")
    if len(chain) >= MAX_CHAIN_DEPTH:
        raise ImageFormatError(f"{image_path}: backing file chain is deeper than {MAX_CHAIN_DEPTH} images")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageFormatError(f"{image_path}: backing file {path!r} does not exist") from None
    except OSError as exc:
        raise ImageFormatError(f"{image_path}: backing file {path!r}: {exc.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):  # a FIFO or a device could block or never end
        raise ImageFormatError(f"{image_path}: backing file {path!r} is not a regular file or block device")
    return path


def probe_backing_format(path: str) -> str:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == q.MAGIC else "raw"
