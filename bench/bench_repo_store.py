#!/usr/bin/env python3
"""Throughput of the repository store itself (no NBD, no CLI): chunks in, chunks out, verify, gc.

Dense random and half-zero data on tmpfs, stored through ``Repository.store_chunk`` from 1..N worker
threads (what the snapshot writer does), a second identical pass (dedup: hash only), reading every
chunk back with its digest checked, ``verify`` and ``gc``. MiB/s of uncompressed data.

    .venv/bin/python bench/bench_repo_store.py                      # 512 MiB per run, 1 and 2 threads
    .venv/bin/python bench/bench_repo_store.py --size 1G --threads 1 2 4 --chunk-size 4M

Not part of the test suite: numbers depend on the machine and on whoever else is using it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backup.repo.gc import collect_garbage  # noqa: E402
from backup.repo.names import parse_size  # noqa: E402
from backup.repo.repository import Repository  # noqa: E402
from backup.repo.verify import verify  # noqa: E402


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / (1 << 20):8.0f} MiB/s"


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(root: Path, size: int, chunk_size: int, threads: int, kind: str) -> None:
    count = size // chunk_size
    chunk = os.urandom(chunk_size)

    # distinct chunks made cheaply (one copy, timed too): one random buffer, its first 8 bytes numbered
    def block(i: int) -> bytes:
        if kind == "half-zero" and i % 2:
            return bytes(chunk_size)
        return i.to_bytes(8, "little") + chunk[8:]

    path = root / f"repo-{kind}-{threads}"
    repo = Repository.init(path, chunk_size)
    with repo.begin_write("bench") as w, ThreadPoolExecutor(threads) as pool:
        digests: list[str | None] = []
        t1 = _timed(
            lambda: digests.extend(d for d, _ in pool.map(lambda i: repo.store_chunk(block(i), w.lease), range(count)))
        )
        t2 = _timed(lambda: list(pool.map(lambda i: repo.store_chunk(block(i), w.lease), range(count))))
        m = w.commit(count * chunk_size, digests, None, {})
        t3 = _timed(lambda: list(pool.map(lambda d: d and repo.load_chunk(d, chunk_size), digests)))
    t4 = _timed(lambda: verify(repo))
    t5 = _timed(lambda: collect_garbage(repo))
    on_disk = sum(f.stat().st_size for f in (path / "chunks").rglob("*") if f.is_file())
    print(
        f"{kind:9} threads={threads}  store {_rate(size, t1)}  dedup {_rate(size, t2)}  read {_rate(size, t3)}"
        f"  verify {_rate(size, t4)}  gc {t5:.2f}s  on disk {on_disk >> 20} MiB"
        f" (new-bytes {m.stats['new-bytes'] >> 20} MiB)"
    )
    shutil.rmtree(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512M")
    ap.add_argument("--chunk-size", default="4M")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = ap.parse_args()
    size, cs = parse_size(args.size), parse_size(args.chunk_size)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for kind in ("dense", "half-zero"):
            for n in args.threads:
                run(Path(tmp), size, cs, n, kind)


if __name__ == "__main__":
    main()
