#!/usr/bin/env python3
"""The repository in S3 (moto on loopback) against our NBD client pushing into nbdkit's S3 plugin.

In one run, for a dense random disk and a half-sparse one (4 MiB data, 4 MiB hole, ...):

- ours: full backup into ``s3://…`` through the public repository API from ``--threads`` worker
  threads (what ``repo backup`` does), an incremental after ``--change`` of the disk was rewritten
  (whole disk read and hashed: unchanged chunks cost a HEAD), a restore to a file, and a second
  "host" backing up the same image into the same bucket (dedup: HEADs, no uploads);
- nbdkit: ``nbd-backup copy FILE nbd+unix://`` into nbdkit's S3 plugin with 1 MiB objects (its block
  size announcement patched at run time, see ``nbdkit_plugin``; the blocksize-policy filter so every
  request is a whole object), the changed 64 KiB blocks written by nbdsh (the incremental: a
  read-modify-write of the object each lands in), then the copy back for the restore. nbdkit's S3
  plugin is a separate package (``nbdkit-plugin-python`` + ``boto3``); when it is not installed that
  column says so and the rest still runs.

Every step runs in its own process, so its peak RSS (ru_maxrss) is the appliance's. Per step: its CPU
seconds (the step's process, and nbdkit's for the nbdkit path), moto's own CPU seconds (on loopback the
server is a large part of where the time goes) and the S3 requests moto served, by kind.

    .venv/bin/python bench/bench_repo_s3.py                          # 1 GiB disks on /dev/shm
    .venv/bin/python bench/bench_repo_s3.py --size 256M --threads 16 --reps 3

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

if TYPE_CHECKING:
    from s3kit import MotoServer

MiB = 1 << 20
#: Objects of the nbdkit S3 path, as the issue asks, and its requests: whole objects (no read-modify-write).
NBDKIT_OBJECT = "1M"
#: Debian's nbdkit S3 plugin (nbdkit-plugin-python); run from a patched copy made at run time (``nbdkit_plugin``).
NBDKIT_S3_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-S3-plugin")
#: The one line of the plugin the copy changes: its block size announcement.
_BLOCK_SIZE_LINE = "return (cfg.obj_size, cfg.obj_size, cfg.obj_size)"

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


def change(path: Path, fraction: float) -> list[int]:
    """Rewrite ``fraction`` of the disk in random 64 KiB blocks; their offsets, sorted."""
    size = path.stat().st_size
    blocks = max(1, int(size * fraction) // (64 << 10))
    rng = random.Random(1)
    offsets = set()
    with open(path, "r+b") as f:
        for _ in range(blocks):
            off = rng.randrange(size // (64 << 10)) * (64 << 10)
            offsets.add(off)
            f.seek(off)
            f.write(os.urandom(64 << 10))
    return sorted(offsets)


#: libnbd's Python (Debian's python3-libnbd): nbdsh is ``python3 -m nbd`` with whatever python3 comes first.
NBDSH_PYTHON = "/usr/bin/python3"

#: The nbdkit path's incremental: an NBD client writes the changed 64 KiB blocks (what a dirty bitmap of
#: that granularity sends) — libnbd's nbdsh, so the step is the writes alone.
_NBDSH_WRITES = """
import os
path, offsets = os.environ["BENCH_IMAGE"], [int(o) for o in os.environ["BENCH_OFFSETS"].split(",")]
with open(path, "rb") as f:
    for off in offsets:
        f.seek(off)
        h.pwrite(f.read(65536), off)
h.flush()
"""


class Step:
    """Runs one step in its own process; adds moto's CPU, the step's own CPU and moto's requests by kind."""

    def __init__(self, server: MotoServer) -> None:
        self.server = server

    def run(
        self, argv: list[str], env: dict[str, str], peers: tuple[int, ...] = (), cwd: Path | None = None
    ) -> dict[str, Any]:
        """``peers``: pids of servers the step's CPU includes (nbdkit for the nbdkit path)."""
        cpu = cpu_seconds(self.server.proc.pid)
        own = _children_cpu() + sum(cpu_seconds(p) for p in peers)
        counts = self.server.counts()
        start = time.perf_counter()
        p = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=cwd)
        wall = time.perf_counter() - start
        if p.returncode != 0:
            raise RuntimeError(f"{argv[:4]} failed: {p.stderr.strip()[-500:]}")
        out: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}
        out.setdefault("seconds", wall)
        out["moto-cpu"] = cpu_seconds(self.server.proc.pid) - cpu
        out["cpu"] = _children_cpu() + sum(cpu_seconds(p) for p in peers) - own
        after = self.server.counts()
        out["requests"] = {k: n - counts.get(k, 0) for k, n in after.items() if n > counts.get(k, 0)}
        return out


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def ours(
    step: Step, env: dict[str, str], code: Path, op: str, loc: str, disk: str, path: Path, threads: int
) -> dict[str, Any]:
    """A step of our repository, with the ``backup.repo`` of the tree ``code``."""
    return step.run([sys.executable, "-c", _WORKER, str(code), op, loc, disk, str(path), str(threads)], env)


