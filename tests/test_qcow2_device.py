"""Qcow2Device against a reference model, with our own metadata checker as the oracle (no QEMU)."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backup.errors import ImageFormatError
from backup.qcow2 import Qcow2Device, is_qcow2
from backup.qcow2 import layout as q
from backup.qcow2.check import check_image
from nbd.constants import State
from nbd.device import Extent

MiB = 1024 * 1024

op = st.one_of(
    st.tuples(st.just("write"), st.floats(0, 1), st.integers(1, 200_000), st.integers(0, 255), st.booleans()),
    st.tuples(st.just("zero"), st.floats(0, 1), st.integers(1, 200_000), st.booleans(), st.booleans()),
    st.tuples(st.just("trim"), st.floats(0, 1), st.integers(1, 200_000), st.booleans(), st.booleans()),
    st.tuples(st.just("flush"), st.floats(0, 1), st.integers(1, 2), st.booleans(), st.booleans()),
)


async def apply(dev: Qcow2Device, ref: bytearray, ops: list[tuple[str, float, int, object, bool]], seed: int) -> None:
    """Run the ops on the device and the reference bytearray alike."""
    rnd = random.Random(seed)
    size = len(ref)
    for kind, where, n, arg, flag in ops:
        off = int(where * (size - 1))
        n = min(n, size - off)
        if kind == "write":
            data = rnd.randbytes(n) if flag else bytes([int(arg)]) * n  # type: ignore[call-overload]
            await dev.pwrite(off, data)
            ref[off : off + n] = data
        elif kind == "zero":
            await dev.zero(off, n, may_trim=bool(arg), fua=flag)
            ref[off : off + n] = bytes(n)
        elif kind == "trim":
            await dev.trim(off, n)
            ref[off : off + n] = await dev.pread(off, n)  # unspecified contents: take what it reads
        else:
            await dev.flush()


async def assert_consistent(dev: Qcow2Device, ref: bytes) -> None:
    assert await dev.pread(0, len(ref)) == ref
    pos = 0
    while pos < len(ref):
        extents = await dev.block_status(pos, len(ref) - pos)
        assert extents and sum(e.length for e in extents) <= len(ref) - pos
        for e in extents:
            if e.flags & State.ZERO:
                assert ref[pos : pos + e.length] == bytes(e.length)
            pos += e.length


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(op, max_size=25),
    cluster_bits=st.sampled_from([9, 12, 16]),
    compress=st.booleans(),
    codec=st.sampled_from(["zlib", "zstd"]),
    small_cache=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_random_operations_give_a_clean_equal_image(
    tmp_path: Path,
    ops: list[tuple[str, float, int, object, bool]],
    cluster_bits: int,
    compress: bool,
    codec: str,
    small_cache: bool,
    seed: int,
) -> None:
    async def main() -> None:
        path = tmp_path / f"r{seed}.qcow2"
        size = 3 * MiB + 1536
        ref = bytearray(size)
        dev = await Qcow2Device.create(
            path,
            size,
            cluster_size=1 << cluster_bits,
            compress=compress,
            compression_type=codec,
            l2_cache_size=(1 << cluster_bits) if small_cache else 8 * MiB,  # tiny: evictions all the time
        )
        await apply(dev, ref, ops, seed)
        await assert_consistent(dev, bytes(ref))
        await dev.flush()
        mid = check_image(str(path))
        assert mid.clean, (mid.corruptions, mid.leaks)  # consistent after a flush, even before close
        await dev.close()
        result = check_image(str(path))
        assert result.clean and not result.dirty, (result.corruptions, result.leaks)
        again = await Qcow2Device.open(path, read_only=True)
        await assert_consistent(again, bytes(ref))
        await again.close()
        path.unlink()

    asyncio.run(main())


async def test_create_layout_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    dev = await Qcow2Device.create(path, 10 * MiB + 100)
    assert dev.size == 10 * MiB + 512  # rounded up to sectors, like qemu-img
    assert dev.cluster_size == 65536 and not dev.read_only and dev.backing is None
    await dev.close()
    assert is_qcow2(str(path))
    assert check_image(str(path)).clean
    dev = await Qcow2Device.open(path)
    assert dev.header.version == 3 and dev.header.l1_size == 1
    assert await dev.block_status(0, dev.size) == [Extent(dev.size, State.HOLE | State.ZERO)]
    await dev.close()


async def test_sequential_backup_is_contiguous_and_cheap_in_metadata(tmp_path: Path) -> None:
    path = tmp_path / "seq.qcow2"
    dev = await Qcow2Device.create(path, 8 * MiB)
    chunk = os.urandom(MiB)
    for off in range(0, 8 * MiB, MiB):
        await dev.pwrite(off, chunk)
    await dev.close()
    # header + reftable + refblock + L1 + one L2 + 128 data clusters: nothing else, no fragmentation
    assert path.stat().st_size == (5 + 128) * 65536
    check = check_image(str(path))
    assert check.clean and check.allocated_clusters == 128


async def test_zero_clusters_write_no_data(tmp_path: Path) -> None:
    path = tmp_path / "z.qcow2"
    dev = await Qcow2Device.create(path, 4 * MiB)
    await dev.pwrite(0, b"\xaa" * (2 * MiB))
    await dev.zero(0, MiB, may_trim=True)
    await dev.zero(MiB, 65536, fast=True)  # keeps the allocation (no may_trim), reads zero
    with pytest.raises(OSError) as info:
        await dev.zero(100, 4096, fast=True)
    assert info.value.errno == errno.ENOTSUP
    assert await dev.pread(0, MiB + 65536) == bytes(MiB + 65536)
    assert await dev.pread(MiB + 65536, 10) == b"\xaa" * 10
    status = await dev.block_status(0, 4 * MiB)
    assert status[0].length == MiB + 65536 and status[0].flags == State.HOLE | State.ZERO
    assert status[1].flags == 0
    alloc = await dev.top_allocation(0, 4 * MiB)
    assert alloc == [(2 * MiB, True), (2 * MiB, False)]
    await dev.close()
    assert check_image(str(path)).clean


async def test_compressed_image_is_smaller_and_reads_back(tmp_path: Path) -> None:
    text = b"".join(b"line %08d of a very compressible backup\n" % i for i in range(50_000))[: 2 * MiB]
    sizes = {}
    for compress in (False, True):
        path = tmp_path / f"c{compress}.qcow2"
        dev = await Qcow2Device.create(path, 2 * MiB, compress=compress)
        await dev.pwrite(0, text)
        await dev.close()
        sizes[compress] = path.stat().st_size
        dev = await Qcow2Device.open(path, read_only=True)
        assert await dev.pread(0, 2 * MiB) == text
        assert await dev.pread(12345, 70000) == text[12345 : 12345 + 70000]
        await dev.close()
        result = check_image(str(path))
        assert result.clean and result.compressed_clusters == (32 if compress else 0)
    assert sizes[True] * 4 < sizes[False]


async def test_zstd_images_mark_their_compression_type(tmp_path: Path) -> None:
    path = tmp_path / "z.qcow2"
    dev = await Qcow2Device.create(path, MiB, compress=True, compression_type="zstd")
    await dev.pwrite(0, b"zstd " * (MiB // 5) + b"z")
    await dev.close()
    dev = await Qcow2Device.open(path, read_only=True)
    h = dev.header
    assert h.compression_type == 1 and h.incompatible & q.INCOMPAT_COMPRESSION and h.header_length == 112
    assert await dev.pread(0, MiB) == b"zstd " * (MiB // 5) + b"z"
    await dev.close()
    result = check_image(str(path))
    assert result.clean and result.compressed_clusters == 16
    with pytest.raises(ImageFormatError, match="unknown compression type"):
        await Qcow2Device.create(path, MiB, compression_type="lz4")


async def test_rewrite_of_compressed_clusters_frees_them(tmp_path: Path) -> None:
    path = tmp_path / "rw.qcow2"
    dev = await Qcow2Device.create(path, MiB, compress=True)
    await dev.pwrite(0, b"x" * MiB)
    await dev.close()
    dev = await Qcow2Device.open(path)  # without compress: rewrites become standard clusters
    await dev.pwrite(1000, b"y" * 70000)
    await dev.zero(5 * 65536, 65536)
    await dev.close()
    expected = bytearray(b"x" * MiB)
    expected[1000:71000] = b"y" * 70000
    expected[5 * 65536 : 6 * 65536] = bytes(65536)
    dev = await Qcow2Device.open(path, read_only=True)
    assert await dev.pread(0, MiB) == expected
    await dev.close()
    result = check_image(str(path))
    assert result.clean, (result.corruptions, result.leaks)
    assert result.compressed_clusters == 13


async def test_interrupted_image_is_detectably_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "crash.qcow2"
    dev = await Qcow2Device.create(path, 2 * MiB)
    with path.open("rb") as f:
        f.seek(q.INCOMPAT_OFFSET)
        assert not struct.unpack(">Q", f.read(8))[0] & q.INCOMPAT_DIRTY  # empty image: complete
    await dev.pwrite(0, b"a" * 65536)
    await dev.flush()
    dev.abandon()  # what a crash (or SIGKILL) leaves behind
    assert check_image(str(path)).dirty
    with pytest.raises(ImageFormatError, match="not cleanly closed"):
        await Qcow2Device.open(path, repair=False)
    ro = await Qcow2Device.open(path, read_only=True)
    assert ro.was_dirty and await ro.pread(0, 4) == b"aaaa"
    await ro.close()
    assert check_image(str(path)).dirty  # reading does not change anything


@pytest.mark.parametrize("flushed", [False, True])
@pytest.mark.parametrize("cluster_size", [512, 65536])
async def test_writing_a_crashed_image_rebuilds_its_refcounts(tmp_path: Path, flushed: bool, cluster_size: int) -> None:
    path = tmp_path / "crash.qcow2"
    dev = await Qcow2Device.create(path, 4 * MiB, cluster_size=cluster_size)
    await dev.pwrite(0, b"a" * MiB)
    await dev.flush()
    await dev.pwrite(MiB, b"b" * MiB)  # metadata of this write only in memory unless flushed
    await dev.zero(0, 65536, may_trim=True)
    if flushed:
        await dev.flush()
    dev.abandon()
    with path.open("r+b") as f:  # stale refcounts, as a crash between metadata writes leaves them
        f.seek(2 * cluster_size)
        f.write(b"\xff" * 64)
    assert not check_image(str(path)).clean
    dev = await Qcow2Device.open(path)
    assert not check_image(str(path)).dirty and check_image(str(path)).clean
    # what was flushed survives; the rest was never recorded in the tables
    after_flush = bytes(65536) + b"a" * (MiB - 65536) + b"b" * MiB
    expected = after_flush if flushed else b"a" * MiB + bytes(MiB)
    assert await dev.pread(0, 2 * MiB) == expected
    await dev.pwrite(3 * MiB, b"c" * 70000)
    await dev.close()
    result = check_image(str(path))
    assert result.clean and not result.dirty, (result.corruptions, result.leaks)


async def test_backing_chain_reads_merges_and_allocation(tmp_path: Path) -> None:
    base_raw = tmp_path / "base.raw"
    base_raw.write_bytes(b"R" * MiB)
    mid = await Qcow2Device.create(tmp_path / "mid.qcow2", 2 * MiB, backing_file="base.raw")
    assert mid.backing is not None and mid.size == 2 * MiB
    await mid.pwrite(65536, b"M" * 65536)
    await mid.close()
    top = await Qcow2Device.create(tmp_path / "top.qcow2", None, backing_file=str(tmp_path / "mid.qcow2"))
    assert top.size == 2 * MiB and top.header.backing_format == "qcow2"
    await top.pwrite(10, b"T" * 10)  # partial: merged with the backing's cluster
    await top.zero(3 * 65536, 65536)  # zero over a backing cluster: a zero flag
    expected = bytearray(b"R" * MiB + bytes(MiB))
    expected[65536 : 2 * 65536] = b"M" * 65536
    expected[10:20] = b"T" * 10
    expected[3 * 65536 : 4 * 65536] = bytes(65536)
    assert await top.pread(0, 2 * MiB) == expected
    assert await top.top_allocation(0, 2 * MiB) == [
        (65536, True),
        (2 * 65536, False),
        (65536, True),
        (
            2 * MiB - 4 * 65536,
            False,
        ),
    ]
    status = await top.block_status(0, 2 * MiB)
    assert status[0].flags == 0 and status[0].length == 3 * 65536
    assert sum(e.length for e in status) <= 2 * MiB
    await top.close()
    assert check_image(str(tmp_path / "top.qcow2")).clean


async def test_backing_cycles_are_refused(tmp_path: Path) -> None:
    (tmp_path / "c.qcow2").write_bytes(b"")
    await (await Qcow2Device.create(tmp_path / "c.qcow2", MiB)).close()
    for name, target in (("a.qcow2", "a.qcow2"), ("b.qcow2", "d.qcow2")):
        await (await Qcow2Device.create(tmp_path / name, MiB, backing_file="c.qcow2")).close()
        data = (tmp_path / name).read_bytes().replace(b"c.qcow2", target.encode())
        (tmp_path / name).write_bytes(data)
    await (await Qcow2Device.create(tmp_path / "d.qcow2", MiB, backing_file="c.qcow2")).close()
    data = (tmp_path / "d.qcow2").read_bytes().replace(b"c.qcow2", b"b.qcow2")
    (tmp_path / "d.qcow2").write_bytes(data)
    for name in ("a.qcow2", "b.qcow2"):
        with pytest.raises(ImageFormatError, match="cycle"):
            await Qcow2Device.open(tmp_path / name, read_only=True)


def _corrupt_image(path: Path, patch: dict[int, bytes] | None = None, truncate: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    for off, value in (patch or {}).items():
        data[off : off + len(value)] = value
    if truncate is not None:
        del data[truncate:]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("patch", "truncate", "message"),
    [
        ({0: b"QFI\x00"}, None, "bad magic"),
        (None, 3 * 65536, "L1 table .* past the end"),
        ({3 * 65536: struct.pack(">Q", q.OFLAG_COPIED | (1 << 40))}, None, "L1 entry 0 .* past the end"),
        ({96: struct.pack(">I", 9)}, None, "refcount_order 9 overflows"),
        ({48: struct.pack(">Q", 1 << 40)}, None, "refcount table .* past the end"),
        ({72: struct.pack(">Q", 1 << 33)}, None, "unknown incompatible"),
        ({4: struct.pack(">I", 4)}, None, "version 4"),
        (None, 50, "truncated|bad magic"),
    ],
)
async def test_corrupt_images_are_refused(
    tmp_path: Path, patch: dict[int, bytes] | None, truncate: int | None, message: str
) -> None:
    path = tmp_path / "bad.qcow2"
    dev = await Qcow2Device.create(path, 2 * MiB)
    await dev.pwrite(0, b"d" * 65536)
    await dev.close()
    _corrupt_image(path, patch, truncate)
    for read_only in (True, False):
        with pytest.raises(ImageFormatError, match=message):
            await Qcow2Device.open(path, read_only=read_only)


async def test_l2_entry_past_the_end_fails_io_with_eio(tmp_path: Path) -> None:
    path = tmp_path / "l2.qcow2"
    dev = await Qcow2Device.create(path, 2 * MiB)
    await dev.pwrite(0, b"d" * 65536)
    await dev.close()
    l2 = 4 * 65536  # header, reftable, refblock, L1, then the L2 table
    _corrupt_image(path, {l2: struct.pack(">Q", q.OFLAG_COPIED | (1 << 40))})
    dev = await Qcow2Device.open(path)
    with pytest.raises(OSError) as info:
        await dev.pwrite(0, b"x")
    assert info.value.errno == errno.EIO and isinstance(info.value, ImageFormatError)
    dev.abandon()


async def test_read_only_and_bounds(tmp_path: Path) -> None:
    path = tmp_path / "ro.qcow2"
    await (await Qcow2Device.create(path, MiB)).close()
    dev = await Qcow2Device.open(path, read_only=True)
    assert dev.read_only and not dev.capabilities.can_zero
    with pytest.raises(OSError) as info:
        await dev.pwrite(0, b"x")
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError):
        await dev.pread(MiB - 1, 2)
    await dev.close()
    with pytest.raises(OSError) as info:
        await dev.pread(0, 1)
    assert info.value.errno == errno.EBADF


async def test_refcount_table_grows_with_small_clusters(tmp_path: Path) -> None:
    path = tmp_path / "grow.qcow2"
    dev = await Qcow2Device.create(path, 20 * MiB, cluster_size=512)
    data = os.urandom(20 * MiB)
    await dev.pwrite(0, data)
    await dev.close()
    dev = await Qcow2Device.open(path, read_only=True)
    assert dev.header.refcount_table_clusters > 1
    assert await dev.pread(0, 20 * MiB) == data
    await dev.close()
    assert check_image(str(path)).clean


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.integers(0, 6 * 4096 - 1), st.integers(0, 255)), min_size=1, max_size=6),
    read_only=st.booleans(),
)
def test_corrupted_metadata_fails_cleanly(tmp_path: Path, flips: list[tuple[int, int]], read_only: bool) -> None:
    """Whatever bytes of the metadata clusters are damaged: a clear error or consistent I/O, never a crash."""

    async def main() -> None:
        path = tmp_path / "fuzz.qcow2"
        dev = await Qcow2Device.create(path, 256 * 1024, cluster_size=4096, compress=True)
        await dev.pwrite(0, b"compressible " * 2000)
        dev.compress = False
        await dev.pwrite(40000, os.urandom(30000))
        await dev.zero(100_000, 20_000)
        await dev.close()
        data = bytearray(path.read_bytes())
        for off, value in flips:
            data[off] = value
        path.write_bytes(bytes(data))
        try:
            image = await Qcow2Device.open(path, read_only=read_only)
        except ImageFormatError:
            return
        try:
            size = image.size
            for off in range(0, min(size, 1 << 20), 65536):
                n = min(65536, size - off)
                await image.pread(off, n)
                await image.block_status(off, n)
                if not read_only:
                    await image.pwrite(off, b"w" * min(n, 5000))
                    await image.zero(off + 4096, min(n, 8192) - 4096 if n > 8192 else 0)
        except OSError:
            pass  # corruption found during I/O: EIO (a Qcow2CorruptError) is the clean outcome
        finally:
            try:
                await image.close()
            except OSError:
                image.abandon()

    asyncio.run(main())


@pytest.mark.parametrize("compress", [False, True])
async def test_reads_never_see_a_cluster_before_its_data(tmp_path: Path, compress: bool) -> None:
    """A write that waits for its backing file mid-way must not expose entries whose data is unwritten."""
    from backup.memory import MemoryDevice

    class SlowBacking(MemoryDevice):
        async def pread(self, offset: int, length: int) -> bytes:
            await asyncio.sleep(0)  # a backing read that yields to the loop (a live source, a thread)
            return await super().pread(offset, length)

    cs = 65536
    base = tmp_path / "base.raw"
    base.write_bytes(b"o" * (8 * cs))
    backing = SlowBacking(8 * cs, data=b"o" * (8 * cs))
    dev = await Qcow2Device.create(
        tmp_path / "top.qcow2", 8 * cs, backing_file=str(base), backing_device=backing, compress=compress
    )
    seen: set[bytes] = set()
    done = False

    async def reader() -> None:
        while not done:
            for c in range(0, 8, 2):
                seen.add(await dev.pread(c * cs, 16))
            await asyncio.sleep(0)

    task = asyncio.create_task(reader())
    for c in range(0, 8, 2):  # cluster c whole (fresh), then c+1 partial (merged with the backing)
        await dev.pwrite(c * cs, b"n" * (cs + 100))
    done = True
    await task
    assert seen <= {b"o" * 16, b"n" * 16}
    await dev.close()
    assert check_image(str(tmp_path / "top.qcow2")).clean


async def test_backing_file_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "placeholder").write_bytes(bytes(MiB))
    await (await Qcow2Device.create(tmp_path / "top.qcow2", MiB, backing_file="placeholder")).close()
    data = (tmp_path / "top.qcow2").read_bytes().replace(b"placeholder", b"fifo\0\0\0\0\0\0\0")
    (tmp_path / "top.qcow2").write_bytes(data)
    with pytest.raises(ImageFormatError, match="NUL"):
        await Qcow2Device.open(tmp_path / "top.qcow2", read_only=True)
    os.rename(tmp_path / "fifo", tmp_path / "fifo_fifo_f")
    data = data.replace(b"fifo\0\0\0\0\0\0\0", b"fifo_fifo_f")
    (tmp_path / "top.qcow2").write_bytes(data)
    with pytest.raises(ImageFormatError, match="not a regular file"):
        await asyncio.wait_for(Qcow2Device.open(tmp_path / "top.qcow2", read_only=True), 10)


async def test_dirty_image_with_a_wild_pointer_is_refused_not_repaired(tmp_path: Path) -> None:
    path = tmp_path / "wild.qcow2"
    dev = await Qcow2Device.create(path, 2 * MiB)
    await dev.pwrite(0, b"d" * 65536)
    await dev.flush()
    dev.abandon()  # dirty
    l2 = 4 * 65536
    _corrupt_image(path, {l2: struct.pack(">Q", q.OFLAG_COPIED | (1 << 54))})
    with pytest.raises(ImageFormatError, match="past the end"):
        await asyncio.wait_for(Qcow2Device.open(path), 20)
    assert not check_image(str(path)).clean


async def test_write_racing_close_never_touches_a_reused_descriptor(tmp_path: Path) -> None:
    """A compressed write is in its compression threads (outside the lock) when the image is closed;
    the descriptor number is then reused by another file. The write must fail with EBADF, not write
    qcow2 data (or the dirty bit) into whatever file now owns that number."""
    path = tmp_path / "race.qcow2"
    dev = await Qcow2Device.create(path, MiB, compress=True)
    await dev.pwrite(0, b"a" * 65536)  # marked dirty: close takes the lock and flushes
    old_fd = dev._fd
    write = asyncio.ensure_future(dev.pwrite(65536, os.urandom(4 * 65536)))
    await asyncio.sleep(0)  # the write passes its checks and starts compressing in threads
    await dev.close()
    other = tmp_path / "other"
    fd = os.open(other, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fd != old_fd:
            pytest.skip("the descriptor number was not reused")
        with pytest.raises(OSError) as info:
            await asyncio.wait_for(write, 30)
        assert info.value.errno == errno.EBADF
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
    assert check_image(str(path)).clean


async def test_concurrent_closes_close_the_descriptor_once(tmp_path: Path) -> None:
    """Two close() calls that both wait for the lock (a write holds it across a backing read that
    suspends): the second must find the image closed, not flush through and close() a descriptor
    number that is no longer ours (another file may own it by then)."""
    from backup.memory import MemoryDevice

    class SlowBacking(MemoryDevice):
        async def pread(self, offset: int, length: int) -> bytes:
            await asyncio.sleep(0.01)
            return await super().pread(offset, length)

    (tmp_path / "base.raw").write_bytes(b"")
    dev = await Qcow2Device.create(
        tmp_path / "top.qcow2",
        MiB,
        backing_file="base.raw",
        backing_format="raw",
        backing_device=SlowBacking(MiB, data=b"b" * MiB),
    )
    write = asyncio.ensure_future(dev.pwrite(100, b"x" * 10))  # merges a backing read, holding the lock
    await asyncio.sleep(0)
    closes = [asyncio.ensure_future(dev.close()) for _ in range(2)]
    results = await asyncio.wait_for(asyncio.gather(write, *closes, return_exceptions=True), 30)
    assert results == [None, None, None]
    assert check_image(str(tmp_path / "top.qcow2")).clean


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batches=st.lists(
        st.lists(st.tuples(st.floats(0, 1), st.integers(1, 150_000), st.integers(0, 255)), min_size=1, max_size=8),
        min_size=1,
        max_size=4,
    ),
    cluster_bits=st.sampled_from([9, 12, 16]),
    backed=st.booleans(),
    small_cache=st.booleans(),
    compress=st.booleans(),
)
def test_pwrite_many_equals_the_writes_one_by_one(
    tmp_path: Path,
    batches: list[list[tuple[float, int, int]]],
    cluster_bits: int,
    backed: bool,
    small_cache: bool,
    compress: bool,
) -> None:
    """Scattered pieces as one request (a batched incremental): pieces that share a cluster, partial
    clusters over a backing file (their old contents come from it), tables evicted in between (tiny
    cache); the image reads as the model and checks clean."""

    async def main() -> None:
        size = 3 * MiB + 1536
        base = tmp_path / "base.raw"
        base_bytes = random.Random(cluster_bits).randbytes(size) if backed else bytes(size)
        base.write_bytes(base_bytes)
        path = tmp_path / "many.qcow2"
        for old in (path,):
            old.unlink(missing_ok=True)
        dev = await Qcow2Device.create(
            path,
            size,
            cluster_size=1 << cluster_bits,
            backing_file=str(base) if backed else None,
            backing_format="raw" if backed else None,
            l2_cache_size=(1 << cluster_bits) if small_cache else 8 * MiB,
            compress=compress,
        )
        ref = bytearray(base_bytes)
        for batch in batches:
            pieces = []
            for where, n, fill in batch:
                off = int(where * (size - 1))
                n = min(n, size - off)
                pieces.append((off, bytes([fill]) * n))
            await dev.pwrite_many(pieces)
            for off, data in pieces:  # overlapping pieces land in the order given
                ref[off : off + len(data)] = data
        assert await dev.pread(0, size) == ref
        await dev.close()
        result = check_image(str(path))
        assert result.clean and not result.dirty, (result.corruptions, result.leaks)

    asyncio.run(main())


async def test_pwrite_many_puts_scattered_clusters_next_to_each_other(tmp_path: Path) -> None:
    """Fresh clusters for all the pieces of one request are allocated in a row: one data run in the
    file (one ``pwritev``), whatever their guest offsets, also when the pieces need two new L2 tables
    (a table allocated between two pieces' data would split the run)."""
    path = tmp_path / "scatter.qcow2"
    dev = await Qcow2Device.create(path, 1024 * MiB)
    cs = dev.cluster_size
    offsets = [37 * cs, 12000 * cs, 3 * cs, 9000 * cs, 511 * cs]  # both halves: two L2 tables
    await dev.pwrite_many([(off, bytes([i + 1]) * cs) for i, off in enumerate(offsets)])
    hosts = sorted(host for off in offsets for _, _, _, host in dev.mapping.runs(off, cs))
    assert hosts == list(range(hosts[0], hosts[0] + len(offsets) * cs, cs))
    for i, off in enumerate(offsets):
        assert await dev.pread(off, cs) == bytes([i + 1]) * cs
    await dev.close()
    assert check_image(str(path)).clean


async def test_pwrite_many_of_nothing_leaves_the_image_clean(tmp_path: Path) -> None:
    """A batch whose every piece was zeroes writes nothing: the image is not marked dirty, so even a
    crash right after it leaves a clean image."""
    path = tmp_path / "none.qcow2"
    dev = await Qcow2Device.create(path, 4 * MiB)
    await dev.close()
    dev = await Qcow2Device.open(path)
    await dev.pwrite_many([])
    await dev.pwrite_many([(65536, b"")])
    dev.abandon()  # what a crash leaves
    assert not check_image(str(path)).dirty
