#!/usr/bin/env python3
"""The repository in S3 (moto on loopback) against our NBD client pushing into nbdkit's S3 plugin.

In one run, for a dense random disk and a half-sparse one (4 MiB data, 4 MiB hole, ...):

- ours: full backup into ``s3://…`` through the public repository API from ``--threads`` worker
  threads (what ``repo backup`` does), an incremental after ``--change`` of the disk was rewritten
  (whole disk read and hashed: unchanged chunks cost a HEAD), a restore to a file, and a second
  "host" backing up the same image into the same bucket (dedup: HEADs, no uploads);
- nbdkit: ``nbd-backup copy FILE nbd+unix://`` into ``nbdkit S3`` (1 MiB objects, the
  blocksize-policy filter so every request is whole objects), then the copy back for the restore.
  nbdkit's S3 plugin is a separate package (``nbdkit-plugin-python`` + ``boto3``); when it is not
  installed that column says so and the rest still runs.

Every step runs in its own process, so its peak RSS (ru_maxrss) is the appliance's; moto's own CPU
seconds (utime + stime of the server process) are reported per step, since on loopback the server
is a large part of where the time goes.

    .venv/bin/python bench/bench_repo_s3.py                          # 1 GiB disks on /dev/shm
    .venv/bin/python bench/bench_repo_s3.py --size 256M --threads 16 --reps 3

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MiB = 1 << 20
#: nbdkit 1.32's S3 plugin announces its object size as the minimum block size, and nbdkit refuses a
#: minimum above 64 KiB (and its maximum is the object size too): the largest objects it can serve are
#: 64 KiB, and requests are at most that (1 MiB objects need a newer nbdkit).
NBDKIT_OBJECT = "64K"

_WORKER = r"""
import json, resource, sys, time
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, sys.argv[1])
from backup.repo.repository import Repository
op, loc, disk, path, threads = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
repo = Repository.open(loc)
cs = repo.chunk_size
start = time.perf_counter()
if op == "backup":
    import os
    size = os.path.getsize(path)
    with open(path, "rb") as f, repo.begin_write(disk) as w, ThreadPoolExecutor(threads) as pool:
        parent = w.parent("latest")
        def one(i):
            return repo.store_chunk(os.pread(f.fileno(), cs, i * cs), w.lease)[0]
        digests = list(pool.map(one, range(-(-size // cs))))
        m = w.commit(size, digests, parent.id if parent else None, {})
    extra = {"new-bytes": m.stats["new-bytes"], "stored-bytes": m.stats["stored-bytes"]}
else:
    import os
    m = repo.resolve(disk)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, m.size)
    def one(i):
        d = m.chunks[i]
        if d is not None:
            os.pwrite(fd, repo.load_chunk(d, m.chunk_length(i)), i * cs)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(len(m.chunks))))
    os.close(fd)
    extra = {}
print(json.dumps({"seconds": time.perf_counter() - start,
                  "rss-mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}))
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_image(path: Path, size: int, kind: str) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 4 * MiB):
            if kind == "half-sparse" and (off // (4 * MiB)) % 2:
                continue
            f.seek(off)
            f.write(os.urandom(min(4 * MiB, size - off)))


def change(path: Path, fraction: float) -> None:
    """Rewrite ``fraction`` of the disk in random 64 KiB blocks."""
    size = path.stat().st_size
    blocks = max(1, int(size * fraction) // (64 << 10))
    rng = random.Random(1)
    with open(path, "r+b") as f:
        for _ in range(blocks):
            f.seek(rng.randrange(size // (64 << 10)) * (64 << 10))
            f.write(os.urandom(64 << 10))


class Step:
    def __init__(self, moto_pid: int) -> None:
        self.moto_pid = moto_pid

    def run(self, argv: list[str], env: dict[str, str]) -> dict[str, float]:
        cpu = cpu_seconds(self.moto_pid)
        start = time.perf_counter()
        p = subprocess.run(argv, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if p.returncode != 0:
            raise RuntimeError(f"{argv[:4]} failed: {p.stderr.strip()[-500:]}")
        out: dict[str, float] = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}
        out.setdefault("seconds", wall)
        out["moto-cpu"] = cpu_seconds(self.moto_pid) - cpu
        return out


def ours(step: Step, env: dict[str, str], op: str, loc: str, disk: str, path: Path, threads: int) -> dict[str, float]:
    return step.run([sys.executable, "-c", _WORKER, str(ROOT), op, loc, disk, str(path), str(threads)], env)


def nbdkit_s3_available() -> str | None:
    p = subprocess.run(["nbdkit", "S3", "--dump-plugin"], capture_output=True, text=True)
    if p.returncode == 0:
        return None
    v = subprocess.run(["nbdkit", "--version"], capture_output=True, text=True).stdout.strip()
    return f"nbdkit's S3 plugin is not installed ({v or 'no nbdkit'}): the nbdkit column is skipped"


def nbdkit_push(step: Step, env: dict[str, str], endpoint: str, bucket: str, key: str, src: Path, dst: Path) -> tuple:
    sock = src.parent / f"{key}.sock"
    pid = src.parent / f"{key}.pid"  # written once nbdkit accepts connections (the socket file comes earlier)
    for stale in (sock, pid):  # a previous run's: nbdkit leaves its pid file behind
        stale.unlink(missing_ok=True)
    server = subprocess.Popen(
        ["nbdkit", "-f", "-U", str(sock), "-P", str(pid), "--filter=blocksize-policy", "S3",
         f"endpoint-url={endpoint}", f"bucket={bucket}", f"key={key}", f"size={src.stat().st_size}",
         f"object-size={NBDKIT_OBJECT}", f"blocksize-minimum={NBDKIT_OBJECT}", f"blocksize-preferred={NBDKIT_OBJECT}",
         "blocksize-error-policy=allow"],
        env=env,
    )  # fmt: skip
    try:
        for _ in range(400):
            if pid.exists() and pid.stat().st_size:
                break
            time.sleep(0.05)
        uri = f"nbd+unix:///?socket={sock}"
        copy = [sys.executable, "-m", "server.cli", "copy", "--no-progress"]
        backup = step.run([*copy, str(src), uri], env)
        restore = step.run([*copy, uri, str(dst)], env)
        return backup, restore
    finally:
        server.terminate()
        server.wait()


def med(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"


def ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--chunk-size", default="4M")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--change", type=float, default=0.01)
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (medians [range] reported)")
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()
    from s3kit import CREDENTIALS, MotoServer

    from backup.repo.names import parse_size
    from backup.repo.repository import Repository

    size, cs, threads = parse_size(args.size), parse_size(args.chunk_size), args.threads
    env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(ROOT)}
    os.environ.update(CREDENTIALS)
    nbdkit_note = nbdkit_s3_available()
    tmp = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-s3-"))
    server = MotoServer()
    step = Step(server.proc.pid)
    # samples[kind][step] = one result per repetition
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        for kind in ("dense", "half-sparse"):
            image = tmp / f"{kind}.img"
            make_image(image, size, kind)
            work = tmp / f"{kind}-changed.img"
            shutil.copyfile(image, work)
            change(work, args.change)
            runs = samples.setdefault(kind, {})
            for rep in range(args.reps):
                sides = ["ours", "nbdkit"] if nbdkit_note is None else ["ours"]
                for side in sides if rep % 2 == 0 else reversed(sides):
                    if side == "nbdkit":
                        try:
                            full, back = nbdkit_push(
                                step, env, server.endpoint, server.new_bucket(), "disk", image, tmp / "nbdkit.img"
                            )
                        except RuntimeError as exc:  # the column says why; ours still count
                            nbdkit_note = f"the nbdkit S3 path failed: {exc}"
                            print(nbdkit_note, file=sys.stderr)
                            continue
                        (tmp / "nbdkit.img").unlink(missing_ok=True)
                        runs.setdefault("nbdkit full", []).append(full)
                        runs.setdefault("nbdkit restore", []).append(back)
                        continue
                    loc = f"s3://{server.new_bucket()}/repo?endpoint={server.endpoint}&region=us-east-1"
                    Repository.init(loc, cs)
                    r = {"full": ours(step, env, "backup", loc, "host1/disk", image, threads)}
                    r["incremental"] = ours(step, env, "backup", loc, "host1/disk", work, threads)
                    r["restore"] = ours(step, env, "restore", loc, "host1/disk", tmp / "restored.img", threads)
                    (tmp / "restored.img").unlink(missing_ok=True)
                    r["second host"] = ours(step, env, "backup", loc, "host2/disk", image, threads)
                    for name, v in r.items():
                        runs.setdefault(name, []).append(v)
                print(f"# {kind} rep {rep + 1} done", file=sys.stderr)
            work.unlink()
            image.unlink()
    finally:
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"disk {args.size}, chunk {args.chunk_size}, {threads} threads, change {args.change:.0%}, moto on "
        f"loopback; medians [range] of {args.reps} interleaved repetitions\n"
    )
    print("| disk | step | MiB/s | moto CPU s | peak RSS MiB | new MiB |")
    print("|---|---|---|---|---|---|")
    for kind, runs in samples.items():
        for name, vs in runs.items():
            speeds = [size / MiB / v["seconds"] for v in vs]
            rss = [v.get("rss-mib", float("nan")) for v in vs]
            print(
                f"| {kind} | {name} | {med(speeds)} | {med([v['moto-cpu'] for v in vs])} | {med(rss)} "
                f"| {med([v.get('new-bytes', 0) / MiB for v in vs])} |"
            )
        if "nbdkit full" in runs:
            pairs = [
                ("full backup ÷ nbdkit backup", "full", "nbdkit full"),
                ("restore ÷ nbdkit restore", "restore", "nbdkit restore"),
                ("second host ÷ nbdkit backup", "second host", "nbdkit full"),
            ]
            for label, a, b in pairs:
                rs = [y["seconds"] / x["seconds"] for x, y in zip(runs[a], runs[b], strict=False)]
                print(f"| {kind} | {label} | {ratio(rs)} | | | |")
    if nbdkit_note:
        print(f"\n{nbdkit_note}")


if __name__ == "__main__":
    main()
