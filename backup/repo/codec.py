"""Chunk encoding: SHA-256 of the uncompressed bytes names a chunk, its content is one zstd frame.

Both directions run in worker threads concurrently: zstd contexts are not thread-safe, so each
thread keeps its own; hashlib and zstd release the GIL on large buffers. Neither copies its input.

An incompressible chunk (a few samples of it do not compress) is not run through zstd at all: its frame
is made of zstd *raw blocks* — the bytes as they are, with a 3-byte header every 128 KiB — built as
views of the chunk for one ``writev`` (no copy), and read back by a restore as views of the file's
bytes (``raw_frame_parts``: no decompression, no copy). Any zstd decoder reads such a frame.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import zstandard

from .errors import ChunkCorrupt

if TYPE_CHECKING:
    from .crypt import RepoCipher

#: zstd level: 3 (zstd's default) costs ~2x level 1 for a few percent of size; 1 keeps backups I/O bound.
LEVEL = 1
#: A frame of raw blocks: magic, then the descriptor "single segment, 4-byte content size" and the size.
_MAGIC = 0xFD2FB528
_RAW_DESCRIPTOR = 0xA0
_RAW_HEADER = struct.Struct("<IBI")
#: zstd's largest block (a raw frame's blocks are this big, the last one shorter).
_RAW_BLOCK = 128 << 10
#: Samples compressed to judge a chunk: each this big, at evenly spaced places. A chunk smaller than
#: ``_SAMPLE * _SAMPLES * 2`` is compressed whole (sampling would save little).
_SAMPLE = 16 << 10
_SAMPLES = 4
#: A sample that zstd shrinks by less than this share counts as incompressible.
_GAIN = 1 / 32

Buffer = bytes | bytearray | memoryview
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


def chunk_digest(data: Buffer, cipher: RepoCipher | None = None) -> str | None:
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


def compress_chunk(data: Buffer) -> list[Buffer]:
    """The chunk's zstd frame, as buffers to write one after the other: compressed, or for an
    incompressible chunk raw blocks that are views of ``data`` (so ``data`` must stay as it is until
    they are written)."""
    view = memoryview(data).cast("B")
    if _incompressible(view):
        return raw_frame(view)
    return [_compressor().compress(view)]


def _incompressible(view: memoryview) -> bool:
    """True when every sample resists zstd: compressing the whole chunk would buy (almost) nothing. A
    chunk with a compressible part that no sample hits is stored raw: it costs space, never correctness."""
    n = len(view)
    if n < _SAMPLE * _SAMPLES * 2:
        return False
    cctx = _compressor()
    step = (n - _SAMPLE) // (_SAMPLES - 1)
    for i in range(_SAMPLES):
        sample = view[i * step : i * step + _SAMPLE]
        if len(cctx.compress(sample)) < len(sample) * (1 - _GAIN):
            return False
    return True


def raw_frame(view: memoryview) -> list[Buffer]:
    """A zstd frame holding ``view`` in raw blocks: headers (bytes) and views of ``view``, no copy."""
    n = len(view)
    parts: list[Buffer] = [_RAW_HEADER.pack(_MAGIC, _RAW_DESCRIPTOR, n)]
    pos = 0
    while True:
        size = min(_RAW_BLOCK, n - pos)
        last = pos + size == n
        parts.append(((size << 3) | last).to_bytes(3, "little"))  # block type 0: raw
        parts.append(view[pos : pos + size])
        pos += size
        if last:
            return parts


def raw_frame_parts(blob: Buffer, length: int) -> list[memoryview] | None:
    """The content of a frame made of raw blocks only (``raw_frame``) as views of ``blob``; None for
    any other frame, a compressed or a damaged one (decompress it: zstd says what is wrong). The
    content still has to be checked against the chunk's name."""
    view = memoryview(blob).cast("B")
    end = len(view)
    head = _RAW_HEADER.size
    if end < head:
        return None
    magic, descriptor, size = _RAW_HEADER.unpack_from(view)
    if magic != _MAGIC or descriptor != _RAW_DESCRIPTOR or size != length:
        return None
    parts = []
    pos = head
    while pos + 3 <= end:
        block = int.from_bytes(view[pos : pos + 3], "little")
        size = block >> 3
        pos += 3
        if (block >> 1) & 3 or pos + size > end:
            return None
        parts.append(view[pos : pos + size])
        pos += size
        if block & 1:
            return parts if pos == end and sum(map(len, parts)) == length else None
    return None


def blob_room(chunk_size: int) -> int:
    """A buffer that holds any blob of a chunk: zstd's worst case is the size plus 1/256 and a few bytes."""
    return chunk_size + chunk_size // 128 + 4096


def joined(parts: Sequence[Buffer]) -> bytes:
    """``parts`` as one ``bytes`` (for a store that takes one body, or a cipher)."""
    return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)


def encode_chunk(data: Buffer) -> tuple[str | None, bytes | None]:
    """(hex digest, zstd blob), or (None, None) when ``data`` is all zero (zero chunks are not stored)."""
    digest = chunk_digest(data)
    return (None, None) if digest is None else (digest, joined(compress_chunk(data)))


def decode_chunk_parts(digest: str, blob: Buffer, length: int) -> list[Buffer]:
    """An unencrypted chunk's bytes, checked like ``decode_chunk``: a raw frame's content as views of
    ``blob`` (no decompression, no copy), any other frame decompressed."""
    parts = raw_frame_parts(blob, length)
    if parts is None:
        return [decode_chunk(digest, blob, length)]
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part)
    if sha.hexdigest() != digest:
        raise ChunkCorrupt(digest, "digest mismatch")
    return list(parts)


def decode_chunk(digest: str, blob: Buffer, length: int, cipher: RepoCipher | None = None) -> bytes:
    """The chunk's bytes, checked against its digest and length; ``ChunkCorrupt`` otherwise (in an
    encrypted repository also when the GCM tag does not match: the stored bytes changed)."""
    if cipher is not None:
        from .crypt import DecryptError

        try:
            blob = cipher.open_sealed(bytes(blob), chunk_aad(digest))
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
