#!/usr/bin/env python3
"""``nbd-backup copy`` against ``nbdcopy``, in one run, on the same data and the same servers.

    .venv/bin/python bench/bench_copy.py [--size 1G] [--runs 3] [--dir /dev/shm]

Cases (issue 3): an ``nbdkit memory`` export filled with data copied to a file on tmpfs, and that file
copied into an ``nbdkit memory`` export. Each tool runs ``--runs`` times, alternating; the table shows
the best and median MiB/s of each and the ratio of the medians (the machine is shared: noisy).

Both tools are CPU-bound here, and a large part of the cost is the kernel allocating fresh tmpfs pages:
other big files on the same tmpfs (or a busy page cache) make that slower and the numbers much noisier
(seen: medians of both tools down by a third with 3 GiB of leftovers in /dev/shm), so the benchmark
warns when it finds the tmpfs already holding more than a quarter of the copy size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


@contextmanager
def nbdkit_memory(tmp: Path, size: int, name: str) -> Iterator[str]:
    sock = tmp / f"{name}.sock"
    proc = subprocess.Popen(
        ["nbdkit", "-U", str(sock), "-f", "--exit-with-parent", "memory", f"size={size}"], stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("nbdkit did not start")
            time.sleep(0.05)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        proc.wait()


def python_env(pycache: Path) -> dict[str, str]:
    """Our runs use compiled bytecode, as an installed package does (pip compiles it): with
    PYTHONDONTWRITEBYTECODE set (as on the dev machine) every run would recompile every module —
    ~40 ms of a ~1 s copy that nbdcopy never pays. The bytecode goes to a private cache directory."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "nbd", "backup", "server"], check=True, cwd=ROOT, env=env)
    return env


def timed(argv: list[str], before: Callable[[], None], env: dict[str, str] | None = None) -> float:
    before()
    start = time.perf_counter()
    cwd = ROOT if argv[0] == sys.executable else "/"
    subprocess.run(argv, check=True, cwd=cwd, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


#: What a copy between an NBD export and a file imports before it moves a byte (``copy --help`` stops
#: short of the NBD client, ~20 ms of it).
STARTUP_IMPORTS = "import server.cli, server.copy_run, server.copy_sides, nbd.client, backup.rawfile, backup.images"


def ours(src: str, dst: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "server.cli", "copy", "--no-progress", *extra, src, dst]


def nbdcopy(src: str, dst: str) -> list[str]:
    return ["nbdcopy", src, dst]


def warn_if_busy(directory: str, size: int) -> None:
    """Say so when the file system under ``directory`` already holds a lot (see the module docstring)."""
    stat = os.statvfs(directory)
    used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
    if used > size // 4:
        print(
            f"warning: {directory} already holds {used >> 20} MiB: fresh pages are slower to get, "
            "expect slower and noisier numbers",
            file=sys.stderr,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=1 << 30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default="/dev/shm", help="tmpfs directory for the file side")
    parser.add_argument("--ours-args", default="", help="extra arguments for nbd-backup copy")
    args = parser.parse_args()
    for tool in ("nbdkit", "nbdcopy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    extra = args.ours_args.split()
    size = args.size
    warn_if_busy(args.dir, size)
    mib = size / (1 << 20)
    rows: list[tuple[str, list[float], list[float]]] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmpdir:
        tmp = Path(tmpdir)
        env = python_env(tmp / "pycache")
        out = tmp / "out.img"
        source_file = tmp / "source.img"

        def remove_out() -> None:
            out.unlink(missing_ok=True)

        with nbdkit_memory(tmp, size, "src") as src:
            fill = ["nbdcopy", "--", "[", "nbdkit", "pattern", f"size={size}", "]", src]
            subprocess.run(fill, check=True, cwd="/")
            # One untimed run each: the interpreter compiles the standard library modules it imports into
            # the fresh bytecode cache once (as an installation has them compiled already).
            timed(nbdcopy(src, str(out)), remove_out)
            timed(ours(src, str(out), extra), remove_out, env)
            theirs_t, ours_t = [], []
            for _ in range(args.runs):
                theirs_t.append(timed(nbdcopy(src, str(out)), remove_out))
                ours_t.append(timed(ours(src, str(out), extra), remove_out, env))
            rows.append(("nbdkit memory -> tmpfs file", theirs_t, ours_t))
            subprocess.run(["nbdcopy", src, str(source_file)], check=True, cwd="/")
        with nbdkit_memory(tmp, size, "dst") as dst:
            theirs_t, ours_t = [], []
            for _ in range(args.runs):
                theirs_t.append(timed(nbdcopy(str(source_file), dst), lambda: None))
                ours_t.append(timed(ours(str(source_file), dst, extra), lambda: None, env))
            rows.append(("tmpfs file -> nbdkit memory", theirs_t, ours_t))

        # What the interpreter and imports cost before any byte moves.
        startup = statistics.median(
            timed([sys.executable, "-c", STARTUP_IMPORTS], lambda: None, env) for _ in range(args.runs)
        )
    print(f"\n{mib:.0f} MiB, {args.runs} runs each, best / median MiB/s (shared 2-core machine: noisy)")
    print(f"nbd-backup start-up (python + what a copy with an NBD side imports): {startup:.2f} s\n")
    print("| case | nbdcopy | nbd-backup copy | ratio (median) | ratio without start-up |")
    print("|---|---|---|---|---|")
    for name, theirs_t, ours_t in rows:
        t_best, t_med = mib / min(theirs_t), mib / statistics.median(theirs_t)
        o_best, o_med = mib / min(ours_t), mib / statistics.median(ours_t)
        o_net = mib / max(statistics.median(ours_t) - startup, 1e-3)
        print(
            f"| {name} | {t_best:.0f} / {t_med:.0f} | {o_best:.0f} / {o_med:.0f} | {o_med / t_med:.2f}x "
            f"| {o_net / t_med:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
