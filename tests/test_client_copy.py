"""The copy engine of ``nbd-backup copy`` between memory devices: holes, zero detection, progress, bounded
concurrency, and the first error cancelling the rest."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from pathlib import Path

import pytest

from backup.copy_engine import CopyFailed, copy_device
from backup.memory import MemoryDevice
from backup.rawfile import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, RawFileDevice, fallocate
from nbd import client_transport
from nbd.client import NbdClient
from nbd.constants import State
from nbd.device import Extent
from nbd.errors import DisconnectedError
from nbd.server import Export, NbdServer
from server.progress import Progress

SIZE = 4 << 20


async def sparse_source(seed: int = 1) -> tuple[MemoryDevice, bytes]:
    """A device with a few random runs of data and holes elsewhere (only non-zero pages are written)."""
    rng = random.Random(seed)
    device = MemoryDevice(SIZE)
    data = bytearray(SIZE)
    for _ in range(10):
        offset, length = rng.randrange(0, SIZE - 200_000), rng.randrange(1, 200_000)
        data[offset : offset + length] = rng.randbytes(length)
    for page in range(0, SIZE, 4096):
        chunk = data[page : page + 4096]
        if any(chunk):
            await device.pwrite(page, chunk)
    return device, bytes(data)


class Recording(MemoryDevice):
    """Counts what the copy asks of the destination, and how many requests overlap."""

    def __init__(self, size: int, fill: bytes = b"\0") -> None:
        super().__init__(size, data=fill * size if fill != b"\0" else None)
        self.writes = 0
        self.zeroes = 0
        self.active = 0
        self.peak = 0

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        self.writes += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0)
        await super().pwrite(offset, data, fua=fua)
        self.active -= 1

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        self.zeroes += 1
        await super().zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)


async def test_sparse_copy_onto_garbage() -> None:
    src, data = await sparse_source()
    dst = Recording(SIZE, fill=b"\xee")
    progress = Progress(SIZE, enabled=False)
    stats = await copy_device(src, dst, request_size=65536, requests=4, progress=progress)
    assert dst.data == data
    assert stats.data_bytes + stats.zero_bytes == SIZE and stats.skipped_bytes == 0
    assert stats.data_bytes < SIZE // 2  # holes went as zero requests, not data
    assert dst.zeroes > 0 and 1 <= dst.peak <= 4
    assert progress.done == SIZE


async def test_zero_destination_skips_holes_and_zero_data() -> None:
    src, data = await sparse_source(2)
    await src.pwrite(SIZE - 65536, bytes(65536))  # allocated, but zeroes: detected
    dst = Recording(SIZE)
    stats = await copy_device(src, dst, dst_is_zero=True, request_size=65536)
    assert dst.data == data[: SIZE - 65536] + bytes(65536)
    assert dst.zeroes == 0 and stats.skipped_bytes > 0
    extents = await dst.block_status(0, SIZE)
    assert any(e.flags & State.HOLE for e in extents)  # the destination stayed sparse


async def test_no_zero_detection_writes_zero_data() -> None:
    src = MemoryDevice(SIZE, data=bytes(SIZE))  # all allocated, all zero
    dst = Recording(SIZE)
    stats = await copy_device(src, dst, detect_zeroes=False, request_size=1 << 20)
    assert stats.data_bytes == SIZE and dst.writes == 4


async def test_first_error_wins_and_nothing_is_left_running() -> None:
    class Failing(MemoryDevice):
        reads = 0

        async def pread(self, offset: int, length: int) -> bytes:
            self.reads += 1
            if self.reads == 3:
                raise OSError(errno.EIO, "bad sector")
            await asyncio.sleep(0)
            return await super().pread(offset, length)

    src = Failing(SIZE, data=b"\1" * SIZE)
    before = len(asyncio.all_tasks())
    with pytest.raises(OSError) as info:
        await copy_device(src, MemoryDevice(SIZE), request_size=65536, requests=8)
    assert info.value.errno == errno.EIO
    assert len(asyncio.all_tasks()) == before


async def test_size_and_read_only_checks() -> None:
    with pytest.raises(CopyFailed, match="smaller"):
        await copy_device(MemoryDevice(SIZE), MemoryDevice(SIZE // 2))
    with pytest.raises(CopyFailed, match="read-only"):
        await copy_device(MemoryDevice(SIZE), MemoryDevice(SIZE, read_only=True))


async def test_block_status_failure_falls_back_to_data() -> None:
    from nbd.errors import NbdRequestError

    class NoStatus(MemoryDevice):
        async def block_status(self, offset: int, length: int) -> list[Extent]:
            raise NbdRequestError(errno.ENOTSUP, "no block status here")

    src = NoStatus(SIZE, data=b"x" * 1000)
    dst = MemoryDevice(SIZE)
    await copy_device(src, dst, request_size=1 << 20)
    assert dst.data == b"x" * 1000 + bytes(SIZE - 1000)


async def test_ranges_copy_only_those_ranges() -> None:
    src = MemoryDevice(SIZE, data=b"\7" * SIZE)
    dst = MemoryDevice(SIZE)
    ranges = iter([(65536, 65536), (SIZE - 4096, 4096)])  # an iterator: taken lazily, once
    stats = await copy_device(src, dst, request_size=65536, ranges=ranges)
    expected = bytearray(SIZE)
    expected[65536:131072] = b"\7" * 65536
    expected[SIZE - 4096 :] = b"\7" * 4096
    assert dst.data == bytes(expected) and stats.data_bytes == 65536 + 4096


def test_stripes_are_aligned_disjoint_and_cover_the_disk_once() -> None:
    import multiprocessing

    from backup.copy_engine import MAX_STRIPE, Stripes

    fork = multiprocessing.get_context("fork")  # no process here: a spawn context would start a resource tracker
    size = (3 << 30) + 12345
    stripes = Stripes.plan(size, 3, 1 << 20, fork)
    assert stripes.stripe == MAX_STRIPE
    first, second = stripes.claim(), stripes.claim()  # two copiers taking turns
    claimed: list[tuple[int, int] | None] = []
    for piece in first:
        claimed.append(piece)
        claimed.extend(next(second, None) for _ in range(2))
    claimed.extend(second)
    pieces = sorted(p for p in claimed if p is not None)
    assert all(offset % stripes.stripe == 0 for offset, _ in pieces)
    assert [offset for offset, _ in pieces] == list(range(0, size, stripes.stripe))
    assert sum(length for _, length in pieces) == size
    small = Stripes.plan(SIZE, 4, 65536, fork)
    assert small.stripe == 131072  # about eight per copier, never below the alignment
    assert list(Stripes.plan(1000, 2, 4096, fork).claim()) == [(0, 1000)]


async def test_workers_only_when_both_sides_allow_parallel_writers(tmp_path: Path) -> None:
    from backup.rawfile import RawFileDevice
    from server.copy_run import AUTO_PARALLEL_MIN, choose_workers
    from server.copy_sides import Endpoint

    small = await RawFileDevice.create(tmp_path / "a.img", SIZE)
    big = await RawFileDevice.create(tmp_path / "b.img", AUTO_PARALLEL_MIN)
    try:
        files = Endpoint(small, "a"), Endpoint(big, "b")
        memory = Endpoint(MemoryDevice(SIZE), "memory")
        assert files[0].parallel_safe and not memory.parallel_safe
        assert choose_workers(3, files[0], files[1], request_size=1 << 20) == 3
        assert choose_workers(8, files[0], files[1], request_size=1 << 20) == 4  # one request per copier at least
        assert choose_workers(None, files[0], files[1], request_size=1 << 20) == 1  # small: not worth processes
        auto = choose_workers(None, files[1], files[0], request_size=1 << 20)
        assert auto == max(1, min((os.cpu_count() or 1) // 2, 4))
        assert choose_workers(3, memory, files[0], request_size=1 << 20) == 1
        assert choose_workers(3, files[0], memory, request_size=1 << 20) == 1
    finally:
        await small.close()
        await big.close()


def test_pipe_progress_batches() -> None:
    import multiprocessing

    from server.copy_workers import PROGRESS_BATCH, PipeProgress

    reader, writer = multiprocessing.Pipe(duplex=False)
    progress = PipeProgress(writer)
    progress.advance(PROGRESS_BATCH // 2)
    assert not reader.poll()
    progress.advance(PROGRESS_BATCH // 2 + 1)
    progress.advance(7)
    progress.flush()
    progress.flush()
    assert reader.recv() == ("progress", PROGRESS_BATCH + 1)
    assert reader.recv() == ("progress", 7)
    assert not reader.poll()


# --- a raw file into an NBD export: payloads go with sendfile ------------------------------------------------


async def _file_source_and_served_target(tmp_path: Path) -> tuple[Path, bytes, Recording, NbdServer, str]:
    """A raw file with data chunks, a chunk that starts with 8 KiB of zeroes, an allocated all-zero chunk,
    a hole and an unaligned tail; and an NBD export of garbage to copy it onto."""
    chunk = 1 << 20
    rng = random.Random(11)
    data = bytearray(rng.randbytes(6 * chunk + 1000))
    data[chunk : chunk + 8192] = bytes(8192)  # first bytes zero, the rest data: the full check decides
    data[2 * chunk : 3 * chunk] = bytes(chunk)  # allocated zeroes: detected and zeroed
    path = tmp_path / "src.raw"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4 * chunk, chunk)  # a real hole
    finally:
        os.close(fd)
    data[4 * chunk : 5 * chunk] = bytes(chunk)
    target = Recording(7 * chunk, fill=b"\xee")
    server = NbdServer()
    server.add_export(Export("t", target))
    await server.listen_unix(tmp_path / "t.sock")
    return path, bytes(data), target, server, f"nbd+unix:///t?socket={tmp_path / 't.sock'}"


@pytest.mark.parametrize("detect_zeroes", [True, False])
async def test_raw_file_to_nbd_sends_payloads_from_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, detect_zeroes: bool
) -> None:
    path, data, target, server, uri = await _file_source_and_served_target(tmp_path)
    sent_from_file: list[tuple[int, int]] = []
    real = NbdClient.pwrite_from_fd

    async def spy(self: NbdClient, offset: int, fd: int, file_offset: int, length: int, *, fua: bool = False) -> None:
        assert offset == file_offset
        sent_from_file.append((offset, length))
        await real(self, offset, fd, file_offset, length, fua=fua)

    monkeypatch.setattr(NbdClient, "pwrite_from_fd", spy)
    src = await RawFileDevice.open(path, read_only=True)
    dst = await NbdClient.connect(uri, connections=2)
    try:
        stats = await copy_device(src, dst, request_size=1 << 20, requests=4, detect_zeroes=detect_zeroes)
    finally:
        await dst.close()
        await src.close()
        await server.stop()
    size = src.size  # the unaligned tail rounded up to 512 bytes: a hole past the end of the file
    tail = size - len(data)
    assert target.data[:size] == data + bytes(size - len(data))
    assert target.data[size:] == b"\xee" * (len(target.data) - size)
    chunk = 1 << 20
    if detect_zeroes:
        assert sorted(sent_from_file) == [
            (0, chunk),
            (3 * chunk, chunk),
            (5 * chunk, chunk),
            (6 * chunk, 1000),
        ]
        assert stats.zero_bytes == 2 * chunk + tail  # the allocated zeroes, the holes
        assert stats.data_bytes == len(data) - 2 * chunk  # the chunk starting with zeroes went the ordinary way
    else:
        assert (2 * chunk, chunk) in sent_from_file and (chunk, chunk) in sent_from_file
        assert stats.zero_bytes == chunk + tail and stats.data_bytes == len(data) - chunk


async def test_raw_file_to_nbd_fails_when_the_file_fails_mid_payload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _, target, server, uri = await _file_source_and_served_target(tmp_path)
    calls = 0
    real = os.sendfile

    def failing(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.EIO, "Input/output error")
        return real(out_fd, in_fd, offset, min(count, 65536))  # part of a payload: later calls go on with it

    monkeypatch.setattr(client_transport.os, "sendfile", failing)
    src = await RawFileDevice.open(path, read_only=True)
    dst = await NbdClient.connect(uri, connections=1)
    try:
        with pytest.raises(OSError) as info:
            await copy_device(src, dst, request_size=1 << 20, requests=4)
        assert info.value.errno == errno.EIO or isinstance(info.value, DisconnectedError)
        assert calls >= 3
    finally:
        await dst.close()
        await src.close()
        await server.stop()
    assert target.data[: 1 << 20] == b"\xee" * (1 << 20)  # the failed payload was never applied


@pytest.mark.parametrize(("request_size", "expected"), [(1 << 20, 4), (256 << 10, 16), (2 << 20, 2), (8 << 20, 2)])
async def test_buffered_copies_keep_a_bounded_buffer_budget_in_flight(request_size: int, expected: int) -> None:
    """Without ``requests`` a copy through our buffers keeps 4 MiB of them in flight (at least two
    requests, at most 16): fewer, cache-warm buffers cost less CPU than 16 MiB of them."""
    size = 64 << 20
    src = MemoryDevice(size, data=b"\5" * size)
    dst = Recording(size)
    await copy_device(src, dst, request_size=request_size)
    assert dst.peak == expected
    assert dst.data == src.data


def test_default_requests_keep_a_window_for_sendfile_and_for_distant_servers() -> None:
    from backup.copy_engine import DEFAULT_REQUESTS, default_requests

    assert default_requests(1 << 20, buffered=True) == 4
    assert default_requests(64 << 10, buffered=True) == DEFAULT_REQUESTS  # 4 MiB would be 64: capped
    assert default_requests(1 << 20, buffered=False) == DEFAULT_REQUESTS
    assert default_requests(1 << 20, buffered=True, nearby=False) == DEFAULT_REQUESTS


async def test_a_distant_nbd_source_keeps_sixteen_requests_in_flight() -> None:
    """The window is decided from the source's URI: a server across a network gets 16 requests."""
    from nbd.uri import parse_uri

    class Distant(MemoryDevice):
        uri = parse_uri("nbd://192.0.2.7/disk")

        async def pread(self, offset: int, length: int) -> bytes:
            await asyncio.sleep(0)
            return await super().pread(offset, length)

    size = 32 << 20
    src = Distant(size, data=b"\3" * size)
    dst = Recording(size)
    await copy_device(src, dst, request_size=1 << 20)
    assert dst.peak == 16
    assert dst.data == src.data
