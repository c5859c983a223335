#!/usr/bin/env python3
# ruff: noqa: ASYNC230, ASYNC240  (tmpfs file setup outside the timed sections; blocking is harmless)
"""Benchmark our backup against QEMU's (qemu-storage-daemon ``blockdev-backup``), in one run.

1. Throughput: the same image on tmpfs (1 GiB by default), dense random data and half-sparse
   (every other 1 MiB stripe is a hole), backed up to a fresh raw file and to a qemu-nbd export.
   MiB/s of image size per second and the ratio ours ÷ QEMU.
2. Guest-side cost: fio 4 KiB random writes (queue depth 16) through the NBD export of the source,
   without and with a backup (throttled to 32 MiB/s, so it is copying the whole time) running, for our
   daemon's pieces (NbdServer + BackupJob in this process) and for qemu-storage-daemon: IOPS, p99
   completion latency, and IOPS with backup ÷ IOPS without.

    .venv/bin/python bench/bench_backup.py                 # everything (a few minutes)
    .venv/bin/python bench/bench_backup.py --size 256M --runtime 3

Not part of the test suite: numbers depend on the machine and on whoever else is using it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qemu.qmp import QMPClient  # noqa: E402

from backup.backup_job import BackupJob, BackupOptions  # noqa: E402
from backup.events import EventBus  # noqa: E402
from backup.node import BlockNode  # noqa: E402
from backup.rawfile import RawFileDevice  # noqa: E402
from backup.targets import open_target  # noqa: E402
from nbd.loop import loop_name, run  # noqa: E402
from nbd.server import Export, NbdServer  # noqa: E402

MiB = 1024 * 1024
GUEST_SPEED = 32 * MiB


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": MiB, "G": 1024 * MiB}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def make_image(path: Path, size: int, *, sparse: bool, seed: int = 1) -> None:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for stripe in range(size // MiB):
            if sparse and stripe % 2:
                continue
            f.seek(stripe * MiB)
            f.write(rnd.randbytes(MiB))


# --- external processes -------------------------------------------------------------------------------


async def wait_for_path(path: Path, proc: asyncio.subprocess.Process, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"process did not create {path}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def process(*argv: str, ready: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_for_path(ready, proc)
        await asyncio.sleep(0.1)
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@contextlib.asynccontextmanager
async def qemu_nbd_target(work: Path, size: int) -> AsyncIterator[str]:
    image = work / "qnbd-target.img"
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    sock = work / "qnbd.sock"
    sock.unlink(missing_ok=True)
    argv = ["qemu-nbd", "-k", str(sock), "-f", "raw", "-x", "disk", "-t", "--shared=8", "--cache=writeback", str(image)]
    async with process(*argv, ready=sock):
        yield str(sock)
    image.unlink(missing_ok=True)


async def fio(uri: str, runtime: int) -> tuple[float, float]:
    """fio 4 KiB random writes: (IOPS, p99 completion latency in µs)."""
    proc = await asyncio.create_subprocess_exec(
        "fio",
        "--name=guest",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--time_based",
        f"--runtime={runtime}",
        "--randrepeat=0",
        "--output-format=json",
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    text = out.decode()
    result = json.loads(text[text.index("{") :])
    write = result["jobs"][0]["write"]
    p99 = write["clat_ns"]["percentile"]["99.000000"] / 1000
    return float(write["iops"]), float(p99)


# --- ours ---------------------------------------------------------------------------------------------


async def ours_backup(source: Path, target_kind: str, work: Path, size: int, options: BackupOptions) -> float:
    device = await RawFileDevice.open(source)
    node = BlockNode("src", device, filename=str(source))
    try:
        async with contextlib.AsyncExitStack() as stack:
            if target_kind == "raw":
                path = work / "ours-target.img"
                path.unlink(missing_ok=True)
                spec = str(path)
            else:
                sock = await stack.enter_async_context(qemu_nbd_target(work, size))
                spec = f"nbd+unix:///disk?socket={sock}"
            target = await open_target(spec, size=size)
            job = BackupJob(
                "bench",
                node,
                target.device,
                options,
                events=EventBus(),
                target_zero_init=target.zero_init,
                owner=target,
            )
            started = time.perf_counter()
            await job.attach()
            job.start()
            await job.wait()
            elapsed = time.perf_counter() - started
            if job.error:
                raise RuntimeError(f"our backup failed: {job.error}")
            if target_kind == "raw":
                Path(spec).unlink(missing_ok=True)
            return size / MiB / elapsed
    finally:
        await node.close()


async def ours_guest(source: Path, work: Path, runtime: int, with_backup: bool) -> tuple[float, float]:
    device = await RawFileDevice.open(source)
    node = BlockNode("src", device, filename=str(source))
    server = NbdServer()
    server.add_export(Export("disk", node))
    sock = work / "ours-nbd.sock"
    await server.listen_unix(sock)
    job: BackupJob | None = None
    target_path = work / "ours-guest-target.img"
    try:
        if with_backup:
            target_path.unlink(missing_ok=True)
            target = await open_target(str(target_path), size=node.size)
            job = BackupJob(
                "bench",
                node,
                target.device,
                BackupOptions(speed=GUEST_SPEED),
                events=EventBus(),
                target_zero_init=target.zero_init,
                owner=target,
            )
            await job.attach()
            job.start()
        return await fio(f"nbd+unix:///disk?socket={sock}", runtime)
    finally:
        if job is not None and not job.is_completed:
            job.cancel()
            await job.wait()
        await server.stop()
        await node.close()
        target_path.unlink(missing_ok=True)


# --- qemu-storage-daemon --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def qsd(work: Path, source: Path, *, export: bool = False) -> AsyncIterator[QMPClient]:
    qmp_sock = work / "qsd-qmp.sock"
    qmp_sock.unlink(missing_ok=True)
    argv = [
        "qemu-storage-daemon",
        "--chardev",
        f"socket,path={qmp_sock},server=on,wait=off,id=qmp",
        "--monitor",
        "chardev=qmp",
        "--blockdev",
        f"driver=file,node-name=src-file,filename={source}",
        "--blockdev",
        "driver=raw,node-name=src,file=src-file",
    ]
    if export:
        nbd_sock = work / "qsd-nbd.sock"
        nbd_sock.unlink(missing_ok=True)
        argv += [
            "--nbd-server",
            f"addr.type=unix,addr.path={nbd_sock}",
            "--export",
            "type=nbd,id=exp,node-name=src,name=disk,writable=on",
        ]
    async with process(*argv, ready=qmp_sock):
        client = QMPClient("bench")
        await client.connect(str(qmp_sock))
        try:
            yield client
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()


async def qsd_add_target(client: QMPClient, work: Path, kind: str, size: int, stack: contextlib.AsyncExitStack) -> None:
    if kind == "raw":
        path = work / "qsd-target.img"
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
        await client.execute("blockdev-add", {"driver": "file", "node-name": "tgt-file", "filename": str(path)})
        await client.execute("blockdev-add", {"driver": "raw", "node-name": "tgt", "file": "tgt-file"})
    else:
        sock = await stack.enter_async_context(qemu_nbd_target(work, size))
        await client.execute(
            "blockdev-add",
            {"driver": "nbd", "node-name": "tgt", "server": {"type": "unix", "path": sock}, "export": "disk"},
        )


async def qsd_wait_job(client: QMPClient, listener: Any, job_id: str) -> dict[str, Any]:
    async for event in listener:
        if event["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") and event["data"]["device"] == job_id:
            data: dict[str, Any] = event["data"]
            return data
    raise RuntimeError("event stream ended")


async def qsd_backup(source: Path, target_kind: str, work: Path, size: int) -> float:
    async with qsd(work, source) as client, contextlib.AsyncExitStack() as stack:
        await qsd_add_target(client, work, target_kind, size, stack)
        with client.listener() as listener:
            started = time.perf_counter()
            await client.execute("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"})
            data = await qsd_wait_job(client, listener, "j")
            elapsed = time.perf_counter() - started
        if "error" in data:
            raise RuntimeError(f"QEMU backup failed: {data['error']}")
        await client.execute("blockdev-del", {"node-name": "tgt"})
    (work / "qsd-target.img").unlink(missing_ok=True)
    return size / MiB / elapsed


async def qsd_guest(source: Path, work: Path, runtime: int, with_backup: bool, size: int) -> tuple[float, float]:
    async with qsd(work, source, export=True) as client, contextlib.AsyncExitStack() as stack:
        if with_backup:
            await qsd_add_target(client, work, "raw", size, stack)
            await client.execute(
                "blockdev-backup",
                {"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "speed": GUEST_SPEED},
            )
        result = await fio(f"nbd+unix:///disk?socket={work / 'qsd-nbd.sock'}", runtime)
        if with_backup and await client.execute("query-block-jobs"):
            with client.listener() as listener:
                await client.execute("block-job-cancel", {"device": "j", "force": True})
                await qsd_wait_job(client, listener, "j")
    (work / "qsd-target.img").unlink(missing_ok=True)
    return result


# --- main -----------------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    ours: float
    qemu: float


async def main_async(args: argparse.Namespace) -> None:
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    size = parse_size(args.size)
    images = {"dense": work / "dense.img", "half-sparse": work / "half.img"}
    print(f"# preparing {size // MiB} MiB images in {work} (loop: {loop_name()})", flush=True)
    make_image(images["dense"], size, sparse=False)
    make_image(images["half-sparse"], size, sparse=True, seed=2)
    rows: list[Row] = []
    try:
        for name, image in images.items() if not args.guest_only else ():
            for kind in ("raw", "qemu-nbd"):
                options = BackupOptions(max_workers=args.workers, max_chunk=parse_size(args.chunk))
                ours = [await ours_backup(image, kind, work, size, options) for _ in range(args.repeat)]
                qemu = [await qsd_backup(image, kind, work, size) for _ in range(args.repeat)]
                rows.append(Row(f"{name} -> {kind}", max(ours), max(qemu)))
                print(f"# {rows[-1]}", flush=True)
        samples: dict[tuple[str, bool], list[tuple[float, float]]] = {}
        for rep in range(args.guest_repeat):  # interleaved, so machine noise hits both daemons alike
            for with_backup in (False, True):
                for who in args.who:
                    if who == "ours":
                        result = await ours_guest(images["dense"], work, args.runtime, with_backup)
                    else:
                        result = await qsd_guest(images["dense"], work, args.runtime, with_backup, size)
                    samples.setdefault((who, with_backup), []).append(result)
                    print(f"# guest rep={rep} {who} backup={with_backup}: {result}", flush=True)
        guest = {
            key: (statistics.median(i for i, _ in values), statistics.median(p for _, p in values))
            for key, values in samples.items()
        }
        best = {key: max(i for i, _ in values) for key, values in samples.items()}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    if rows:
        print(f"Backup throughput, {size // MiB} MiB image on tmpfs (MiB/s of image size, best of {args.repeat})")
        print(f"{'case':<26}{'ours':>10}{'qemu':>10}{'ours/qemu':>11}")
        for row in rows:
            print(f"{row.label:<26}{row.ours:>10.0f}{row.qemu:>10.0f}{row.ours / row.qemu:>10.2f}x")
        print()
    print(
        f"Guest fio 4k randwrite QD16 for {args.runtime} s, backup throttled to {GUEST_SPEED // MiB} MiB/s"
        f" (median and best of {args.guest_repeat})"
    )
    print(
        f"{'daemon':<8}{'IOPS idle':>11}{'p99 idle':>11}{'IOPS bkup':>11}{'p99 bkup':>11}{'ratio':>8}"
        f"{'best idle':>11}{'best bkup':>11}{'ratio':>8}"
    )
    for who in args.who:
        (iops0, p990), (iops1, p991) = guest[who, False], guest[who, True]
        best0, best1 = best[who, False], best[who, True]
        print(
            f"{who:<8}{iops0:>11.0f}{p990:>9.0f}us{iops1:>11.0f}{p991:>9.0f}us{iops1 / iops0:>8.2f}"
            f"{best0:>11.0f}{best1:>11.0f}{best1 / best0:>8.2f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--dir", default="/dev/shm/nbd-backup-bench")
    parser.add_argument("--runtime", type=int, default=5, help="fio seconds per guest run")
    parser.add_argument("--repeat", type=int, default=2, help="throughput runs per case (best is kept)")
    parser.add_argument("--guest-repeat", type=int, default=3, help="guest fio runs per case (median is kept)")
    parser.add_argument("--workers", type=int, default=BackupOptions.max_workers, help="our max-workers")
    parser.add_argument("--chunk", default=str(BackupOptions.max_chunk), help="our max-chunk")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--guest-only", action="store_true", help="skip the throughput part")
    parser.add_argument("--who", nargs="+", choices=("ours", "qemu"), default=["ours", "qemu"], help="guest daemons")
    args = parser.parse_args()
    for tool in ("qemu-storage-daemon", "qemu-nbd", "fio"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    run(main_async(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
