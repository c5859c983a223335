"""Compressed cluster codecs: deflate (the default, "zlib" in QEMU) and zstd (``compression_type`` 1).

Both compress one cluster at a time and release the GIL while they work, so the device runs them
in worker threads. Decompression stops once a whole cluster came out: the stored bytes run to the
end of a 512-byte sector, and whatever follows the stream there is not part of it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Protocol

from backup.errors import ImageFormatError

DEFLATE = 0
ZSTD = 1
NAMES = {"zlib": DEFLATE, "deflate": DEFLATE, "zstd": ZSTD}


class CodecError(ValueError):
    """The stored bytes do not decompress to a cluster."""


class Codec(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def type_id(self) -> int: ...

    def compress(self, data: bytes | bytearray | memoryview) -> bytes: ...

    def decompress(self, data: bytes, size: int) -> bytes: ...


@dataclass(frozen=True)
class Deflate:
    """Raw deflate as QEMU writes it: no zlib header, 4 KiB window, default level, memLevel 9."""

    name: str = "zlib"
    type_id: int = DEFLATE

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        return c.compress(data) + c.flush()

    def decompress(self, data: bytes, size: int) -> bytes:
        try:
            return zlib.decompressobj(-15).decompress(data, size)
        except zlib.error as exc:
            raise CodecError(str(exc)) from None


@dataclass(frozen=True)
class Zstd:
    """One zstd frame per cluster (QEMU's ``compression_type=zstd``)."""

    name: str = "zstd"
    type_id: int = ZSTD

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        import zstandard

        out: bytes = zstandard.ZstdCompressor(level=3).compress(data)
        return out

    def decompress(self, data: bytes, size: int) -> bytes:
        import zstandard

        try:
            out: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        except zstandard.ZstdError as exc:
            raise CodecError(str(exc)) from None
        return out[:size]


def codec_for(type_id: int, path: str = "") -> Codec:
    """The codec of an image's ``compression_type``; refuses what cannot be read here."""
    if type_id == DEFLATE:
        return Deflate()
    if type_id == ZSTD:
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise ImageFormatError(f"{path}: zstd-compressed image, but the zstandard module is missing") from None
        return Zstd()
    raise ImageFormatError(f"{path}: unknown compression type {type_id}")


def type_id_of(name: str) -> int:
    try:
        return NAMES[name]
    except KeyError:
        raise ImageFormatError(f"unknown compression type '{name}' (zlib or zstd)") from None
