"""An in-process harness for end-to-end backup tests (until QMP drives jobs).

Our ``NbdServer`` runs in the test's event loop and exports a ``BlockNode`` over a raw image; the
backup job runs in the same loop; the guests (``qemu-io``, ``fio --ioengine=nbd``) and the target
servers (qemu-nbd, nbdkit) are real processes. Every external tool is run with asyncio subprocesses
so the loop keeps serving the guests while a tool runs.

The oracle: inside the drained section that installs the copy-before-write filter, the source image
is copied to ``snapshot.img`` — the disk exactly as it was at the backup's point in time.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backup.backup_job import BackupJob, BackupOptions
from backup.events import Event, EventBus
from backup.images import open_image
from backup.node import BlockNode
from backup.rawfile import RawFileDevice
from backup.targets import BackupTarget
from nbd.device import BlockDevice
from nbd.server import Export, NbdServer

MiB = 1024 * 1024
CLUSTER = 65536


@dataclass
class Source:
    image: Path
    node: BlockNode
    server: NbdServer
    uri: str
    tmp: Path


@dataclass
class Backup:
    job: BackupJob
    snapshot: Path
    events: list[Event] = field(default_factory=list)

    def named(self, name: str) -> list[dict[str, object]]:
        return [e.data for e in self.events if e.name == name]

    async def wait_event(self, name: str, timeout: float = 30) -> dict[str, object]:
        async def poll() -> dict[str, object]:
            while not self.named(name):
                await asyncio.sleep(0.01)
            return self.named(name)[0]

        return await asyncio.wait_for(poll(), timeout)

    async def finish(self, timeout: float = 60) -> None:
        await asyncio.wait_for(self.job.wait(), timeout)


def write_random_image(path: Path, size: int, seed: int = 0) -> Path:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(rnd.randbytes(MiB))
        f.write(rnd.randbytes(size % MiB))
    return path


def write_sparse_image(path: Path, size: int, pieces: Sequence[tuple[int, bytes]]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
    return path


@asynccontextmanager
async def served_source(
    tmp: Path, image: Path, *, format: str = "raw", device: BlockDevice | None = None
) -> AsyncIterator[Source]:
    """Export ``image`` (or ``device``, whose contents ``image`` then holds) as ``disk`` over TCP from
    our server, in this event loop."""
    if device is None:
        device = await RawFileDevice.open(image) if format == "raw" else await open_image(image, format=format)
    node = BlockNode("disk", device, filename=str(image))
    server = NbdServer()
    server.add_export(Export("disk", node))
    _, port = await server.listen_tcp("127.0.0.1", 0)
    try:
        yield Source(image, node, server, f"nbd://127.0.0.1:{port}/disk", tmp)
    finally:
        await server.stop()
        await node.close()


async def start_backup(source: Source, target: BackupTarget, options: BackupOptions, job_id: str = "b0") -> Backup:
    """Fix the point in time (copying the image as the oracle) and start the job."""
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    job = BackupJob(
        job_id,
        source.node,
        target.device,
        options,
        events=bus,
        target_zero_init=target.zero_init,
        owner=target if target.owned else None,
    )
    snapshot = source.tmp / f"snapshot-{job_id}.img"
    async with source.node.drained():
        shutil.copyfile(source.image, snapshot)
        job.install_filter()
    job.start()
    return Backup(job, snapshot, events)


async def tool(*argv: str | os.PathLike[str], timeout: float = 60, check: bool = True) -> tuple[int, str]:
    """Run a peer without blocking the loop; returns (exit status, stdout+stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    text = out.decode(errors="replace")
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{text}")
    assert proc.returncode is not None
    return proc.returncode, text


def qemu_io_commands(size: int, count: int, seed: int) -> list[str]:
    """Random guest I/O: writes (some unaligned, some crossing clusters), write-zeroes, discards."""
    rnd = random.Random(seed)
    cmds: list[str] = []
    for _ in range(count):
        kind = rnd.random()
        length = rnd.choice([512, 4096, CLUSTER, CLUSTER + 512, 3 * CLUSTER])
        offset = rnd.randrange(0, size - length, 512)
        if kind < 0.15:  # cross a cluster boundary
            offset = max(0, (offset // CLUSTER + 1) * CLUSTER - 512)
            length = min(length, size - offset)
        if kind < 0.7:
            cmds.append(f"write -P 0x{rnd.randrange(1, 256):02x} {offset} {length}")
        elif kind < 0.85:
            cmds.append(f"write -z {offset} {length}")
        else:
            cmds.append(f"discard {offset} {length}")
    return cmds


async def qemu_io(uri: str, commands: Sequence[str], *, timeout: float = 60, check: bool = True) -> tuple[int, str]:
    argv: list[str] = ["qemu-io", "-f", "raw"]
    for cmd in commands:
        argv += ["-c", cmd]
    return await tool(*argv, uri, timeout=timeout, check=check)


async def fio_randwrite(
    uri: str, *, io_size: str = "2M", bs: str = "4k", seed: int = 1, offset: str = "0", size: str = "100%"
) -> str:
    _, out = await tool(
        "fio",
        "--name=guest",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=randwrite",
        f"--bs={bs}",
        f"--io_size={io_size}",
        f"--offset={offset}",
        f"--size={size}",
        "--iodepth=8",
        f"--randseed={seed}",
        "--output-format=json",
        timeout=120,
    )
    return out


async def nbd_export_to_file(uri: str, path: Path) -> Path:
    """Read an NBD export into a file (to compare it with the oracle)."""
    await tool("nbdcopy", uri, path)
    return path


def same_bytes(a: Path, b: Path) -> None:
    """Byte-for-byte equality, with the first differing offset in the failure."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                first = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
                pytest.fail(f"{a} and {b} differ at byte {pos + first} (cluster {(pos + first) // CLUSTER})")
            if not x:
                return
            pos += len(x)


async def nbdinfo_map(uri: str) -> list[tuple[int, int, bool]]:
    """``(offset, length, is data)`` of each extent ``nbdinfo --map`` reports."""
    _, out = await tool("nbdinfo", "--map", "--json", uri)
    return [(int(e["offset"]), int(e["length"]), not int(e["type"]) & 1) for e in json.loads(out)]


async def qemu_img_map(path: Path) -> list[tuple[int, int, bool]]:
    """``(offset, length, is data)`` of each extent ``qemu-img map`` reports for a raw file."""
    _, out = await tool("qemu-img", "map", "--output=json", "-f", "raw", path)
    return [(int(e["start"]), int(e["length"]), bool(e["data"])) for e in json.loads(out)]
