#!/usr/bin/env python3
# ruff: noqa: ASYNC230, ASYNC240  (image setup and log parsing outside the timed sections)
"""What a running backup costs the guest: fio through the source's NBD export while the job copies.

For each daemon — ``nbd-backup serve`` (the real daemon, driven over QMP), ``ours-inproc`` (NbdServer
and BackupJob in this process: the same pieces without the daemon around them) and
qemu-storage-daemon — and each repetition (daemons interleaved, their order rotated per rep):

1. serve a raw image of random data on tmpfs (6 GiB by default: big enough that the throttled
   backup is still running when fio ends; the table says how much it had copied) over NBD;
2. fio 4 KiB random writes QD16 for ``--runtime`` seconds without a backup (the baseline);
3. ``drive-backup`` (sync full, raw target on tmpfs, ``--speed`` 32 MiB/s) and the same fio again,
   every completion logged; then the job is cancelled.

From the completion log: IOPS and p99 completion latency in the *burst* (the first ``--burst``
seconds, when guest writes mostly hit clusters not yet copied) and in the *steady* part (the rest),
IOPS per second (does it decline as the backup goes on?), and the ratio to the baseline. Medians of
the repetitions with their range.

    .venv/bin/python bench/guest_cost.py                          # 3 daemons x 5 reps (~4 minutes)
    .venv/bin/python bench/guest_cost.py --size 2G --reps 3 --who ours,qemu
    .venv/bin/python bench/guest_cost.py --who ours,qemu --baseline ../before   # a change against the code before it

Not part of the test suite: numbers depend on the machine and on whoever else is using it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "integration"))

from qsd import QmpAsync, Qsd  # type: ignore[import-not-found]  # noqa: E402

MiB = 1 << 20
DAEMONS = ("ours", "ours-inproc", "qemu")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def make_image(path: Path, size: int) -> None:
    """Random, incompressible, never-zero data (one random MiB, rotated per MiB: fast to write)."""
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            k = (i * 4099) % MiB
            f.write(chunk[k:] + chunk[:k])


# --- fio and its completion log ---------------------------------------------------------------------


@dataclass
class GuestRun:
    """One fio run: completion times (ms since start) and latencies (µs), and how the backup stood."""

    times_ms: list[int]
    clat_us: list[float]
    runtime: float
    copied_share: float | None = None  # of the disk, when fio ended (None: no backup)
    job_outlived: bool = True
    job_end_s: float | None = None  # when the job completed, in seconds since fio started (None: later)
    backup_mib_s: float = 0.0  # the backup's throughput while the guest wrote
    loop_lag_us: list[float] = field(default_factory=list)  # ours-inproc: how late 1 ms timers fired

    def finish_backup(self, started: float, fio_started: float, completed_at: float | None, size: int) -> None:
        """Record how the backup (sent at ``started``) went along fio (started at ``fio_started``)."""
        if completed_at is not None:
            self.job_end_s = completed_at - fio_started
            self.backup_mib_s = size / MiB / (completed_at - started)
        else:
            self.backup_mib_s = (self.copied_share or 0.0) * size / MiB / (fio_started - started + self.runtime)

    @property
    def busy_until(self) -> float:
        """The end of the window in which the backup ran alongside the guest."""
        return self.runtime if self.job_end_s is None else min(self.runtime, self.job_end_s)

    def window(self, start_s: float, end_s: float) -> tuple[float, float]:
        """(IOPS, p99 µs) of the completions in ``[start_s, end_s)``."""
        lo, hi = start_s * 1000, end_s * 1000
        lat = sorted(c for t, c in zip(self.times_ms, self.clat_us, strict=True) if lo <= t < hi)
        if not lat:
            return 0.0, float("nan")
        return len(lat) / (end_s - start_s), lat[min(len(lat) - 1, int(len(lat) * 0.99))]

    def per_second(self) -> list[float]:
        counts = [0] * int(self.runtime)
        for t in self.times_ms:
            second = t // 1000
            if second < len(counts):
                counts[second] += 1
        return [float(c) for c in counts]


async def fio(uri: str, runtime: int, work: Path, *, unix_epoch: bool = False) -> GuestRun:
    """fio 4 KiB random writes QD16 over NBD, every completion logged (in ms since fio started, or
    since the Unix epoch with ``unix_epoch``, to line completions up with events outside fio)."""
    prefix = work / "guest"
    for old in work.glob("guest_*.log"):
        old.unlink()
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
        f"--write_lat_log={prefix}",
        "--log_avg_msec=0",
        f"--log_unix_epoch={int(unix_epoch)}",
        "--output-format=json",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"fio failed: {err.decode(errors='replace')[-500:]}")
    times: list[int] = []
    clat: list[float] = []
    with open(work / "guest_clat.1.log") as log:
        for line in log:
            fields = line.split(",", 2)
            times.append(int(fields[0]))
            clat.append(int(fields[1]) / 1000)  # fio logs nanoseconds
    return GuestRun(times, clat, float(runtime))


# --- the daemons --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def ours_daemon(work: Path, *extra: str, checkout: Path = ROOT) -> AsyncIterator[QmpAsync]:
    """``nbd-backup serve`` of ``checkout`` (this one, or ``--baseline``'s) with a QMP monitor (and
    ``extra`` serve arguments), until the block ends."""
    sock, pid = work / "ours-qmp.sock", work / "ours.pid"
    pid.unlink(missing_ok=True)
    with open(work / "ours.log", "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.cli", "serve", "--qmp", f"unix:{sock}", "--pid-file", str(pid),
            *extra, stdout=subprocess.DEVNULL, stderr=log, cwd=checkout,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (pid.exists() and pid.stat().st_size):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nbd-backup serve did not start: {(work / 'ours.log').read_text()}")
            await asyncio.sleep(0.02)
        qmp = await QmpAsync.connect(sock, timeout=120)
        try:
            yield qmp
        finally:
            await qmp.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)


@contextlib.asynccontextmanager
async def qemu_daemon(work: Path) -> AsyncIterator[QmpAsync]:
    qsd = Qsd(work)
    await asyncio.to_thread(qsd.launch)
    try:
        qmp = await qsd.connect_async(timeout=120)
        try:
            yield qmp
        finally:
            await qmp.close()
    finally:
        await asyncio.to_thread(qsd.stop)


async def export_source(qmp: QmpAsync, image: Path, nbd_sock: Path) -> None:
    """The same QMP sequence on both daemons: file + raw node, an NBD server, a writable export."""
    await qmp.ok("blockdev-add", driver="file", filename=str(image), **{"node-name": "src-file"})
    await qmp.ok("blockdev-add", driver="raw", file="src-file", **{"node-name": "src"})
    await qmp.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd_sock)}})
    await qmp.ok("block-export-add", type="nbd", id="exp", name="disk", writable=True, **{"node-name": "src"})


def is_j(data: dict[str, Any]) -> bool:
    return bool(data["device"] == "j")


async def completion_time(done: Awaitable[Any]) -> float:
    await done
    return time.monotonic()


def finished_at(task: asyncio.Future[float]) -> float | None:
    if not task.done() or task.cancelled() or task.exception() is not None:
        return None
    return task.result()


async def qmp_guest(qmp: QmpAsync, work: Path, runtime: int, speed: int, size: int) -> tuple[GuestRun, GuestRun]:
    uri = f"nbd+unix:///disk?socket={work / 'nbd.sock'}"
    idle = await fio(uri, runtime, work)
    target = work / "target.raw"
    target.unlink(missing_ok=True)
    await qmp.ok(
        "drive-backup", device="src", target=str(target), format="raw", sync="full", speed=speed, **{"job-id": "j"}
    )
    started = time.monotonic()
    completed = asyncio.ensure_future(completion_time(qmp.wait_event("BLOCK_JOB_COMPLETED", is_j, timeout=3600)))
    try:
        fio_started = time.monotonic()
        busy = await fio(uri, runtime, work)
        jobs = await qmp.ok("query-block-jobs")
        if jobs:
            busy.copied_share = jobs[0]["offset"] / size
            busy.job_outlived = jobs[0]["status"] == "running"
            await qmp.ok("block-job-cancel", device="j", force=True)
            await qmp.wait_event("BLOCK_JOB_CANCELLED", lambda d: d["device"] == "j", timeout=120)
        else:
            await asyncio.wait_for(asyncio.shield(completed), 120)
            busy.copied_share, busy.job_outlived = 1.0, False
    finally:
        if not completed.done():
            completed.cancel()
    busy.finish_backup(started, fio_started, finished_at(completed), size)
    target.unlink(missing_ok=True)
    return idle, busy


async def daemon_guest(
    who: str, image: Path, work: Path, runtime: int, speed: int, size: int, baseline: Path | None = None
) -> tuple[GuestRun, GuestRun]:
    """One repetition on daemon ``who``: "ours", "baseline" (ours of the ``baseline`` checkout) or "qemu"."""
    daemon: contextlib.AbstractAsyncContextManager[QmpAsync]
    if who == "ours":
        daemon = ours_daemon(work)
    elif who == "baseline":
        assert baseline is not None
        daemon = ours_daemon(work, checkout=baseline)
    else:
        daemon = qemu_daemon(work)
    async with daemon as qmp:
        await export_source(qmp, image, work / "nbd.sock")
        return await qmp_guest(qmp, work, runtime, speed, size)


async def lag_probe(samples: list[float], period: float = 0.001) -> None:
    """Event-loop lag: every ``period``, how long one yield to the loop takes (what a request that just
    became ready waits for the loop to get to it). Runs until cancelled."""
    while True:
        await asyncio.sleep(period)
        start = time.perf_counter()
        await asyncio.sleep(0)
        samples.append((time.perf_counter() - start) * 1e6)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else math.nan


async def inproc_guest(image: Path, work: Path, runtime: int, speed: int, size: int) -> tuple[GuestRun, GuestRun]:
    """The same measurement with NbdServer + BackupJob in this process (what a profiler attaches to)."""
    from backup.backup_job import BackupJob, BackupOptions
    from backup.events import EventBus
    from backup.node import BlockNode
    from backup.rawfile import RawFileDevice
    from backup.targets import open_target
    from nbd.server import Export, NbdServer

    device = await RawFileDevice.open(image)
    node = BlockNode("src", device, filename=str(image))
    server = NbdServer()
    server.add_export(Export("disk", node))
    sock = work / "inproc.sock"
    sock.unlink(missing_ok=True)
    await server.listen_unix(sock)
    uri = f"nbd+unix:///disk?socket={sock}"
    target_path = work / "inproc-target.raw"
    job: BackupJob | None = None
    try:
        lag: list[float] = []
        probe = asyncio.ensure_future(lag_probe(lag))
        idle = await fio(uri, runtime, work)
        probe.cancel()
        idle.loop_lag_us = lag
        target_path.unlink(missing_ok=True)
        target = await open_target(str(target_path), size=size)
        job = BackupJob(
            "j", node, target.device, BackupOptions(speed=speed), events=EventBus(),
            target_zero_init=target.zero_init, owner=target,
        )  # fmt: skip
        started = time.monotonic()
        await job.attach()
        job.start()
        completed = asyncio.ensure_future(completion_time(job.wait()))
        fio_started = time.monotonic()
        lag = []
        probe = asyncio.ensure_future(lag_probe(lag))
        busy = await fio(uri, runtime, work)
        probe.cancel()
        busy.loop_lag_us = lag
        busy.copied_share = job.current_progress / size
        busy.job_outlived = not job.is_completed
        if not completed.done():
            completed.cancel()
        busy.finish_backup(started, fio_started, finished_at(completed), size)
        return idle, busy
    finally:
        if job is not None and not job.is_completed:
            job.cancel()
            await job.wait()
        await server.stop()
        await node.close()
        target_path.unlink(missing_ok=True)


# --- the report ---------------------------------------------------------------------------------------


@dataclass
class Samples:
    idle_iops: list[float] = field(default_factory=list)
    idle_p99: list[float] = field(default_factory=list)
    burst_iops: list[float] = field(default_factory=list)
    burst_p99: list[float] = field(default_factory=list)
    steady_iops: list[float] = field(default_factory=list)
    steady_p99: list[float] = field(default_factory=list)
    per_second: list[list[float]] = field(default_factory=list)
    copied: list[float] = field(default_factory=list)
    outlived: list[bool] = field(default_factory=list)
    backup_mib_s: list[float] = field(default_factory=list)

    def add(self, idle: GuestRun, busy: GuestRun, burst: float) -> None:
        iops, p99 = idle.window(0, idle.runtime)
        self.idle_iops.append(iops)
        self.idle_p99.append(p99)
        until = busy.busy_until
        iops, p99 = busy.window(0, min(burst, until))
        self.burst_iops.append(iops)
        self.burst_p99.append(p99)
        iops, p99 = busy.window(burst, until) if until > burst else (math.nan, math.nan)
        self.steady_iops.append(iops)
        self.steady_p99.append(p99)
        self.backup_mib_s.append(busy.backup_mib_s)
        self.per_second.append(busy.per_second())
        self.copied.append(busy.copied_share or 0.0)
        self.outlived.append(busy.job_outlived)


def med(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    return [a / b if b else math.nan for a, b in zip(num, den, strict=True)]


def report(samples: dict[str, Samples], args: argparse.Namespace) -> str:
    burst = args.burst
    speed = f"speed {args.speed // MiB} MiB/s" if args.speed else "unthrottled"
    lines = [
        f"Guest: fio 4 KiB randwrite QD16, {args.runtime} s per run; backup: drive-backup sync=full, raw target,"
        f" {speed}; disk {args.size // MiB} MiB on tmpfs; median [range] of {args.reps} reps",
        "",
        "| daemon | IOPS idle | IOPS burst (÷ idle) | IOPS steady (÷ idle) | p99 idle µs | p99 burst µs | p99 steady µs"
        " | IOPS per second (medians) | backup MiB/s | disk copied | job outlived fio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for who, s in samples.items():
        seconds = [statistics.median(col) for col in zip(*s.per_second, strict=False)]
        lines.append(
            f"| {who} | {med(s.idle_iops)} | {med(s.burst_iops)} ({med(ratios(s.burst_iops, s.idle_iops), '{:.2f}')})"
            f" | {med(s.steady_iops)} ({med(ratios(s.steady_iops, s.idle_iops), '{:.2f}')})"
            f" | {med(s.idle_p99)} | {med(s.burst_p99)} | {med(s.steady_p99)}"
            f" | {' '.join(f'{v / 1000:.1f}k' for v in seconds)} | {med(s.backup_mib_s)}"
            f" | {med([c * 100 for c in s.copied], '{:.0f}')} %"
            f" | {sum(s.outlived)}/{len(s.outlived)} |"
        )
    lines.append("")
    lines.append(
        f"burst: the first {burst:g} s of the backup run; steady: the rest while the job ran; backup MiB/s: of the"
        " disk, guest copies included, while the guest wrote (till the job ended, or the copied share at fio's end)"
    )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    who_list = [w.strip() for w in args.who.split(",") if w.strip()]
    baseline = Path(args.baseline).resolve() if args.baseline else None
    if baseline is not None:
        if not (baseline / "server" / "cli.py").is_file():
            print(f"--baseline {baseline}: not a checkout of nbd-backup", file=sys.stderr)
            return 2
        who_list.insert(1, "baseline")
    for who in who_list:
        if who == "baseline":
            continue
        if who not in DAEMONS:
            print(f"unknown daemon {who!r} (choose from {', '.join(DAEMONS)})", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="guest-cost-", dir=args.dir) as tmp:
        work = Path(tmp)
        image = work / "source.raw"
        print(f"# writing a {args.size // MiB} MiB source image", flush=True)
        make_image(image, args.size)
        samples: dict[str, Samples] = {who: Samples() for who in who_list}
        for rep in range(args.reps):
            order = who_list[rep % len(who_list) :] + who_list[: rep % len(who_list)]
            for who in order:
                run_dir = work / who
                run_dir.mkdir(exist_ok=True)
                if who == "ours-inproc":
                    idle, busy = await inproc_guest(image, run_dir, args.runtime, args.speed, args.size)
                else:
                    idle, busy = await daemon_guest(who, image, run_dir, args.runtime, args.speed, args.size, baseline)
                samples[who].add(idle, busy, args.burst)
                b_iops, b_p99 = busy.window(0, args.burst)
                s_iops, s_p99 = busy.window(args.burst, max(busy.busy_until, args.burst + 0.001))
                print(
                    f"# rep {rep} {who}: idle {idle.window(0, idle.runtime)[0]:.0f} IOPS; backup burst {b_iops:.0f}"
                    f" p99 {b_p99:.0f} µs, steady {s_iops:.0f} p99 {s_p99:.0f} µs; copied {busy.copied_share or 0:.0%}"
                    f"{'' if busy.job_outlived else ' (JOB ENDED BEFORE FIO)'}"
                    + (
                        f"; loop lag p50/p99 idle {percentile(idle.loop_lag_us, 0.5):.0f}/"
                        f"{percentile(idle.loop_lag_us, 0.99):.0f} µs, backup {percentile(busy.loop_lag_us, 0.5):.0f}/"
                        f"{percentile(busy.loop_lag_us, 0.99):.0f} µs"
                        if busy.loop_lag_us
                        else ""
                    ),
                    flush=True,
                )
    text = report(samples, args)
    print()
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({who: vars(s) for who, s in samples.items()}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=6 << 30, help="disk size (default 6G)")
    parser.add_argument("--runtime", type=int, default=5, help="fio seconds per run (default 5)")
    parser.add_argument("--burst", type=float, default=2.0, help="seconds counted as the first-touch burst")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--speed", type=parse_size, default=32 * MiB, help="backup speed limit (default 32M)")
    parser.add_argument("--who", default=",".join(DAEMONS), help=f"comma-separated subset of {', '.join(DAEMONS)}")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run the daemon of this checkout (a git worktree of the code before a change) in every"
        " repetition, as 'baseline'",
    )
    parser.add_argument("--dir", default="/dev/shm", help="tmpfs directory for the images")
    parser.add_argument("--json", help="also write the raw samples here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nbd.loop import run

    return run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
