"""``nbd-backup serve`` as a process: ready line, clean SIGTERM, refusals, hostile clients, both loops."""

from __future__ import annotations

import json
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
from conftest import nbd_backup_argv, require, run
from peers import serve

MiB = 1 << 20


def test_help_speaks_qemu_nbd() -> None:
    out = run(*nbd_backup_argv("serve", "--help")).stdout
    for word in ("--nbd HOST:PORT", "--nbd-socket PATH", "--export", "readonly", "format=raw|qcow2", "qemu-nbd -x"):
        assert word in out


def test_ready_line_and_clean_sigterm(tmp_path: Path) -> None:
    require("nbdinfo")
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(bytes(MiB))
    b.write_bytes(bytes(2 * MiB))
    with serve(tmp_path, [f"a={a}", f"b={b},readonly,format=raw"]) as served:
        assert f"nbd=127.0.0.1:{served.port},unix:{served.socket}" in served.stderr()
        assert "exports=a,b" in served.stderr()
        for transport in ("tcp", "unix"):
            size = run("nbdinfo", "--size", served.uri("b", transport), cwd=str(tmp_path)).stdout
            assert int(size) == 2 * MiB
        # A client stuck half-way through the handshake does not hold the shutdown up.
        stuck = socket.create_connection(("127.0.0.1", served.port))
        assert served.stop() == 0
        stuck.close()
        assert not served.socket.exists()
        assert "Traceback" not in served.stderr()


@pytest.mark.parametrize(
    ("export", "message"),
    [("x={tmp}/missing.raw", "missing.raw"), ("x={tmp}/img.qcow2,format=raw", "qcow2"), ("noequals", "--export")],
)
def test_refusals_exit_1_with_a_message(tmp_path: Path, export: str, message: str) -> None:
    (tmp_path / "img.qcow2").write_bytes(b"QFI\xfb" + bytes(4092))
    result = run(
        *nbd_backup_argv("serve", "--nbd-socket", str(tmp_path / "s.sock"), "--export", export.format(tmp=tmp_path)),
        check=False,
        timeout=30,
    )
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s.sock").exists()


def test_hostile_clients_do_not_disturb_others(tmp_path: Path) -> None:
    require("nbdinfo", "qemu-io")
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(MiB))
    with serve(tmp_path, [f"d={disk}"], "--handshake-timeout", "1", "--max-connections", "8") as served:
        # Garbage instead of a handshake.
        with socket.create_connection(("127.0.0.1", served.port)) as garbage:
            garbage.recv(18)
            garbage.sendall(b"\xde\xad\xbe\xef" * 100)
            garbage.settimeout(10)
            assert garbage.recv(100) == b""  # hung up on
        # An absurd option length: refused and hung up on, without reading 4 GiB first.
        with socket.create_connection(("127.0.0.1", served.port)) as absurd:
            absurd.settimeout(10)
            absurd.recv(18)
            absurd.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 0xFFFFFFFF))
            reply = absurd.recv(20)
            assert struct.unpack(">QIII", reply)[2] == 0x80000009  # NBD_REP_ERR_TOO_BIG
        # A silent client is dropped by the handshake timeout.
        with socket.create_connection(("127.0.0.1", served.port)) as silent:
            silent.settimeout(10)
            assert len(silent.recv(18)) == 18
            assert silent.recv(1) == b""
        # Everyone else is still served.
        run("qemu-io", "-f", "raw", "-c", "write -P 7 0 4k", "-c", "read -P 7 0 4k", served.uri("d"))
        assert "WARNING" in served.stderr()  # the refusals were logged


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_both_event_loops(tmp_path: Path, loop: str) -> None:
    require("qemu-img")
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\x33" * MiB)
    with serve(tmp_path, [f"d={disk}"], env={"NBD_BACKUP_LOOP": loop}) as served:
        out = tmp_path / "out.raw"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri("d", "unix"), out)
        assert out.read_bytes() == disk.read_bytes()
        info = json.loads(run("qemu-img", "info", "--output=json", served.uri("d")).stdout)
        assert info["virtual-size"] == MiB


def test_sigint_also_stops(tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(4096))
    with serve(tmp_path, [f"d={disk}"]) as served:
        served.proc.send_signal(signal.SIGINT)
        assert served.proc.wait(15) == 0


def test_connection_limit_is_a_clear_refusal(tmp_path: Path) -> None:
    require("qemu-img")
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(MiB))
    with serve(tmp_path, [f"d={disk}"], "--max-connections", "1") as served:
        holder = socket.create_connection(("127.0.0.1", served.port))
        holder.settimeout(10)
        holder.recv(18)
        go = struct.pack(">I", 1) + b"d" + struct.pack(">H", 0)
        holder.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, len(go)) + go)
        holder.recv(4096)  # the GO replies: the one allowed connection is in use
        refused = run("qemu-img", "info", served.uri("d"), check=False)
        assert refused.returncode != 0
        assert "too many connections (limit 1)" in refused.stderr
        holder.close()
        deadline = time.monotonic() + 20
        while run("qemu-img", "info", served.uri("d"), check=False).returncode != 0:
            assert time.monotonic() < deadline, "the slot was never given back"
            time.sleep(0.1)
