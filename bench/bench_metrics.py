#!/usr/bin/env python3
"""What ``serve --metrics`` costs the NBD request path: fio's nbd engine against our daemon without
and with ``--metrics``, and (``--baseline DIR``) against another checkout (the code before metrics),
in interleaved rounds so a busy machine hurts every variant alike. Prints the median IOPS of each,
its ratio to the first variant, and the daemon's CPU time per request (less noisy than IOPS on a
shared machine: what the counting costs shows there first).

    .venv/bin/python bench/bench_metrics.py                       # 4k random read/write, 3 rounds
    .venv/bin/python bench/bench_metrics.py --baseline /work/main --rounds 5 --runtime 5

A second part (``--micro``) times just the statements the request path runs per request with
metrics on, to put a number on them apart from the noise of a whole request.

Not part of the test suite: numbers depend on the machine and on whoever else is using it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # our nbd package, not libnbd's

from bench_server import EXPORT, WORKLOADS, free_port, make_image, run_fio, serving

ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def daemon(root: Path, image: Path, metrics: bool) -> Iterator[tuple[int, int]]:
    """``nbd-backup serve`` of ``image`` (with ``--metrics`` or without): (NBD port, pid)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "server.cli", "serve", "--nbd", f"127.0.0.1:{port}"]
        argv += ["--export", f"{EXPORT}={image},format=raw"]
        if metrics:
            argv += ["--metrics", f"127.0.0.1:{free_port()}"]
        started.append(subprocess.Popen(argv, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return started[-1]

    with serving(start) as port:
        yield port, started[-1].pid


def micro(number: int = 1_000_000) -> float:
    """Nanoseconds per request of the counting ``_handle`` does with metrics on."""
    setup = (
        "from time import perf_counter\nfrom bisect import bisect_right\n"
        "from nbd.stats import ConnStats, LATENCY_BOUNDS\n"
        "stats = ConnStats('disk')\ncmd = 0\nsize = 4096\n"
    )
    body = (
        "if stats is not None:\n    started = perf_counter()\n"
        "if stats is not None:\n    elapsed = perf_counter() - started\n"
        "    stats.buckets[cmd][bisect_right(LATENCY_BOUNDS, elapsed)] += 1\n"
        "    stats.seconds[cmd] += elapsed\n    stats.bytes[cmd] += size\n"
    )
    off = "stats = None\n" + body
    on = timeit.timeit(body, setup, number=number)
    none = timeit.timeit(off, setup, number=number)
    return (on - none) / number * 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runtime", type=float, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="randread,randwrite")
    parser.add_argument("--baseline", metavar="DIR", help="also run the daemon of this checkout (no --metrics)")
    parser.add_argument("--dir", default="/dev/shm")
    parser.add_argument("--micro", action="store_true", help="only time the per-request counting statements")
    args = parser.parse_args()
    if args.micro:
        print(f"counting with metrics on: {micro():.0f} ns per request more than with metrics off")
        return 0
    variants: list[tuple[str, Path, bool]] = []
    if args.baseline:
        variants.append(("baseline", Path(args.baseline), False))
    variants += [("metrics off", ROOT, False), ("metrics on", ROOT, True)]
    workloads = [w for w in WORKLOADS if w.name in args.workloads.split(",")]
    iops: dict[tuple[str, str], list[float]] = {}
    cpu_us: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        image = Path(tmp) / "disk.img"
        make_image(image, args.size_mib << 20)
        for _ in range(args.rounds):
            for workload in workloads:
                for name, root, metrics in variants:
                    with daemon(root, image, metrics) as (port, pid):
                        cpu = cpu_seconds(pid)
                        result = run_fio(port, workload, args.size_mib << 20, args.runtime)
                        cpu = cpu_seconds(pid) - cpu
                    iops.setdefault((workload.name, name), []).append(result.iops)
                    # the daemon's CPU per request, over the whole run (fio's ramp included)
                    requests = result.iops * args.runtime + result.iops  # ramp_time=1 at about the same rate
                    cpu_us.setdefault((workload.name, name), []).append(cpu / requests * 1e6)
                    time.sleep(0.2)
    for workload in workloads:
        first = statistics.median(iops[(workload.name, variants[0][0])])
        for name, _, _ in variants:
            runs = iops[(workload.name, name)]
            median = statistics.median(runs)
            spread = f"{min(runs):.0f}-{max(runs):.0f}"
            per_request = cpu_us[(workload.name, name)]
            print(
                f"{workload.name:<10} {name:<12} {median:9.0f} IOPS (runs {spread})  {median / first:.3f}x   "
                f"daemon CPU {statistics.median(per_request):5.1f} µs/request"
                f" (runs {min(per_request):.1f}-{max(per_request):.1f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
