"""Chunk codec: round trip, zero detection, corruption detection, concurrent use from threads."""

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import zstandard

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


def _zstd_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of what the codec hands zstd's compressor."""
    from backup.repo import codec

    sizes: list[int] = []
    real = codec._compressor

    class Counting:
        def compress(self, data: object) -> bytes:
            sizes.append(len(memoryview(data)))  # type: ignore[arg-type]
            return real().compress(data)

    monkeypatch.setattr(codec, "_compressor", Counting)
    return sizes


@pytest.mark.parametrize("size", [(1 << 20), (4 << 20) + 4096, (128 << 10) * 3])
def test_an_incompressible_chunk_is_raw_blocks_that_any_zstd_reads_and_only_samples_are_compressed(
    size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backup.repo.codec import compress_chunk, decode_chunk_parts, raw_frame_parts

    sizes = _zstd_calls(monkeypatch)
    data = os.urandom(size)
    parts = compress_chunk(data)
    assert sum(sizes) <= 4 * (16 << 10)  # samples, not the chunk
    blob = b"".join(parts)
    assert len(blob) == size + 9 + 3 * -(-size // (128 << 10))
    assert zstandard.ZstdDecompressor().decompress(blob) == data  # a standard frame with its content size
    assert b"".join(raw_frame_parts(blob, size) or []) == data
    digest = hashlib.sha256(data).hexdigest()
    assert b"".join(decode_chunk_parts(digest, blob, size)) == data
    assert decode_chunk(digest, blob, size) == data


def test_a_chunk_with_a_compressible_sample_is_compressed_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    from backup.repo.codec import compress_chunk, raw_frame_parts

    sizes = _zstd_calls(monkeypatch)
    data = os.urandom(768 << 10) + b"text " * ((256 << 10) // 5) + os.urandom(100)
    [blob] = compress_chunk(data)
    assert len(data) in sizes and len(blob) < len(data) - (200 << 10)
    assert raw_frame_parts(blob, len(data)) is None
    assert zstandard.ZstdDecompressor().decompress(blob) == data


def test_a_damaged_raw_frame_is_corrupt_never_wrong_bytes() -> None:
    from backup.repo.codec import compress_chunk, decode_chunk_parts

    data = os.urandom(512 << 10)
    digest = hashlib.sha256(data).hexdigest()
    blob = b"".join(compress_chunk(data))
    for pos in (0, 5, 9, 12, 1000, len(blob) - 1):  # magic, size, a block header, content, the end
        damaged = bytearray(blob)
        damaged[pos] ^= 0x10
        for decode in (decode_chunk, decode_chunk_parts):
            with pytest.raises(ChunkCorrupt):
                decode(digest, bytes(damaged), len(data))
    for cut in (blob[:-1], blob[:100]):
        with pytest.raises(ChunkCorrupt):
            decode_chunk_parts(digest, cut, len(data))
