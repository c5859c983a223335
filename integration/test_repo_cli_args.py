"""``nbd-backup repo``: names, arguments and exit statuses (design §3.6 "Precisely"): every failure is one
line on stderr and a non-zero status; ``verify`` exits 2 when it cannot run."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
from conftest import ROOT, nbd_backup_argv, require, run
from peers import qemu_nbd
from repo_cli_kit import CS, init, one_line_error, random_disk, repo, snapshots

BAD_DISKS = ["../x", "a//b", ".hidden", "a/@lock", "x" * 65, "/".join(["s"] * 9), "", "a/", "sp ace", "a@b/c"]


def test_bad_disk_names_are_refused_by_every_command(tmp_path: Path) -> None:
    r = init(tmp_path / "r")
    disk = random_disk(tmp_path / "d.raw", 4 * CS, seed=1)
    for name in BAD_DISKS:
        line = one_line_error(repo("backup", r, name, disk, check=False))
        assert line.startswith("nbd-backup repo backup: ")
        assert "invalid disk name" in line or "invalid snapshot" in line, line
    one_line_error(repo("list", r, "../x", check=False))
    one_line_error(repo("restore", r, "a//b", tmp_path / "out.raw", check=False))
    proc = repo("verify", r, ".hidden", check=False)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    one_line_error(repo("prune", r, "a/@lock", "--keep-last", "1", check=False))
    assert snapshots(r) == [] and not (tmp_path / "out.raw").exists()
    assert list((r / "disks").iterdir()) == []  # nothing was created for a refused name


def test_verify_exits_2_when_it_cannot_run(tmp_path: Path) -> None:
    for args in (
        [tmp_path / "missing"],
        [tmp_path],  # a directory that is not a repository
        [init(tmp_path / "r"), "d@20990101T000000.000000Z"],  # no such snapshot
        [tmp_path / "r", "d@not-an-id"],
        [tmp_path / "r", "--no-such-option"],
    ):
        proc = repo("verify", *args, check=False)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("nbd-backup repo verify: "), proc.stderr
    assert repo("verify", tmp_path / "r").returncode == 0


def test_init_needs_a_missing_or_empty_directory_and_a_valid_chunk_size(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    assert "not empty" in one_line_error(repo("init", tmp_path / "full", check=False))
    assert "chunk size" in one_line_error(repo("init", tmp_path / "x", "--chunk-size", "3M", check=False))
    assert "invalid size" in one_line_error(repo("init", tmp_path / "y", "--chunk-size", "lots", check=False))
    (tmp_path / "empty").mkdir()
    repo("init", tmp_path / "empty", "--chunk-size", "1M")
    assert "not empty" in one_line_error(repo("init", tmp_path / "empty", check=False))  # a repository now
    assert "not a repository" in one_line_error(repo("list", tmp_path / "full", check=False))


def test_restore_replaces_an_existing_file_only_with_force(tmp_path: Path) -> None:
    r = init(tmp_path / "r")
    disk = random_disk(tmp_path / "d.raw", 8 * CS + 1536, seed=2)  # the last chunk is short
    repo("backup", r, "d", disk)
    target = tmp_path / "target.raw"
    target.write_bytes(b"precious")
    assert "--force" in one_line_error(repo("restore", r, "d", target, check=False))
    assert target.read_bytes() == b"precious"
    repo("restore", r, "d", target, "--force")
    assert target.read_bytes() == disk.read_bytes()
    missing = one_line_error(repo("restore", r, "d@20990101T000000.000000Z", tmp_path / "x.raw", check=False))
    assert "not found" in missing
    assert "no snapshots" in one_line_error(repo("restore", r, "other", tmp_path / "x.raw", check=False))
    assert not (tmp_path / "x.raw").exists()


def test_restore_to_an_nbd_export_smaller_than_the_disk_is_refused(tmp_path: Path) -> None:
    require("qemu-nbd")
    r = init(tmp_path / "r")
    repo("backup", r, "d", random_disk(tmp_path / "d.raw", 8 * CS, seed=3))
    small = tmp_path / "small.raw"
    small.write_bytes(b"\x55" * (8 * CS - 512))
    with qemu_nbd(tmp_path, small) as peer:
        assert "smaller than the disk" in one_line_error(repo("restore", r, "d", peer.uri, check=False))
    assert small.read_bytes() == b"\x55" * (8 * CS - 512)


def test_other_failures_are_one_line(tmp_path: Path) -> None:
    r = init(tmp_path / "r")
    disk = random_disk(tmp_path / "d.raw", 4 * CS, seed=4)
    assert "cannot open the source" in one_line_error(repo("backup", r, "d", tmp_path / "nope.raw", check=False))
    assert "not found" in one_line_error(
        repo("backup", r, "d", disk, "--parent", "20990101T000000.000000Z", check=False)
    )
    assert "invalid snapshot id" in one_line_error(repo("backup", r, "d", disk, "--parent", "yesterday", check=False))
    assert "keep rule" in one_line_error(repo("prune", r, check=False))
    one_line_error(repo("prune", r, "--keep-last", "-1", check=False))
    one_line_error(repo("gc", tmp_path / "nothing", check=False))
    assert snapshots(r) == []


def test_prune_dry_run_prints_what_would_go_and_keeps_it(tmp_path: Path) -> None:
    r = init(tmp_path / "r")
    disk = random_disk(tmp_path / "d.raw", 4 * CS, seed=5)
    for name in ("a", "a", "a", "b"):
        repo("backup", r, name, disk)
    old = [f"a@{s['id']}" for s in snapshots(r, "a")[:2]]
    assert repo("prune", r, "--keep-last", "1", "--dry-run").stdout.splitlines() == [f"would remove {x}" for x in old]
    assert len(snapshots(r)) == 4
    assert repo("prune", r, "--keep-last", "1").stdout.splitlines() == [f"removed {x}" for x in old]
    assert [s["disk"] for s in snapshots(r)] == ["a", "b"]


@pytest.mark.parametrize("action", ["init", "list", "backup", "restore", "verify", "prune", "gc"])
def test_every_action_has_help(action: str) -> None:
    proc = run(*nbd_backup_argv("repo", action, "--help"), cwd=str(ROOT))
    assert f"nbd-backup repo {action}" in proc.stdout and len(proc.stdout.splitlines()) > 5


def test_a_disk_being_written_is_busy_for_another_backup_and_prune(tmp_path: Path) -> None:
    r = init(tmp_path / "r")
    disk = random_disk(tmp_path / "d.raw", 4 * CS, seed=6)
    repo("backup", r, "d", disk)
    fd = os.open(r / "disks" / "d" / "@lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running backup of d holds it
        assert "busy" in one_line_error(repo("backup", r, "d", disk, check=False))
        assert "busy" in one_line_error(repo("prune", r, "d", "--keep-last", "1", check=False))
        repo("backup", r, "e", disk)  # another disk is not held up
        assert repo("verify", r).returncode == 0  # readers never block
    finally:
        os.close(fd)
    repo("backup", r, "d", disk)
    assert [s["disk"] for s in snapshots(r)] == ["d", "d", "e"]
