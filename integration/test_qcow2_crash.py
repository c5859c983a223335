"""qcow2 crash consistency: every state a power cut can leave during an allocating write is sound.

``crashsim.FileJournal`` records the driver's writes and syncs; every crash state it derives (the
synced prefix plus subsets of the unsynced writes) must pass our checker and ``qemu-img check``
with no corruption (leaked clusters are allowed: the image is dirty and QEMU's lazy-refcount rule
rebuilds them), read every guest cluster as either its old or its new contents (never another
cluster's, never garbage), and reopen for writing (refcount rebuild) into a clean image.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import require, run
from crashsim import FileJournal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backup.qcow2 import Qcow2Device
from backup.qcow2.check import check_image

MiB = 1024 * 1024
Ops = Callable[[Qcow2Device], Awaitable[None]]


def fill(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


def qemu_check(path: Path) -> tuple[int, dict[str, int]]:
    proc = run("qemu-img", "check", "--output=json", "-f", "qcow2", path, check=False)
    assert proc.returncode in (0, 3), f"qemu-img check: {proc.returncode} {proc.stdout}{proc.stderr}"
    report: dict[str, int] = json.loads(proc.stdout)
    return proc.returncode, report


async def crash_everywhere(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    size: int,
    cluster_size: int,
    setup: Ops,
    ops: Ops,
    l2_cache_size: int = 8 * MiB,
) -> FileJournal:
    """Run ``ops`` (then a flush) on an image prepared by ``setup`` and check every crash state."""
    require("qemu-img")
    path = tmp_path / "img.qcow2"
    dev = await Qcow2Device.create(path, size, cluster_size=cluster_size)
    await setup(dev)
    before = await dev.pread(0, size)
    await dev.close()
    journal = FileJournal(path, monkeypatch)
    dev = await Qcow2Device.open(path, l2_cache_size=l2_cache_size)
    await ops(dev)
    await dev.flush()
    after = await dev.pread(0, size)
    dev.abandon()  # a crash at the latest right after the flush
    monkeypatch.undo()
    assert journal.syncs >= 2  # the dirty bit, then the flush
    changed = [c for c in range(0, size, cluster_size) if before[c : c + cluster_size] != after[c : c + cluster_size]]
    probe = tmp_path / "crash.qcow2"
    states = list(journal.crash_images())
    for label, image in states:
        probe.write_bytes(image)
        result = check_image(str(probe))
        assert not result.corruptions, f"{label}: {result.corruptions[:3]}"
        qemu_check(probe)
        ro = await Qcow2Device.open(probe, read_only=True)
        got = await ro.pread(0, size)
        await ro.close()
        for c in changed:
            assert got[c : c + cluster_size] in (before[c : c + cluster_size], after[c : c + cluster_size]), (
                f"{label}: guest cluster {c:#x} reads neither its old nor its new contents"
            )
        unchanged = bytearray(got)
        for c in changed:
            unchanged[c : c + cluster_size] = before[c : c + cluster_size]
        assert unchanged == before, f"{label}: a cluster nobody wrote changed"
        if "kept changes []" in label:  # each synced state: the refcount rebuild makes it clean
            rw = await Qcow2Device.open(probe)
            await rw.close()
            assert qemu_check(probe)[0] == 0
    assert got == after, "the flush did not make the writes durable"
    return journal


async def test_crash_during_writes_that_allocate_l2_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def setup(dev: Qcow2Device) -> None:
        await dev.pwrite(0, fill(1, 4096))

    async def ops(dev: Qcow2Device) -> None:
        await dev.pwrite(4096, fill(2, 4096))  # a data cluster in an existing L2 table
        await dev.pwrite(4 * MiB, fill(3, 8192))  # a new L2 table (4 KiB clusters: 2 MiB each), a new L1 entry
        await dev.pwrite(4 * MiB + 3 * 4096, fill(4, 512))

    await crash_everywhere(tmp_path, monkeypatch, size=8 * MiB, cluster_size=4096, setup=setup, ops=ops)


async def test_crash_while_the_refcount_table_grows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """512-byte clusters: one refcount table cluster covers 8 MiB of file; the write crosses that."""
    table_offsets: list[int] = []

    async def setup(dev: Qcow2Device) -> None:
        await dev.pwrite(0, fill(5, 4096))
        await dev.flush()
        os.truncate(dev.path, 8 * MiB - 4096)  # unused (refcount 0) clusters up to near the limit
        table_offsets.append(dev.header.refcount_table_offset)

    async def ops(dev: Qcow2Device) -> None:
        await dev.pwrite(64 * 1024, fill(6, 64 * 1024))
        await dev.flush()
        table_offsets.append(dev.header.refcount_table_offset)

    await crash_everywhere(tmp_path, monkeypatch, size=MiB, cluster_size=512, setup=setup, ops=ops)
    assert table_offsets[0] != table_offsets[1]  # the scenario did move the refcount table


async def test_crash_with_l2_tables_evicted_before_the_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tables = [i * 2 * MiB for i in range(7)]  # 4 KiB clusters: one L2 table per 2 MiB

    async def setup(dev: Qcow2Device) -> None:
        for t in tables:
            await dev.pwrite(t, fill(7, 4096))

    async def ops(dev: Qcow2Device) -> None:
        for t in tables:  # a cache of 4 tables: dirty tables are written back before the flush
            await dev.pwrite(t + 4096, fill(8, 4096))
        assert dev._l2.writes >= 3  # evictions wrote changed tables

    await crash_everywhere(
        tmp_path, monkeypatch, size=14 * MiB, cluster_size=4096, setup=setup, ops=ops, l2_cache_size=4 * 4096
    )


async def test_crash_after_clusters_were_freed_and_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A freed cluster reused before its freeing is durable: the old L2 entry would read new data."""

    async def setup(dev: Qcow2Device) -> None:
        for i in range(4):
            await dev.pwrite(i * 65536, fill(10 + i, 65536))

    async def ops(dev: Qcow2Device) -> None:
        await dev.trim(65536, 65536)
        await dev.zero(2 * 65536, 65536, may_trim=True)
        await dev.pwrite(10 * 65536, fill(20, 65536))
        await dev.pwrite(11 * 65536, fill(21, 65536))

    await crash_everywhere(tmp_path, monkeypatch, size=4 * MiB, cluster_size=65536, setup=setup, ops=ops)


