"""Chunk codec: round trip, zero detection, corruption detection, concurrent use from threads."""

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from backup.repo.codec import decode_chunk, encode_chunk
from backup.repo.errors import ChunkCorrupt


def test_round_trip_names_chunk_by_sha256_of_plain_bytes() -> None:
    data = os.urandom(5000) + bytes(60000) + b"x" * 1000
    digest, blob = encode_chunk(memoryview(data))
    assert digest == hashlib.sha256(data).hexdigest()
    assert blob is not None and len(blob) < len(data)
    assert decode_chunk(digest, blob, len(data)) == data


def test_all_zero_is_not_stored() -> None:
    assert encode_chunk(bytes(64 << 10)) == (None, None)
    assert encode_chunk(bytearray(1)) == (None, None)
    assert encode_chunk(b"\0" * 100 + b"\1")[0] is not None


def test_corruption_is_detected() -> None:
    data = os.urandom(20000)
    digest, blob = encode_chunk(data)
    assert digest and blob
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 1
    with pytest.raises(ChunkCorrupt) as e:
        decode_chunk(digest, bytes(flipped), len(data))
    assert e.value.digest == digest and digest in str(e.value) and e.value.errno == 5
    with pytest.raises(ChunkCorrupt):
        decode_chunk(digest, blob[:-3], len(data))
    with pytest.raises(ChunkCorrupt):
        decode_chunk(digest, blob, len(data) - 1)
    with pytest.raises(ChunkCorrupt):
        decode_chunk("0" * 64, blob, len(data))
    # a valid frame of other content under this name
    other_digest, other = encode_chunk(os.urandom(20000))
    assert other_digest != digest and other
    with pytest.raises(ChunkCorrupt):
        decode_chunk(digest, other, len(data))


def test_threads_encode_and_decode_concurrently() -> None:
    blocks = [os.urandom(256 << 10) + bytes(i * 1000) for i in range(32)]

    def round_trip(data: bytes) -> bool:
        d, b = encode_chunk(data)
        assert d and b
        return decode_chunk(d, b, len(data)) == data

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(round_trip, blocks * 2))
