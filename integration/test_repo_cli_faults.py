"""``nbd-backup repo`` under faults: ``kill -9`` mid-backup, corrupt and missing chunks, a full file system,
and backups, prune and gc running at the same time (design §3.6 crash rules).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

from conftest import ROOT, nbd_backup_argv, require, run
from peers import qemu_nbd
from repo_cli_kit import CS, MiB, chunk_files, init, one_line_error, random_disk, repo, snapshots


def referenced_chunks(r: Path) -> set[str]:
    """Every chunk a published manifest names (read from the files, not through our code)."""
    names: set[str] = set()
    for manifest in (r / "disks").glob("**/@snapshots/*.json"):
        names.update(c for c in json.loads(manifest.read_text())["chunks"] if c is not None)
    return names


def manifest_of(r: Path, disk: str, snap_id: str) -> dict:
    doc: dict = json.loads((r / "disks" / disk / "@snapshots" / f"{snap_id}.json").read_text())
    return doc


def dense_disk(path: Path, size: int, seed: int) -> Path:
    return random_disk(path, size, seed=seed, data=[(0, size)])


def _kill_at(r: Path, source: Path, percent: int | None, rnd: random.Random) -> int:
    """Start ``repo backup`` and ``kill -9`` it once its progress reaches ``percent`` (None: after a random
    moment of its start-up). Returns its exit status (0 when it finished first)."""
    read_fd, write_fd = os.pipe()
    argv = nbd_backup_argv("repo", "backup", f"--progress={write_fd}", str(r), "d", str(source))
    proc = subprocess.Popen(
        argv, cwd=str(ROOT), pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as progress:
            if percent is None:
                time.sleep(rnd.uniform(0.0, 0.3))
            else:
                for line in progress:  # ends when the backup exits and closes the pipe
                    if int(line.split("/")[0]) >= percent:
                        break
            proc.kill()
    finally:
        proc.kill()
        proc.wait(timeout=60)
    return proc.returncode


def test_kill_9_at_random_instants_publishes_nothing_and_gc_reclaims_the_orphans(tmp_path: Path) -> None:
    r = init(tmp_path / "r")
    repo("backup", r, "d", dense_disk(tmp_path / "first.raw", MiB, seed=20))
    rnd = random.Random(21)
    source = tmp_path / "source.raw"
    interrupted = 0
    for attempt, percent in enumerate([None, rnd.randrange(1, 50), rnd.randrange(50, 100), 100]):
        before = snapshots(r)
        dense_disk(source, 16 * MiB, seed=100 + attempt)  # new data: every chunk of it is new
        status = _kill_at(r, source, percent, rnd)
        after = snapshots(r)
        assert after[: len(before)] == before
        assert len(after) - len(before) in (0, 1), (status, after)
        if status == 0:
            assert len(after) == len(before) + 1  # it finished before the kill
        interrupted += len(after) == len(before)
        if len(after) > len(before):  # killed after publishing: the snapshot is whole
            restored = tmp_path / f"restored-{attempt}.raw"
            repo("restore", r, "d", restored)
            assert restored.read_bytes() == source.read_bytes()
            restored.unlink()
        assert repo("verify", r).returncode == 0
        repo("gc", r)
        assert chunk_files(r) == referenced_chunks(r)  # the orphans are gone
        assert list((r / "leases").iterdir()) == [] and list((r / "tmp").iterdir()) == []
    assert interrupted >= 2  # the kills at 1-99 % land mid-copy
    repo("backup", r, "d", source)
    restored = tmp_path / "restored.raw"
    repo("restore", r, "d", restored)
    assert restored.read_bytes() == source.read_bytes()


def test_a_flipped_byte_and_a_missing_chunk_are_named_with_every_snapshot_they_break(tmp_path: Path) -> None:
    require("qemu-nbd")
    r = init(tmp_path / "r")
    disk = dense_disk(tmp_path / "disk.raw", 8 * CS, seed=30)
    for name in ("a", "b", "a"):
        repo("backup", r, name, disk)
    a1, a2 = (s["id"] for s in snapshots(r, "a"))
    [b1] = (s["id"] for s in snapshots(r, "b"))
    chunks = manifest_of(r, "a", a1)["chunks"]
    corrupt, missing = chunks[2], chunks[5]
    path = r / "chunks" / corrupt[:2] / corrupt
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    path.write_bytes(bytes(blob))
    (r / "chunks" / missing[:2] / missing).unlink()
    everyone = sorted([f"a@{a1}", f"a@{a2}", f"b@{b1}"])

    proc = repo("verify", r, check=False)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"chunk {corrupt} is corrupt: breaks {', '.join(everyone)}" in lines
    assert f"chunk {missing} is missing: breaks {', '.join(everyone)}" in lines
    report = json.loads(repo("verify", r, "--json", check=False).stdout)
    assert {c["digest"]: (c["reason"], c["snapshots"]) for c in report["bad-chunks"]} == {
        corrupt: ("corrupt", everyone),
        missing: ("missing", everyone),
    }
    proc = repo("verify", r, f"b@{b1}", "--json", check=False)
    assert proc.returncode == 1
    assert {c["digest"]: c["snapshots"] for c in json.loads(proc.stdout)["bad-chunks"]} == {
        corrupt: [f"b@{b1}"],
        missing: [f"b@{b1}"],
    }

    target = tmp_path / "restored.raw"
    line = one_line_error(repo("restore", r, f"a@{a1}", target, check=False))
    assert corrupt in line or missing in line
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.raw", "r"]  # no temporary left either
    export = tmp_path / "export.raw"
    export.write_bytes(bytes(8 * CS))
    with qemu_nbd(tmp_path, export) as peer:
        line = one_line_error(repo("restore", r, "b", peer.uri, check=False))
    assert "partial" in line and (corrupt in line or missing in line)


def test_enospc_fails_the_backup_cleanly_and_leaves_the_repository_intact(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mnt)
    try:
        r = init(mnt / "r")
        small = dense_disk(tmp_path / "small.raw", MiB, seed=40)
        repo("backup", r, "d", small)
        [first] = snapshots(r)
        line = one_line_error(repo("backup", r, "d", dense_disk(tmp_path / "big.raw", 8 * MiB, seed=41), check=False))
        assert "No space left on device" in line, line
        assert snapshots(r) == [first]
        assert repo("verify", r).returncode == 0
        restored = tmp_path / "restored.raw"
        repo("restore", r, "d", restored)
        assert restored.read_bytes() == small.read_bytes()
        repo("gc", r)
        assert chunk_files(r) == referenced_chunks(r)
        repo("backup", r, "d", small)  # room again: the next backup works
        assert len(snapshots(r)) == 2
    finally:
        run("umount", mnt)


def test_two_backups_and_prune_and_gc_at_the_same_time(tmp_path: Path) -> None:
    r = init(tmp_path / "r")
    sources: dict[str, Path] = {}  # "disk@id" -> the file it was taken from
    for disk in ("a", "b"):
        for i in range(2):
            source = dense_disk(tmp_path / f"{disk}{i}.raw", 1 * MiB, seed=10 * ord(disk) + i)
            ref = repo("backup", r, disk, source).stdout.split()[0]
            sources[ref] = source
    new = {disk: dense_disk(tmp_path / f"{disk}-new.raw", 16 * MiB, seed=50 + n) for n, disk in enumerate("ab")}
    refs: dict[str, str] = {}
    backups = {
        disk: subprocess.Popen(
            nbd_backup_argv("repo", "backup", "--no-progress", str(r), disk, str(source)),
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for disk, source in new.items()
    }
    try:
        for _ in range(3):
            prune = repo("prune", r, "--keep-last", "1", check=False)
            assert prune.returncode == 0 or "busy" in prune.stderr, prune.stderr
            repo("gc", r)
        for disk, proc in backups.items():
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            refs[disk] = out.split()[0]
            sources[refs[disk]] = new[disk]
    finally:
        for proc in backups.values():
            proc.kill()
            proc.wait()
    repo("gc", r)
    assert repo("verify", r).returncode == 0
    listed = [f"{s['disk']}@{s['id']}" for s in snapshots(r)]
    assert set(refs.values()) <= set(listed)
    for n, ref in enumerate(listed):
        restored = tmp_path / f"restored-{n}.raw"
        repo("restore", r, ref, restored)
        assert restored.read_bytes() == sources[ref].read_bytes(), ref
        restored.unlink()
