"""qcow2 images through the daemon and the CLI: ``--export NAME=PATH,format=qcow2`` and ``copy``.

A writable qcow2 export written by qemu-io over NBD must leave, after SIGTERM, an image that
``qemu-img check`` finds clean and ``qemu-img compare`` finds as written; its ``base:allocation``
must agree with what ``qemu-img map`` says about the file itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import nbd_backup_argv, require, run
from peers import serve

MiB = 1024 * 1024
SIZE = 4 * MiB

WRITES = [
    "write -P 0x41 0 100000",
    "write -z 131072 131072",
    "write -P 0x42 1048577 70000",
    f"write -P 0x43 {SIZE - 4096} 4096",
    "discard 2097152 131072",
]


def _qemu_image(tmp_path: Path) -> tuple[Path, Path]:
    image, raw = tmp_path / "disk.qcow2", tmp_path / "expected.raw"
    run("qemu-img", "create", "-f", "qcow2", image, str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 3M", "-c", "write -z 1M 64k", image)
    run("qemu-img", "convert", "-O", "raw", image, raw)
    return image, raw


def _flags(entries: list[dict[str, object]]) -> list[tuple[bool, bool]]:
    out: list[tuple[bool, bool]] = []
    for pos in range(0, SIZE, 65536):
        for e in entries:
            start, length = int(str(e["start"])), int(str(e["length"]))
            if start <= pos < start + length:
                out.append((bool(e["data"]), bool(e["zero"])))
                break
    return out


def test_writable_qcow2_export_stays_clean(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    image, raw = _qemu_image(tmp_path)
    with serve(tmp_path, [f"disk={image},format=qcow2"]) as served:
        uri = served.uri("disk")
        argv: list[str] = ["qemu-io", "-f", "raw"]
        for command in WRITES:
            argv += ["-c", command]
        run(*argv, uri)
        got_map = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", uri).stdout)
        assert served.stop() == 0
    for command in WRITES:
        if not command.startswith("discard"):  # discard leaves unspecified contents: not replayed
            run("qemu-io", "-f", "raw", "-c", command, raw)
    run("qemu-io", "-f", "raw", "-c", "write -z 2097152 131072", raw)  # our discard reads as zeroes
    run("qemu-img", "check", image)
    info = json.loads(run("qemu-img", "info", "--output=json", image).stdout)
    assert not info.get("dirty-flag", False)  # SIGTERM closed the image cleanly
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, raw)
    file_map = json.loads(run("qemu-img", "map", "--output=json", image).stdout)
    assert _flags(got_map) == _flags(file_map)


def test_readonly_export_of_our_backup_and_copy_round_trip(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    source = tmp_path / "source.raw"
    data = bytearray(os.urandom(SIZE))
    data[MiB : 2 * MiB] = bytes(MiB)  # a zero region: becomes unallocated in the copy
    source.write_bytes(data)
    backup = tmp_path / "backup.qcow2"
    run(*nbd_backup_argv("copy", "--no-progress", "-O", "qcow2", str(source), str(backup)), timeout=120)
    run("qemu-img", "check", backup)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", backup, source)
    entries = json.loads(run("qemu-img", "map", "--output=json", backup).stdout)
    assert any(int(e["start"]) <= MiB and e["data"] is False and e["zero"] is True for e in entries)
    with serve(tmp_path, [f"b={backup},readonly"]) as served:
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", served.uri("b"), source)
        restored = tmp_path / "restored.raw"
        run(*nbd_backup_argv("copy", "--no-progress", served.uri("b"), str(restored)), timeout=120)
        assert served.stop() == 0
    assert restored.read_bytes() == bytes(data)


def test_qcow2_export_given_as_raw_is_refused(tmp_path: Path) -> None:
    require("qemu-img")
    image, _ = _qemu_image(tmp_path)
    proc = run(
        *nbd_backup_argv("serve", "--nbd", "127.0.0.1:0", "--export", f"d={image},format=raw"),
        check=False,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "qcow2" in proc.stderr


@pytest.mark.parametrize("compressed", [False, True])
def test_copy_from_qemu_qcow2(tmp_path: Path, compressed: bool) -> None:
    require("qemu-img", "qemu-io")
    image, raw = _qemu_image(tmp_path)
    if compressed:
        packed = tmp_path / "packed.qcow2"
        run("qemu-img", "convert", "-c", "-O", "qcow2", image, packed)
        image = packed
    out = tmp_path / "out.qcow2"
    run(*nbd_backup_argv("copy", "--no-progress", "-O", "qcow2", str(image), str(out)), timeout=120)
    run("qemu-img", "check", out)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", out, raw)


def test_killed_export_is_dirty_then_repaired_on_the_next_start(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    image, raw = _qemu_image(tmp_path)
    with serve(tmp_path, [f"disk={image},format=qcow2"]) as served:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "flush", served.uri("disk"))
        served.proc.kill()  # no clean shutdown: the image keeps its dirty bit
        served.proc.wait()
    info = json.loads(run("qemu-img", "info", "--output=json", image).stdout)
    assert info["dirty-flag"] is True
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", raw)
    with serve(tmp_path, [f"disk={image},format=qcow2"]) as served:  # writable: refcounts rebuilt first
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", served.uri("disk"), raw)
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5b 2M 64k", served.uri("disk"))
        assert served.stop() == 0
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5b 2M 64k", raw)
    run("qemu-img", "check", image)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, raw)
