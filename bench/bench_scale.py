#!/usr/bin/env python3
"""How ``nbd-backup serve`` scales with clients and exports.

1. Clients: fio's nbd engine, 1, 8, 32 and 128 clients (one connection each, 4 KiB random reads and
   writes half and half, QD4 per client) spread evenly over 1 and over 32 exports of one daemon.
   Reported: aggregate IOPS, the p99 completion latency (the worse of reads and writes), the daemon's
   peak RSS while the clients ran, and from it the memory per connection (peak RSS over the idle daemon's,
   per client).
2. Exports: the daemon started with 1 and with 1,000 exports on the command line (sparse files): the time
   from exec to listening (the pid file appears once every export is open and the socket listens) and the
   RSS then, hence the memory per export. The 1,000th export is then read with ``nbdinfo``.

Medians [range] of the repetitions.

    .venv/bin/python bench/bench_scale.py
    .venv/bin/python bench/bench_scale.py --clients 1,8 --exports 1 --runtime 2 --reps 1   # a quick check

Not part of the test suite: the numbers depend on the machine and on whoever else is using it; on two
cores fio's 128 client threads and the daemon share the same CPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@contextlib.contextmanager
def daemon(work: Path, exports: list[Path]) -> Iterator[tuple[int, Path, float]]:
    """``nbd-backup serve`` with ``exports`` (named e0, e1, …) on a unix socket: (pid, socket, seconds
    from exec to listening)."""
    sock, pid_file = work / "nbd.sock", work / "serve.pid"
    pid_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "server.cli", "serve", "--nbd-socket", str(sock), "--pid-file", str(pid_file)]
    argv += ["--max-connections", "400"]
    for i, path in enumerate(exports):
        argv += ["--export", f"e{i}={path}"]
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = started + 120
        while not (pid_file.exists() and pid_file.stat().st_size):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nbd-backup serve did not start")
            time.sleep(0.005)
        yield proc.pid, sock, time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def fio(sock: Path, clients: int, exports: int, runtime: int) -> tuple[float, float]:
    """(aggregate IOPS, p99 µs) of ``clients`` fio threads, client ``i`` on export ``i % exports``."""
    argv = ["fio", "--ioengine=nbd", "--rw=randrw", "--bs=4k", "--iodepth=4", "--time_based", f"--runtime={runtime}"]
    argv += ["--thread", "--group_reporting", "--randrepeat=0", "--output-format=json"]
    for i in range(clients):
        argv += [f"--name=c{i}", f"--uri=nbd+unix:///e{i % exports}?socket={sock}"]
    run = subprocess.run(argv, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"fio with {clients} clients failed: {run.stderr[-600:]}")
    out = run.stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    iops = job["read"]["iops"] + job["write"]["iops"]
    p99 = max(job[kind]["clat_ns"]["percentile"]["99.000000"] for kind in ("read", "write")) / 1000
    return iops, p99


class PeakRss:
    """The largest RSS of ``pid`` seen while the block runs (sampled every 50 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_kib(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def med(values: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def bench_clients(base: Path, args: argparse.Namespace) -> None:
    data = os.urandom(args.size)
    files = []
    for i in range(max(args.exports)):
        path = base / f"disk{i}.raw"
        path.write_bytes(data)
        files.append(path)
    print("| exports | clients | IOPS | p99 µs | daemon RSS MiB (idle → peak) | KiB per connection |")
    print("|---|---|---|---|---|---|")
    for exports in args.exports:
        for clients in args.clients:
            iops, p99, idle, peak = [], [], [], []
            for _ in range(args.reps):
                with daemon(base, files[:exports]) as (pid, sock, _):
                    idle.append(rss_kib(pid))
                    with PeakRss(pid) as rss:
                        got_iops, got_p99 = fio(sock, clients, exports, args.runtime)
                    iops.append(got_iops)
                    p99.append(got_p99)
                    peak.append(rss.peak)
            per_conn = [(p - i) / clients for p, i in zip(peak, idle, strict=True)]
            print(
                f"| {exports} | {clients} | {med(iops)} | {med(p99)} |"
                f" {statistics.median(idle) / 1024:.0f} → {statistics.median(peak) / 1024:.0f} | {med(per_conn)} |",
                flush=True,
            )


def bench_exports(base: Path, args: argparse.Namespace) -> None:
    files = []
    for i in range(args.many):
        path = base / f"sparse{i}.raw"
        with open(path, "wb") as f:
            f.truncate(args.size)
        files.append(path)
    print()
    print("| exports | start-up s | daemon RSS MiB |")
    print("|---|---|---|")
    results: dict[int, tuple[list[float], list[float]]] = {}
    for count in (1, args.many):
        startup, rss = results.setdefault(count, ([], []))
        for _ in range(args.reps):
            with daemon(base, files[:count]) as (pid, sock, seconds):
                startup.append(seconds)
                rss.append(rss_kib(pid) / 1024)
                last = f"nbd+unix:///e{count - 1}?socket={sock}"
                size = subprocess.run(["nbdinfo", "--size", last], capture_output=True, text=True, check=True)
                assert int(size.stdout) == args.size, size.stdout
        print(f"| {count} | {med(startup, '{:.2f}')} | {med(rss, '{:.1f}')} |", flush=True)
    one, many = results[1][1], results[args.many][1]
    per_export = (statistics.median(many) - statistics.median(one)) * 1024 / (args.many - 1)
    print(f"\nMemory per configured export: {per_export:.1f} KiB (RSS difference ÷ {args.many - 1}).")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=lambda t: [int(x) for x in t.split(",")], default=[1, 8, 32, 128])
    parser.add_argument("--exports", type=lambda t: [int(x) for x in t.split(",")], default=[1, 32])
    parser.add_argument("--many", type=int, default=1000, help="exports of the start-up measurement")
    parser.add_argument("--size", type=int, default=16 * MiB, help="bytes per export")
    parser.add_argument("--runtime", type=int, default=5, help="fio seconds per run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default="/dev/shm")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.dir) as tmp:
        print(
            f"nbd-backup serve on a unix socket, {args.size // MiB} MiB raw exports on tmpfs; fio 4 KiB randrw QD4"
            f" per client, {args.runtime} s; median [range] of {args.reps}\n"
        )
        bench_clients(Path(tmp), args)
        bench_exports(Path(tmp), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
