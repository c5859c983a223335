#!/usr/bin/env python3
# ruff: noqa: ASYNC240  (file housekeeping between the timed sections)
"""The backup repository against QEMU's own backups (issue 15, "Performance"), in one run.

Two disks on tmpfs (``--dir``): dense random, and half-sparse (8 MiB of random data, 8 MiB hole, …).
For each disk and each repetition (the contenders' order rotated per repetition):

1. full backup: ``nbd-backup repo backup`` from the raw file and from a ``qemu-nbd -r`` export of it,
   each into a fresh repository (the command as a user runs it, process start included), against
   qemu-storage-daemon ``drive-backup`` sync=full of the same file to raw, qcow2 and compressed qcow2
   (command to BLOCK_JOB_COMPLETED);
2. restore: ``repo restore`` to a raw file (compared with the source: a fast wrong result fails the
   run) against ``qemu-img convert -O raw`` of QEMU's qcow2 and compressed qcow2 backups;
3. instant restore: ``nbdcopy … null:`` of the ``d@latest`` export of ``serve --repo-exports`` against
   the same reader on ``qemu-nbd -r`` serving each qcow2 backup;
4. incremental: through each daemon from a pristine copy of the disk, a full backup that starts
   bitmap ``b0`` in the same transaction, then ``--changes`` percent of the disk rewritten in random
   64 KiB pieces through the daemon's NBD export before each incremental: ours is
   ``repo-snapshot-begin parent=latest`` + ``blockdev-backup sync=incremental bitmap=b0`` +
   ``repo-snapshot-commit`` (timed from begin to commit's reply), once per ``--chunk-sizes``;
   QEMU's is ``drive-backup sync=incremental`` into a qcow2 overlay of the previous backup (overlay
   made before the clock starts; command to BLOCK_JOB_COMPLETED). Bytes stored: what the
   repository directory / the overlay file grew by on disk (du; ours also the commit's new-bytes: du
   counts chunks that no snapshot references, which ``repo gc`` frees). Chunks touched: the share of
   the repository's chunks that contain a changed piece (each is re-stored whole);
5. the memory of ``repo backup`` and ``repo restore`` (peak RSS, ``/usr/bin/time -f %M``) for sparse
   disks of the ``--rss-sizes`` (1 MiB of random data every 64 MiB): flat in the disk's size?

Once per disk after the repetitions: 7 daily backups (a full + 6 incrementals, 1 % daily change) in
each repository chunk size and in QEMU's qcow2 chain, bytes on disk (the repository's also after
``repo gc``); the last snapshot of each chain is restored and compared with the source.

Medians of the repetitions with [min-max]; ratios ours ÷ QEMU are of speeds (QEMU's time ÷ ours, per
repetition) and of bytes (ours ÷ QEMU's: below 1 is smaller); the CPU seconds (user + system) of our
commands and of ``qemu-img convert`` (steadier than times on a shared machine). The machine's load
average at the end.

    .venv/bin/python bench/bench_repo.py                              # 1 GiB disks, 5 reps (~10 min)
    .venv/bin/python bench/bench_repo.py --json samples.json          # also every sample
    .venv/bin/python bench/bench_repo.py --size 64M --reps 2          # a quick check, not a measurement
    .venv/bin/python bench/bench_repo.py --reps 3 --only restore      # full backups and restores only

Not part of the test suite: numbers depend on the machine and on whoever else is using it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_incremental import wait_completed  # noqa: E402
from guest_cost import export_source, ours_daemon, parse_size, qemu_daemon  # noqa: E402

MiB = 1 << 20
PIECE = 64 << 10  # one change: a random 64 KiB piece
DISK = "d"
BIG_RUN, SMALL_RUN = 8 * MiB, MiB
#: What ``--only`` chooses from (the full backup from a file and QEMU's full backups always run).
PARTS = ("nbd", "restore", "instant", "incremental", "dailies", "memory")


# --- disks, children, files -----------------------------------------------------------------------


def make_disk(path: Path, size: int, run: int, period: int) -> None:
    """Random data in ``run`` bytes at the start of every ``period`` (dense: run == period), holes between."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, period):
            f.seek(offset)
            f.write(os.urandom(min(run, size - offset)))


