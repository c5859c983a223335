"""The container's entrypoint: arguments after the image name are merged with the image's defaults
(a default is dropped only when its option is given), as the README's "Container" section says."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ENTRYPOINT = Path(__file__).resolve().parent.parent / "contrib" / "container" / "entrypoint.sh"
DEFAULTS = [
    "--qmp",
    "unix:/run/nbd-backup/qmp.sock",
    "--nbd",
    "0.0.0.0:10809",
    "--allow-dir",
    "/backups",
    "--pid-file",
    "/run/nbd-backup/serve.pid",
]


def run_entrypoint(tmp_path: Path, *args: str) -> list[str]:
    """The argv the entrypoint execs, seen by a stand-in ``nbd-backup`` (or other command) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("nbd-backup", "qemu-img"):
        fake = bin_dir / name
        fake.write_text(f'#!/bin/sh\nprintf "%s\\n" {name} "$@"\n')
        fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run([str(ENTRYPOINT), *args], capture_output=True, text=True, env=env, check=True, timeout=30)
    return out.stdout.splitlines()


def test_no_arguments_are_the_defaults(tmp_path: Path) -> None:
    assert run_entrypoint(tmp_path) == ["nbd-backup", "serve", *DEFAULTS]


def test_added_arguments_keep_the_defaults(tmp_path: Path) -> None:
    argv = run_entrypoint(tmp_path, "--export", "disk=/backups/disk.raw", "--max-connections", "8")
    assert argv == ["nbd-backup", "serve", *DEFAULTS, "--export", "disk=/backups/disk.raw", "--max-connections", "8"]


@pytest.mark.parametrize("form", ["separate", "joined"])
def test_a_given_option_replaces_only_its_default(tmp_path: Path, form: str) -> None:
    nbd = ["--nbd", "0.0.0.0:10810"] if form == "separate" else ["--nbd=0.0.0.0:10810"]
    argv = run_entrypoint(tmp_path, *nbd, "--nbd-socket", "/run/nbd-backup/nbd.sock")
    without_nbd = [a for a in DEFAULTS if a not in ("--nbd", "0.0.0.0:10809")]
    assert argv == ["nbd-backup", "serve", *without_nbd, *nbd, "--nbd-socket", "/run/nbd-backup/nbd.sock"]


def test_serve_first_is_the_same(tmp_path: Path) -> None:
    assert run_entrypoint(tmp_path, "serve", "--repo-exports") == ["nbd-backup", "serve", *DEFAULTS, "--repo-exports"]


def test_no_defaults(tmp_path: Path) -> None:
    argv = run_entrypoint(tmp_path, "--no-defaults", "--config", "/etc/nbd-backup/serve.toml")
    assert argv == ["nbd-backup", "serve", "--config", "/etc/nbd-backup/serve.toml"]


def test_a_command_runs_as_given(tmp_path: Path) -> None:
    assert run_entrypoint(tmp_path, "qemu-img", "info", "/backups/d.qcow2") == [
        "qemu-img",
        "info",
        "/backups/d.qcow2",
    ]
