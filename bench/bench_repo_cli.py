#!/usr/bin/env python3
"""``nbd-backup repo backup`` / ``restore`` as a user runs them, beside what QEMU's tools do with the same
disk: wall-clock seconds and MiB/s of disk bytes, and the bytes each backup takes on disk.

Disks (on --dir, tmpfs by default): dense random, and half-sparse (alternating 8 MiB of random data and
8 MiB holes). For each: a full `repo backup` from the file and from a qemu-nbd export of it, `qemu-img
convert` to raw and to compressed qcow2 (QEMU's own full copies), an incremental `repo backup` after 1 %
of the disk changed in 64 KiB pieces (the whole source re-read, only changed chunks stored), and `repo
restore` beside `qemu-img convert` of the compressed qcow2 back to raw.

    .venv/bin/python bench/bench_repo_cli.py                       # 1 GiB disks on /dev/shm
    .venv/bin/python bench/bench_repo_cli.py --size 256M --chunk-size 1M

Not part of the test suite: numbers depend on the machine and on whoever else is using it.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
RUN = 8 * MiB


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def timed(*argv: str | Path) -> float:
    start = time.perf_counter()
    subprocess.run([str(a) for a in argv], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - start


def ours(*args: str | Path) -> list[str | Path]:
    return [sys.executable, "-m", "server.cli", "repo", *args]


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def make_disk(path: Path, size: int, sparse: bool, rnd: random.Random) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, 2 * RUN if sparse else RUN):
            f.seek(offset)
            f.write(rnd.randbytes(min(RUN, size - offset)))


def change(path: Path, size: int, rnd: random.Random, percent: float = 1.0) -> None:
    with open(path, "r+b") as f:
        for _ in range(int(size * percent / 100) // (64 << 10)):
            f.seek(rnd.randrange(0, size // (64 << 10)) * (64 << 10))
            f.write(rnd.randbytes(64 << 10))


def row(name: str, seconds: float, size: int, stored: int | None = None) -> None:
    extra = f"{stored / MiB:10.1f} MiB" if stored is not None else ""
    print(f"  {name:44s} {seconds:7.2f} s {size / MiB / seconds:9.0f} MiB/s {extra}")


def bench(work: Path, size: int, chunk_size: str, sparse: bool) -> None:
    rnd = random.Random(1)
    disk = work / "disk.raw"
    make_disk(disk, size, sparse, rnd)
    print(f"{'half-sparse' if sparse else 'dense'} {size // MiB} MiB disk:")
    repo = work / "repo"
    subprocess.run(ours("init", repo, "--chunk-size", chunk_size), check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    row("repo backup (raw file)", timed(*ours("backup", "--no-progress", repo, "a", disk)), size, du(repo))
    sock = work / "qemu-nbd.sock"
    pid = work / "qemu-nbd.pid"
    server = subprocess.Popen(["qemu-nbd", "-k", sock, "-f", "raw", "-r", "-t", "--pid-file", pid, "-x", "d", disk])
    try:
        while not pid.exists():
            time.sleep(0.01)
        uri = f"nbd+unix:///d?socket={sock}"
        row("repo backup (qemu-nbd export)", timed(*ours("backup", "--no-progress", repo, "b", uri)), size)
    finally:
        server.terminate()
        server.wait()
    raw, qcow2 = work / "copy.raw", work / "copy.qcow2"
    row("qemu-img convert -O raw", timed("qemu-img", "convert", "-O", "raw", disk, raw), size, du(raw))
    row("qemu-img convert -O qcow2 -c", timed("qemu-img", "convert", "-c", "-O", "qcow2", disk, qcow2), size, du(qcow2))
    before = du(repo)
    change(disk, size, rnd)
    seconds = timed(*ours("backup", "--no-progress", repo, "a", disk))
    row("repo backup, incremental after 1 % change", seconds, size, du(repo) - before)
    restored = work / "restored.raw"
    row("repo restore", timed(*ours("restore", "--no-progress", repo, "a", restored)), size)
    restored.unlink()
    row("qemu-img convert qcow2 -> raw", timed("qemu-img", "convert", "-O", "raw", qcow2, restored), size)
    for path in (raw, qcow2, restored, disk):
        path.unlink()
    shutil.rmtree(repo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--chunk-size", default="4M")
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = parser.parse_args()
    size = parse_size(args.size)
    for sparse in (False, True):
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-repo-cli-") as work:
            bench(Path(work), size, args.chunk_size, sparse)


if __name__ == "__main__":
    main()
