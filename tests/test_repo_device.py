"""Snapshots as block devices: ``SnapshotWriter`` against a bytearray model, ``SnapshotReader`` of what it
committed, memory bounds, parent reads, corruption and the end of a snapshot's life."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import random
import weakref
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sockkit import serve_unix

from backup.repo.device import SnapshotReader, SnapshotWriter
from backup.repo.errors import DiskBusy, SnapshotNotFound
from backup.repo.repository import Repository
from nbd.client import NbdClient
from nbd.constants import State
from nbd.device import read_into

CS = 64 << 10  # the smallest chunk size: small disks still span many chunks


def _random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _chunk_files(repo: Repository) -> set[str]:
    return set(repo.chunks.list_digests())


class CountingLoads:
    """Wraps ``repo.load_chunk`` (the one way chunks are read) to count reads per digest."""

    def __init__(self, repo: Repository) -> None:
        self.calls: list[str] = []
        inner = repo.load_chunk

        def load(digest: str, length: int) -> bytes:
            self.calls.append(digest)
            return inner(digest, length)

        repo.load_chunk = load  # type: ignore[method-assign]


async def _make_parent(repo: Repository, disk: str, data: bytes) -> None:
    writer = SnapshotWriter(repo, disk, len(data), parent="none")
    await writer.pwrite(0, data)
    await writer.commit()


def _parent_data(size: int, seed: int) -> bytes:
    """Random chunks with an all-zero chunk and a half-zero one among them."""
    data = bytearray(_random(size, seed))
    data[CS : 2 * CS] = bytes(CS)
    data[3 * CS : 3 * CS + CS // 2] = bytes(CS // 2)
    return bytes(data[:size])


async def _read_all(device: SnapshotReader | SnapshotWriter, step: int) -> bytes:
    return b"".join([await device.pread(pos, min(step, device.size - pos)) for pos in range(0, device.size, step)])


# -- the model test -------------------------------------------------------------------------------------------

SIZE = 5 * CS + 1000  # a short last chunk

_span = st.tuples(st.integers(0, SIZE - 1), st.integers(1, 2 * CS + 7)).map(lambda t: (t[0], min(t[1], SIZE - t[0])))
_op = st.one_of(
    st.tuples(st.just("write"), _span, st.integers(0, 2**16)),
    st.tuples(st.just("write-chunk"), st.integers(0, SIZE // CS), st.integers(0, 2**16)),
    st.tuples(st.just("zero"), _span, st.booleans()),
    st.tuples(st.just("read"), _span, st.just(0)),
    st.tuples(st.just("flush"), st.just((0, 0)), st.just(0)),
    st.tuples(st.just("together"), st.lists(_span, min_size=2, max_size=5), st.integers(0, 2**16)),
)


def _disjoint(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    taken: list[tuple[int, int]] = []
    for off, n in spans:
        if all(off + n <= o or o + m <= off for o, m in taken):
            taken.append((off, n))
    return taken


async def _run_model(
    repo: Repository, parent_size: int | None, ops: list, max_in_flight: int, seed: int, with_reads: bool = True
) -> None:
    disk = f"model/{next(_disks)}"  # one repository for every example: init costs more than an example
    model = bytearray(SIZE)
    if parent_size is not None:
        parent = _parent_data(parent_size, seed)
        await _make_parent(repo, disk, parent)
        model[: min(SIZE, parent_size)] = parent[:SIZE]
    writer = SnapshotWriter(repo, disk, SIZE, max_chunks_in_flight=max_in_flight)
    for kind, arg, extra in ops:
        if kind == "write":
            off, n = arg
            data = _random(n, extra)
            await writer.pwrite(off, data, fua=extra % 7 == 0)
            model[off : off + n] = data
        elif kind == "write-chunk":  # a whole chunk, often the same bytes as before (dedup, rewrites)
            off = arg * CS
            n = min(CS, SIZE - off)
            data = bytes(model[off : off + n]) if extra % 2 else _random(n, extra)
            await writer.pwrite(off, data)
            model[off : off + n] = data
        elif kind == "zero":
            off, n = arg
            if extra:
                await writer.trim(off, n)
            else:
                await writer.zero(off, n, may_trim=True)
            model[off : off + n] = bytes(n)
        elif kind == "read" and with_reads:
            off, n = arg
            assert await writer.pread(off, n) == model[off : off + n]
        elif kind == "flush":
            await writer.flush()
        elif kind == "together":  # disjoint requests in flight at once (waiting for buffers, merging)
            (read_off, read_n), *spans = _disjoint(arg)
            datas = [_random(n, extra + i) for i, (_, n) in enumerate(spans)]
            writes = [writer.pwrite(off, d) for (off, _), d in zip(spans, datas, strict=True)]
            read, *_ = await asyncio.gather(writer.pread(read_off, read_n), *writes)
            assert read == model[read_off : read_off + read_n]
            for (off, n), d in zip(spans, datas, strict=True):
                model[off : off + n] = d
    if with_reads:
        assert await _read_all(writer, 48 << 10) == model
    for ext_off, ext in _walk_extents(await writer.block_status(0, SIZE)):
        if ext.flags & State.ZERO:
            assert model[ext_off : ext_off + ext.length] == bytes(ext.length)
    manifest = await writer.commit()
    assert manifest.size == SIZE
    assert manifest.chunks == [
        None if model[i : i + CS] == bytes(len(model[i : i + CS])) else manifest.chunks[i // CS]
        for i in range(0, SIZE, CS)
    ]
    reader = SnapshotReader(repo, repo.resolve(disk), cache_chunks=3)
    try:
        assert await _read_all(reader, 64 << 10) == model
        assert await _read_all(reader, 100_000) == model
        into = bytearray(SIZE - 777)
        await reader.pread_into(777, into)
        assert into == model[777:]
        for ext_off, ext in _walk_extents(await reader.block_status(0, SIZE)):
            is_zero = model[ext_off : ext_off + ext.length] == bytes(ext.length)
            assert bool(ext.flags & State.ZERO) == is_zero or not ext.flags
    finally:
        await reader.close()


def _walk_extents(extents: list) -> list:
    out, pos = [], 0
    for ext in extents:
        out.append((pos, ext))
        pos += ext.length
    return out


_disks = itertools.count()


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    return Repository.init(tmp_path_factory.mktemp("model") / "repo", chunk_size=CS)


_model_settings = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_model_settings
@given(
    ops=st.lists(_op, max_size=14),
    max_in_flight=st.sampled_from([1, 2, 8]),
    seed=st.integers(0, 1000),
)
def test_writes_into_a_fresh_disk_match_the_model(
    model_repo: Repository, ops: list, max_in_flight: int, seed: int
) -> None:
    asyncio.run(_run_model(model_repo, None, ops, max_in_flight, seed))


@_model_settings
@given(
    ops=st.lists(_op, max_size=14),
    parent_size=st.sampled_from([SIZE, 3 * CS, 4 * CS + 4096, 6 * CS + 512]),
    max_in_flight=st.sampled_from([1, 2, 8]),
    seed=st.integers(0, 1000),
    with_reads=st.booleans(),
)
def test_writes_into_a_child_match_the_model(
    model_repo: Repository, ops: list, parent_size: int, max_in_flight: int, seed: int, with_reads: bool
) -> None:
    asyncio.run(_run_model(model_repo, parent_size, ops, max_in_flight, seed, with_reads))


# -- parents, dedup and what is read ----------------------------------------------------------------------------


async def test_an_incremental_child_stores_only_the_chunk_it_changed(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    parent = _random(8 * CS, 1)
    await _make_parent(repo, "d", parent)
    before = _chunk_files(repo)
    loads = CountingLoads(repo)
    writer = SnapshotWriter(repo, "d", len(parent))
    await writer.pwrite(2 * CS, _random(CS, 2))  # a new chunk
    await writer.pwrite(5 * CS, parent[5 * CS : 6 * CS])  # rewritten with the same bytes: dedup
    manifest = await writer.commit()
    assert manifest.parent == repo.snapshots("d")[0].id
    assert manifest.stats["new-bytes"] == CS
    assert manifest.stats["reused-bytes"] == 7 * CS
    assert len(_chunk_files(repo) - before) == 1
    assert loads.calls == []  # whole-chunk writes never read the parent
    reader = SnapshotReader(repo, manifest)
    expect = parent[: 2 * CS] + _random(CS, 2) + parent[3 * CS :]
    assert await reader.pread(0, len(parent)) == expect
    await reader.close()


async def test_sequential_small_writes_of_whole_chunks_never_read_the_parent(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    await _make_parent(repo, "d", _random(4 * CS, 3))
    loads = CountingLoads(repo)
    writer = SnapshotWriter(repo, "d", 4 * CS, max_chunks_in_flight=2)
    data = _random(4 * CS, 4)
    for pos in range(0, 4 * CS, 16 << 10):  # QEMU's backup pushes requests smaller than a chunk
        await writer.pwrite(pos, data[pos : pos + (16 << 10)])
    await writer.commit()
    assert loads.calls == []


async def test_a_partial_write_merges_with_the_parent_chunk_read_once(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    parent = _random(4 * CS, 5)
    await _make_parent(repo, "d", parent)
    loads = CountingLoads(repo)
    writer = SnapshotWriter(repo, "d", 4 * CS)
    model = bytearray(parent)
    for off in (CS + 100, CS + 5000, CS + 30000):
        await writer.pwrite(off, b"x" * 1000)
        model[off : off + 1000] = b"x" * 1000
        assert await writer.pread(CS, CS) == model[CS : 2 * CS]
    manifest = await writer.commit()
    assert len(loads.calls) == 1
    reader = SnapshotReader(repo, manifest)
    assert await reader.pread(0, 4 * CS) == model
    await reader.close()


async def test_writer_memory_stays_within_its_buffers_whatever_the_disk_size(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    await _make_parent(repo, "d", _random(8 * CS, 6))
    buffers: list[weakref.ref[bytearray]] = []
    limit = 3

    def live() -> int:
        return sum(ref() is not None for ref in buffers)

    class Tracked(bytearray):
        pass

    class Counting(SnapshotWriter):
        def _new_buffer(self, size: int) -> bytearray:
            assert live() < limit, "a buffer beyond max_chunks_in_flight"
            self.peak = getattr(self, "peak", 0) + 1
            buffer = Tracked(size)
            buffers.append(weakref.ref(buffer))
            return buffer

    size = 200 * CS  # a disk many times larger than the buffers
    writer = Counting(repo, "d", size, max_chunks_in_flight=limit)
    rng = random.Random(7)
    writes = [writer.pwrite(pos, b"s" * (20 << 10)) for pos in range(0, size, 20 << 10)]
    writes += [writer.pwrite(rng.randrange(size - 5000), b"r" * 5000) for _ in range(100)]
    rng.shuffle(writes)
    for i in range(0, len(writes), 16):  # many writes in flight at once
        await asyncio.gather(*writes[i : i + 16])
    assert writer.peak == limit  # the hook was asked exactly as often as the limit allows
    manifest = await writer.commit()
    assert live() == 0  # dropped at the end
    assert all(c is not None for c in manifest.chunks)


async def test_concurrent_and_sequential_reads_decode_each_chunk_once(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    data = _parent_data(8 * CS, 8)
    await _make_parent(repo, "d", data)
    manifest = repo.resolve("d")
    loads = CountingLoads(repo)
    reader = SnapshotReader(repo, manifest, cache_chunks=4)
    parts = await asyncio.gather(*(reader.pread(i * 4096, 4096) for i in range(16)))
    assert b"".join(parts) == data[:65536]
    assert loads.calls.count(manifest.chunks[0]) == 1  # (and the next chunks are read ahead)
    repo2 = Repository.open(repo.path)  # counted apart from the first reader's read-ahead still in flight
    loads = CountingLoads(repo2)
    reader2 = SnapshotReader(repo2, manifest, cache_chunks=4)
    assert await _read_all(reader2, 16 << 10) == data
    assert sorted(loads.calls) == sorted(c for c in manifest.chunks if c is not None)
    assert len(reader2._cache._entries) <= 4  # memory: cache_chunks decoded chunks
    await reader.close()
    await reader2.close()


async def test_devices_describe_themselves(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    data = _parent_data(6 * CS, 9)
    await _make_parent(repo, "d", data)
    reader = SnapshotReader(repo, repo.resolve("d"))
    assert reader.read_only and reader.size == len(data)
    caps = reader.capabilities
    assert caps.can_extents and not caps.can_trim and not caps.can_zero
    assert read_into(reader) is not None
    assert [(e.length, e.flags) for e in await reader.block_status(0, len(data))] == [
        (CS, 0),
        (CS, State.HOLE | State.ZERO),
        (4 * CS, 0),
    ]
    with pytest.raises(OSError) as err:
        await reader.pwrite(0, b"x")
    assert err.value.errno == errno.EPERM
    await reader.close()
    writer = SnapshotWriter(repo, "d", len(data))
    assert not writer.read_only
    caps = writer.capabilities
    assert caps.can_zero and caps.can_trim and caps.can_flush
    assert writer.block_limits.preferred == CS
    await writer.zero(0, 2 * CS)
    assert [(e.length, e.flags) for e in await writer.block_status(0, 3 * CS)] == [
        (2 * CS, State.HOLE | State.ZERO),
        (CS, 0),
    ]
    with pytest.raises(DiskBusy):
        SnapshotWriter(repo, "d", len(data))
    manifest = await writer.commit()
    assert manifest.chunks[:2] == [None, None]
    assert manifest.stats["zero-bytes"] == 2 * CS


# -- failures ------------------------------------------------------------------------------------------------


def _corrupt(repo: Repository, digest: str) -> None:
    path = repo.path / "chunks" / digest[:2] / digest
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


async def test_a_corrupt_parent_chunk_is_eio_never_wrong_bytes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    data = _random(4 * CS, 10)
    await _make_parent(repo, "d", data)
    manifest = repo.resolve("d")
    bad = manifest.chunks[1]
    assert bad is not None
    _corrupt(repo, bad)
    caplog.set_level(logging.ERROR, logger="nbd_backup.repo")

    reader = SnapshotReader(repo, manifest)
    with pytest.raises(OSError) as err:
        await reader.pread(CS + 10, 100)
    assert err.value.errno == errno.EIO
    assert f"chunk {bad} is corrupt" in caplog.text
    assert await reader.pread(0, CS) == data[:CS]  # the others still read
    with pytest.raises(OSError):
        await reader.pread(0, 2 * CS)
    await reader.close()

    writer = SnapshotWriter(repo, "d", len(data))
    with pytest.raises(OSError) as err:
        await writer.pread(CS, 10)
    assert err.value.errno == errno.EIO
    await writer.pwrite(2 * CS, b"y" * 100)  # a partial write of a good chunk
    with pytest.raises(OSError) as err:
        await writer.pwrite(CS + 5, b"z" * 100, fua=True)  # needs the bad one: merged when stored
    assert err.value.errno == errno.EIO
    with pytest.raises(OSError) as err:
        await writer.commit()
    assert err.value.errno == errno.EIO
    assert [m.id for m in repo.snapshots("d")] == [manifest.id]

    writer = SnapshotWriter(repo, "d", len(data))  # the lock was released
    await writer.pwrite(CS + 5, b"z" * 100)
    with pytest.raises(OSError) as err:
        await writer.flush()
    assert err.value.errno == errno.EIO
    await writer.close()

    writer = SnapshotWriter(repo, "d", len(data))  # overwriting the bad chunk whole needs nothing of it
    await writer.pwrite(CS, _random(CS, 11))
    fixed = await writer.commit()
    assert fixed.chunks[1] != bad


async def test_a_store_error_passes_its_errno_and_fails_the_snapshot(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)

    def full(data: object, lease: object) -> tuple[str | None, bool]:
        raise OSError(errno.ENOSPC, "No space left on device")

    repo.store_chunk = full  # type: ignore[method-assign]
    writer = SnapshotWriter(repo, "d", 4 * CS)
    await writer.pwrite(0, _random(CS, 12))  # accepted; stored in the background
    with pytest.raises(OSError) as err:
        await writer.flush()
    assert err.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as err:
        await writer.pwrite(CS, b"x")
    assert err.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as err:
        await writer.commit()
    assert err.value.errno == errno.ENOSPC
    assert repo.snapshots("d") == []


async def test_abort_publishes_nothing_and_ends_the_snapshot(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    writer = SnapshotWriter(repo, "d", 4 * CS)
    await writer.pwrite(0, _random(2 * CS + 7, 13))
    await writer.flush()
    await writer.abort()
    assert repo.snapshots("d") == []
    assert _chunk_files(repo)  # stored chunks stay for gc
    await _expect_done(writer)
    await writer.abort()  # idempotent
    closing = SnapshotWriter(repo, "d", 4 * CS)  # the lock is free again
    await closing.pwrite(0, b"q" * 10)
    await closing.close()  # close without commit is abort
    assert repo.snapshots("d") == []
    assert list((repo.path / "leases").iterdir()) == []


async def test_every_verb_fails_after_commit(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    writer = SnapshotWriter(repo, "d", 2 * CS)
    await writer.pwrite(10, b"abc")
    manifest = await writer.commit()
    await _expect_done(writer)
    with pytest.raises(OSError) as err:
        await writer.commit()
    assert err.value.errno == errno.EIO
    await writer.close()
    reader = SnapshotReader(repo, manifest)
    assert await reader.pread(8, 6) == b"\0\0abc\0"
    await reader.close()


async def _expect_done(writer: SnapshotWriter) -> None:
    verbs = [
        writer.pread(0, 1),
        writer.pwrite(0, b"x"),
        writer.zero(0, 1),
        writer.trim(0, 1),
        writer.flush(),
        writer.block_status(0, 1),
        writer.cache(0, 1),
    ]
    for verb in verbs:
        with pytest.raises(OSError) as err:
            await verb
        assert err.value.errno == errno.EIO


async def test_a_missing_parent_is_refused_and_frees_the_disk(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    await _make_parent(repo, "d", _random(2 * CS, 14))
    with pytest.raises(SnapshotNotFound):
        SnapshotWriter(repo, "d", 2 * CS, parent="20200101T000000.000000Z")
    writer = SnapshotWriter(repo, "d", 2 * CS, parent="none")  # the lock was released
    assert writer.parent_id is None
    assert await writer.pread(0, 16) == bytes(16)
    await writer.abort()
    first = repo.resolve("d")
    writer = SnapshotWriter(repo, "d", 2 * CS, parent=first.id)
    assert writer.parent_id == first.id
    assert await writer.pread(0, 2 * CS) == _random(2 * CS, 14)
    await writer.abort()


async def test_a_write_cancelled_while_it_waits_for_a_buffer_leaks_nothing(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    writer = SnapshotWriter(repo, "d", 4 * CS, max_chunks_in_flight=1)
    await writer.pwrite(10, b"a" * 100)  # holds the only buffer
    waiting = asyncio.ensure_future(writer.pwrite(CS + 10, b"b" * 100))
    await asyncio.sleep(0)  # it stores chunk 0 to make room and waits for the buffer
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await writer.pwrite(2 * CS, b"c" * 100)
    manifest = await writer.commit()
    reader = SnapshotReader(repo, manifest)
    expect = bytearray(4 * CS)
    expect[10:110] = b"a" * 100
    expect[2 * CS : 2 * CS + 100] = b"c" * 100
    assert await reader.pread(0, 4 * CS) == expect
    await reader.close()


async def test_pushed_and_read_over_nbd(tmp_path: Path) -> None:
    """What QEMU's blockdev-backup does to a ``repo-snapshot-begin`` export, and an instant restore."""
    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    size = 16 * CS + 4096
    parent = _parent_data(size, 15)
    await _make_parent(repo, "d", parent)
    writer = SnapshotWriter(repo, "d", size, max_chunks_in_flight=3)
    model = bytearray(parent)
    async with serve_unix(tmp_path, writer) as uri, await NbdClient.connect(uri, max_in_flight=8) as client:
        assert client.size == size and not client.read_only
        dirty = list(range(0, size, 64 << 10))[::3]
        pushed = {o: _random(min(64 << 10, size - o), o) for o in dirty}
        await asyncio.gather(*(client.pwrite(o, d) for o, d in pushed.items()))
        for o, d in pushed.items():
            model[o : o + len(d)] = d
        await client.zero(5 * CS, 2 * CS)
        model[5 * CS : 7 * CS] = bytes(2 * CS)
        await client.flush()
        assert await client.pread(0, size) == model
    manifest = await writer.commit()
    reader = SnapshotReader(repo, manifest)
    async with serve_unix(tmp_path, reader) as uri, await NbdClient.connect(uri) as client:
        assert client.read_only
        assert await client.pread(0, size) == model
        with pytest.raises(OSError):
            await client.pwrite(0, b"x")
    await reader.close()


