#!/usr/bin/env python3
"""Benchmark our NBD server against qemu-nbd, nbdkit (file plugin) and nbd-server, in one run.

Every server exports the same file on tmpfs (1 GiB by default, filled with non-zero data so nobody
gets to answer with holes); fio's nbd engine drives each over TCP on 127.0.0.1 with four workloads:
sequential read and write with 1 MiB blocks at queue depth 8, random read and write with 4 KiB blocks
at queue depth 16; then whole-disk copies with each tool's defaults: nbdcopy (four connections with
multi-conn) and qemu-img convert, the export into a null sink and a file on the same tmpfs into the
export. Prints MiB/s, IOPS, p50/p99 completion latency and ours ÷ each peer: medians over interleaved
rounds, with ranges, the ratios paired round by round.

    .venv/bin/python bench/bench_server.py                 # everything (about 10 minutes)
    .venv/bin/python bench/bench_server.py --runtime 3 --servers ours,qemu-nbd --workloads randread
    NBD_BACKUP_LOOP=asyncio .venv/bin/python bench/bench_server.py   # our server on the stdlib loop
    NBD_BACKUP_SENDFILE_MIN=0 .venv/bin/python bench/bench_server.py # big reads without sendfile
    git worktree add ../before HEAD~1 && .venv/bin/python bench/bench_server.py --baseline ../before \
        --servers ours,nbdkit --workloads seqwrite,nbdcopy-w   # a change against the code before it

Not part of the test suite: numbers depend on the machine and on whoever else is using it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXPORT = "disk"


@dataclass(frozen=True)
class Workload:
    """An fio job (``rw``, ``bs``, ``iodepth``), or with ``tool`` a whole-disk copy by nbdcopy or qemu-img
    (``rw`` "read": the export into a null sink; "write": a file on the same tmpfs into the export)."""

    name: str
    rw: str
    bs: str = ""
    iodepth: int = 0
    tool: str = "fio"


WORKLOADS = [
    Workload("seqread", "read", "1M", 8),
    Workload("seqwrite", "write", "1M", 8),
    Workload("randread", "randread", "4k", 16),
    Workload("randwrite", "randwrite", "4k", 16),
    Workload("nbdcopy-r", "read", tool="nbdcopy"),
    Workload("nbdcopy-w", "write", tool="nbdcopy"),
    Workload("convert-r", "read", tool="qemu-img"),
    Workload("convert-w", "write", tool="qemu-img"),
]


@dataclass
class Result:
    mib_s: float
    iops: float
    p50_us: float
    p99_us: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, proc: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def start_ours(image: Path, port: int, workdir: Path, checkout: Path = ROOT) -> subprocess.Popen[bytes]:
    """``nbd-backup serve`` of ``checkout`` (this one, or ``--baseline``'s) with this interpreter."""
    argv = [sys.executable, "-m", "server.cli", "serve", "--nbd", f"127.0.0.1:{port}", "--export", f"{EXPORT}={image}"]
    return subprocess.Popen(argv, cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_qemu_nbd(image: Path, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    argv = ["qemu-nbd", "-f", "raw", "-x", EXPORT, "-b", "127.0.0.1", "-p", str(port), "-e", "16", "-t"]
    return subprocess.Popen([*argv, str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_nbdkit(image: Path, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "-e", EXPORT, "file", f"file={image}"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_nbd_server(image: Path, port: int, workdir: Path) -> _Pids:
    config = workdir / "nbd-server.conf"
    config.write_text(
        f"[generic]\n    listenaddr = 127.0.0.1\n    port = {port}\n    allowlist = true\n"
        f"[{EXPORT}]\n    exportname = {image}\n"
    )
    # "-d" (no fork) serves a single client and exits, so nbd-server runs as the daemon it wants to be;
    # its processes are found again by their (unique) config path and stopped by pid.
    argv = ["nbd-server", "-C", str(config)]
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=30)
    return _Pids(pids_with_cmdline(argv))


def pids_with_cmdline(argv: list[str]) -> list[int]:
    wanted = "\0".join(argv)
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "cmdline").read_bytes().decode(errors="replace").rstrip("\0") == wanted:
                    pids.append(int(entry.name))
    return pids


class _Pids:
    """The slice of ``Popen`` the benchmark uses, for a daemon that forked away from us."""

    def __init__(self, pids: list[int]) -> None:
        if not pids:
            raise RuntimeError("nbd-server did not start")
        self.pids = pids
        self.returncode: int | None = None

    def poll(self) -> int | None:
        alive = [pid for pid in self.pids if Path(f"/proc/{pid}").exists()]
        return None if alive else 0

    def send_signal(self, sig: int) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout or 0)
        while self.poll() is None:
            if timeout is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("nbd-server", timeout)
            time.sleep(0.05)
        return 0

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


SERVERS: dict[str, tuple[str | None, Callable[[Path, int, Path], Any]]] = {
    "ours": (None, start_ours),
    "qemu-nbd": ("qemu-nbd", start_qemu_nbd),
    "nbdkit": ("nbdkit", start_nbdkit),
    "nbd-server": ("nbd-server", start_nbd_server),
}


@contextlib.contextmanager
def running(name: str, image: Path, workdir: Path) -> Iterator[int]:
    with serving(lambda port: SERVERS[name][1](image, port, workdir)) as port:
        yield port


@contextlib.contextmanager
def serving(start: Callable[[int], subprocess.Popen[bytes]]) -> Iterator[int]:
    """A server ``start(port)`` launches on a free port, for the ``with`` block: yields the port once it
    accepts connections, then stops it (SIGTERM, SIGKILL after 15 s)."""
    port = free_port()
    proc = start(port)
    try:
        wait_port(port, proc)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_fio(port: int, workload: Workload, size: int, runtime: float) -> Result:
    return run_fio_uri(f"nbd://127.0.0.1:{port}/{EXPORT}", workload, size, runtime)


def run_workload(port: int, workload: Workload, size: int, runtime: float, source: Path) -> Result:
    uri = f"nbd://127.0.0.1:{port}/{EXPORT}"
    if workload.tool == "fio":
        return run_fio_uri(uri, workload, size, runtime)
    return run_copy_tool(uri, workload, size, source)


def run_copy_tool(uri: str, workload: Workload, size: int, source: Path) -> Result:
    """A whole-disk copy with the tool's defaults (nbdcopy: its connections and threads, multi-conn when
    the server offers it); the result is MiB/s (also in ``iops``, which the ratios use)."""
    reading = workload.rw == "read"
    if workload.tool == "nbdcopy":
        argv = ["nbdcopy", uri, "null:"] if reading else ["nbdcopy", str(source), uri]
    else:
        null = f"driver=null-co,size={size}"
        argv = (
            ["qemu-img", "convert", "-n", "-f", "raw", uri, "--target-image-opts", null]
            if reading
            else ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), uri]
        )
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{workload.tool} failed: {proc.stderr.strip()}")
    mib_s = size / (1 << 20) / seconds
    return Result(mib_s=mib_s, iops=mib_s, p50_us=0.0, p99_us=0.0)


def run_fio_uri(uri: str, workload: Workload, size: int, runtime: float) -> Result:
    """One fio run with its nbd engine against ``uri`` (any NBD URI libnbd takes, ``nbds://`` included)."""
    argv = [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={workload.rw}",
        f"--bs={workload.bs}",
        f"--iodepth={workload.iodepth}",
        f"--size={size}",
        "--time_based",
        f"--runtime={runtime}",
        "--ramp_time=1",
        "--randrepeat=0",
        "--norandommap",
        "--output-format=json",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed: {proc.stderr.strip()}")
    job = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0]
    side = job["read"] if "read" in workload.rw else job["write"]
    percentiles = side["clat_ns"].get("percentile", {})
    return Result(
        mib_s=side["bw_bytes"] / (1 << 20),
        iops=side["iops"],
        p50_us=percentiles.get("50.000000", 0) / 1000,
        p99_us=percentiles.get("99.000000", 0) / 1000,
    )


def make_image(path: Path, size: int) -> None:
    """Non-zero data everywhere: no server may answer a read with a hole."""
    block = bytes((i * 7 + 1) & 0xFF or 1 for i in range(1 << 20))
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)


