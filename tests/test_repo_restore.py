"""``restore_to_fd``: a snapshot into a file by worker threads — every chunk at its place, zero chunks left
as holes, the first bad chunk stops every worker and is the error, an outside stop ends them quietly."""

from __future__ import annotations

import asyncio
import os
import random
import threading
from pathlib import Path

import pytest

from backup.repo.device import SnapshotWriter
from backup.repo.errors import ChunkCorrupt
from backup.repo.manifest import Manifest
from backup.repo.repository import Repository
from backup.repo.restore import restore_to_fd

CS = 64 << 10


async def _snapshot(repo: Repository, data: bytes) -> Manifest:
    writer = SnapshotWriter(repo, "d", len(data), parent="none")
    await writer.pwrite(0, data)
    return await writer.commit()


def _disk(chunks: int, *, short_tail: int = 0) -> bytes:
    rnd = random.Random(7)
    data = bytearray(rnd.randbytes(chunks * CS + short_tail))
    data[2 * CS : 3 * CS] = bytes(CS)  # a zero chunk: a hole in the restored file
    return bytes(data)


def _restore(repo: Repository, manifest: Manifest, path: Path, **kw: object) -> bytes:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        os.ftruncate(fd, manifest.size)
        restore_to_fd(repo, manifest, fd, **kw)  # type: ignore[arg-type]
    finally:
        os.close(fd)
    return path.read_bytes()


@pytest.mark.parametrize("threads", [1, 3])
async def test_every_chunk_lands_at_its_place(tmp_path: Path, threads: int) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    data = _disk(9, short_tail=1000)
    manifest = await _snapshot(repo, data)
    seen: list[int] = []
    lock = threading.Lock()

    def progress(n: int) -> None:
        with lock:
            seen.append(n)

    assert _restore(repo, manifest, tmp_path / "out", threads=threads, on_progress=progress) == data
    assert sum(seen) == len(data) and len(seen) == len(manifest.chunks)


@pytest.mark.parametrize("where", [0, 20, -1])  # a block header, the content, the last byte
@pytest.mark.parametrize("threads", [1, 2])
async def test_a_corrupt_chunk_is_the_error_and_stops_the_workers(tmp_path: Path, where: int, threads: int) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    manifest = await _snapshot(repo, _disk(40))
    bad = manifest.chunks[0]
    assert bad is not None
    path = repo.path / "chunks" / bad[:2] / bad
    blob = bytearray(path.read_bytes())
    blob[where] ^= 1
    path.write_bytes(blob)
    loads: list[str] = []
    inner = repo.load_chunk_into

    def load(digest: str, length: int, scratch: bytearray) -> list[bytes | memoryview]:
        loads.append(digest)
        return inner(digest, length, scratch)

    repo.load_chunk_into = load  # type: ignore[method-assign]
    with pytest.raises(ChunkCorrupt) as caught:
        _restore(repo, manifest, tmp_path / "out", threads=threads)
    assert caught.value.digest == bad
    if threads == 1:
        assert loads == [bad]  # nothing after it
    else:
        assert len(loads) < len(manifest.chunks)  # the other stopped at its next chunk


async def test_incompressible_chunks_go_from_the_file_into_the_target_without_zstd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backup.repo import codec

    repo = Repository.init(tmp_path / "repo", chunk_size=4 * CS)
    data = random.Random(5).randbytes(16 * CS) + b"compressible " * 20000
    manifest = await _snapshot(repo, data)
    decoded: list[int] = []
    real = codec.decode_chunk

    def decode(digest: str, blob: bytes, length: int, cipher: object = None) -> bytes:
        decoded.append(length)
        return real(digest, blob, length)

    monkeypatch.setattr(codec, "decode_chunk", decode)
    assert _restore(repo, manifest, tmp_path / "out", threads=2) == data
    assert decoded == [len(data) - 16 * CS]  # only the compressible tail went through zstd


async def test_a_stop_from_outside_ends_the_workers_without_error(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    manifest = await _snapshot(repo, _disk(20))
    stop = threading.Event()
    count = 0

    def progress(n: int) -> None:
        nonlocal count
        count += 1
        if count == 3:
            stop.set()

    _restore(repo, manifest, tmp_path / "out", threads=1, on_progress=progress, stop=stop)
    assert count == 3


def test_ctrl_c_stops_the_workers_and_leaves_no_file(tmp_path: Path) -> None:
    import signal

    from backup.repo.restore import restore_file

    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    manifest = asyncio.run(_snapshot(repo, _disk(30)))
    stop = threading.Event()
    count = 0

    def progress(n: int) -> None:
        nonlocal count
        count += 1
        if count == 2:
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
            assert stop.wait(30)

    with pytest.raises(KeyboardInterrupt):
        restore_file(repo, manifest, tmp_path / "out.raw", threads=1, on_progress=progress, stop=stop)
    assert count == 2
    assert sorted(os.listdir(tmp_path)) == ["repo"] and os.listdir(repo.path / "leases") == []


async def test_chunks_read_through_each_threads_buffer_come_out_whole_and_unshared(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    repo = Repository.init(tmp_path / "repo", chunk_size=2 * CS)  # raw frames of one block and of two
    rnd = random.Random(9)
    data = rnd.randbytes(6 * 2 * CS) + b"compressible " * 30000
    manifest = await _snapshot(repo, data)
    cs = manifest.chunk_size
    wanted = [(d, manifest.chunk_length(i), data[i * cs : i * cs + manifest.chunk_length(i)])
              for i, d in enumerate(manifest.chunks) if d is not None]  # fmt: skip

    def load(item: tuple[str, int, bytes]) -> bool:
        digest, length, expected = item
        got = repo.load_chunk(digest, length)
        repo.check_chunk(digest, length)  # reuses the thread's buffer: ``got`` must not change
        return isinstance(got, bytes) and got == expected

    with ThreadPoolExecutor(3) as pool:
        assert all(pool.map(load, wanted * 4))


def test_an_interrupt_while_the_workers_start_stops_and_joins_those_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C may land before the workers are all started (a fast worker can call back first): the
    ones already running are stopped and waited for, never left writing behind the caller's cleanup."""
    from backup.repo.restore import run_workers

    stop = threading.Event()
    running: list[threading.Thread] = []
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if running:  # the second start: Ctrl-C arrives here
            raise KeyboardInterrupt
        real_start(thread)
        running.append(thread)

    def work() -> None:
        stop.wait(30)  # a worker that runs until told to stop

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(KeyboardInterrupt):
        run_workers(work, 3, "test-workers", stop, [])
    assert stop.is_set()
    assert running and not running[0].is_alive()