def _run_child(argv: Sequence[str | Path]) -> tuple[float, int, float]:
    # Peak RSS from /usr/bin/time, not from our own wait4: a child forked from this (large) process
    # keeps the parent's pre-exec high-water mark in its ru_maxrss.
    with tempfile.NamedTemporaryFile("r", prefix="rss-") as rss:
        command = ["/usr/bin/time", "-f", "%M %U %S", "-o", rss.name, *map(str, argv)]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - start
        if proc.returncode:
            err = proc.stderr.decode(errors="replace")[-500:]
            raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}): {err}")
        kib, user, system = rss.read().split()[-3:]
        return elapsed, int(kib), float(user) + float(system)


async def child(*argv: str | Path) -> tuple[float, int]:
    """(seconds, peak RSS KiB) of a command run to success."""
    return (await timed_child(*argv))[:2]


async def timed_child(*argv: str | Path) -> tuple[float, int, float]:
    """(seconds, peak RSS KiB, CPU seconds: user + system) of a command run to success."""
    return await asyncio.to_thread(_run_child, argv)


def ours(*args: str | Path) -> list[str | Path]:
    return [sys.executable, "-m", "server.cli", "repo", *args]


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def same_bytes(a: Path, b: Path) -> None:
    if subprocess.run(["cmp", "-s", str(a), str(b)]).returncode:
        raise RuntimeError(f"WRONG RESULT: {b} differs from {a}")


