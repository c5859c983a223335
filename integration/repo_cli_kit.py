"""Helpers of the ``nbd-backup repo`` end-to-end tests: run the command, read the repository, make disks."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

from conftest import ROOT, nbd_backup_argv, run

KiB = 1 << 10
MiB = 1 << 20
CS = 64 * KiB  # small chunks keep the disks of the tests small


def repo(*args: str | os.PathLike[str], check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``nbd-backup repo ARGS…`` (with ``--no-progress`` where the action takes it)."""
    argv = [str(a) for a in args]
    if argv and argv[0] in ("backup", "restore", "verify"):
        argv.insert(1, "--no-progress")
    return run(*nbd_backup_argv("repo", *argv), cwd=str(ROOT), check=check, timeout=timeout)


def init(path: Path, chunk_size: int = CS) -> Path:
    repo("init", path, "--chunk-size", str(chunk_size))
    return path


def snapshots(path: Path, disk: str | None = None) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(repo("list", path, *([disk] if disk else []), "--json").stdout)
    return result


def chunk_files(path: Path) -> set[str]:
    return {p.name for p in (path / "chunks").glob("*/*")}


def chunk_bytes(path: Path) -> int:
    """Bytes the chunk files take on disk (du)."""
    return sum(p.stat().st_blocks * 512 for p in (path / "chunks").glob("*/*"))


def random_disk(path: Path, size: int, *, seed: int, data: list[tuple[int, int]] | None = None) -> Path:
    """A sparse raw file of ``size`` bytes with random data in the ``(offset, length)`` ranges (by default
    about half of it, in runs that start and end inside chunks)."""
    rnd = random.Random(seed)
    if data is None:
        data = [(offset, rnd.randrange(1, 3 * CS)) for offset in range(rnd.randrange(0, CS), size - 3 * CS, 4 * CS)]
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in data:
            f.seek(offset)
            f.write(rnd.randbytes(min(length, size - offset)))
    return path


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The failure's stderr: exactly one line, non-zero exit."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]
