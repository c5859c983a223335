"""What a QMP or NBD client may reach on the host: backing chains under ``--allow-dir`` (images made by
qemu-img), ``nbd-server-start`` unix sockets, and writes that would turn a probed raw export into
another format (checked with our client and with qemu-io)."""

from __future__ import annotations

import errno
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import require
from peers import serve
from qmp_daemon import make_image, our_daemon

SIZE = 1 << 20


def qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True, timeout=60)


def test_backing_chain_outside_allow_dir_refused(tmp_path: Path) -> None:
    """A qcow2 inside the allowed directory whose backing file (relative, or one level further down)
    is outside: blockdev-add and drive-backup mode=existing fail with a GenericError naming the file,
    and nothing is opened; a chain wholly inside opens."""
    require("qemu-img")
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    secret = make_image(outside / "secret.raw", SIZE)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "../outside/secret.raw", "-F", "raw", allowed / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", allowed / "mid.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", allowed / "deep.qcow2")
    make_image(allowed / "base.raw", SIZE)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", allowed / "ok.qcow2")
    make_image(allowed / "src.raw", SIZE)
    with our_daemon(tmp_path / "run", "--allow-dir", str(allowed)) as daemon, daemon.connect() as q:
        q.ok("blockdev-add", driver="file", filename=str(allowed / "src.raw"), **{"node-name": "src"})
        for name in ("top.qcow2", "deep.qcow2"):
            image = str(allowed / name)
            file = {"driver": "file", "filename": image}
            reply = q.execute("blockdev-add", driver="qcow2", file=file, **{"node-name": "x"})
            assert reply["error"]["class"] == "GenericError", reply
            assert str(secret) in reply["error"]["desc"] and "outside the allowed" in reply["error"]["desc"], reply
            target = {"device": "src", "target": image, "sync": "full", "mode": "existing", "format": "qcow2"}
            reply = q.execute("drive-backup", **target)
            assert reply["error"]["class"] == "GenericError" and str(secret) in reply["error"]["desc"], reply
        assert [n["node-name"] for n in q.ok("query-named-block-nodes")] == ["src"]
        assert q.ok("query-jobs") == []
        file = {"driver": "file", "filename": str(allowed / "ok.qcow2")}
        q.ok("blockdev-add", driver="qcow2", file=file, **{"node-name": "ok"})
        node = q.ok("query-named-block-nodes")[0]
        assert node["node-name"] == "ok" and node["backing_file_depth"] == 1, node
    assert (allowed / "top.qcow2").exists() and secret.read_bytes() == make_image(tmp_path / "x", SIZE).read_bytes()


def _listening(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4)
    return sock


def _answers(listener: socket.socket) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(listener.getsockname())
        listener.settimeout(10)
        listener.accept()[0].close()
    return True


def test_nbd_server_start_socket_confined_and_live_sockets_kept(tmp_path: Path) -> None:
    """Another service's live socket (outside or inside --allow-dir) is never unlinked or taken over;
    a path outside is refused with GenericError; a stale socket file inside is replaced and serves."""
    require("nbdinfo")
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    live_out, live_in = _listening(outside / "svc.sock"), _listening(allowed / "svc.sock")
    try:
        with our_daemon(tmp_path / "run", "--allow-dir", str(allowed)) as daemon, daemon.connect() as q:
            for path, words in ((outside / "svc.sock", "outside the allowed"), (allowed / "svc.sock", "listening")):
                reply = q.execute("nbd-server-start", addr={"type": "unix", "data": {"path": str(path)}})
                assert reply["error"]["class"] == "GenericError" and words in reply["error"]["desc"], reply
            assert _answers(live_out) and _answers(live_in)
            _listening(allowed / "stale.sock").close()
            q.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(allowed / "stale.sock")}})
            q.ok("blockdev-add", driver="null-co", size=SIZE, **{"node-name": "n0"})
            q.ok("block-export-add", type="nbd", id="e0", **{"node-name": "n0"})
            uri = f"nbd+unix:///n0?socket={allowed / 'stale.sock'}"
            out = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60)
            assert out.stdout.strip() == str(SIZE), out
    finally:
        live_out.close()
        live_in.close()
    assert (outside / "svc.sock").exists() and (allowed / "svc.sock").exists()


def qemu_io(uri: str, command: str) -> str:
    """``qemu-io -f raw URI -c COMMAND``: its output (errors included)."""
    done = subprocess.run(["qemu-io", "-f", "raw", uri, "-c", command], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


async def test_probed_raw_export_cannot_be_turned_into_qcow2(tmp_path: Path) -> None:
    """``serve --export g=disk.img`` (no format): a client writing a qcow2 header that names a host
    file as backing file gets EPERM (our client and qemu-io), the image is unchanged and still
    probes raw after a restart; other writes work; with format=raw the same write is allowed."""
    require("qemu-img", "qemu-io")
    from nbd.client import NbdClient

    secret = make_image(tmp_path / "secret.raw", SIZE, pattern=0x77)
    qemu_img("create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", tmp_path / "evil.qcow2", str(SIZE))
    header = (tmp_path / "evil.qcow2").read_bytes()[: 64 << 10]  # magic, then the backing file's name
    (tmp_path / "header.bin").write_bytes(header)
    disk, explicit = make_image(tmp_path / "disk.img", SIZE), make_image(tmp_path / "raw.img", SIZE)
    original = disk.read_bytes()
    with serve(tmp_path, [f"g={disk}", f"r={explicit},format=raw"]) as served:
        log = served.stderr()
        warnings = "\n".join(line for line in log.splitlines() if " WARNING: " in line)
        assert f"'{disk}' and probing guessed raw" in warnings and str(explicit) not in warnings, log
        client = await NbdClient.connect(served.uri("g", "unix"))
        try:
            with pytest.raises(OSError) as info:
                await client.pwrite(0, header)
            assert info.value.errno == errno.EPERM
            await client.flush()
            await client.pwrite(4096, header)  # past the first sector: data like any other
            await client.pwrite(0, b"\xeb\x63\x90")  # a first sector that still probes raw
        finally:
            await client.close()
        write_header = f"write -s {tmp_path / 'header.bin'} 0 64k"
        assert "Operation not permitted" in qemu_io(served.uri("g", "unix"), write_header)
        assert "wrote 512/512" in qemu_io(served.uri("g", "unix"), "write -P 0x51 0 512")
        # format=raw given: the user's choice, as in QEMU
        assert "wrote 65536/65536" in qemu_io(served.uri("r", "unix"), write_header)
    expected = bytearray(original)
    expected[4096 : 4096 + len(header)] = header
    expected[:512] = b"\x51" * 512
    assert disk.read_bytes() == bytes(expected)
    assert explicit.read_bytes()[:4] == b"QFI\xfb"
    with serve(tmp_path, [f"g={disk}"]) as served:  # restarted: still probed as raw, serves the disk's bytes
        client = await NbdClient.connect(served.uri("g", "unix"))
        try:
            assert await client.pread(0, 4096) == bytes(expected[:4096])
        finally:
            await client.close()
