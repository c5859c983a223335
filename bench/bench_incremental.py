#!/usr/bin/env python3
"""Incremental backups against qemu-storage-daemon, in one run, over the same QMP sequence on both.

1. Each daemon exports its own copy of a raw disk of random data on tmpfs (1 GiB by default); a
   ``transaction`` takes a full ``drive-backup`` (qcow2) and adds bitmap ``b0`` at the same instant; then,
   ``--incrementals`` times, 1 % of the disk is rewritten at random 64 KiB clusters through the export
   (qemu-io) and ``drive-backup sync=incremental bitmap=b0`` writes into a fresh qcow2 overlay of the
   full backup (``mode: existing``). Both daemons run at once and their incrementals alternate, so each
   pair ran within a second of each other: one takes ~15 ms and the VM's speed drifted by a third from
   minute to minute, more than the difference measured. Reported: the incremental's time (command to
   BLOCK_JOB_COMPLETED; per repetition the median of its incrementals), the median of ours ÷ QEMU's over
   the pairs, and the bytes the last image holds (``qemu-img map``, top layer) against its dirty
   clusters.
2. What recording costs the guest: fio 4 KiB random writes QD16 through the export while a bitmap is
   added and removed every half second; IOPS of the seconds with a recording bitmap ÷ those without.

Repetitions are interleaved between the daemons; medians with their range.

    .venv/bin/python bench/bench_incremental.py
    .venv/bin/python bench/bench_incremental.py --size 256M --reps 3 --runtime 6

Not part of the test suite: numbers depend on the machine and on whoever else is using it.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import guest_cost  # noqa: E402
from guest_cost import QmpAsync, export_source, fio, ours_daemon, qemu_daemon  # noqa: E402

MiB = 1 << 20
CLUSTER = 64 << 10


async def tool(*argv: str | Path) -> str:
    proc = await asyncio.create_subprocess_exec(*map(str, argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{argv[0]} failed: {out.decode(errors='replace')[-400:]}")
    return out.decode()


async def wait_completed(qmp: QmpAsync, job: str) -> None:
    event = await qmp.wait_event("BLOCK_JOB_COMPLETED", lambda d: d["device"] == job, timeout=600)
    if "error" in event["data"]:
        raise RuntimeError(f"job {job} failed: {event['data']['error']}")


def top_layer_bytes(image: Path) -> int:
    extents = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", str(image)], capture_output=True, text=True, check=True
        ).stdout
    )
    return sum(e["length"] for e in extents if e["depth"] == 0 and e["data"])


async def full_backup(qmp: QmpAsync, work: Path) -> None:
    """A full backup into ``work/full.qcow2`` that starts bitmap ``b0`` at the same instant."""
    for path in (work / "full.qcow2", work / "inc.qcow2"):
        path.unlink(missing_ok=True)
    await qmp.ok(
        "transaction",
        actions=[
            {"type": "drive-backup", "data": {"job-id": "full", "device": "src", "target": str(work / "full.qcow2"),
                                              "format": "qcow2", "sync": "full"}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0"}},
        ],
    )  # fmt: skip
    await wait_completed(qmp, "full")


async def incremental(qmp: QmpAsync, work: Path, size: int, rnd: random.Random) -> tuple[float, int]:
    """1 % of the disk rewritten through the export, then an incremental into a fresh overlay of the
    full backup: (seconds from the command to BLOCK_JOB_COMPLETED, bytes of the dirty clusters)."""
    full, inc = work / "full.qcow2", work / "inc.qcow2"
    clusters = sorted(rnd.sample(range(size // CLUSTER), max(1, size // CLUSTER // 100)))
    commands: list[str] = []
    for c in clusters:
        commands += ["-c", f"write -P {rnd.randrange(1, 255)} {c * CLUSTER} {CLUSTER}"]
    await tool("qemu-io", "-f", "raw", *commands, f"nbd+unix:///disk?socket={work / 'nbd.sock'}")
    inc.unlink(missing_ok=True)
    await tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", full, "-F", "qcow2", inc)
    started = time.perf_counter()
    await qmp.ok(
        "drive-backup", device="src", target=str(inc), format="qcow2", mode="existing", sync="incremental",
        bitmap="b0", **{"job-id": "inc"},
    )  # fmt: skip
    await wait_completed(qmp, "inc")
    return time.perf_counter() - started, len(clusters) * CLUSTER


async def incrementals(
    qmps: dict[str, QmpAsync], base: Path, size: int, seed: int, count: int
) -> dict[str, tuple[list[float], int, int]]:
    """``count`` incrementals on each daemon, alternating between them (who goes first alternates
    too), so each pair ran within a second of each other: one incremental takes ~15 ms and varied by a
    third from minute to minute on this VM, more than the difference measured. Per daemon: (seconds of
    each, bytes the last one's image holds, bytes of its dirty clusters)."""
    for who, qmp in qmps.items():
        await full_backup(qmp, base / who)
    rnds = {who: random.Random(seed) for who in qmps}  # the same clusters on both
    times: dict[str, list[float]] = {who: [] for who in qmps}
    dirty: dict[str, int] = {}
    names = list(qmps)
    for i in range(count):
        for who in names if i % 2 == 0 else names[::-1]:
            seconds, dirty[who] = await incremental(qmps[who], base / who, size, rnds[who])
            times[who].append(seconds)
    out: dict[str, tuple[list[float], int, int]] = {}
    for who, qmp in qmps.items():
        await qmp.ok("block-dirty-bitmap-remove", node="src", name="b0")
        out[who] = (times[who], top_layer_bytes(base / who / "inc.qcow2"), dirty[who])
        for path in (base / who / "full.qcow2", base / who / "inc.qcow2"):
            path.unlink(missing_ok=True)
    return out


async def recording_cost(qmp: QmpAsync, work: Path, runtime: int, segment: float) -> tuple[float, float]:
    """(IOPS without a bitmap, IOPS with one recording), from one fio run during which a bitmap is added
    and removed every ``segment`` seconds: the two states alternate many times within the same seconds
    of the same run, so what drifts over a run (page cache, tmpfs pages, CPU frequency, the other
    daemon's leftovers) falls on both equally. Separate runs with and without a bitmap differed by
    ±10 % from run to run on this VM, more than the effect measured."""
    uri = f"nbd+unix:///disk?socket={work / 'nbd.sock'}"
    guest = asyncio.create_task(fio(uri, runtime, work, unix_epoch=True))
    toggles: list[tuple[float, bool]] = []  # (Unix ms once the change is in effect, recording after it)
    recording = False
    await asyncio.sleep(0.5)  # fio connected and writing
    deadline = time.time() + runtime - 1.0
    while time.time() < deadline:
        command = "block-dirty-bitmap-remove" if recording else "block-dirty-bitmap-add"
        await qmp.ok(command, node="src", name="rec")
        recording = not recording
        toggles.append((time.time() * 1000, recording))
        await asyncio.sleep(segment)
    if recording:
        await qmp.ok("block-dirty-bitmap-remove", node="src", name="rec")
        toggles.append((time.time() * 1000, False))
    run = await guest
    completions = {False: 0, True: 0}
    spent = {False: 0.0, True: 0.0}
    times = sorted(run.times_ms)
    for (start, state), (end, _) in itertools.pairwise(toggles):
        completions[state] += bisect.bisect_left(times, end) - bisect.bisect_left(times, start)
        spent[state] += end - start
    return completions[False] / spent[False] * 1000, completions[True] / spent[True] * 1000


def med(values: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


async def main_async(args: argparse.Namespace) -> int:
    results: dict[str, dict[str, list[float]]] = {}
    paired: list[float] = []  # per repetition: the median of ours ÷ QEMU's time over the pairs
    with tempfile.TemporaryDirectory(prefix="bench-inc-", dir=args.dir) as tmp:
        base = Path(tmp)
        images = {who: base / f"source-{who}.raw" for who in args.daemons}  # each daemon locks its own
        for image in images.values():
            guest_cost.make_image(image, args.size)
        for rep in range(args.reps):
            order = args.daemons if rep % 2 == 0 else args.daemons[::-1]
            async with contextlib.AsyncExitStack() as stack:
                qmps: dict[str, QmpAsync] = {}
                for who in order:
                    work = base / who
                    work.mkdir(exist_ok=True)
                    start = ours_daemon if who == "ours" else qemu_daemon
                    qmps[who] = await stack.enter_async_context(start(work))
                    await export_source(qmps[who], images[who], work / "nbd.sock")
                incs = await incrementals(qmps, base, args.size, seed=rep, count=args.incrementals)
                costs = {who: await recording_cost(qmps[who], base / who, args.runtime, args.segment) for who in order}
            for who in order:
                seconds, held, dirty = incs[who]
                idle, recording = costs[who]
                r = results.setdefault(who, {})
                r.setdefault("seconds", []).append(statistics.median(seconds))
                r.setdefault("held", []).append(held / MiB)
                r.setdefault("dirty", []).append(dirty / MiB)
                r.setdefault("ratio", []).append(recording / idle)
                r.setdefault("idle", []).append(idle)
                print(
                    f"# rep {rep} {who}: incremental {statistics.median(seconds) * 1000:.1f} ms (median of"
                    f" {len(seconds)}), holds {held / MiB:.1f} MiB of {dirty / MiB:.1f} MiB dirty; guest {idle:.0f}"
                    f" IOPS, with a bitmap {recording:.0f}",
                    flush=True,
                )
            if "ours" in incs and "qemu" in incs:
                pairs = [o / q for o, q in zip(incs["ours"][0], incs["qemu"][0], strict=True)]
                paired.append(statistics.median(pairs))
                print(f"# rep {rep}: ours ÷ qemu incremental time, median of {len(pairs)} pairs {paired[-1]:.2f}")
    print()
    print(f"{args.size // MiB} MiB raw disk on tmpfs, 1 % rewritten in 64 KiB clusters; median [range] of {args.reps}")
    print("| daemon | incremental ms | MiB in the incremental | MiB dirty | guest IOPS | with a bitmap ÷ without |")
    print("|---|---|---|---|---|---|")
    for who, r in results.items():
        print(
            f"| {who} | {med([s * 1000 for s in r['seconds']])} | {med(r['held'], '{:.1f}')} |"
            f" {med(r['dirty'], '{:.1f}')} | {med(r['idle'])} | {med(r['ratio'], '{:.3f}')} |"
        )
    if paired:
        print(f"\nincremental time ours ÷ QEMU's, paired (each pair within a second): {med(paired, '{:.2f}')}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=guest_cost.parse_size, default=1 << 30)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--runtime", type=int, default=12, help="fio seconds per run")
    parser.add_argument("--incrementals", type=int, default=8, help="incrementals per repetition (their median)")
    parser.add_argument("--segment", type=float, default=0.5, help="seconds between adding and removing the bitmap")
    parser.add_argument("--dir", default="/dev/shm")
    parser.add_argument(
        "--daemons", type=lambda text: text.split(","), default=["ours", "qemu"], help="comma-separated: ours,qemu"
    )
    args = parser.parse_args()
    from nbd.loop import run

    return run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