def nbdkit_plugin(tmp: Path) -> Path:
    """The installed S3 plugin with only its block size announcement changed, copied into ``tmp``.

    nbdkit 1.32's S3 plugin announces ``object-size`` as its minimum, preferred and maximum block
    size, and nbdkit refuses a minimum above 64 KiB: with 1 MiB objects (the issue's comparison) it
    does not start. The plugin itself handles writes of any size and alignment (a read-modify-write
    of partial objects), so announcing (4096, object, object) changes no data path: with the
    blocksize-policy filter's preferred = maximum = 1 MiB our client sends whole aligned objects
    (the bench counts the GETs of a backup to show there is no read-modify-write). The copy is made
    at run time from the installed package; none of its code lives in this repository.
    """
    text = NBDKIT_S3_PLUGIN.read_text()
    if text.count(_BLOCK_SIZE_LINE) != 1:
        raise RuntimeError(f"{NBDKIT_S3_PLUGIN}: its block_size announcement is not the one this bench patches")
    script = tmp / "nbdkit-S3-plugin-1M.py"
    script.write_text(text.replace(_BLOCK_SIZE_LINE, "return (4096, cfg.obj_size, cfg.obj_size)"))
    return script


def nbdkit_s3_available() -> str | None:
    p = subprocess.run(["nbdkit", "S3", "--dump-plugin"], capture_output=True, text=True)
    if p.returncode == 0 and NBDKIT_S3_PLUGIN.is_file():
        return None
    v = subprocess.run(["nbdkit", "--version"], capture_output=True, text=True).stdout.strip()
    return f"nbdkit's S3 plugin is not installed ({v or 'no nbdkit'}): the nbdkit column is skipped"


