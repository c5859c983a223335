"""``nbd-backup info`` says what ``nbdinfo`` says about the same exports (``--json``, ``--list``, ``--map``)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, nbd_backup_argv, require, run
from peers import KINDS, make_image, nbdinfo_json, nbdkit, peer_of_kind, qemu_nbd

SIZE = 8 << 20
# Keys nbdinfo prints that need more than NBD to compute (file(1) of the first sector, a size string).
NOT_COMPARED = {"content", "export-size-str"}


def info(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        nbd_backup_argv("info", "--json", *args), capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def assert_same_exports(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert {k: ours[k] for k in ("protocol", "TLS", "structured")} == {
        k: theirs[k] for k in ("protocol", "TLS", "structured")
    }
    assert len(ours["exports"]) == len(theirs["exports"])
    for mine, other in zip(
        sorted(ours["exports"], key=lambda e: e["export-name"]),
        sorted(theirs["exports"], key=lambda e: e["export-name"]),
        strict=True,
    ):
        expected = {k: v for k, v in other.items() if k not in NOT_COMPARED}
        # nbdinfo prints the URI it was given; ours is canonical: compare the parsed forms instead.
        expected.pop("uri", None)
        assert {k: mine[k] for k in expected if k in mine} == expected
        assert set(expected) <= set(mine), set(expected) - set(mine)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "nbd-server"])
def test_json_matches_nbdinfo(kind: str, tmp_path: Path) -> None:
    with peer_of_kind(kind, tmp_path) as peer:
        assert_same_exports(info(peer.uri), nbdinfo_json(peer.uri))


def test_nbd_server_matches_nbdinfo(tmp_path: Path) -> None:
    """nbdinfo 1.14 reads nbd-server 3.24's size as 0 in --json (its NBD_OPT_INFO); --size agrees with us."""
    with peer_of_kind("nbd-server", tmp_path) as peer:
        theirs = nbdinfo_json(peer.uri)
        theirs["exports"][0]["export-size"] = int(run("nbdinfo", "--size", peer.uri, cwd="/").stdout)
        assert_same_exports(info(peer.uri), theirs)


def test_description_and_block_sizes(tmp_path: Path) -> None:
    image = make_image(tmp_path / "d.img", SIZE)
    with qemu_nbd(tmp_path, image, export="disk", extra=("-D", "a disk, described")) as peer:
        ours = info(peer.uri)
        assert ours["exports"][0]["description"] == "a disk, described"
        assert ours["exports"][0]["block_size_maximum"] == 32 << 20
        assert_same_exports(ours, nbdinfo_json(peer.uri))


def test_list_matches_nbdinfo(tmp_path: Path) -> None:
    args = (
        "--filter=exportname",
        "memory",
        f"size={SIZE}",
        "exportname=alpha",
        "exportname=beta",
        "exportname-list=explicit",
    )
    with nbdkit(tmp_path, *args, "exportdesc=fixed:described") as peer:
        ours = info("--list", peer.uri)
        theirs = nbdinfo_json(peer.uri, "--list")
        assert sorted(e["export-name"] for e in ours["exports"]) == ["alpha", "beta"]
        assert_same_exports(ours, theirs)


def _merged(entries: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    merged: list[list[int]] = []
    for entry in entries:
        if merged and merged[-1][2] == entry["type"]:
            merged[-1][1] += entry["length"]
        else:
            merged.append([entry["offset"], entry["length"], entry["type"]])
    return [(a, b, c) for a, b, c in merged]


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit-data", "nbd-backup"])
def test_map_matches_nbdinfo(kind: str, tmp_path: Path) -> None:
    if kind == "nbdkit-data":
        context = nbdkit(tmp_path, "-r", "data", "1 @1048576 (2)*70000 @6291456 3", f"size={SIZE}")
    else:
        context = peer_of_kind(kind, tmp_path)
    with context as peer:
        if peer.image is not None:
            with open(peer.image, "r+b") as f:
                f.seek(1 << 20)
                f.write(b"x" * 200_000)
                f.seek(5 << 20)
                f.write(b"y" * 4096)
        ours = info("--map", peer.uri)["exports"][0]["map"]
        theirs = json.loads(run("nbdinfo", "--map", "--json", peer.uri, cwd="/").stdout)
    assert _merged(ours) == _merged(theirs)
    assert [e["description"] for e in ours] == [e["description"] for e in ours if e["description"]]
    assert any(e["type"] == 3 for e in ours) and any(e["type"] == 0 for e in ours)


def test_text_output_and_errors(tmp_path: Path) -> None:
    with nbdkit(tmp_path, "memory", f"size={SIZE}") as peer:
        proc = subprocess.run(nbd_backup_argv("info", "--map", peer.uri), capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        assert f"export-size: {SIZE}" in proc.stdout and "hole,zero" in proc.stdout
    for uri, message in [
        (f"nbd+unix:///?socket={tmp_path}/none.sock", "No such file"),
        ("nbds://localhost/?tls-psk-file=/k", "pre-shared keys is not supported"),
        ("nope", "not an NBD URI"),
    ]:
        proc = subprocess.run(nbd_backup_argv("info", uri), capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.fixture
def chain_with_bitmap(tmp_path: Path) -> Path:
    """A qcow2 overlay with a backing file and a recording bitmap ``b0``, written after the bitmap began."""
    require("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M", cwd="/")
    run("qemu-io", "-c", "write -P 1 0 1M", str(base), cwd="/")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top), cwd="/")
    run("qemu-img", "bitmap", "--add", str(top), "b0", cwd="/")
    run("qemu-io", "-c", "write -P 2 2M 64k", "-c", "write -P 3 3M 4k", "-c", "write -P 4 100k 1", str(top), cwd="/")
    return top


@pytest.mark.parametrize("context", ["qemu:dirty-bitmap:b0", "qemu:allocation-depth", "base:allocation"])
def test_map_of_a_meta_context_matches_nbdinfo(tmp_path: Path, chain_with_bitmap: Path, context: str) -> None:
    extra = ("-f", "qcow2", "-r", "-A", "-B", "b0")
    with qemu_nbd(tmp_path, chain_with_bitmap, extra=extra) as peer:
        ours = info(f"--map={context}", peer.uri)["exports"][0]
        theirs = json.loads(run("nbdinfo", f"--map={context}", "--json", peer.uri, cwd="/").stdout)
        assert ours["map"] == theirs
        if context == "qemu:dirty-bitmap:b0":  # the writes after the bitmap began, rounded to 64 KiB
            dirty = [(e["offset"], e["length"]) for e in ours["map"] if e["description"] == "dirty"]
            assert dirty == [(64 << 10, 64 << 10), (2 << 20, 64 << 10), (3 << 20, 64 << 10)]
        text = subprocess.run(
            nbd_backup_argv("info", f"--map={context}", peer.uri), capture_output=True, text=True, cwd=ROOT
        )
        assert text.returncode == 0, text.stderr
        assert text.stdout.count("\n") >= len(theirs)


def test_a_context_the_export_does_not_offer_is_an_error(tmp_path: Path) -> None:
    image = make_image(tmp_path / "d.img", SIZE)
    with qemu_nbd(tmp_path, image) as peer:
        proc = subprocess.run(
            nbd_backup_argv("info", "--map=qemu:dirty-bitmap:nope", peer.uri), capture_output=True, text=True, cwd=ROOT
        )
    assert proc.returncode == 1
    assert "does not offer meta context 'qemu:dirty-bitmap:nope'" in proc.stderr
