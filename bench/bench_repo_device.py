#!/usr/bin/env python3
"""Throughput of a repository's snapshots as block devices (no NBD, no CLI): sequential writes into a
``SnapshotWriter`` in 64 KiB requests (what QEMU's ``blockdev-backup`` pushes) and in 1 MiB requests (our
copy engine), then sequential reads of the committed snapshot through a ``SnapshotReader`` (instant
restore), with several requests in flight as an NBD client keeps them. MiB/s of disk bytes.

Disks: dense random and half-sparse (alternating 8 MiB of random data and 8 MiB of zeroes, the zeroes
written as data: the writer finds them zero and stores nothing). Every chunk is distinct (no dedup help).
Then an incremental child that rewrites 1 % of the chunks (64 KiB writes at random offsets, merged with
the parent's chunks) and the repository's size on disk.

    .venv/bin/python bench/bench_repo_device.py                      # 1 GiB disks on /dev/shm
    .venv/bin/python bench/bench_repo_device.py --size 256M --chunk-size 1M --in-flight 16

Not part of the test suite: numbers depend on the machine and on whoever else is using it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backup.repo.device import SnapshotReader, SnapshotWriter  # noqa: E402
from backup.repo.names import parse_size  # noqa: E402
from backup.repo.repository import Repository  # noqa: E402

MiB = 1 << 20
SPARSE_RUN = 8 * MiB


class Source:
    """The disk's bytes, made on the fly from a 16 MiB random pool: each 64 KiB piece is stamped with its
    offset and ``salt`` so that no two chunks are equal, within a disk or across disks (dedup would
    flatter the numbers)."""

    def __init__(self, size: int, sparse: bool, salt: int) -> None:
        self.size = size
        self.sparse = sparse
        self.salt = salt
        self._pool = random.Random(1).randbytes(16 * MiB)

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        pos = 0
        while pos < length:
            at = offset + pos
            n = min(length - pos, 64 * 1024 - at % (64 * 1024))
            if not (self.sparse and (at // SPARSE_RUN) % 2):
                start = at % (len(self._pool) - n)
                out[pos : pos + n] = self._pool[start : start + n]
                if at % (64 * 1024) == 0 and n >= 16:
                    out[pos : pos + 16] = at.to_bytes(8, "little") + self.salt.to_bytes(8, "little")
            pos += n
        return bytes(out)


async def _in_flight(jobs: list[Callable[[], Awaitable[object]]], depth: int) -> None:
    """Run the jobs in order with at most ``depth`` of them at once (an NBD client's queue)."""
    it = iter(jobs)

    async def lane() -> None:
        for job in it:
            await job()

    await asyncio.gather(*(lane() for _ in range(depth)))


async def write_disk(repo: Repository, disk: str, src: Source, request: int, depth: int) -> tuple[float, int]:
    """(seconds, new bytes) of a full backup written in ``request``-sized writes, commit included. Making
    each request's bytes is inside the clock, as receiving them is in a push."""
    writer = SnapshotWriter(repo, disk, src.size, parent="none")

    def job(offset: int) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            await writer.pwrite(offset, src.read(offset, min(request, src.size - offset)))

        return run

    start = time.perf_counter()
    await _in_flight([job(o) for o in range(0, src.size, request)], depth)
    manifest = await writer.commit()
    return time.perf_counter() - start, int(manifest.stats["new-bytes"])


async def read_disk(repo: Repository, disk: str, request: int, depth: int) -> float:
    reader = SnapshotReader(repo, repo.resolve(disk))

    def job(offset: int) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            await reader.pread(offset, min(request, reader.size - offset))

        return run

    start = time.perf_counter()
    await _in_flight([job(o) for o in range(0, reader.size, request)], depth)
    seconds = time.perf_counter() - start
    await reader.close()
    return seconds


async def incremental(repo: Repository, disk: str, src: Source, fraction: float) -> tuple[float, int]:
    """A child that rewrites ``fraction`` of the chunks with one 64 KiB write each (merged with the parent)."""
    cs = repo.chunk_size
    chunks = -(-src.size // cs)
    picked = random.Random(2).sample(range(chunks), max(1, int(chunks * fraction)))
    writer = SnapshotWriter(repo, disk, src.size)
    start = time.perf_counter()
    for index in sorted(picked):
        offset = index * cs + cs // 2
        await writer.pwrite(offset, os.urandom(min(64 * 1024, src.size - offset)))
    manifest = await writer.commit()
    return time.perf_counter() - start, int(manifest.stats["new-bytes"])


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / MiB:8.0f} MiB/s"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G", help="disk size (default 1G)")
    parser.add_argument("--chunk-size", default="4M", help="repository chunk size (default 4M)")
    parser.add_argument("--dir", default="/dev/shm", help="where the repository goes (default /dev/shm: tmpfs)")
    parser.add_argument("--in-flight", type=int, default=8, help="requests in flight (default 8)")
    args = parser.parse_args()
    size, chunk_size = parse_size(args.size), parse_size(args.chunk_size)
    tmp = Path(tempfile.mkdtemp(prefix="bench-repo-device-", dir=args.dir))
    try:
        repo = Repository.init(tmp / "repo", chunk_size=chunk_size)
        print(f"disk {size / MiB:.0f} MiB, chunks {chunk_size / MiB:g} MiB, {args.in_flight} requests in flight")
        print(f"{'disk':<12} {'request':>8} {'write':>14} {'read':>14} {'new MiB':>8}")
        for kind in ("random", "half-sparse"):
            for request in (64 * 1024, MiB):
                src = Source(size, sparse=kind == "half-sparse", salt=request + (kind == "random"))
                disk = f"{kind}/r{request // 1024}k"
                w, new = await write_disk(repo, disk, src, request, args.in_flight)
                r = await read_disk(repo, disk, request, args.in_flight)
                label = f"{request // 1024}K"
                print(f"{kind:<12} {label:>8} {_rate(size, w):>14} {_rate(size, r):>14} {new / MiB:8.0f}")
            seconds, new = await incremental(repo, f"{kind}/r{MiB // 1024}k", src, 0.01)
            print(f"{kind:<12} {'1% incr':>8} {seconds:12.2f} s {'':>14} {new / MiB:8.0f}")
        print(f"repository on disk: {_du(tmp / 'repo') / MiB:.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
