"""``backup_fd`` and ``repo backup`` of a raw file: chunks read straight from the file by worker threads
land as the block-device path stores them, holes are not read, the first error stops every worker."""

from __future__ import annotations

import errno
import os
import random
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from backup.repo import backup_file as bf_module
from backup.repo.backup_file import RawSource, backup_fd, backup_file
from backup.repo.device import SnapshotWriter
from backup.repo.manifest import Manifest
from backup.repo.repository import Repository
from server import repo_transfer

CS = 64 << 10


def _disk(path: Path, chunks: int, *, tail: int = 0) -> bytes:
    """Random chunks, one zero chunk written as zeroes, a hole of three chunks, a repeated chunk."""
    rnd = random.Random(3)
    data = bytearray(rnd.randbytes(chunks * CS + tail))
    data[2 * CS : 3 * CS] = bytes(CS)
    data[5 * CS : 8 * CS] = bytes(3 * CS)
    data[9 * CS : 10 * CS] = data[0:CS]
    with open(path, "wb") as f:
        f.write(data[: 5 * CS])
        f.seek(8 * CS)
        f.write(data[8 * CS :])
    return bytes(data)


async def _through_device(repo: Repository, data: bytes) -> Manifest:
    writer = SnapshotWriter(repo, "ref", len(data), parent="none")
    await writer.pwrite(0, data)
    return await writer.commit()


@pytest.mark.parametrize("threads", [1, 3])
async def test_a_file_lands_as_the_device_path_stores_it_and_its_holes_are_not_read(
    tmp_path: Path, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    data = _disk(tmp_path / "disk.raw", 16, tail=1000)
    reads: list[int] = []
    real = bf_module.read_full
    monkeypatch.setattr(bf_module, "read_full", lambda fd, view, off: reads.append(off) or real(fd, view, off))
    seen: list[int] = []
    fd = os.open(tmp_path / "disk.raw", os.O_RDONLY)
    try:
        with repo.begin_write("d") as writer:
            result = backup_fd(repo, writer, fd, len(data), threads=threads, on_progress=seen.append)
            assert result is not None
            chunks, stats = result
            manifest = writer.commit(len(data), chunks, None, dict(stats))
    finally:
        os.close(fd)
    reference = await _through_device(repo, data)
    assert manifest.chunks == reference.chunks
    assert sorted(reads) == [i * CS for i in range(17) if i not in (5, 6, 7)]  # the hole: not read
    assert sum(seen) == len(data) and len(seen) == 17
    assert stats == {"new-bytes": 11 * CS + 1000, "zero-bytes": 4 * CS, "reused-bytes": CS}
    assert manifest.stats["new-bytes"] == 11 * CS + 1000


def test_the_first_error_stops_every_worker_and_a_stop_from_outside_returns_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    path = tmp_path / "disk.raw"
    path.write_bytes(random.Random(1).randbytes(60 * CS))
    stored: list[int] = []
    inner = repo.store_chunk

    def store(data: memoryview, lease: object) -> tuple[str | None, bool]:
        stored.append(1)
        if len(stored) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return inner(data, lease)  # type: ignore[arg-type]

    repo.store_chunk = store  # type: ignore[method-assign]
    fd = os.open(path, os.O_RDONLY)
    try:
        with repo.begin_write("d") as writer, pytest.raises(OSError) as caught:
            backup_fd(repo, writer, fd, 60 * CS, threads=2)
        assert caught.value.errno == errno.ENOSPC and len(stored) < 10
        stop = threading.Event()
        count = 0

        def progress(n: int) -> None:
            nonlocal count
            count += 1
            if count == 2:
                stop.set()

        repo.store_chunk = inner  # type: ignore[method-assign]
        with repo.begin_write("d") as writer:
            assert backup_fd(repo, writer, fd, 60 * CS, threads=1, on_progress=progress, stop=stop) is None
        assert count == 2
    finally:
        os.close(fd)


async def test_repo_backup_of_a_raw_file_skips_the_device_and_restores_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    data = _disk(tmp_path / "disk.raw", 12, tail=300)  # not a multiple of 512: the tail reads as zeroes

    def no_device(*args: object, **kwargs: object) -> None:
        raise AssertionError("a raw file went through SnapshotWriter")

    monkeypatch.setattr(repo_transfer, "SnapshotWriter", no_device)
    first = await repo_transfer.run_backup(repo, "d", str(tmp_path / "disk.raw"))
    second = await repo_transfer.run_backup(repo, "d", str(tmp_path / "disk.raw"))
    assert first.size == len(data) + 212 and first.parent is None
    assert second.parent == first.id and second.chunks == first.chunks
    assert second.stats["new-bytes"] == 0 and second.stats["stored-bytes"] == 0
    await repo_transfer.run_restore(repo, second, str(tmp_path / "out.raw"))
    assert (tmp_path / "out.raw").read_bytes() == data + bytes(212)
    assert repo.store.lock("d") is not None  # the writer's lock was released


def _interrupt_main_at(call: int, stop: threading.Event) -> Callable[[int], None]:
    """An ``on_progress`` that sends the main thread SIGINT (Ctrl-C) at its ``call``-th chunk and waits
    until the workers were told to stop, so that no further chunk starts."""
    count = 0

    def progress(n: int) -> None:
        nonlocal count
        count += 1
        if count == call:
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
            assert stop.wait(30)

    return progress


def test_ctrl_c_stops_the_workers_and_publishes_nothing(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    path = tmp_path / "disk.raw"
    path.write_bytes(random.Random(2).randbytes(40 * CS))
    source = RawSource.open(str(path), None)
    assert source is not None and source.size == 40 * CS and source.holes
    stop = threading.Event()
    stored: list[int] = []
    inner = repo.store_chunk
    repo.store_chunk = lambda data, lease: stored.append(1) or inner(data, lease)  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            backup_file(
                repo, "d", source.fd, source.size, threads=1, on_progress=_interrupt_main_at(2, stop), stop=stop
            )
    finally:
        source.close()
    assert len(stored) == 2 and repo.snapshot_ids("d") == []
    assert os.listdir(repo.path / "leases") == []
    repo.store.lock("d").release()  # the writer's lock is free again


def test_a_source_that_is_not_plainly_raw_takes_the_device_path(tmp_path: Path) -> None:
    qcow2 = tmp_path / "disk.qcow2"
    qcow2.write_bytes(b"QFI\xfb" + bytes(1000))
    assert RawSource.open(str(qcow2), None) is None
    assert RawSource.open(str(tmp_path / "missing"), None) is None
    assert RawSource.open(str(tmp_path), None) is None
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"x" * 1000)
    assert RawSource.open(str(raw), "qcow2") is None
    source = RawSource.open(str(raw), "raw")
    assert source is not None and source.size == 1024
    source.close()