crash_op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 2**20), st.integers(1, 3000)),
    st.tuples(st.just("zero"), st.integers(0, 2**20), st.integers(1, 3000)),
    st.tuples(st.just("trim"), st.integers(0, 2**20), st.integers(1, 3000)),
    st.tuples(st.just("flush"), st.just(0), st.just(0)),
)


@settings(
    max_examples=int(os.environ.get("QCOW2_CRASH_EXAMPLES", "5")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    ops=st.lists(crash_op, min_size=1, max_size=10),
    cluster_bits=st.sampled_from([9, 12]),
    small_cache=st.booleans(),
    compress=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_random_operations_survive_a_crash_anywhere(
    tmp_path: Path, ops: list[tuple[str, int, int]], cluster_bits: int, small_cache: bool, compress: bool, seed: int
) -> None:
    """Every crash state reads each guest byte as a value it had (never another cluster's data,
    never garbage) and checks without corruption; the synced ones also pass ``qemu-img check``.
    ``QCOW2_CRASH_EXAMPLES=500`` runs it longer."""
    require("qemu-img")
    asyncio.run(_random_crash(tmp_path, ops, cluster_bits, small_cache, compress, seed))


async def _random_crash(
    tmp_path: Path, ops: list[tuple[str, int, int]], cluster_bits: int, small_cache: bool, compress: bool, seed: int
) -> None:
    rnd = random.Random(seed)
    cs, size = 1 << cluster_bits, 256 * 1024  # 512-byte clusters: 8 L2 tables, for a small cache to evict
    path = tmp_path / f"r{seed}.qcow2"
    dev = await Qcow2Device.create(path, size, cluster_size=cs, compress=compress)
    await dev.pwrite(0, rnd.randbytes(size // 2))
    base = await dev.pread(0, size)
    await dev.close()
    seen: list[set[bytes]] = [{base[c : c + cs]} for c in range(0, size, cs)]
    with pytest.MonkeyPatch.context() as monkeypatch:
        journal = FileJournal(path, monkeypatch)
        dev = await Qcow2Device.open(path, compress=compress, l2_cache_size=cs if small_cache else 8 * MiB)
        for kind, where, n in ops:
            off = where % size
            n = min(n, size - off)
            if kind == "write":
                await dev.pwrite(off, rnd.randbytes(n))
            elif kind == "zero":
                await dev.zero(off, n, may_trim=rnd.random() < 0.5)
            elif kind == "trim":
                await dev.trim(off, n)
            else:
                await dev.flush()
            first, last = off // cs, (off + max(n, 1) - 1) // cs
            now = await dev.pread(first * cs, (last + 1 - first) * cs)
            for c in range(first, last + 1):
                seen[c].add(now[(c - first) * cs : (c - first + 1) * cs])
        await dev.flush()
        final = await dev.pread(0, size)
        dev.abandon()
    probe = tmp_path / "crash.qcow2"
    got = b""
    for label, image in journal.crash_images():
        probe.write_bytes(image)
        result = check_image(str(probe))
        assert not result.corruptions, f"{label}: {result.corruptions[:3]}"
        ro = await Qcow2Device.open(probe, read_only=True)
        got = await ro.pread(0, size)
        await ro.close()
        for c in range(size // cs):
            assert _had(got[c * cs : (c + 1) * cs], seen[c]), f"{label}: guest cluster {c} reads data it never had"
        if "kept changes []" in label:
            qemu_check(probe)
    assert got == final


def _had(data: bytes, versions: set[bytes]) -> bool:
    """Whether every byte holds a value it had at some time (unsynced writes within a cluster may
    survive in any combination; another cluster's data, or garbage, does not pass)."""
    if data in versions:
        return True
    return all(any(v[i] == b for v in versions) for i, b in enumerate(data))
