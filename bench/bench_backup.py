#!/usr/bin/env python3
# ruff: noqa: ASYNC230, ASYNC240  (tmpfs file setup outside the timed sections; blocking is harmless)
"""Benchmark our backup against QEMU's (qemu-storage-daemon ``blockdev-backup``), in one run.

1. Throughput: the same image on tmpfs (1 GiB by default), dense random data and half-sparse
   (every other 1 MiB stripe is a hole), backed up to a fresh raw file and to a qemu-nbd export.
   MiB/s of image size per second and the ratio ours ÷ QEMU.
2. Guest-side cost (``guest_cost.py``, which this runs): fio 4 KiB random writes QD16 through the NBD
   export of the source, without and then with a throttled backup running the whole time (a 6 GiB
   disk, so that the backup outlives the measurement), for ``nbd-backup serve`` (over QMP), our pieces
   in this process and qemu-storage-daemon: IOPS and p99 in the first-touch burst and in the steady
   part, IOPS per second, and IOPS with the backup ÷ IOPS without.

    .venv/bin/python bench/bench_backup.py                 # everything (several minutes)
    .venv/bin/python bench/bench_backup.py --size 256M --guest-size 2G --runtime 3 --guest-repeat 1

Not part of the test suite: numbers depend on the machine and on whoever else is using it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import guest_cost  # noqa: E402
from qemu.qmp import QMPClient  # noqa: E402

from backup.backup_job import BackupJob, BackupOptions  # noqa: E402
from backup.events import EventBus  # noqa: E402
from backup.node import BlockNode  # noqa: E402
from backup.rawfile import RawFileDevice  # noqa: E402
from backup.targets import open_target  # noqa: E402
from nbd.loop import loop_name, run  # noqa: E402

MiB = 1024 * 1024


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
    rows: list[Row] = []
    try:
        if not args.guest_only:
            images = {"dense": work / "dense.img", "half-sparse": work / "half.img"}
            print(f"# preparing {size // MiB} MiB images in {work} (loop: {loop_name()})", flush=True)
            make_image(images["dense"], size, sparse=False)
            make_image(images["half-sparse"], size, sparse=True, seed=2)
            for name, image in images.items():
                for kind in ("raw", "qemu-nbd"):
                    options = BackupOptions(max_workers=args.workers, max_chunk=parse_size(args.chunk))
                    ours = [await ours_backup(image, kind, work, size, options) for _ in range(args.repeat)]
                    qemu = [await qsd_backup(image, kind, work, size) for _ in range(args.repeat)]
                    rows.append(Row(f"{name} -> {kind}", max(ours), max(qemu)))
                    print(f"# {rows[-1]}", flush=True)
            for image in images.values():
                image.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if rows:
        print()
        print(f"Backup throughput, {size // MiB} MiB image on tmpfs (MiB/s of image size, best of {args.repeat})")
        print(f"{'case':<26}{'ours':>10}{'qemu':>10}{'ours/qemu':>11}")
        for row in rows:
            print(f"{row.label:<26}{row.ours:>10.0f}{row.qemu:>10.0f}{row.ours / row.qemu:>10.2f}x")
        print()
    if not args.throughput_only:
        guest_args = guest_cost.build_parser().parse_args(
            [
                f"--size={args.guest_size}",
                f"--runtime={args.runtime}",
                f"--reps={args.guest_repeat}",
                f"--who={args.who}",
                f"--speed={args.guest_speed}",
            ]
        )
        await guest_cost.main_async(guest_args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--dir", default="/dev/shm/nbd-backup-bench")
    parser.add_argument("--runtime", type=int, default=5, help="fio seconds per guest run")
    parser.add_argument("--guest-size", default="6G", help="disk of the guest part (the backup must outlive fio)")
    parser.add_argument("--guest-speed", default="32M", help="the backup's speed limit in the guest part")
    parser.add_argument("--repeat", type=int, default=2, help="throughput runs per case (best is kept)")
    parser.add_argument("--guest-repeat", type=int, default=5, help="guest repetitions (medians and ranges)")
    parser.add_argument("--workers", type=int, default=BackupOptions.max_workers, help="our max-workers")
    parser.add_argument("--chunk", default=str(BackupOptions.max_chunk), help="our max-chunk")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--guest-only", action="store_true", help="skip the throughput part")
    parser.add_argument("--throughput-only", action="store_true", help="skip the guest part")
    parser.add_argument("--who", default=",".join(guest_cost.DAEMONS), help="guest daemons (comma-separated)")
    args = parser.parse_args()
    for tool in ("qemu-storage-daemon", "qemu-nbd", "fio"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2
    run(main_async(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
