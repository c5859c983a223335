#!/usr/bin/env python3
"""End-to-end backups through the daemons' QMP monitors: ``nbd-backup serve`` vs ``qemu-storage-daemon``.

The same QMP sequence on both (blockdev-add file + raw, then ``drive-backup`` or a ``transaction``),
timed from sending the command to the job's ``BLOCK_JOB_COMPLETED`` event: the whole control path,
target creation included. Images live on tmpfs (/dev/shm) with random (incompressible) data.

    .venv/bin/python bench/bench_daemon.py                  # 256 MiB, 3 runs each, best kept
    .venv/bin/python bench/bench_daemon.py --size 64M --runs 1

Not part of the test suite: the machine is shared, numbers are noisy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "integration"))

from qsd import QmpSync, Qsd  # type: ignore[import-not-found]  # noqa: E402

MiB = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def make_image(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        chunk = os.urandom(MiB)
        for i in range(size // MiB):
            f.write(chunk[i % 7 :] + chunk[: i % 7])


@contextmanager
def ours(work: Path) -> Iterator[QmpSync]:
    sock, pid = work / "ours-qmp.sock", work / "ours.pid"
    with open(work / "ours.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--qmp", f"unix:{sock}", "--pid-file", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 30
        while not (pid.exists() and pid.stat().st_size):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nbd-backup serve did not start: {(work / 'ours.log').read_text()}")
            time.sleep(0.02)
        with QmpSync(sock, timeout=600) as q:
            yield q
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@contextmanager
def qemu(work: Path) -> Iterator[QmpSync]:
    with Qsd.start(work) as qsd, QmpSync(qsd.qmp_path, timeout=600) as q:
        yield q


def add_sources(q: QmpSync, images: list[Path]) -> None:
    for i, image in enumerate(images):
        q.ok("blockdev-add", driver="file", filename=str(image), **{"node-name": f"f{i}"})
        q.ok("blockdev-add", driver="raw", file=f"f{i}", **{"node-name": f"d{i}"})


def timed_backup(q: QmpSync, work: Path, images: list[Path], fmt: str, run: int) -> float:
    """Seconds from the command to the last BLOCK_JOB_COMPLETED."""
    actions = []
    for i in range(len(images)):
        target = work / f"b{run}-{i}.{fmt}"
        actions.append(
            {"type": "drive-backup", "data": {"job-id": f"j{run}-{i}", "device": f"d{i}", "target": str(target),
                                              "sync": "full", "format": fmt}}
        )  # fmt: skip
    start = time.perf_counter()
    if len(actions) == 1:
        q.ok("drive-backup", actions[0]["data"])
    else:
        q.ok("transaction", actions=actions)
    for i in range(len(images)):
        event = q.wait_event("BLOCK_JOB_COMPLETED", lambda d, i=i: d["device"] == f"j{run}-{i}", timeout=600)
        assert "error" not in event["data"], event
    elapsed = time.perf_counter() - start
    for i in range(len(images)):
        (work / f"b{run}-{i}.{fmt}").unlink()
    return elapsed


Side = Callable[[Path], AbstractContextManager[QmpSync]]


def measure(side: Side, base: Path, label: str, images: list[Path], fmt: str, runs: int) -> float:
    work = base / label
    work.mkdir(exist_ok=True)
    with side(work) as q:
        add_sources(q, images)
        return min(timed_backup(q, work, images, fmt, run) for run in range(runs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=256 * MiB, help="image size (default 256M)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon is not installed", file=sys.stderr)
        return 1
    tmp_root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="bench-daemon-", dir=tmp_root) as tmp:
        base = Path(tmp)
        one = [base / "disk0.raw"]
        make_image(one[0], args.size)
        four = [base / f"t{i}.raw" for i in range(4)]
        for image in four:
            make_image(image, args.size // 4)
        cases = [
            (f"drive-backup {args.size // MiB} MiB → raw", one, "raw"),
            (f"drive-backup {args.size // MiB} MiB → qcow2", one, "qcow2"),
            (f"transaction 4 x {args.size // 4 // MiB} MiB → raw", four, "raw"),
        ]
        print(f"{'case':<36} {'ours MiB/s':>11} {'qsd MiB/s':>10} {'ours/qsd':>9}")
        for name, images, fmt in cases:
            total = sum(p.stat().st_size for p in images) / MiB
            t_ours = measure(ours, base, "ours", images, fmt, args.runs)
            t_qsd = measure(qemu, base, "qsd", images, fmt, args.runs)
            print(f"{name:<36} {total / t_ours:>11.0f} {total / t_qsd:>10.0f} {t_qsd / t_ours:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
