"""Our NBD server against the real clients, over TCP and a unix socket: qemu-img, qemu-io, nbdinfo,
nbdcopy and fio's nbd engine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require, run
from peers import Served, qemu_nbd, serve

MiB = 1 << 20
SIZE = 8 * MiB
TRANSPORTS = ["tcp", "unix"]


def pattern(size: int, seed: int = 1) -> bytes:
    block = bytes((i * seed + i // 251) & 0xFF for i in range(65536))
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(SIZE)
        f.seek(MiB)
        f.write(pattern(MiB))  # data at [1 MiB, 2 MiB), holes elsewhere
    ro = tmp_path / "ro.raw"
    ro.write_bytes(pattern(2 * MiB, 3))
    return {"disk": disk, "ro": ro}


@pytest.fixture
def served(tmp_path: Path, images: dict[str, Path]) -> Iterator[Served]:
    with serve(tmp_path, [f"disk={images['disk']}", f"ro={images['ro']},readonly,description=read only"]) as s:
        yield s


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_qemu_img_info_convert_compare(served: Served, images: dict[str, Path], tmp_path: Path, transport: str) -> None:
    require("qemu-img")
    uri = served.uri("disk", transport)
    info = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
    assert info["virtual-size"] == SIZE
    # nbd → local, identical to the file behind the export.
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out)
    assert out.read_bytes() == images["disk"].read_bytes()
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", out, uri)
    # local → nbd, over the existing export.
    src = tmp_path / "src.raw"
    src.write_bytes(pattern(SIZE, 7))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
    assert images["disk"].read_bytes() == src.read_bytes()
    different = run("qemu-img", "compare", "-f", "raw", "-F", "raw", out, uri, check=False)
    assert different.returncode == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_qemu_io_patterns_zero_discard(served: Served, images: dict[str, Path], transport: str) -> None:
    require("qemu-io")
    uri = served.uri("disk", transport)
    commands = [
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -P 0xcd 4M 64k",
        "write -z 0 64k",
        "read -P 0 0 64k",
        "read -P 0xab 64k 960k",
        "discard 4M 64k",
        "write -z -u 512k 512k",
        "read -P 0 512k 512k",
        "aio_write -P 0x11 6M 4k",
        "aio_write -P 0x22 7M 4k",
        "aio_flush",
        "read -P 0x11 6M 4k",
        "read -P 0x22 7M 4k",
        "flush",
    ]
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    result = run(*argv, uri)
    assert "Pattern verification failed" not in result.stdout + result.stderr
    data = images["disk"].read_bytes()
    assert data[:65536] == bytes(65536)
    assert data[65536 : 512 * 1024] == b"\xab" * (512 * 1024 - 65536)
    assert data[6 * MiB : 6 * MiB + 4096] == b"\x11" * 4096
    # A failed pattern check is a non-zero exit: prove the checks can fail.
    bad = run("qemu-io", "-f", "raw", "-c", "read -P 0x99 0 4k", uri, check=False)
    assert "Pattern verification failed" in bad.stdout + bad.stderr


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_qemu_io_read_only_export_refuses_writes(served: Served, transport: str) -> None:
    require("qemu-io")
    uri = served.uri("ro", transport)
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 1", "-c", "read -P 3 1 1", uri)
    result = run("qemu-io", "-f", "raw", "-c", "write 0 4k", uri, check=False)
    assert result.returncode != 0
    assert "Permission denied" in result.stdout + result.stderr


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nbdinfo_json_list_map(served: Served, transport: str, tmp_path: Path) -> None:
    require("nbdinfo")
    info = json.loads(run("nbdinfo", "--json", served.uri("disk", transport), cwd=str(tmp_path)).stdout)
    export = info["exports"][0]
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    assert export["export-size"] == SIZE
    assert export["can_multi_conn"] is True and export["is_read_only"] is False
    assert export["can_zero"] and export["can_trim"] and export["can_flush"] and export["can_fua"]
    assert "base:allocation" in export["contexts"]
    ro = json.loads(run("nbdinfo", "--json", served.uri("ro", transport), cwd=str(tmp_path)).stdout)["exports"][0]
    assert ro["is_read_only"] is True and ro["export-size"] == 2 * MiB

    base = served.uri("", transport)
    listing = json.loads(run("nbdinfo", "--json", "--list", base, cwd=str(tmp_path)).stdout)
    names = {e["export-name"]: e for e in listing["exports"]}
    assert set(names) == {"disk", "ro"}
    assert names["ro"].get("description") == "read only"

    mapping = json.loads(run("nbdinfo", "--json", "--map", served.uri("disk", transport), cwd=str(tmp_path)).stdout)
    # The sparse file shows its holes: data only around [1 MiB, 2 MiB).
    total = sum(e["length"] for e in mapping)
    assert total == SIZE
    holes = [e for e in mapping if e["type"] & 1]
    data = [e for e in mapping if not e["type"] & 1]
    assert holes and data
    assert all(e["offset"] <= MiB and e["offset"] + e["length"] >= 2 * MiB for e in data)
    assert any(e["offset"] == 0 for e in holes) and any(e["offset"] + e["length"] == SIZE for e in holes)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nbdcopy_both_ways_multi_conn(served: Served, tmp_path: Path, transport: str) -> None:
    require("nbdcopy")
    uri = served.uri("disk", transport)
    src = tmp_path / "src.raw"
    src.write_bytes(pattern(SIZE, 5))
    # CAN_MULTI_CONN is advertised (checked above), so four connections are allowed.
    run("nbdcopy", "-C", "4", "--flush", str(src), uri, cwd=str(tmp_path))
    back = tmp_path / "back.raw"
    run("nbdcopy", "-C", "4", uri, str(back), cwd=str(tmp_path))
    assert back.read_bytes() == src.read_bytes()
    # A sparse source: zeroes travel as zero requests / holes and still compare equal.
    sparse = tmp_path / "sparse.raw"
    with open(sparse, "wb") as f:
        f.truncate(SIZE)
        f.seek(3 * MiB)
        f.write(b"\x5a" * 4096)
    run("nbdcopy", str(sparse), uri, cwd=str(tmp_path))
    run("nbdcopy", uri, str(back), cwd=str(tmp_path))
    assert back.read_bytes() == sparse.read_bytes()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fio_nbd_engine_verify(served: Served, tmp_path: Path, transport: str) -> None:
    require("fio")
    uri = served.uri("disk", transport)
    result = run(
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=randwrite",
        "--bs=4k",
        "--bsrange=4k-64k",
        f"--size={SIZE}",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
        cwd=str(tmp_path),
        timeout=120,
    )
    job = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= SIZE and job["read"]["io_bytes"] >= SIZE


def test_unaligned_image_matches_qemu_nbd(tmp_path: Path) -> None:
    """A file whose size is not a multiple of 512 is exported with the size qemu-nbd gives it."""
    require("qemu-nbd", "nbdinfo")
    odd = tmp_path / "odd.raw"
    odd.write_bytes(b"\x01" * 1000)
    with qemu_nbd(tmp_path, odd, export="odd", extra=("-r",), name="qemu") as qemu:
        theirs = int(run("nbdinfo", "--size", qemu.uri, cwd=str(tmp_path)).stdout)
    with serve(tmp_path, [f"odd={odd},readonly"]) as s:
        ours = int(run("nbdinfo", "--size", s.uri("odd"), cwd=str(tmp_path)).stdout)
        back = tmp_path / "odd.out"
        run("nbdcopy", s.uri("odd"), str(back), cwd=str(tmp_path))
    assert ours == theirs == 1024
    assert back.read_bytes() == b"\x01" * 1000 + bytes(24)