def nbdkit_push(
    step: Step,
    env: dict[str, str],
    plugin: Path,
    endpoint: str,
    bucket: str,
    key: str,
    src: Path,
    changed: tuple[Path, list[int]],
    dst: Path,
) -> dict[str, dict[str, Any]]:
    """Full backup (``nbd-backup copy``), the changed blocks (nbdsh), restore (``nbd-backup copy``)."""
    sock = src.parent / f"{key}.sock"
    pid = src.parent / f"{key}.pid"  # written once nbdkit accepts connections (the socket file comes earlier)
    for stale in (sock, pid):  # a previous run's: nbdkit leaves its pid file behind
        stale.unlink(missing_ok=True)
    server = subprocess.Popen(
        ["nbdkit", "-f", "-U", str(sock), "-P", str(pid), "--filter=blocksize-policy", "python", str(plugin),
         f"endpoint-url={endpoint}", f"bucket={bucket}", f"key={key}", f"size={src.stat().st_size}",
         f"object-size={NBDKIT_OBJECT}", f"blocksize-preferred={NBDKIT_OBJECT}", f"blocksize-maximum={NBDKIT_OBJECT}",
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
        out = {"nbdkit full": step.run([*copy, str(src), uri], env, (server.pid,))}
        writes = [NBDSH_PYTHON, "-m", "nbd", "-u", uri, "-c", _NBDSH_WRITES]
        # libnbd's python module is ``nbd``, like our package: nbdsh runs without our tree on its path
        plain = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        plain |= {"BENCH_IMAGE": str(changed[0]), "BENCH_OFFSETS": ",".join(map(str, changed[1]))}
        out["nbdkit incremental"] = step.run(writes, plain, (server.pid,), cwd=src.parent)
        out["nbdkit restore"] = step.run([*copy, uri, str(dst)], env, (server.pid,))
        return out
    finally:
        server.terminate()
        server.wait()


def empty_bucket(server: MotoServer, bucket: str) -> None:
    """Delete a repetition's objects: moto keeps every body in its memory, and a server holding
    several GiB from earlier repetitions is slower for whichever side comes later."""
    client = server.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def med(values: list[float]) -> str:
    if any(math.isnan(v) for v in values):  # not measured (the nbdkit path's RSS)
        return "-"
    return f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"


def med1(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def requests(vs: list[dict[str, Any]]) -> str:
    kinds = sorted({k for v in vs for k in v["requests"]})
    return ", ".join(f"{k} {statistics.median(v['requests'].get(k, 0) for v in vs):.0f}" for k in kinds)


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
    ap.add_argument(
        "--code",
        type=Path,
        default=ROOT,
        help="tree whose backup.repo our steps run (e.g. an older commit's, from git archive: before/after)",
    )
    args = ap.parse_args()
    from s3kit import CREDENTIALS, MotoServer

    from backup.repo.names import parse_size
    from backup.repo.repository import Repository

    size, cs, threads = parse_size(args.size), parse_size(args.chunk_size), args.threads
    env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(ROOT)}
    os.environ.update(CREDENTIALS)
    nbdkit_note = nbdkit_s3_available()
    tmp = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-s3-"))
    plugin = nbdkit_plugin(tmp) if nbdkit_note is None else tmp
    server = MotoServer()
    step = Step(server)
    # samples[kind][step] = one result per repetition
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        for kind in ("dense", "half-sparse"):
            image = tmp / f"{kind}.img"
            make_image(image, size, kind)
            work = tmp / f"{kind}-changed.img"
            shutil.copyfile(image, work)
            offsets = change(work, args.change)
            runs = samples.setdefault(kind, {})
            for rep in range(args.reps):
                sides = ["ours", "nbdkit"] if nbdkit_note is None else ["ours"]
                for side in sides if rep % 2 == 0 else reversed(sides):
                    bucket = server.new_bucket()
                    if side == "nbdkit":
                        try:
                            got = nbdkit_push(
                                step,
                                env,
                                plugin,
                                server.endpoint,
                                bucket,
                                "disk",
                                image,
                                (work, offsets),
                                tmp / "nbdkit.img",
                            )
                        except RuntimeError as exc:  # the column says why; ours still count
                            nbdkit_note = f"the nbdkit S3 path failed: {exc}"
                            print(nbdkit_note, file=sys.stderr)
                            continue
                        (tmp / "nbdkit.img").unlink(missing_ok=True)
                        empty_bucket(server, bucket)
                        for name, v in got.items():
                            runs.setdefault(name, []).append(v)
                        continue
                    loc = f"s3://{bucket}/repo?endpoint={server.endpoint}&region=us-east-1"
                    Repository.init(loc, cs)
                    r = {"full": ours(step, env, args.code, "backup", loc, "host1/disk", image, threads)}
                    r["incremental"] = ours(step, env, args.code, "backup", loc, "host1/disk", work, threads)
                    r["restore"] = ours(
                        step, env, args.code, "restore", loc, "host1/disk", tmp / "restored.img", threads
                    )
                    (tmp / "restored.img").unlink(missing_ok=True)
                    r["second host"] = ours(step, env, args.code, "backup", loc, "host2/disk", image, threads)
                    empty_bucket(server, bucket)
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
    rmw: list[str] = []
    print("| disk | step | MiB/s | step CPU s | moto CPU s | peak RSS MiB | new MiB | S3 requests (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, runs in samples.items():
        for name, vs in runs.items():
            speeds = [size / MiB / v["seconds"] for v in vs]
            rss = [v.get("rss-mib", float("nan")) for v in vs]
            print(
                f"| {kind} | {name} | {med(speeds)} | {med1([v['cpu'] for v in vs])} "
                f"| {med1([v['moto-cpu'] for v in vs])} | {med(rss)} "
                f"| {med([v.get('new-bytes', 0) / MiB for v in vs])} | {requests(vs)} |"
            )
        if "nbdkit full" in runs:
            pairs = [
                ("full backup ÷ nbdkit backup", "full", "nbdkit full"),
                ("incremental ÷ nbdkit changed blocks", "incremental", "nbdkit incremental"),
                ("restore ÷ nbdkit restore", "restore", "nbdkit restore"),
                ("second host ÷ nbdkit backup", "second host", "nbdkit full"),
            ]
            for label, a, b in pairs:
                rs = [y["seconds"] / x["seconds"] for x, y in zip(runs[a], runs[b], strict=False)]
                print(f"| {kind} | {label} | {ratio(rs)} | | | | | |")
            gets = max(sum(n for k, n in v["requests"].items() if k.startswith("GET")) for v in runs["nbdkit full"])
            rmw.append(
                f"{kind}: {gets} GETs during the nbdkit path's full backups (0: whole objects, no read-modify-write)"
            )
    if rmw:
        print("\n" + "\n".join(rmw))
    if nbdkit_note:
        print(f"\n{nbdkit_note}")


if __name__ == "__main__":
    main()
