#!/usr/bin/env python3
"""Does the daemon's memory stay flat over a long backup? RSS of ``nbd-backup serve``, sampled the whole run.

An 8 GiB sparse-backed raw disk on tmpfs (1 MiB of random data every ``--stride``; the rest holes),
exported over NBD; ``drive-backup`` of it (raw target, throttled by ``--speed`` so the job runs for a
while) while fio writes 4 KiB blocks at random all over the disk at ``--guest-iops`` (so the
copy-before-write path runs all along). The daemon's VmRSS is read every ``--interval`` seconds from
the command to the job's completion.

    .venv/bin/python bench/rss_backup.py                    # ~1 minute
    .venv/bin/python bench/rss_backup.py --speed 8M         # longer

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import guest_cost  # noqa: E402

MiB = 1 << 20


def make_sparse_image(path: Path, size: int, stride: int) -> int:
    """``size`` bytes, 1 MiB of random data every ``stride``; returns the data bytes."""
    chunk = os.urandom(MiB)
    data = 0
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, stride):
            f.seek(offset)
            f.write(chunk)
            data += MiB
    return data


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def daemon_pid(work: Path) -> int:
    return int((work / "ours.pid").read_text().strip())


async def main_async(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="rss-backup-", dir=args.dir) as tmp:
        work = Path(tmp)
        image = work / "source.raw"
        data = make_sparse_image(image, args.size, args.stride)
        print(f"# {args.size // MiB} MiB disk, {data // MiB} MiB of data; speed {args.speed // MiB} MiB/s", flush=True)
        async with guest_cost.ours_daemon(work) as qmp:
            await guest_cost.export_source(qmp, image, work / "nbd.sock")
            pid = daemon_pid(work)
            before = rss_mib(pid)
            guest = await asyncio.create_subprocess_exec(
                "fio", "--name=guest", "--ioengine=nbd", f"--uri=nbd+unix:///disk?socket={work / 'nbd.sock'}",
                "--rw=randwrite", "--bs=4k", "--iodepth=4", f"--rate_iops={args.guest_iops}", "--time_based",
                "--runtime=3600", "--randrepeat=0", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            target = work / "target.raw"
            started = time.monotonic()
            await qmp.ok(
                "drive-backup", device="src", target=str(target), format="raw", sync="full", speed=args.speed,
                **{"job-id": "j"},
            )  # fmt: skip
            done = asyncio.ensure_future(qmp.wait_event("BLOCK_JOB_COMPLETED", guest_cost.is_j, timeout=7200))
            samples: list[tuple[float, float]] = []
            while not done.done():
                samples.append((time.monotonic() - started, rss_mib(pid)))
                await asyncio.wait([done], timeout=args.interval)
            event = done.result()
            guest.terminate()
            await guest.wait()
            after = rss_mib(pid)
    if "error" in event["data"]:
        print(f"backup failed: {event['data']['error']}", file=sys.stderr)
        return 1
    elapsed = samples[-1][0] if samples else 0.0
    values = [rss for _, rss in samples]
    half = samples[len(samples) // 2 :]
    slope = _slope(half) * 60 if len(half) > 2 else 0.0
    print()
    print(f"backup of {args.size // MiB} MiB: {elapsed:.0f} s, {len(samples)} RSS samples every {args.interval:g} s")
    print("| RSS MiB | before the job | min | median | max | last sample | after the job | second-half slope |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| nbd-backup serve | {before:.0f} | {min(values):.0f} | {statistics.median(values):.0f} | {max(values):.0f}"
        f" | {values[-1]:.0f} | {after:.0f} | {slope:+.1f} MiB/min |"
    )
    deciles = [values[min(len(values) - 1, len(values) * k // 10)] for k in range(10)]
    print("deciles of the run:", " ".join(f"{v:.0f}" for v in deciles))
    return 0


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (MiB per second)."""
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=guest_cost.parse_size, default=8 << 30, help="disk size (default 8G)")
    parser.add_argument("--stride", type=guest_cost.parse_size, default=16 * MiB, help="1 MiB of data every STRIDE")
    parser.add_argument("--speed", type=guest_cost.parse_size, default=16 * MiB, help="backup speed (default 16M)")
    parser.add_argument("--guest-iops", type=int, default=2000, help="fio's write rate during the backup")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--dir", default="/dev/shm")
    args = parser.parse_args()
    from nbd.loop import run

    return run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
