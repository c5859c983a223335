"""What a QMP or NBD client may reach on the host: backing chains under ``--allow-dir`` (images made by
qemu-img), ``nbd-server-start`` unix sockets, and writes that would turn a probed raw export into
another format (checked with our client and with qemu-io)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from conftest import require
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