async def test_an_open_reader_keeps_its_chunks_through_prune_and_gc(tmp_path: Path) -> None:
    """An instant-restore export reads a snapshot that a prune removes and a gc then collects: the reader's
    lease keeps its chunks, so it goes on reading the right bytes; once it is closed, gc frees them. A reader
    opened on a snapshot pruned already is SnapshotNotFound, not a reader of chunks that may vanish."""
    from backup.repo.gc import collect_garbage
    from backup.repo.prune import PruneRules, prune

    repo = Repository.init(tmp_path / "repo", chunk_size=CS)
    old, new = _random(4 * CS, 11), _random(4 * CS, 12)
    await _make_parent(repo, "d", old)
    first = repo.resolve("d")
    await _make_parent(repo, "d", new)
    reader = SnapshotReader(repo, first, cache_chunks=1)
    assert [m.id for m in prune(repo, "d", PruneRules(keep_last=1))] == [first.id]
    collect_garbage(repo)
    assert await _read_all(reader, CS) == old  # every chunk decoded after the gc
    await reader.close()
    collect_garbage(repo)
    assert len(_chunk_files(repo)) == 4  # only the newest snapshot's chunks are left
    with pytest.raises(SnapshotNotFound):
        SnapshotReader(repo, first)


@pytest.mark.parametrize("workers", [4, 8])
async def test_a_backup_job_with_several_workers_stores_each_chunk_once(tmp_path: Path, workers: int) -> None:
    """Several writers each filling their own chunks while full ones are being stored: a writer waits for
    a buffer coming back instead of storing a chunk still being filled (stored half from zeroes, then
    again when complete: an orphan chunk and the work done twice)."""
    from backup.backup_job import BackupJob, BackupOptions
    from backup.events import EventBus
    from backup.memory import MemoryDevice
    from backup.node import BlockNode

    chunk = 4 << 20  # the default: larger than the job writes at a time, so each is filled in pieces
    repo = Repository.init(tmp_path / "repo", chunk_size=chunk)
    size = 16 * chunk
    node = BlockNode("src", MemoryDevice(size, data=_random(size, 21)))
    writer = SnapshotWriter(repo, "d", size)
    job = BackupJob("j", node, writer, BackupOptions(max_workers=workers), events=EventBus(), target_zero_init=True)
    await job.attach()
    job.start()
    await asyncio.wait_for(job.wait(), 30)
    assert job.error is None
    manifest = await writer.commit()
    assert _chunk_files(repo) == {c for c in manifest.chunks if c is not None}
    assert manifest.stats["stored-bytes"] < size * 1.01  # nothing stored twice
