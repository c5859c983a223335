"""qcow2 interoperability with QEMU: images we write pass qemu-img, images QEMU writes read back.

Oracles: ``qemu-img check`` (clean), ``qemu-img compare`` (equal), ``qemu-img info`` (size, dirty
flag), ``qemu-img map`` (allocation), ``qemu-img convert -O raw`` (QEMU's reading of an image).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from conftest import require, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backup.errors import ImageFormatError
from backup.qcow2 import Qcow2Device
from nbd.constants import State

MiB = 1024 * 1024
SIZE = 4 * MiB


def qemu_check(path: Path) -> dict[str, int]:
    proc = run("qemu-img", "check", "--output=json", path, check=False)
    assert proc.returncode == 0, f"qemu-img check {path}: {proc.stdout}{proc.stderr}"
    report: dict[str, int] = json.loads(proc.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0 and report["check-errors"] == 0
    return report


def qemu_compare(image: Path, raw: Path) -> None:
    proc = run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, raw, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def qemu_read(image: Path, tmp_path: Path) -> bytes:
    out = tmp_path / (image.name + ".as-qemu-reads.raw")
    run("qemu-img", "convert", "-O", "raw", image, out)
    return out.read_bytes()


def qemu_map(image: Path) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = json.loads(run("qemu-img", "map", "--output=json", image).stdout)
    return entries


def qemu_io(image: Path, *commands: str, fmt: str = "qcow2") -> None:
    argv: list[str] = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    run(*argv, image)


@pytest.fixture(autouse=True)
def _peers() -> None:
    require("qemu-img", "qemu-io")


async def test_our_image_is_clean_equal_sized_and_mapped(tmp_path: Path) -> None:
    path, raw = tmp_path / "ours.qcow2", tmp_path / "ref.raw"
    ref = bytearray(SIZE)
    dev = await Qcow2Device.create(path, SIZE)
    data = os.urandom(2 * 65536)
    await dev.pwrite(0, data)  # two data clusters
    ref[0 : len(data)] = data
    await dev.pwrite(4 * 65536, b"\x55" * 65536)
    await dev.zero(4 * 65536, 65536, may_trim=True)  # a zero cluster (no data)
    await dev.pwrite(SIZE - 1000, b"tail")  # a partial cluster at the end
    ref[SIZE - 1000 : SIZE - 996] = b"tail"
    await dev.close()
    raw.write_bytes(ref)
    qemu_check(path)
    qemu_compare(path, raw)
    info = json.loads(run("qemu-img", "info", "--output=json", path).stdout)
    assert info["virtual-size"] == SIZE and info["format"] == "qcow2" and not info.get("dirty-flag", False)
    mapping = {int(str(e["start"])): e for e in qemu_map(path)}
    assert mapping[0]["data"] is True and mapping[0]["length"] == 2 * 65536
    assert mapping[2 * 65536]["data"] is False and mapping[2 * 65536]["zero"] is True
    assert mapping[2 * 65536]["present"] is False  # unallocated
    zero = mapping[4 * 65536]
    assert zero["zero"] is True and zero["data"] is False and zero["present"] is True  # zero cluster
    assert zero["length"] == 65536


@pytest.mark.parametrize("codec", ["zlib", "zstd"])
async def test_compressed_backup_is_smaller_and_equal(tmp_path: Path, codec: str) -> None:
    payload = b"".join(b"block %09d: the same words again and again\n" % i for i in range(200_000))[:SIZE]
    raw = tmp_path / "ref.raw"
    raw.write_bytes(payload)
    sizes = {}
    for compress in (False, True):
        path = tmp_path / f"c{int(compress)}.qcow2"
        dev = await Qcow2Device.create(path, SIZE, compress=compress, compression_type=codec)
        for off in range(0, SIZE, MiB):
            await dev.pwrite(off, payload[off : off + MiB])
        await dev.close()
        report = qemu_check(path)
        assert report.get("compressed-clusters", 0) == (SIZE // 65536 if compress else 0)
        qemu_compare(path, raw)
        sizes[compress] = path.stat().st_size
        info = json.loads(run("qemu-img", "info", "--output=json", path).stdout)
        assert info["format-specific"]["data"]["compression-type"] == codec
    assert sizes[True] * 3 < sizes[False]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    writes=st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 300_000), st.booleans()), max_size=30),
    cluster_size=st.sampled_from([512, 4096, 65536]),
    compress=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_random_write_orders_are_clean_and_equal_to_qemu(
    tmp_path: Path, writes: list[tuple[int, int, bool]], cluster_size: int, compress: bool, seed: int
) -> None:
    import asyncio

    async def main() -> None:
        path, raw = tmp_path / f"h{seed}.qcow2", tmp_path / f"h{seed}.raw"
        rnd = random.Random(seed)
        ref = bytearray(SIZE)
        dev = await Qcow2Device.create(path, SIZE, cluster_size=cluster_size, compress=compress)
        for off, n, zero in writes:
            n = min(n, SIZE - off)
            if zero:
                await dev.zero(off, n, may_trim=rnd.random() < 0.5)
                ref[off : off + n] = bytes(n)
            else:
                data = rnd.randbytes(n) if rnd.random() < 0.5 else bytes([rnd.randrange(256)]) * n
                await dev.pwrite(off, data)
                ref[off : off + n] = data
        await dev.close()
        raw.write_bytes(ref)
        qemu_check(path)
        qemu_compare(path, raw)
        path.unlink()
        raw.unlink()

    asyncio.run(main())


def _make_qemu_image(tmp_path: Path, variant: str) -> Path:
    """An image written by QEMU with zero, compressed and unallocated clusters as the variant says."""
    path = tmp_path / f"{variant}.qcow2"
    opts = {
        "v3": "cluster_size=65536",
        "v2": "compat=0.10",
        "c512": "cluster_size=512",
        "c2m": "cluster_size=2M",
        "refcount1": "refcount_bits=1",
        "refcount64": "refcount_bits=64",
        "lazy": "lazy_refcounts=on",
        "extl2": "extended_l2=on",
    }
    if variant.startswith("compressed"):
        src = tmp_path / "src.raw"
        src.write_bytes(b"".join(b"compressible %08d\n" % i for i in range(SIZE // 21))[: SIZE // 2].ljust(SIZE, b"\0"))
        codec = ["-o", "compression_type=zstd"] if variant == "compressed-zstd" else []
        run("qemu-img", "convert", "-c", "-O", "qcow2", *codec, src, path)
        qemu_io(path, "write -P 0x33 100000 5000", "write -z 1048576 65536")
        return path
    if variant.startswith("backing") or variant == "extl2-backing":
        base = tmp_path / "base.img"
        if variant == "backing-raw":
            base.write_bytes(os.urandom(SIZE // 2))  # a backing file shorter than the image
            fmt = "raw"
        else:
            run("qemu-img", "create", "-f", "qcow2", base, str(SIZE))
            qemu_io(base, "write -P 0x11 0 2M", "write -z 2M 64k")
            fmt = "qcow2"
        extl2 = ["-o", "extended_l2=on"] if variant == "extl2-backing" else []
        run("qemu-img", "create", "-f", "qcow2", *extl2, "-b", base.name, "-F", fmt, path, str(SIZE), cwd=str(tmp_path))
        qemu_io(path, "write -P 0x22 65536 65536", "write -P 0x23 300000 1000", "write -z 196608 65536")
        if extl2:  # subclusters: some allocated, some zero, the rest still from the backing file
            qemu_io(path, "write -P 0x24 1050624 4096", "write -z 1060864 2048", "write -P 0x25 3145728 2048")
        return path
    run("qemu-img", "create", "-f", "qcow2", "-o", opts[variant], path, str(SIZE))
    qemu_io(
        path,
        "write -P 0xab 0 128k",
        "write -P 0xcd 200000 70000",
        "write -z 512k 128k",
        "write -P 0xef 1M 64k",
        "write -z 1M 64k",
        f"write -P 0x99 {SIZE - 512} 512",
    )
    return path


VARIANTS = [
    "v3",
    "v2",
    "c512",
    "c2m",
    "refcount1",
    "refcount64",
    "lazy",
    "compressed",
    "compressed-zstd",
    "backing-raw",
    "backing-qcow2",
]


def _flags_per_block(extents: list[tuple[int, int, bool, bool]], size: int, block: int) -> list[tuple[bool, bool]]:
    out: list[tuple[bool, bool]] = []
    for pos in range(0, size, block):
        for start, length, data, zero in extents:
            if start <= pos < start + length:
                out.append((data, zero))
                break
    return out


@pytest.mark.parametrize("variant", [*VARIANTS, "extl2", "extl2-backing"])
async def test_qemu_images_read_back_byte_for_byte(tmp_path: Path, variant: str) -> None:
    path = _make_qemu_image(tmp_path, variant)
    expected = qemu_read(path, tmp_path)
    dev = await Qcow2Device.open(path, read_only=True)
    assert dev.size == SIZE
    assert await dev.pread(0, SIZE) == expected
    assert await dev.pread(199_999, 70_003) == expected[199_999:270_002]
    ours: list[tuple[int, int, bool, bool]] = []
    pos = 0
    while pos < SIZE:
        for e in await dev.block_status(pos, SIZE - pos):
            ours.append((pos, e.length, not e.flags & State.HOLE, bool(e.flags & State.ZERO)))
            pos += e.length
    await dev.close()
    theirs = [(int(str(e["start"])), int(str(e["length"])), bool(e["data"]), bool(e["zero"])) for e in qemu_map(path)]
    assert _flags_per_block(ours, SIZE, 512) == _flags_per_block(theirs, SIZE, 512)


@pytest.mark.parametrize("variant", VARIANTS)
async def test_writes_into_qemu_images_stay_clean(tmp_path: Path, variant: str) -> None:
    path = _make_qemu_image(tmp_path, variant)
    ref = bytearray(qemu_read(path, tmp_path))
    rnd = random.Random(variant)
    dev = await Qcow2Device.open(path, compress=variant in ("compressed", "compressed-zstd", "refcount1"))
    for _ in range(40):
        off = rnd.randrange(SIZE)
        n = min(rnd.randrange(1, 200_000), SIZE - off)
        what = rnd.random()
        if what < 0.6:
            data = rnd.randbytes(n) if rnd.random() < 0.3 else bytes([rnd.randrange(256)]) * n
            await dev.pwrite(off, data)
            ref[off : off + n] = data
        elif what < 0.85:
            await dev.zero(off, n, may_trim=rnd.random() < 0.5)
            ref[off : off + n] = bytes(n)
        else:
            await dev.trim(off, n)
            ref[off : off + n] = await dev.pread(off, n)
    await dev.close()
    raw = tmp_path / "expected.raw"
    raw.write_bytes(ref)
    qemu_check(path)
    qemu_compare(path, raw)


async def test_interrupted_image_is_reported_dirty_by_qemu(tmp_path: Path) -> None:
    path = tmp_path / "crash.qcow2"
    dev = await Qcow2Device.create(path, SIZE)
    await dev.pwrite(0, b"x" * MiB)
    await dev.flush()
    dev.abandon()
    info = json.loads(run("qemu-img", "info", "--output=json", path).stdout)
    assert info["dirty-flag"] is True
    with pytest.raises(ImageFormatError, match="not cleanly closed"):
        await Qcow2Device.open(path, repair=False)
    dev = await Qcow2Device.open(path)  # for writing: refcounts rebuilt, as QEMU does
    await dev.pwrite(MiB, b"y" * 4096)
    await dev.close()
    qemu_check(path)
    info = json.loads(run("qemu-img", "info", "--output=json", path).stdout)
    assert not info.get("dirty-flag", False)
    raw = tmp_path / "expected.raw"
    raw.write_bytes((b"x" * MiB + b"y" * 4096).ljust(SIZE, b"\0"))
    qemu_compare(path, raw)


async def test_backing_cycle_and_truncation_are_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    run("qemu-img", "create", "-f", "qcow2", a, "1M")
    run("qemu-img", "create", "-f", "qcow2", "-b", a.name, "-F", "qcow2", b, "1M", cwd=str(tmp_path))
    run("qemu-img", "rebase", "-u", "-b", b.name, "-F", "qcow2", a, cwd=str(tmp_path))
    for path in (a, b):
        with pytest.raises(ImageFormatError, match="cycle"):
            await Qcow2Device.open(path, read_only=True)
    c = tmp_path / "c.qcow2"
    run("qemu-img", "create", "-f", "qcow2", c, "1M")
    os.truncate(c, 65536 * 3)  # cuts the L1 table off
    with pytest.raises(ImageFormatError, match="L1 table"):
        await Qcow2Device.open(c)


async def test_fleecing_overlay_reads_the_point_in_time_image(tmp_path: Path) -> None:
    """sync=none's scheme at device level: old data goes into an overlay backed by the source."""
    source = tmp_path / "source.raw"
    snapshot = tmp_path / "snapshot.raw"
    source.write_bytes(os.urandom(SIZE))
    snapshot.write_bytes(source.read_bytes())
    target = await Qcow2Device.create(tmp_path / "fleece.qcow2", SIZE, backing_file=str(source))
    rnd = random.Random(7)
    fd = os.open(source, os.O_RDWR)
    try:
        for _ in range(30):  # a guest overwrites clusters; copy-before-write saves the old data
            cluster = rnd.randrange(SIZE // 65536) * 65536
            if (await target.top_allocation(cluster, 65536))[0][1] is False:
                await target.pwrite(cluster, os.pread(fd, 65536, cluster))
            os.pwrite(fd, os.urandom(65536), cluster)
    finally:
        os.close(fd)
    assert await target.pread(0, SIZE) == snapshot.read_bytes()
    await target.close()
    qemu_check(tmp_path / "fleece.qcow2")
    qemu_compare(tmp_path / "fleece.qcow2", snapshot)


@pytest.mark.parametrize("variant", ["lazy", "refcount1", "c512", "compressed"])
async def test_repair_of_a_dirty_qemu_image_satisfies_qemu_check(tmp_path: Path, variant: str) -> None:
    path = _make_qemu_image(tmp_path, variant)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(qemu_read(path, tmp_path))
    dev = await Qcow2Device.open(path, read_only=True)
    reftable = dev.header.refcount_table_offset
    await dev.close()
    with path.open("r+b") as f:  # a crash with lazy refcounts: dirty bit set, refcounts stale
        f.seek(72)
        incompatible = int.from_bytes(f.read(8), "big") | 1
        f.seek(72)
        f.write(incompatible.to_bytes(8, "big"))
        f.seek(reftable)
        first_block = int.from_bytes(f.read(8), "big")
        f.seek(first_block)
        f.write(bytes(256))
    assert run("qemu-img", "check", path, check=False).returncode != 0
    dev = await Qcow2Device.open(path)
    await dev.close()
    qemu_check(path)
    qemu_compare(path, expected)


async def test_image_with_internal_snapshots_reads_its_active_state(tmp_path: Path) -> None:
    path = _make_qemu_image(tmp_path, "v3")
    run("qemu-img", "snapshot", "-c", "before", path)
    qemu_io(path, "write -P 0x77 0 192k", "write -z 1M 64k")  # copy-on-write away from the snapshot
    expected = qemu_read(path, tmp_path)
    dev = await Qcow2Device.open(path, read_only=True)
    assert await dev.pread(0, SIZE) == expected
    await dev.close()
    with pytest.raises(ImageFormatError, match="snapshots"):
        await Qcow2Device.open(path)


async def test_extended_l2_images_are_read_only(tmp_path: Path) -> None:
    path = _make_qemu_image(tmp_path, "extl2")
    with pytest.raises(ImageFormatError, match="read-only"):
        await Qcow2Device.open(path)
    dev = await Qcow2Device.open(path, read_only=True)
    assert await dev.top_allocation(0, 65536) == [(65536, True)]
    await dev.close()
