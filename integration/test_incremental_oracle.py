"""The incremental oracle: a chain of a full backup and incrementals, each taken while guests write
through the source's NBD export, every image of the chain restored byte-exact.

As a ``transaction`` of ``drive-backup sync=full`` and ``block-dirty-bitmap-add`` does, the full
backup and the bitmap start at one instant (both inside one drained section); each incremental is a
``sync=incremental`` backup (``bitmap``, ``on-success``) into a qcow2 overlay whose backing file is
the previous backup (``qemu-img create -b prev -F qcow2``, opened as ``mode: existing``). At every
point in time the source image is copied (``backup_rig``'s oracle, inside the drained section that
installs the copy-before-write filter); after each backup ``qemu-img compare`` of the chain's top
against that copy must find them identical, and ``qemu-img map`` of the overlay must show exactly the
clusters of the bitmap's dirty granules as allocated in it (the incremental holds nothing else).
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from backup_rig import (
    CLUSTER,
    MiB,
    Source,
    fio_randwrite,
    qemu_io,
    qemu_io_commands,
    served_source,
    tool,
    write_random_image,
)
from conftest import require
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qsd import QmpSync

from backup.backup_job import BackupJob, BackupOptions
from backup.dirty_bitmap import DirtyBitmap
from backup.events import EventBus
from backup.targets import BackupTarget, open_target

SIZE = 8 * MiB
SPEED = 16 * MiB  # bytes/s: each backup lasts long enough for the guests to write while it runs


async def qcow2_target(path: Path, backing: Path | None) -> BackupTarget:
    argv: list[str | Path] = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-b", backing, "-F", "qcow2"]
    await tool(*argv, path, str(SIZE))
    return await open_target(str(path), size=SIZE, format="qcow2", mode="existing")


async def backup_at_one_instant(
    source: Source,
    target_path: Path,
    backing: Path | None,
    options: BackupOptions,
    snapshot: Path,
    *,
    add: str = "",
    granularity: int = CLUSTER,
) -> tuple[BackupJob, set[int]]:
    """Start a backup; inside its drained point in time: add bitmap ``add`` (the transaction's
    ``block-dirty-bitmap-add``), copy the source image (the oracle) and note which granules of the
    sync bitmap are dirty. Returns the running job and the byte offsets of the qcow2 clusters that
    those granules touch."""
    target = await qcow2_target(target_path, backing)
    job = BackupJob(
        target_path.stem,
        source.node,
        target.device,
        options,
        events=EventBus(),
        target_zero_init=target.zero_init,
        owner=target if target.owned else None,
    )
    dirty: set[int] = set()
    async with source.node.drained():
        if add:
            source.node.add_bitmap(DirtyBitmap(add, SIZE, granularity=granularity))
        shutil.copyfile(source.image, snapshot)
        job.install_filter()
        bitmap = options.bitmap
        if bitmap is not None:
            pos = 0
            for length, is_dirty in bitmap.dirty_runs(0, SIZE):
                if is_dirty:
                    dirty.update(c * CLUSTER for c in range(pos // CLUSTER, (pos + length - 1) // CLUSTER + 1))
                pos += length
    job.start()
    return job, dirty


async def top_clusters(image: Path) -> set[int]:
    """Byte offsets of the clusters ``image`` itself allocates (depth 0), data or zero."""
    _, out = await tool("qemu-img", "map", "--output=json", "-f", "qcow2", image)
    found: set[int] = set()
    for extent in json.loads(out):
        if extent["depth"] == 0 and (extent["data"] or extent["zero"]):
            found.update(range(int(extent["start"]), int(extent["start"]) + int(extent["length"]), CLUSTER))
    return found


@pytest.mark.parametrize(("granularity", "seed"), [(CLUSTER, 1), (2 * CLUSTER, 2)])
async def test_full_then_incrementals_restore_byte_exact(tmp_path: Path, granularity: int, seed: int) -> None:
    require("qemu-img", "qemu-io", "fio")
    image = write_random_image(tmp_path / "disk.raw", SIZE, seed=seed)
    chain: list[Path] = []
    async with served_source(tmp_path, image) as source:
        for step in range(4):
            target_path = tmp_path / f"backup{step}.qcow2"
            snapshot = tmp_path / f"snapshot{step}.raw"
            if step == 0:
                options = BackupOptions(sync="full", speed=SPEED)
                job, _ = await backup_at_one_instant(
                    source, target_path, None, options, snapshot, add="b", granularity=granularity
                )
            else:
                bitmap = source.node.bitmaps["b"]
                options = BackupOptions(sync="bitmap", bitmap=bitmap, bitmap_mode="on-success", speed=SPEED)
                job, dirty = await backup_at_one_instant(source, target_path, chain[-1], options, snapshot)
            # guests write while the backup runs: qemu-io (unaligned, zeroes, discards) and fio
            await asyncio.gather(
                qemu_io(source.uri, qemu_io_commands(SIZE, 30, seed * 100 + step)),
                fio_randwrite(source.uri, io_size="256k", seed=seed * 10 + step, offset="4M", size="2M"),
            )
            await asyncio.wait_for(job.wait(), 60)
            assert job.error is None, job.error
            chain.append(target_path)
            await tool("qemu-img", "check", "-q", "-f", "qcow2", target_path)
            code, out = await tool(
                "qemu-img", "compare", "-f", "raw", "-F", "qcow2", snapshot, target_path, check=False
            )
            assert code == 0, f"backup {step}: {out}"
            if step:
                written = await top_clusters(target_path)
                assert written == dirty, f"backup {step}: allocated {sorted(written)} != dirty {sorted(dirty)}"
                assert dirty, "the guests wrote between backups: an incremental has something to copy"
            # and between backups, more writes (recorded in the bitmap for the next incremental)
            await qemu_io(source.uri, qemu_io_commands(SIZE, 10, seed * 1000 + step))
    # every image of the chain still restores its own point in time
    for step, top in enumerate(chain):
        code, out = await tool(
            "qemu-img", "compare", "-f", "raw", "-F", "qcow2", tmp_path / f"snapshot{step}.raw", top, check=False
        )
        assert code == 0, f"chain up to backup {step}: {out}"


def _dirty_count(q: QmpSync, bitmap: str) -> int:
    for node in q.ok("query-named-block-nodes"):
        for found in node.get("dirty-bitmaps") or []:
            if found.get("name") == bitmap:
                return int(found["count"])
    raise AssertionError(f"bitmap {bitmap} not listed")


def _qcow2(path: Path, backing: Path | None = None) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"] + (
        [] if backing is None else ["-b", str(backing), "-F", "qcow2"]
    )
    subprocess.run([*argv, str(path), str(SIZE)], check=True, capture_output=True, timeout=60)


def _writers(uri: str, seed: int) -> list[subprocess.Popen[bytes]]:
    """Guests writing through the export while a backup runs: qemu-io (mixed I/O) and fio."""
    io = ["qemu-io", "-f", "raw"]
    for command in qemu_io_commands(SIZE, 20, seed):
        io += ["-c", command]
    fio = ["fio", "--name=g", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--io_size=128k"]
    fio += ["--offset=2M", "--size=2M", "--iodepth=4", f"--randseed={seed}"]
    return [subprocess.Popen([*io, uri], stdout=subprocess.DEVNULL), subprocess.Popen(fio, stdout=subprocess.DEVNULL)]


def _join(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.args


@pytest.mark.parametrize("side", ["ours", "qsd"])
def test_chain_through_qmp_transaction_and_incrementals(tmp_path: Path, side: str) -> None:
    """The same oracle through QMP, on our daemon and on qemu-storage-daemon 7.2: ``transaction`` of a
    full ``drive-backup`` and ``block-dirty-bitmap-add``, then ``sync: incremental`` backups into
    overlays over the previous one, guests writing through the export during every backup. The point in
    time is copied while no guest writes (the writers start once the backup command has returned)."""
    require("qemu-img", "qemu-io", "fio", "qemu-storage-daemon")
    from test_qmp_diff import our_side, qsd_side

    image = write_random_image(tmp_path / "disk.raw", SIZE, seed=5)
    opened = our_side(tmp_path) if side == "ours" else qsd_side(tmp_path)
    with opened as run:
        q = run.q
        q.ok("blockdev-add", driver="file", filename=str(image), **{"node-name": "src"})
        sock = tmp_path / "nbd.sock"
        q.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        q.ok("block-export-add", type="nbd", id="e", writable=True, **{"node-name": "src"})
        uri = f"nbd+unix:///src?socket={sock}"
        chain: list[Path] = []
        for step in range(3):
            top, snapshot = tmp_path / f"b{step}.qcow2", tmp_path / f"snap{step}.raw"
            _qcow2(top, chain[-1] if chain else None)
            shutil.copyfile(image, snapshot)  # no writer runs: this is the backup's point in time
            backup: dict[str, Any] = {"job-id": f"j{step}", "device": "src", "target": str(top), "format": "qcow2"}
            backup |= {"mode": "existing", "speed": SPEED}
            if step == 0:
                q.ok(
                    "transaction",
                    actions=[
                        {"type": "drive-backup", "data": {**backup, "sync": "full"}},
                        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b"}},
                    ],
                )
            else:
                dirty = _dirty_count(q, "b")
                q.ok("drive-backup", **backup, sync="incremental", bitmap="b")
            _join(_writers(uri, 40 + step))
            q.wait_job_status(f"j{step}", "null", timeout=120)
            assert q.transcript.events("BLOCK_JOB_COMPLETED")[-1][1].get("error") is None
            chain.append(top)
            done = subprocess.run(
                ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(snapshot), str(top)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, f"{side} backup {step}: {done.stdout}{done.stderr}"
            if step:
                mapped = subprocess.run(
                    ["qemu-img", "map", "--output=json", "-f", "qcow2", str(top)], capture_output=True, timeout=60
                )
                own = sum(
                    e["length"] for e in json.loads(mapped.stdout) if e["depth"] == 0 and (e["data"] or e["zero"])
                )
                assert own == dirty > 0, f"{side} backup {step}: {own} bytes in the overlay, {dirty} dirty"
            subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {step + 9} 0 70000", uri], check=True, timeout=60)


#: A guest request: (kind, offset, length); kinds as qemu-io's write, write -z and discard.
OPS = st.tuples(st.sampled_from(["write", "zero", "trim"]), st.integers(0, SIZE - 1), st.integers(1, 3 * CLUSTER + 777))


async def _apply(source: Source, ops: list[tuple[str, int, int]], seed: int) -> None:
    """The guest's requests, through the node (so every recording bitmap sees them), unaligned."""
    rnd = random.Random(seed)
    for kind, offset, length in ops:
        length = min(length, SIZE - offset)
        if kind == "write":
            await source.node.pwrite(offset, rnd.randbytes(length))
        elif kind == "zero":
            await source.node.zero(offset, length)
        else:
            await source.node.trim(offset, length)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    granularity=st.sampled_from([512, 4096, CLUSTER, 4 * CLUSTER]),
    rounds=st.lists(st.tuples(st.lists(OPS, max_size=8), st.lists(OPS, max_size=8)), min_size=1, max_size=3),
)
def test_random_write_patterns_and_granularities(
    tmp_path: Path, granularity: int, rounds: list[tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]]
) -> None:
    """Randomized: writes of any size and alignment (data, zeroes, trims) between and during the
    backups, at bitmap granularities finer and coarser than the qcow2 cluster: the chain restores
    every point in time, and each overlay allocates exactly the clusters its dirty granules touch."""
    require("qemu-img")
    work = Path(tempfile.mkdtemp(dir=tmp_path))

    async def main() -> None:
        image = write_random_image(work / "disk.raw", SIZE, seed=granularity)
        async with served_source(work, image) as source:
            top, snapshot = work / "b0.qcow2", work / "s0.raw"
            full = BackupOptions(sync="full")
            job, _ = await backup_at_one_instant(source, top, None, full, snapshot, add="b", granularity=granularity)
            await asyncio.wait_for(job.wait(), 60)
            chain = [(top, snapshot)]
            for step, (between, during) in enumerate(rounds, 1):
                await _apply(source, between, step)
                top, snapshot = work / f"b{step}.qcow2", work / f"s{step}.raw"
                bitmap = source.node.bitmaps["b"]
                options = BackupOptions(sync="bitmap", bitmap=bitmap, speed=4 * MiB, max_workers=2)
                job, dirty = await backup_at_one_instant(source, top, chain[-1][0], options, snapshot)
                await _apply(source, during, -step)
                await asyncio.wait_for(job.wait(), 60)
                assert job.error is None, job.error
                assert await top_clusters(top) == dirty
                chain.append((top, snapshot))
        for top, snapshot in chain:
            code, out = await tool("qemu-img", "compare", "-f", "raw", "-F", "qcow2", snapshot, top, check=False)
            assert code == 0, f"{top.name}: {out}"

    asyncio.run(main())
