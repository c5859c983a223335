#!/usr/bin/env python3
"""Throughput over TLS: our server against qemu-nbd and nbdkit with TLS (same certificates, same image),
beside our server in clear text, in one run.

The certificates are made on the spot (``tests.tlskit``: an EC P-256 CA and server certificate); every
server exports the same non-zero image on tmpfs over TCP 127.0.0.1 and requires TLS. fio's nbd engine
(libnbd) drives each with the workloads of ``bench_server.py``: sequential read and write with 1 MiB
blocks at queue depth 8, random read and write with 4 KiB at queue depth 16. fio cannot hand libnbd a
``tls-certificates=`` directory (libnbd refuses local files in URIs unless asked, and as root reads
only /etc/pki/libnbd), so fio connects with ``tls-verify-peer=false`` and the servers do not ask for
client certificates: the encryption is the same, only the certificate checks at connect are skipped.

    .venv/bin/python bench/bench_tls.py                          # everything (about 5 minutes)
    .venv/bin/python bench/bench_tls.py --runtime 3 --rounds 1 --servers ours-tls,qemu-nbd-tls

Prints MiB/s, IOPS, p50/p99 latency and the ratio ours-tls ÷ each. Not part of the test suite: numbers
depend on the machine and on whoever else is using it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_server import (  # noqa: E402
    EXPORT,
    WORKLOADS,
    Result,
    Workload,
    make_image,
    run_fio_uri,
    serving,
)

from tests.tlskit import Pki, make_pki  # noqa: E402

Starter = Callable[[Path, int, Pki], subprocess.Popen[bytes]]


def _ours(tls: bool) -> Starter:
    def start(image: Path, port: int, pki: Pki) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "server.cli", "serve", "--nbd", f"127.0.0.1:{port}"]
        argv += ["--export", f"{EXPORT}={image},format=raw"]
        if tls:
            argv += ["--tls", "require", "--tls-dir", str(pki.server), "--tls-verify-peer", "off"]
        return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    return start


def _qemu_nbd(image: Path, port: int, pki: Pki) -> subprocess.Popen[bytes]:
    argv = ["qemu-nbd", "-f", "raw", "-x", EXPORT, "-b", "127.0.0.1", "-p", str(port), "-e", "16", "-t"]
    argv += ["--object", f"tls-creds-x509,id=t0,dir={pki.server},endpoint=server,verify-peer=off", "--tls-creds", "t0"]
    return subprocess.Popen([*argv, str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _nbdkit(image: Path, port: int, pki: Pki) -> subprocess.Popen[bytes]:
    argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "-e", EXPORT]
    argv += ["--tls=require", f"--tls-certificates={pki.server}", "file", f"file={image}"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


#: name → (the program it needs, how to start it, whether it speaks TLS)
SERVERS: dict[str, tuple[str | None, Starter, bool]] = {
    "ours-tls": (None, _ours(True), True),
    "qemu-nbd-tls": ("qemu-nbd", _qemu_nbd, True),
    "nbdkit-tls": ("nbdkit", _nbdkit, True),
    "ours-plain": (None, _ours(False), False),
}


def running(name: str, image: Path, pki: Pki) -> contextlib.AbstractContextManager[int]:
    return serving(lambda port: SERVERS[name][1](image, port, pki))


def median_result(runs: list[Result]) -> Result:
    """The median of each figure over the rounds (each figure on its own)."""
    return Result(
        mib_s=statistics.median(r.mib_s for r in runs),
        iops=statistics.median(r.iops for r in runs),
        p50_us=statistics.median(r.p50_us for r in runs),
        p99_us=statistics.median(r.p99_us for r in runs),
    )


def table(results: dict[str, dict[str, list[Result]]], servers: list[str], workloads: list[Workload]) -> str:
    """Medians over the rounds with the IOPS range, and ours-tls ÷ each other server (median of the
    per-round ratios, so that a round slowed for everyone does not count against one server)."""
    header = (
        f"{'workload':<10} {'server':<13} {'MiB/s':>9} {'IOPS':>9} {'IOPS range':>17} {'p50 µs':>9} {'p99 µs':>9}"
        "   ours-tls ÷ this (range)"
    )
    lines = [header, "-" * len(header)]
    for workload in workloads:
        row = results.get(workload.name, {})
        ours = row.get("ours-tls", [])
        for server in servers:
            runs = row.get(server, [])
            if not runs:
                lines.append(f"{workload.name:<10} {server:<13} {'(failed)':>9}")
                continue
            m = median_result(runs)
            spread = f"{min(r.iops for r in runs):.0f}-{max(r.iops for r in runs):.0f}"
            ratios = [o.iops / r.iops for o, r in zip(ours, runs, strict=False) if r.iops]
            ratio = ""
            if server != "ours-tls" and ratios:
                ratio = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
            numbers = f"{m.mib_s:9.1f} {m.iops:9.0f} {spread:>17} {m.p50_us:9.1f} {m.p99_us:9.1f}"
            lines.append(f"{workload.name:<10} {server:<13} {numbers}   {ratio}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runtime", type=float, default=4, help="seconds per workload, server and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all servers (medians reported)")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    parser.add_argument("--dir", default="/dev/shm", help="where the image lives (tmpfs)")
    args = parser.parse_args()
    servers = [s for s in args.servers.split(",") if s]
    workloads = [w for w in WORKLOADS if w.name in args.workloads.split(",")]
    missing = [s for s in servers if SERVERS[s][0] and shutil.which(SERVERS[s][0] or "") is None]
    if shutil.which("fio") is None or shutil.which("openssl") is None or missing:
        print(f"missing: {', '.join(missing or ['fio or openssl'])}", file=sys.stderr)
        return 2
    size = args.size_mib << 20
    results: dict[str, dict[str, list[Result]]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="nbd-bench-tls-") as tmp:
        workdir = Path(tmp)
        pki = make_pki(workdir / "pki")
        image = workdir / "bench.img"
        make_image(image, size)
        with contextlib.ExitStack() as stack:
            ports = {server: stack.enter_context(running(server, image, pki)) for server in servers}
            for round_ in range(args.rounds):
                order = servers[round_ % len(servers) :] + servers[: round_ % len(servers)]
                for workload in workloads:
                    for server in order:
                        scheme = "nbds" if SERVERS[server][2] else "nbd"
                        query = "?tls-verify-peer=false" if SERVERS[server][2] else ""
                        uri = f"{scheme}://localhost:{ports[server]}/{EXPORT}{query}"
                        try:
                            result = run_fio_uri(uri, workload, size, args.runtime)
                        except RuntimeError as exc:
                            print(f"{server} {workload.name}: {exc}", file=sys.stderr)
                            continue
                        results.setdefault(workload.name, {}).setdefault(server, []).append(result)
                        print(
                            f"  round {round_ + 1}: {workload.name:<10} {server:<13} {result.iops:9.0f} IOPS",
                            file=sys.stderr,
                        )
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\nfio nbd engine over TLS (x509) on TCP 127.0.0.1, {args.size_mib} MiB image on "
        f"{args.dir}, {args.runtime:g} s per run, medians of {args.rounds} interleaved rounds; "
        f"load average at the end {load}\n"
    )
    print(table(results, servers, workloads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
