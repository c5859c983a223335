#!/usr/bin/env python3
"""Soak ``nbd-backup serve``: an hour of mixed NBD clients, backups and faults, with the daemon's RSS and
open file descriptors sampled all along (they must stay flat).

One daemon with a QMP socket exports three images from a temporary directory on tmpfs: ``raw`` (raw,
writable), ``q`` (qcow2, writable) and ``quiet`` (raw, read-only: nothing writes it, so every read and
every backup of it can be checked against its image). Meanwhile, each in its own bounded loop
(``bench/soak_workers.py``):

* NBD clients over TCP and the unix socket: fio's nbd engine (verified random writes, random reads),
  qemu-io (patterned writes read back), our NbdClient (writes/zeroes read back), nbdcopy, qemu-img
  convert/compare and ``nbd-backup copy`` of ``quiet`` (compared with the image), a raw client that
  pipelines READs and checks every reply's cookie and data, and hostile clients (silent, idle after
  the handshake, pipelining without reading replies, disconnecting mid-payload or mid-reply, garbage);
* backups over QMP: ``drive-backup``/``transaction`` of ``quiet`` to raw/qcow2 files, run to completion
  and compared; speed-limited backups of the busy exports to files or an nbdkit target, cancelled,
  paused and resumed, or completed; backups through nbdkit's error and delay filters (failing target
  writes or source reads) with every error policy while the faults are switched on and off.

Every ``--interval`` seconds a line shows the daemon's RSS, open fds, sockets and threads; at the end a
table gives min/median/max per ``--window`` and the slope, ``--csv`` keeps the samples. The exit status
is non-zero if the daemon died or did not exit 0 on SIGTERM, or if any wrong data or unexpected failure
was seen (each is printed as it happens, the first 30 of them).

    .venv/bin/python bench/soak.py                          # an hour
    .venv/bin/python bench/soak.py --duration 120 --interval 5 --csv /tmp/soak.csv

Not part of the test suite (it runs for an hour and loads the machine).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "integration"))
sys.path.insert(0, str(ROOT / "bench"))

from soak_workers import WORKERS, MiB, Soak, kill_group, loop  # noqa: E402

READY = "nbd-backup: ready"
TOOLS = ("fio", "qemu-io", "qemu-img", "nbdcopy", "nbdkit")


@dataclass
class Sample:
    t: float
    rss_kib: int
    hwm_kib: int
    fds: int
    sockets: int
    threads: int
    ops: int
    wrong: int
    unexpected: int


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def random_image(path: Path, size: int, seed: int) -> None:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(rnd.randbytes(MiB))


def start_daemon(work: Path, size: int, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int, Path]:
    """The daemon with its three exports; returns it, its TCP port and its log once it is ready."""
    random_image(work / "raw.img", size, 1)
    random_image(work / "quiet.img", size // 4, 2)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(work / "q.qcow2"), str(size)], check=True)
    log = work / "daemon.log"
    argv = [sys.executable, "-m", "server.cli", "serve", "--qmp", f"unix:{work / 'qmp.sock'}"]
    argv += ["--nbd", "127.0.0.1:0", "--nbd-socket", str(work / "nbd.sock"), "--allow-dir", str(work)]
    argv += ["--export", f"raw={work / 'raw.img'},format=raw", "--export", f"q={work / 'q.qcow2'},format=qcow2"]
    argv += ["--export", f"quiet={work / 'quiet.img'},format=raw,readonly", "--pid-file", str(work / "daemon.pid")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **env}
        )
    deadline = time.monotonic() + 60
    while READY not in (text := log.read_text(errors="replace")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"nbd-backup serve did not start:\n{text}")
        time.sleep(0.05)
    found = re.search(r"nbd=(?:\S*,)?127\.0\.0\.1:(\d+)", text)
    if found is None:
        raise RuntimeError(f"no TCP port in the ready line:\n{text}")
    return proc, int(found.group(1)), log


def sample(pid: int, start: float, soak: Soak) -> Sample | None:
    """The daemon's VmRSS, VmHWM, threads and open fds (sockets among them); None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    sockets = 0
    for fd in fds:
        try:
            sockets += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    with soak.lock:
        ops = sum(v for k, v in soak.counts.items() if k.startswith("ops:"))
        wrong, unexpected = soak.counts["wrong"], soak.counts["unexpected"]
    return Sample(
        t=time.monotonic() - start,
        rss_kib=int(fields["VmRSS"].split()[0]),
        hwm_kib=int(fields["VmHWM"].split()[0]),
        fds=len(fds),
        sockets=sockets,
        threads=int(fields["Threads"]),
        ops=ops,
        wrong=wrong,
        unexpected=unexpected,
    )