async def init_repo(path: Path, chunk_size: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    await child(*ours("init", path, "--chunk-size", chunk_size))


@contextlib.asynccontextmanager
async def qemu_nbd(work: Path, image: Path, fmt: str) -> AsyncIterator[str]:
    """``qemu-nbd -r`` serving ``image`` on a unix socket; yields its URI."""
    sock, pid = work / "qemu-nbd.sock", work / "qemu-nbd.pid"
    pid.unlink(missing_ok=True)
    proc = await asyncio.create_subprocess_exec(
        "qemu-nbd", "-r", "-t", "-f", fmt, "-k", str(sock), "-x", DISK, "--pid-file", str(pid), str(image),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (pid.exists() and pid.stat().st_size):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd did not start")
            await asyncio.sleep(0.01)
        yield f"nbd+unix:///{DISK}?socket={sock}"
    finally:
        proc.terminate()
        await proc.wait()


# --- the samples ----------------------------------------------------------------------------------


@dataclass
class Samples:
    """Every measurement of one disk, a list per name (one entry per repetition)."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def get(self, name: str) -> list[float]:
        return self.values.get(name, [])


def med(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{fmt.format(mid)} [{fmt.format(low)}-{fmt.format(high)}]"


def speed_ratio(ours_s: Sequence[float], qemu_s: Sequence[float]) -> list[float]:
    """Per repetition: QEMU's time ÷ ours (above 1: ours is faster)."""
    if not ours_s or not qemu_s:
        return []  # a part left out (--only)
    return [q / o for o, q in zip(ours_s, qemu_s, strict=True)]


# --- 1-3: full backup, restore, instant restore ---------------------------------------------------


async def ours_full(s: Samples, work: Path, source: Path, via_nbd: bool, chunk_size: str) -> Path:
    repo = work / ("repo-nbd" if via_nbd else "repo-file")
    await init_repo(repo, chunk_size)
    if via_nbd:
        async with qemu_nbd(work, source, "raw") as uri:
            seconds, rss, cpu = await timed_child(*ours("backup", "--no-progress", repo, DISK, uri))
    else:
        s.add("startup", (await child(*ours("list", repo)))[0])  # the CLI's start-up, for scale
        seconds, rss, cpu = await timed_child(*ours("backup", "--no-progress", repo, DISK, source))
    kind = "nbd" if via_nbd else "file"
    s.add(f"full/ours-{kind}", seconds)
    s.add(f"full/ours-{kind}/rss", rss)
    s.add(f"full/ours-{kind}/cpu", cpu)
    s.add(f"full/ours-{kind}/bytes", du(repo))
    return repo


async def qemu_full(s: Samples, work: Path, source: Path) -> dict[str, Path]:
    targets = {"raw": work / "full.raw", "qcow2": work / "full.qcow2", "qcow2c": work / "full-c.qcow2"}
    async with qemu_daemon(work / "qsd") as qmp:
        await export_source(qmp, source, work / "qsd" / "nbd.sock")
        for i, (kind, target) in enumerate(targets.items()):
            target.unlink(missing_ok=True)
            args: dict[str, Any] = {"job-id": f"f{i}", "device": "src", "target": str(target), "sync": "full"}
            args["format"] = "raw" if kind == "raw" else "qcow2"
            if kind == "qcow2c":
                args["compress"] = True
            start = time.perf_counter()
            await qmp.ok("drive-backup", **args)
            await wait_completed(qmp, f"f{i}")
            s.add(f"full/qemu-{kind}", time.perf_counter() - start)
            s.add(f"full/qemu-{kind}/bytes", du(target))
    return targets


async def restores(s: Samples, work: Path, source: Path, repo: Path, qcow2: dict[str, Path], rep: int) -> None:
    out = work / "restored.raw"
    runs: list[tuple[str, list[str | Path]]] = [
        ("ours", ours("restore", "--no-progress", "--force", repo, f"{DISK}@latest", out)),
        ("qemu-qcow2", ["qemu-img", "convert", "-O", "raw", qcow2["qcow2"], out]),
        ("qemu-qcow2c", ["qemu-img", "convert", "-O", "raw", qcow2["qcow2c"], out]),
    ]
    for name, argv in rotate(runs, rep):
        out.unlink(missing_ok=True)
        seconds, rss, cpu = await timed_child(*argv)
        s.add(f"restore/{name}", seconds)
        s.add(f"restore/{name}/cpu", cpu)
        if name == "ours":
            s.add("restore/ours/rss", rss)
            same_bytes(source, out)
    out.unlink(missing_ok=True)


async def instant_restores(s: Samples, work: Path, source: Path, repo: Path, qcow2: dict[str, Path], rep: int) -> None:
    """nbdcopy of the whole export to null: (in the first repetition also to a file, compared)."""

    async def read(name: str, uri: str) -> None:
        seconds, _ = await child("nbdcopy", uri, "null:")
        s.add(f"instant/{name}", seconds)
        if rep == 0:
            copy = work / "instant.raw"
            await child("nbdcopy", uri, copy)
            same_bytes(source, copy)
            copy.unlink()

    async def ours_read() -> None:
        sock = work / "exports.sock"
        async with ours_daemon(work / "serve", "--repo", str(repo), "--repo-exports", "--nbd-socket", str(sock)):
            await read("ours", f"nbd+unix:///{DISK}@latest?socket={sock}")

    async def qemu_read(kind: str) -> None:
        async with qemu_nbd(work, qcow2[kind], "qcow2") as uri:
            await read(f"qemu-{kind}", uri)

    for run in rotate([ours_read, lambda: qemu_read("qcow2"), lambda: qemu_read("qcow2c")], rep):
        await run()


# --- 4-5: incrementals through the daemons ---------------------------------------------------------


@dataclass
class Step:
    seconds: float
    stored: int  # bytes the backup added on disk
    new: int = 0  # ours: the commit's new-bytes
    touched: float = 0.0  # ours: the share of chunks holding a change


async def write_changes(uri: str, size: int, percent: float, rnd: random.Random) -> list[int]:
    """Rewrite ``percent`` of the disk in random 64 KiB pieces of random data through an NBD export."""
    from nbd.client import NbdClient

    count = max(1, round(size * percent / 100 / PIECE))
    pieces = sorted(rnd.sample(range(size // PIECE), count))
    client = await NbdClient.connect(uri, connections=1)
    async with client:
        for piece in pieces:
            await client.pwrite(piece * PIECE, rnd.randbytes(PIECE))
        await client.flush()
    return pieces


def touched(pieces: Sequence[int], size: int, chunk: int) -> float:
    """The share of the disk's chunks that hold at least one changed piece."""
    return len({p * PIECE // chunk for p in pieces}) / -(-size // chunk)


async def ours_chain(
    work: Path, source: Path, size: int, chunk_size: str, changes: Sequence[float], seed: int
) -> tuple[list[Step], Path]:
    """A full backup through our daemon, then one incremental after each change; (steps, repository)."""
    repo = work / f"repo-{chunk_size}"
    await init_repo(repo, chunk_size)
    rnd = random.Random(seed)
    steps: list[Step] = []
    async with ours_daemon(work / "serve", "--repo", str(repo)) as qmp:
        await export_source(qmp, source, work / "serve" / "nbd.sock")
        uri = f"nbd+unix:///disk?socket={work / 'serve' / 'nbd.sock'}"
        for i, percent in enumerate([0.0, *changes]):
            pieces = await write_changes(uri, size, percent, rnd) if i else []
            before = du(repo)
            node, job = f"snap{i}", f"j{i}"
            start = time.perf_counter()
            begin = {"disk": DISK, "size": size, "parent": "latest" if i else "none", "node-name": node}
            await qmp.ok("repo-snapshot-begin", **begin)
            backup = {"job-id": job, "device": "src", "target": node, "sync": "full"}
            if i:
                await qmp.ok("blockdev-backup", **(backup | {"sync": "incremental", "bitmap": "b0"}))
            else:
                bitmap = {"node": "src", "name": "b0"}
                actions = [
                    {"type": "block-dirty-bitmap-add", "data": bitmap},
                    {"type": "blockdev-backup", "data": backup},
                ]
                await qmp.ok("transaction", actions=actions)
            await wait_completed(qmp, job)
            committed = await qmp.ok("repo-snapshot-commit", **{"node-name": node})
            seconds = time.perf_counter() - start
            if i and not committed["new-bytes"]:
                raise RuntimeError(f"WRONG RESULT: incremental {i} stored nothing after a {percent} % change")
            share = touched(pieces, size, parse_size(chunk_size))
            steps.append(Step(seconds, du(repo) - before, new=committed["new-bytes"], touched=share))
    return steps, repo


async def qemu_chain(work: Path, source: Path, size: int, changes: Sequence[float], seed: int) -> list[Step]:
    """QEMU's full drive-backup to qcow2 (+ bitmap b0), then incrementals into a chain of qcow2 overlays."""
    rnd = random.Random(seed)
    steps: list[Step] = []
    qsd = work / "qsd"
    images = [work / f"qemu-{i}.qcow2" for i in range(len(changes) + 1)]
    async with qemu_daemon(qsd) as qmp:
        await export_source(qmp, source, qsd / "nbd.sock")
        uri = f"nbd+unix:///disk?socket={qsd / 'nbd.sock'}"
        for i, percent in enumerate([0.0, *changes]):
            if i:
                await write_changes(uri, size, percent, rnd)
            image, job = images[i], f"j{i}"
            image.unlink(missing_ok=True)
            args: dict[str, Any] = {"job-id": job, "device": "src", "target": str(image), "format": "qcow2"}
            if i:
                await child("qemu-img", "create", "-q", "-f", "qcow2", "-b", images[i - 1], "-F", "qcow2", image)
                start = time.perf_counter()
                await qmp.ok("drive-backup", **args, sync="incremental", bitmap="b0", mode="existing")
            else:
                start = time.perf_counter()
                bitmap = {"node": "src", "name": "b0"}
                actions = [
                    {"type": "drive-backup", "data": args | {"sync": "full"}},
                    {"type": "block-dirty-bitmap-add", "data": bitmap},
                ]
                await qmp.ok("transaction", actions=actions)
            await wait_completed(qmp, job)
            steps.append(Step(time.perf_counter() - start, du(image)))
    return steps


async def incrementals(
    s: Samples, work: Path, pristine: Path, size: int, chunk_sizes: Sequence[str], changes: Sequence[float], rep: int
) -> None:
    source = work / "source.raw"

    async def ours_run(chunk: str) -> None:
        shutil.copyfile(pristine, source)
        steps, repo = await ours_chain(work, source, size, chunk, changes, seed=rep)
        s.add(f"inc/ours-{chunk}/full", steps[0].seconds)
        s.add(f"inc/ours-{chunk}/full/bytes", steps[0].stored)
        s.add(f"inc/ours-{chunk}/full/new", steps[0].new)
        for percent, step in zip(changes, steps[1:], strict=True):
            s.add(f"inc/ours-{chunk}/{percent:g}", step.seconds)
            s.add(f"inc/ours-{chunk}/{percent:g}/bytes", step.stored)
            s.add(f"inc/ours-{chunk}/{percent:g}/new", step.new)
            s.add(f"inc/touched-{chunk}/{percent:g}", step.touched)
        shutil.rmtree(repo)

    async def qemu_run() -> None:
        shutil.copyfile(pristine, source)
        steps = await qemu_chain(work, source, size, changes, seed=rep)
        s.add("inc/qemu/full", steps[0].seconds)
        s.add("inc/qemu/full/bytes", steps[0].stored)
        for percent, step in zip(changes, steps[1:], strict=True):
            s.add(f"inc/qemu/{percent:g}", step.seconds)
            s.add(f"inc/qemu/{percent:g}/bytes", step.stored)
        for image in work.glob("qemu-*.qcow2"):
            image.unlink()

    runs = [*(lambda c=c: ours_run(c) for c in chunk_sizes), qemu_run]
    for run in rotate(runs, rep):
        await run()
    source.unlink(missing_ok=True)


async def dailies(s: Samples, work: Path, pristine: Path, size: int, chunk_sizes: Sequence[str], days: int) -> None:
    """``days`` daily backups with 1 % daily change: bytes on disk; each chain's last snapshot checked."""
    source = work / "source.raw"
    changes = [1.0] * (days - 1)
    for chunk in chunk_sizes:
        shutil.copyfile(pristine, source)
        _, repo = await ours_chain(work, source, size, chunk, changes, seed=1000)
        s.add(f"daily/ours-{chunk}", du(repo))
        await child(*ours("gc", repo))  # frees what no snapshot references (see the report)
        s.add(f"daily/ours-{chunk}/gc", du(repo))
        out = work / "daily.raw"
        await child(*ours("restore", "--no-progress", "--force", repo, f"{DISK}@latest", out))
        same_bytes(source, out)
        out.unlink()
        shutil.rmtree(repo)
    shutil.copyfile(pristine, source)
    steps = await qemu_chain(work, source, size, changes, seed=1000)
    s.add("daily/qemu", sum(step.stored for step in steps))
    for image in work.glob("qemu-*.qcow2"):
        image.unlink()
    source.unlink()


# --- 6: memory ------------------------------------------------------------------------------------


async def memory(s: Samples, work: Path, disks: dict[int, Path], chunk_size: str) -> None:
    for size, disk in disks.items():
        repo, out = work / "repo-rss", work / "rss.raw"
        await init_repo(repo, chunk_size)
        _, rss = await child(*ours("backup", "--no-progress", repo, DISK, disk))
        s.add(f"rss/backup/{size}", rss)
        _, rss = await child(*ours("restore", "--no-progress", repo, DISK, out))
        s.add(f"rss/restore/{size}", rss)
        if out.stat().st_size != size:
            raise RuntimeError(f"WRONG RESULT: restored {out.stat().st_size} bytes of {size}")
        out.unlink()
        shutil.rmtree(repo)


# --- the run and the report -----------------------------------------------------------------------


def rotate(items: Sequence[Any], rep: int) -> list[Any]:
    k = rep % len(items)
    return [*items[k:], *items[:k]]


async def one_rep(s: Samples, work: Path, source: Path, args: argparse.Namespace, rep: int) -> None:
    repo: dict[str, Path] = {}
    qcow2: dict[str, Path] = {}

    async def file_run() -> None:
        repo["file"] = await ours_full(s, work, source, False, args.chunk_sizes[0])

    async def nbd_run() -> None:
        shutil.rmtree(await ours_full(s, work, source, True, args.chunk_sizes[0]))

    async def qemu_run() -> None:
        qcow2.update(await qemu_full(s, work, source))

    runs = [file_run, nbd_run, qemu_run] if "nbd" in args.only else [file_run, qemu_run]
    for run in rotate(runs, rep):
        await run()
    (work / "full.raw").unlink()
    if "restore" in args.only:
        await restores(s, work, source, repo["file"], qcow2, rep)
    if "instant" in args.only:
        await instant_restores(s, work, source, repo["file"], qcow2, rep)
    shutil.rmtree(repo["file"])
    for path in qcow2.values():
        path.unlink(missing_ok=True)
    if "incremental" in args.only:
        await incrementals(s, work, source, args.size, args.chunk_sizes, args.changes, rep)


def full_table(s: Samples, size: int) -> list[str]:
    def mib_s(name: str) -> list[float]:
        return [size / MiB / t for t in s.get(name)]

    lines = [
        "| measure | ours MiB/s | QEMU MiB/s | ours ÷ QEMU | bar |",
        "|---|---|---|---|---|",
    ]
    rows = [
        ("full: repo backup from file / drive-backup to raw", "full/ours-file", "full/qemu-raw", "≥ 0.8"),
        ("full: repo backup from file / drive-backup to qcow2", "full/ours-file", "full/qemu-qcow2", ""),
        ("full: repo backup from file / drive-backup to qcow2 compressed", "full/ours-file", "full/qemu-qcow2c", "≥ 2"),
        ("full: repo backup from qemu-nbd / drive-backup to raw", "full/ours-nbd", "full/qemu-raw", "≥ 0.8"),
        ("full: repo backup from qemu-nbd / drive-backup qcow2 compressed", "full/ours-nbd", "full/qemu-qcow2c", "≥ 2"),
        ("restore: repo restore / qemu-img convert of qcow2", "restore/ours", "restore/qemu-qcow2", "≥ 1.0"),
        (
            "restore: repo restore / qemu-img convert of qcow2 compressed",
            "restore/ours",
            "restore/qemu-qcow2c",
            "≥ 1.0",
        ),
        ("instant restore read: d@latest / qemu-nbd qcow2", "instant/ours", "instant/qemu-qcow2", ""),
        ("instant restore read: d@latest / qemu-nbd qcow2 compressed", "instant/ours", "instant/qemu-qcow2c", ""),
    ]
    for label, o, q, bar in rows:
        ratio = speed_ratio(s.get(o), s.get(q))
        lines.append(f"| {label} | {med(mib_s(o))} | {med(mib_s(q))} | {med(ratio, '{:.2f}')} | {bar} |")
    lines.append("")
    stored = ", ".join(
        f"{n} {med([b / MiB for b in s.get(k)], '{:.0f}')}"
        for n, k in [
            ("repo", "full/ours-file/bytes"),
            ("raw", "full/qemu-raw/bytes"),
            ("qcow2", "full/qemu-qcow2/bytes"),
            ("qcow2 compressed", "full/qemu-qcow2c/bytes"),
        ]
    )
    lines.append(f"Full backup on disk, MiB: {stored}.")
    rss = ", ".join(f"{n} {med([k / 1024 for k in s.get(key)], '{:.0f}')}" for n, key in [
        ("backup from file", "full/ours-file/rss"), ("from qemu-nbd", "full/ours-nbd/rss"),
        ("restore", "restore/ours/rss"),
    ])  # fmt: skip
    lines.append(f"Peak RSS of the repo commands, MiB: {rss}.")
    cpu = ", ".join(f"{n} {med(s.get(key), '{:.2f}')}" for n, key in [
        ("repo backup from file", "full/ours-file/cpu"), ("from qemu-nbd", "full/ours-nbd/cpu"),
        ("repo restore", "restore/ours/cpu"), ("qemu-img convert of qcow2", "restore/qemu-qcow2/cpu"),
        ("of qcow2 compressed", "restore/qemu-qcow2c/cpu"),
    ])  # fmt: skip
    lines.append(f"CPU seconds (user + system) of the commands: {cpu}.")
    lines.append(
        "The CLI's start-up (repo list of an empty repository), inside every repo time:"
        f" {med(s.get('startup'), '{:.2f}')} s."
    )
    return lines


def incremental_table(s: Samples, chunk_sizes: Sequence[str], changes: Sequence[float]) -> list[str]:
    head = "| change | " + " | ".join(
        f"chunks touched ({c}) | ours {c} ms | ours {c} MiB stored | ours {c} ÷ QEMU speed" for c in chunk_sizes
    )
    lines = [head + " | QEMU ms | QEMU MiB stored |", "|---" * (2 + 4 * len(chunk_sizes) + 1) + "|"]
    for label, suffix in [("full (QMP)", "full"), *((f"{p:g} %", f"{p:g}") for p in changes)]:
        cells = [label]
        for c in chunk_sizes:
            key = f"inc/ours-{c}/{suffix}"
            share = s.get(f"inc/touched-{c}/{suffix}")
            cells += [
                med([v * 100 for v in share], "{:.1f}") + " %" if share else "-",
                med([t * 1000 for t in s.get(key)]),
                med([b / MiB for b in s.get(f"{key}/bytes")], "{:.1f}"),
                med(speed_ratio(s.get(key), s.get(f"inc/qemu/{suffix}")), "{:.2f}"),
            ]
        cells += [
            med([t * 1000 for t in s.get(f"inc/qemu/{suffix}")]),
            med([b / MiB for b in s.get(f"inc/qemu/{suffix}/bytes")], "{:.1f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for c in chunk_sizes:
        new = ", ".join(
            f"{label} {med([b / MiB for b in s.get(f'inc/ours-{c}/{suffix}/new')], '{:.1f}')}"
            for label, suffix in [("full", "full"), *((f"{p:g} %", f"{p:g}") for p in changes)]
        )
        shares = ", ".join(f"{p:g} % → {100 * (1 - (1 - p / 100) ** (parse_size(c) // PIECE)):.1f} %" for p in changes)
        lines.append(
            f"Ours {c}: chunks touched by scattered 64 KiB pieces, expected 1-(1-p)^{parse_size(c) // PIECE}: {shares}."
        )
        lines.append(f"Ours {c}: the commits' new-bytes (MiB; the table's 'stored' is du of the repository): {new}.")
    return lines


def daily_line(s: Samples, chunk_sizes: Sequence[str], days: int) -> str:
    qemu = s.get("daily/qemu")
    parts = [f"QEMU qcow2 full + {days - 1} overlays {qemu[0] / MiB:.1f} MiB" if qemu else "QEMU -"]
    for c in chunk_sizes:
        ours_b = s.get(f"daily/ours-{c}")
        if ours_b and qemu:
            after = s.get(f"daily/ours-{c}/gc")[0]
            parts.append(
                f"repository ({c} chunks) {ours_b[0] / MiB:.1f} MiB ({ours_b[0] / qemu[0]:.2f} x QEMU),"
                f" after repo gc {after / MiB:.1f} MiB ({after / qemu[0]:.2f} x)"
            )
    return f"{days} daily backups, 1 % daily change, on disk: " + "; ".join(parts)


def memory_lines(s: Samples, rss_sizes: Sequence[int]) -> list[str]:
    lines = []
    for what in ("backup", "restore"):
        cells = [f"{size // MiB} MiB disk {med([k / 1024 for k in s.get(f'rss/{what}/{size}')], '{:.1f}')}"
                 for size in rss_sizes]  # fmt: skip
        first, last = s.get(f"rss/{what}/{rss_sizes[0]}"), s.get(f"rss/{what}/{rss_sizes[-1]}")
        ratio = f" (largest ÷ smallest {med([b / a for a, b in zip(first, last, strict=True)], '{:.3f}')})"
        bar = " (bar: within 10 %)" if what == "backup" else ""
        lines.append(f"Peak RSS of repo {what}, MiB: " + ", ".join(cells) + ratio + bar)
    return lines


async def main_async(args: argparse.Namespace) -> int:
    kinds = {"dense": (args.size, args.size), "half-sparse": (BIG_RUN, 2 * BIG_RUN)}
    results = {kind: Samples() for kind in kinds}
    memory_samples = Samples()
    with tempfile.TemporaryDirectory(prefix="bench-repo-", dir=args.dir) as tmp:
        base = Path(tmp)
        sources: dict[str, Path] = {}
        for kind, (run, period) in kinds.items():
            sources[kind] = base / f"{kind}.raw"
            make_disk(sources[kind], args.size, run, period)
            for sub in ("serve", "qsd"):
                (base / kind / sub).mkdir(parents=True)
        rss_disks = {size: base / f"rss-{size}.raw" for size in args.rss_sizes if "memory" in args.only}
        for size, path in rss_disks.items():
            make_disk(path, size, SMALL_RUN, 64 * MiB)
        started = time.monotonic()
        for rep in range(args.reps):
            for kind in rotate(list(kinds), rep):
                await one_rep(results[kind], base / kind, sources[kind], args, rep)
                print(f"# rep {rep} {kind} done at {time.monotonic() - started:.0f} s", flush=True)
            if "memory" in args.only:
                await memory(memory_samples, base, rss_disks, args.chunk_sizes[0])
            print(f"# rep {rep} done at {time.monotonic() - started:.0f} s", flush=True)
        for kind in kinds if "dailies" in args.only else ():
            await dailies(results[kind], base / kind, sources[kind], args.size, args.chunk_sizes, args.days)
        print(f"# dailies done at {time.monotonic() - started:.0f} s", flush=True)
    print()
    for kind, s in results.items():
        print(f"## {kind} {args.size // MiB} MiB disk on {args.dir}: median [min-max] of {args.reps} interleaved reps")
        print()
        print("\n".join(full_table(s, args.size)))
        print()
        print("\n".join(incremental_table(s, args.chunk_sizes, args.changes)))
        print()
        print(daily_line(s, args.chunk_sizes, args.days))
        print()
    print("\n".join(memory_lines(memory_samples, args.rss_sizes)))
    print(
        "\nours ÷ QEMU: QEMU's time ÷ ours, per repetition (above 1: ours faster). full (QMP): our daemon's full"
        " into the repository vs QEMU's drive-backup to qcow2. Chunks touched: the share of chunks holding a"
        " changed 64 KiB piece (each is read and stored whole). RSS disks: 1 MiB of data every 64 MiB."
    )
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        dump = {kind: s.values for kind, s in results.items()} | {"memory": memory_samples.values}
        Path(args.json).write_text(json.dumps(dump, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="disk size (default 1G)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--chunk-sizes", type=lambda t: t.split(","), default=["4M", "256K"])
    parser.add_argument("--changes", type=lambda t: [float(x) for x in t.split(",")], default=[0.1, 1.0, 5.0],
                        help="percent of the disk changed before each incremental")  # fmt: skip
    parser.add_argument("--days", type=int, default=7, help="daily backups in the bytes-on-disk chain")
    parser.add_argument("--rss-sizes", type=lambda t: [parse_size(x) for x in t.split(",")], default=[1 << 30, 8 << 30])
    parser.add_argument("--dir", default="/dev/shm", help="tmpfs directory for disks and backups")
    parser.add_argument("--json", help="also write the raw samples here")
    parts = ",".join(PARTS)
    parser.add_argument("--only", type=lambda t: set(t.split(",")), default=set(PARTS),
                        help=f"parts to run besides the full backup from a file (default all: {parts})")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nbd.loop import run

    return run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