def table(results: dict[str, dict[str, dict[int, Result]]], servers: list[str], workloads: list[Workload]) -> str:
    """Medians over the rounds, the range of MiB/s, and ours ÷ each peer: the median of the rounds'
    ratios (each round ran every server back to back) with their range."""
    lines = []
    header = (
        f"{'workload':<10} {'server':<11} {'MiB/s':>9} {'[range]':>15} {'IOPS':>9} {'p50 µs':>9} {'p99 µs':>9}"
        "   ours ÷ this [range]"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for workload in workloads:
        row = results.get(workload.name, {})
        ours = row.get("ours", {})
        for server in servers:
            by_round = row.get(server, {})
            runs = list(by_round.values())
            if not runs:
                lines.append(f"{workload.name:<10} {server:<11} {'(failed)':>9}")
                continue
            mib = [r.mib_s for r in runs]
            ratio = ""
            if server != "ours" and ours:
                ratios = [ours[n].iops / r.iops for n, r in by_round.items() if n in ours and r.iops]
                if ratios:
                    ratio = f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"
            numbers = (
                f"{statistics.median(mib):9.1f} {f'[{min(mib):.0f}-{max(mib):.0f}]':>15}"
                f" {statistics.median(r.iops for r in runs):9.0f} {statistics.median(r.p50_us for r in runs):9.1f}"
                f" {statistics.median(r.p99_us for r in runs):9.1f}"
            )
            lines.append(f"{workload.name:<10} {server:<11} {numbers}   {ratio}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runtime", type=float, default=4, help="seconds per workload, server and round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds over all servers (the order rotates each round); medians and ranges are reported",
    )
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also serve with the daemon of this checkout (a git worktree of the code before a change), as"
        " server 'baseline' in the same rounds: a change measured against what it changes",
    )
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    parser.add_argument("--dir", default="/dev/shm", help="where the image lives (tmpfs)")
    args = parser.parse_args()
    servers = [s for s in args.servers.split(",") if s]
    if args.baseline:
        baseline = Path(args.baseline).resolve()
        if not (baseline / "server" / "cli.py").is_file():
            print(f"--baseline {baseline}: not a checkout of nbd-backup", file=sys.stderr)
            return 2
        SERVERS["baseline"] = (None, lambda image, port, workdir: start_ours(image, port, workdir, baseline))
        servers.insert(1, "baseline")
    workloads = [w for w in WORKLOADS if w.name in args.workloads.split(",")]
    missing = [s for s in servers if SERVERS[s][0] and shutil.which(SERVERS[s][0] or "") is None]
    missing += [tool for tool in {w.tool for w in workloads} if shutil.which(tool) is None]
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    size = args.size_mib << 20
    results: dict[str, dict[str, dict[int, Result]]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="nbd-bench-") as tmp:
        workdir = Path(tmp)
        image = workdir / "bench.img"
        make_image(image, size)
        source = workdir / "source.img"  # what the "-w" copy workloads write into the export
        if any(w.tool != "fio" for w in workloads):
            shutil.copyfile(image, source)
        with contextlib.ExitStack() as stack:
            # Every server runs for the whole benchmark, and the runs interleave server by server
            # within each workload (the order rotating each round): whatever else the shared machine
            # is doing hits all of them alike, rather than whichever server happened to run then.
            ports = {server: stack.enter_context(running(server, image, workdir)) for server in servers}
            for round_ in range(args.rounds):
                order = servers[round_ % len(servers) :] + servers[: round_ % len(servers)]
                for workload in workloads:
                    for server in order:
                        try:
                            result = run_workload(ports[server], workload, size, args.runtime, source)
                        except RuntimeError as exc:
                            print(f"{server} {workload.name}: {exc}", file=sys.stderr)
                            continue
                        results.setdefault(workload.name, {}).setdefault(server, {})[round_] = result
                        print(
                            f"  round {round_ + 1}: {workload.name:<10} {server:<11} {result.iops:9.0f} IOPS",
                            file=sys.stderr,
                            flush=True,
                        )
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    loop = os.environ.get("NBD_BACKUP_LOOP") or "uvloop (default)"
    print(
        f"\nfio nbd engine over TCP 127.0.0.1, {args.size_mib} MiB image on {args.dir}, "
        f"{args.runtime:g} s per run, medians of {args.rounds} interleaved round(s); nbdcopy and qemu-img"
        " rows: one whole-disk copy each (r: export -> null, w: a file on the same tmpfs -> export), MiB/s"
        " in both columns"
    )
    print(f"ours: nbd-backup serve, event loop {loop}; {os.cpu_count()} CPUs, load average at the end {load}\n")
    print(table(results, servers, workloads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
