"""What the daemon's repository tests share: our daemon with a repository, QEMU (qemu-storage-daemon or
``qemu-system-x86_64 -M none``) with a QMP monitor, a logged writer, and reading snapshots back.

The oracle (design §4): a snapshot equals the source as it was at its backup's instant. Here the
instant is pinned without fleecing: the reference copy is read while nothing writes, then the backup
starts, and only once its job is running does the writer begin (``qemu-io`` over NBD, every write
logged); so the source at the instant is the reference, and the writes, which land during the copy,
must not be in the snapshot (copy-before-write keeps them out).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import require, run
from peers import spawn, wait_until
from qmp_daemon import OurDaemon, make_image, our_daemon
from qsd import QmpSync, Qsd

from backup.repo.repository import Repository

CS = 64 << 10
SIZE = 4 << 20
#: Backup jobs are throttled so that the writer overlaps them (bytes/s: a 4 MiB disk takes ~1 s).
SPEED = 4 << 20


def new_repo(path: Path) -> Repository:
    return Repository.init(path, CS)


def read_snapshot(repo: Repository, disk: str, snap: str = "latest") -> bytes:
    """A snapshot's bytes through the library (every chunk verified)."""
    m = repo.resolve(disk, snap)
    parts = []
    for index, digest in enumerate(m.chunks):
        length = m.chunk_length(index)
        parts.append(bytes(length) if digest is None else repo.load_chunk(digest, length))
    return b"".join(parts)


@contextmanager
def repo_daemon(workdir: Path, repo: Path, *extra: str, check_exit: bool = True) -> Iterator[OurDaemon]:
    """Our daemon with ``--repo repo`` and an NBD unix socket (``workdir/nbd.sock``)."""
    with our_daemon(
        workdir, "--repo", str(repo), "--nbd-socket", str(workdir / "nbd.sock"), *extra, check_exit=check_exit
    ) as daemon:
        yield daemon


def nbd_uri(socket: Path, export: str) -> str:
    return f"nbd+unix:///{export}?socket={socket}"


class QemuSystem(Qsd):
    """``qemu-system-x86_64 -M none``: QEMU's system emulator without a machine, driven over QMP like
    qemu-storage-daemon (same harness; only the command line differs)."""

    def launch(self, *, timeout: float = 60.0) -> None:
        binary = shutil.which("qemu-system-x86_64")
        if binary is None:
            raise FileNotFoundError("qemu-system-x86_64 is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "-M",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-pidfile",
            str(self.pid_path),
        ]
        self.proc = spawn(argv, self.log_path)
        wait_until(lambda: self.qmp_path.exists() and self.pid_path.exists(), self.proc, self.log_path, "qemu", timeout)


@contextmanager
def qemu(kind: str, workdir: Path) -> Iterator[Qsd]:
    if kind == "qsd":
        require("qemu-storage-daemon")
        with Qsd.start(workdir) as q:
            yield q
    else:
        require("qemu-system-x86_64")
        with QemuSystem.start(workdir) as q:
            yield q


def source_image(path: Path, size: int = SIZE, *, qcow2: bool = False) -> Path:
    """A source whose every 4 KiB block differs, with a hole (zeroes) in its second quarter."""
    raw = path.with_suffix(".raw") if qcow2 else path
    make_image(raw, size)
    with open(raw, "r+b") as f:
        f.seek(size // 4)
        f.write(bytes(size // 4))
    if qcow2:
        require("qemu-img")
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
        raw.unlink()
    return path


def read_uri(uri: str, path: Path) -> bytes:
    """The whole export, read by ``qemu-img convert`` (a QEMU NBD client)."""
    require("qemu-img")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(path), cwd="/")
    return path.read_bytes()


class Writer:
    """``qemu-io`` writing patterns at random 4 KiB-aligned places of an NBD export, in the background;
    ``log`` keeps (offset, length, pattern) of every write."""

    def __init__(self, uri: str, size: int, seed: int, count: int = 24) -> None:
        require("qemu-io")
        rng = random.Random(seed)
        self.log: list[tuple[int, int, int]] = []
        commands: list[str] = []
        for _ in range(count):
            length = rng.choice((4096, 16384, 65536))
            offset = rng.randrange(0, (size - length) // 4096) * 4096
            pattern = rng.randrange(1, 256)
            self.log.append((offset, length, pattern))
            commands += ["-c", f"write -P {pattern} {offset} {length}"]
        self.proc = subprocess.Popen(
            ["qemu-io", "-f", "raw", *commands, uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd="/",
        )

    def wait(self) -> None:
        out, _ = self.proc.communicate(timeout=60)
        if self.proc.returncode != 0 or b"error" in out.lower():
            pytest.fail(f"qemu-io writer failed ({self.proc.returncode}):\n{out.decode(errors='replace')}")

    def chunks(self, chunk_size: int) -> set[int]:
        """The indexes of the chunks the writes touched."""
        return {i for o, n, _ in self.log for i in range(o // chunk_size, (o + n - 1) // chunk_size + 1)}

    def apply(self, image: bytes) -> bytes:
        out = bytearray(image)
        for offset, length, pattern in self.log:
            out[offset : offset + length] = bytes([pattern]) * length
        return bytes(out)


def wait_job(q: QmpSync, job_id: str) -> dict[str, Any]:
    """The job's BLOCK_JOB_COMPLETED data once it has gone (null); fails on an error or a cancel."""
    done = q.wait_event("BLOCK_JOB_COMPLETED", lambda d: d["device"] == job_id, timeout=60)
    q.wait_job_status(job_id, "null", timeout=60)
    assert "error" not in done["data"], done
    return dict(done["data"])


def begin_export(ours: QmpSync, node: str, disk: str, size: int, parent: str) -> None:
    """A writable snapshot exported writable as ``node`` (QEMU's push target)."""
    ours.ok("repo-snapshot-begin", disk=disk, size=size, parent=parent, **{"node-name": node})
    ours.ok("block-export-add", type="nbd", id=node, writable=True, **{"node-name": node})


def unexport_commit(ours: QmpSync, node: str) -> dict[str, Any]:
    ours.ok("block-export-del", id=node, mode="hard")
    ours.wait_event("BLOCK_EXPORT_DELETED", lambda d: d["id"] == node)
    result: dict[str, Any] = ours.ok("repo-snapshot-commit", **{"node-name": node})
    return result


def chunk_files(repo: Path) -> set[str]:
    return {p.name for p in (repo / "chunks").rglob("*") if p.is_file()}


def manifest_chunks(repository: Repository) -> set[str]:
    return {c for d in repository.disks() for m in repository.snapshots(d) for c in m.chunks if c is not None}


def env_seed() -> int:
    return int(os.environ.get("REPO_TEST_SEED", "0")) or random.randrange(1 << 30)
