"""Chunk encoding: SHA-256 of the uncompressed bytes names a chunk, its content is one zstd frame.

Both functions run in worker threads concurrently: zstd contexts are not thread-safe, so each
thread keeps its own; hashlib and zstd release the GIL on large buffers. Neither copies its input.
"""

from __future__ import annotations

import hashlib
import threading
from functools import lru_cache
from typing import TYPE_CHECKING

import zstandard

from .errors import ChunkCorrupt

if TYPE_CHECKING:
    from .crypt import RepoCipher

#: zstd level: 3 (zstd's default) costs ~2x level 1 for a few percent of size; 1 keeps backups I/O bound.
LEVEL = 1
_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True, write_checksum=False)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


@lru_cache(maxsize=16)
def zero_digest(length: int) -> str:
    """The digest of ``length`` zero bytes: a chunk hashing to it is all zero (no separate scan)."""
    return hashlib.sha256(bytes(length)).hexdigest()


def chunk_digest(data: bytes | memoryview, cipher: RepoCipher | None = None) -> str | None:
    """The chunk's name, or None when ``data`` is all zero: its SHA-256, or in an encrypted repository
    the keyed HMAC-SHA-256 (``crypt``), which says nothing about the data to whoever lacks the key."""
    if cipher is not None:
        digest = cipher.chunk_id(data)
        return None if digest == cipher.zero_id(len(data)) else digest
    digest = hashlib.sha256(data).hexdigest()
    return None if digest == zero_digest(len(data)) else digest


def chunk_aad(digest: str) -> str:
    """What an encrypted chunk authenticates besides its bytes: its name (a body moved under another
    name fails to decrypt)."""
    return f"chunk {digest}"


def compress_chunk(data: bytes | memoryview) -> bytes:
    return _compressor().compress(data)


def encode_chunk(data: bytes | memoryview) -> tuple[str | None, bytes | None]:
    """(hex digest, zstd blob), or (None, None) when ``data`` is all zero (zero chunks are not stored)."""
    digest = chunk_digest(data)
    return (None, None) if digest is None else (digest, compress_chunk(data))


def decode_chunk(digest: str, blob: bytes, length: int, cipher: RepoCipher | None = None) -> bytes:
    """The chunk's bytes, checked against its digest and length; ``ChunkCorrupt`` otherwise (in an
    encrypted repository also when the GCM tag does not match: the stored bytes changed)."""
    if cipher is not None:
        from .crypt import DecryptError

        try:
            blob = cipher.open_sealed(blob, chunk_aad(digest))
        except DecryptError:
            raise ChunkCorrupt(digest, "authentication failed") from None
    try:
        data = _decompressor().decompress(blob, max_output_size=length)
    except zstandard.ZstdError as e:
        raise ChunkCorrupt(digest, f"zstd: {e}") from None
    if len(data) != length:
        raise ChunkCorrupt(digest, f"{len(data)} bytes, expected {length}")
    if (cipher.chunk_id(data) if cipher is not None else hashlib.sha256(data).hexdigest()) != digest:
        raise ChunkCorrupt(digest, "digest mismatch")
    return data