def show(s: Sample) -> str:
    return (
        f"t={s.t:7.0f}s rss={s.rss_kib / 1024:7.1f}MiB hwm={s.hwm_kib / 1024:7.1f}MiB fds={s.fds:4d} "
        f"sockets={s.sockets:4d} threads={s.threads:3d} ops={s.ops:6d} wrong={s.wrong} unexpected={s.unexpected}"
    )


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (per second) of (t, value) points; 0 with fewer than two."""
    if len(points) < 2:
        return 0.0
    mt = statistics.fmean(t for t, _ in points)
    mv = statistics.fmean(v for _, v in points)
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / den if den else 0.0


def summary(samples: list[Sample], window: float) -> str:
    if not samples:
        return "no samples"
    lines = [
        f"{'window':>13} {'n':>4} {'RSS MiB min/med/max':>24} {'fds min/med/max':>17} {'sockets max':>11}",
    ]
    end = samples[-1].t
    w = 0.0
    while w <= end:
        part = [s for s in samples if w <= s.t < w + window]
        if part:
            rss = [s.rss_kib / 1024 for s in part]
            fds = [s.fds for s in part]
            span = f"{w / 60:.0f}-{min(w + window, end) / 60:.0f} min"
            lines.append(
                f"{span:>13} {len(part):>4} {min(rss):7.1f} {statistics.median(rss):7.1f} {max(rss):7.1f}  "
                f"{min(fds):5d} {statistics.median(fds):5.0f} {max(fds):5d} {max(s.sockets for s in part):11d}"
            )
        w += window
    # the first sample is taken before the load starts, the last one after it stopped
    loaded = samples[1:-1] if len(samples) > 3 else samples
    marks = [("idle", samples[0]), ("loaded first", loaded[0]), ("loaded middle", loaded[len(loaded) // 2])]
    marks += [("loaded last", loaded[-1]), ("after load", samples[-1])]
    for label, s in marks:
        lines.append(f"{label:>13}: {show(s)}")
    half = [s for s in loaded if s.t >= end / 2]
    for label, part in (("loaded", loaded), ("2nd half", half)):
        rss_slope = slope([(s.t, s.rss_kib / 1024) for s in part]) * 3600
        fd_slope = slope([(s.t, s.fds) for s in part]) * 3600
        lines.append(f"slope ({label}): RSS {rss_slope:+.1f} MiB/h, fds {fd_slope:+.1f}/h")
    lines.append(f"peak RSS (VmHWM) {samples[-1].hwm_kib / 1024:.1f} MiB")
    return "\n".join(lines)


def log_summary(log: Path) -> str:
    """How many warnings and errors the daemon logged, and the exceptions in its tracebacks."""
    levels: Counter[str] = Counter()
    exceptions: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        level = re.match(r"\S+ \S+ \S+ (WARNING|ERROR|CRITICAL):", line)
        if level:
            levels[level.group(1)] += 1
        elif re.match(r"[A-Za-z_.]+(Error|Exception|Exit)\b", line):
            exceptions[re.sub(r"\d+", "N", line)[:160]] += 1
    lines = ["daemon log: " + (", ".join(f"{k} {v}" for k, v in sorted(levels.items())) or "no warnings")]
    lines += [f"  {n} x {text}" for text, n in exceptions.most_common(10)]
    return "\n".join(lines)


def write_csv(path: Path, samples: list[Sample]) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["t_s", "rss_kib", "hwm_kib", "fds", "sockets", "threads", "ops", "wrong", "unexpected"])
        for s in samples:
            out.writerow(
                [f"{s.t:.1f}", s.rss_kib, s.hwm_kib, s.fds, s.sockets, s.threads, s.ops, s.wrong, s.unexpected]
            )


def check_left_over(soak: Soak) -> None:
    """Once every worker ended, the daemon must hold only its three exports and no job."""
    from qsd import QmpSync  # type: ignore[import-not-found]

    try:
        with QmpSync(soak.qmp_sock, timeout=30) as q:
            jobs = q.ok("query-block-jobs")
            nodes = sorted(n["node-name"] for n in q.ok("query-named-block-nodes"))
    except Exception as exc:
        soak.fail("unexpected", "end", f"QMP at the end: {type(exc).__name__}: {exc}")
        return
    if jobs:
        soak.fail("unexpected", "end", f"jobs left at the end: {jobs}")
    if [n for n in nodes if n not in ("raw", "q", "quiet")]:
        soak.fail("unexpected", "end", f"block nodes left at the end: {nodes}")


def stop_daemon(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM and its exit status; None if it had to be killed (a failure)."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def soak_run(args: argparse.Namespace, work: Path) -> int:
    proc, port, log = start_daemon(work, args.size, dict(item.split("=", 1) for item in args.daemon_env))
    soak = Soak(
        work=work,
        port=port,
        nbd_sock=work / "nbd.sock",
        qmp_sock=work / "qmp.sock",
        quiet=work / "quiet.img",
        size=args.size,
        quiet_size=args.size // 4,
        fault=work / "fault",
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: soak.stop.set())
    print(f"daemon pid {proc.pid}, NBD 127.0.0.1:{port} and {soak.nbd_sock}, work dir {work}", flush=True)
    rnd = random.Random(args.seed)
    threads = [
        threading.Thread(target=loop, args=(soak, name, body, pause, rnd.getrandbits(32)), name=name)
        for name, body, pause in WORKERS
        if name not in args.skip
    ]
    samples: list[Sample] = []
    start = time.monotonic()
    died = False
    exit_status: int | None = 0
    try:
        idle = sample(proc.pid, start, soak)  # before any load: the baseline
        if idle is not None:
            samples.append(idle)
            print(show(idle) + "  (idle)", flush=True)
        for t in threads:
            t.start()
        while True:
            s = sample(proc.pid, start, soak)
            if s is None or proc.poll() is not None:
                died = True
                print(f"!!! the daemon is gone (exit status {proc.poll()})", flush=True)
                break
            samples.append(s)
            print(show(s), flush=True)
            left = args.duration - (time.monotonic() - start)
            if left <= 0 or soak.stop.wait(min(args.interval, left)):
                break
    finally:
        soak.stop.set()
        deadline = time.monotonic() + 300
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with soak.lock:
            leftovers = list(soak.procs)
        for p in leftovers:
            kill_group(p)
            p.wait()
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            print(f"!!! workers still running after 300 s: {stuck}", flush=True)
        if samples and not died:
            final = sample(proc.pid, start, soak)
            if final is not None:
                samples.append(final)
            check_left_over(soak)
        exit_status = stop_daemon(proc)
    print("\n" + summary(samples, args.window))
    with soak.lock:
        counts = dict(sorted(soak.counts.items()))
    print("counts: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    print(log_summary(log))
    if args.csv:
        write_csv(args.csv, samples)
    if args.log:
        shutil.copyfile(log, args.log)
    failed = died or exit_status != 0 or counts.get("wrong", 0) > 0 or counts.get("unexpected", 0) > 0
    if died or exit_status != 0:
        print(f"daemon exit status {exit_status}; last lines of its log:")
        print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    print(f"daemon exit status {exit_status}; {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3600, help="seconds of load (default 3600)")
    parser.add_argument("--interval", type=float, default=10, help="seconds between samples (default 10)")
    parser.add_argument("--window", type=float, default=600, help="seconds per summary row (default 600)")
    parser.add_argument("--size", type=parse_size, default=256 * MiB, help="writable exports' size (default 256M)")
    parser.add_argument("--csv", type=Path, help="write the samples here")
    parser.add_argument("--log", type=Path, help="keep the daemon's log here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", action="append", default=[], help="a worker not to run (repeatable)")
    parser.add_argument(
        "--daemon-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment of the daemon only (repeatable), e.g. MALLOC_ARENA_MAX=2 to tell heap retention from leaks",
    )
    args = parser.parse_args()
    if args.size < 256 * MiB:
        parser.error("--size must be at least 256M (the workers' regions need it)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    tmp_root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="soak-", dir=tmp_root) as tmp:
        return soak_run(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
