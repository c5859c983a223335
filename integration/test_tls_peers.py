"""NBD over TLS with the real peers, both ways, with certificates made by the test (``tests.tlskit``).

Our daemon (``serve --tls require --tls-authz DN``) served to nbdinfo/nbdcopy (``nbds://``) and to
qemu-img/qemu-io (``--object tls-creds-x509`` + ``--image-opts``); our client (``info``, ``copy``,
``backup`` targets) against ``qemu-nbd --tls-creds`` and ``nbdkit --tls=require``; byte-exact. Then the
refusals — a clear-text client against ``require`` (the exact option replies), a client certificate
from another CA, a DN the authz refuses, STARTTLS followed by garbage, a client that drops in the middle
of the handshake, a TLS client against a server without TLS — each followed by a client that is served.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require, run
from peers import ROOT, Served, nbd_backup_argv, nbdkit, qemu_nbd, serve
from qmp_daemon import our_daemon

from nbd import constants as c
from nbd.tls import client_context
from tests.tlskit import CLIENT_DN, Pki, make_pki

SIZE = 4 << 20
Opt, Rep = c.Opt, c.Rep


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require("openssl")
    return make_pki(tmp_path_factory.mktemp("pki"))


def random_image(path: Path, seed: int) -> bytes:
    rng = random.Random(seed)
    data = bytearray(SIZE)
    for offset in range(0, SIZE, 256 * 1024):  # data in some places, holes in others
        if rng.random() < 0.6:
            data[offset : offset + 65536] = rng.randbytes(65536)
    path.write_bytes(data)
    return bytes(data)


@pytest.fixture(scope="module")
def daemon(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Path, bytes]]:
    tmp = tmp_path_factory.mktemp("tls-daemon")
    image = tmp / "disk.raw"
    data = random_image(image, 1)
    tls = ["--tls", "require", "--tls-dir", str(pki.server), "--tls-authz", CLIENT_DN]
    with serve(tmp, [f"disk={image},format=raw"], *tls) as served:
        yield served, image, data


def nbds(served: Served, certs: Path, export: str = "disk") -> str:
    return f"nbds://localhost:{served.port}/{export}?tls-certificates={certs}"


def ours(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(nbd_backup_argv(*args), capture_output=True, text=True, timeout=120, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_serves(served: Served, pki: Pki) -> None:
    """The daemon still serves a good client (after whatever the test did to it)."""
    out = run("nbdinfo", "--size", nbds(served, pki.client), cwd="/").stdout
    assert int(out) == SIZE


# --- a raw client, to see the exact bytes ------------------------------------------------------------


class Raw:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        greeting = self._exactly(18)
        assert greeting[:16] == struct.pack(">QQ", c.NBDMAGIC, c.IHAVEOPT)
        self.sock.sendall(struct.pack(">I", c.ClientFlag.C_FIXED_NEWSTYLE | c.ClientFlag.C_NO_ZEROES))

    def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", c.IHAVEOPT, option, len(data)) + data)

    def option(self, option: int, data: bytes = b"") -> tuple[int, bytes]:
        """The final reply to one option (type, payload)."""
        self.send_option(option, data)
        while True:
            magic, opt, rep, length = struct.unpack(">QIII", self._exactly(20))
            assert (magic, opt) == (c.OPT_REPLY_MAGIC, option)
            payload = self._exactly(length)
            if rep == Rep.ACK or rep & 0x80000000:
                return rep, payload

    def rest(self) -> bytes:
        """Everything until the server closes (a timeout fails the test)."""
        out = b""
        try:
            while chunk := self.sock.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out

    def close(self) -> None:
        self.sock.close()


def _name(export: str) -> bytes:
    return struct.pack(">I", len(export)) + export.encode() + struct.pack(">H", 0)


# --- peers against our server ------------------------------------------------------------------------


def test_libnbd_tools_over_tls(daemon: tuple[Served, Path, bytes], pki: Pki, tmp_path: Path) -> None:
    require("nbdinfo", "nbdcopy")
    served, _, data = daemon
    info = run("nbdinfo", "--json", nbds(served, pki.client), cwd="/").stdout
    assert '"TLS": true' in info and f'"export-size": {SIZE}' in info
    run("nbdcopy", nbds(served, pki.client), str(tmp_path / "out.raw"), cwd="/")
    assert (tmp_path / "out.raw").read_bytes() == data
    unix = f"nbds+unix:///disk?socket={served.socket}&tls-certificates={pki.client}"
    assert int(run("nbdinfo", "--size", unix, cwd="/").stdout) == SIZE


def _qemu_opts(served: Served, pki: Pki) -> list[str]:
    return [
        "--object",
        f"tls-creds-x509,id=tls0,dir={pki.client},endpoint=client",
        "--image-opts",
        f"driver=nbd,server.type=inet,server.host=localhost,server.port={served.port},export=disk,tls-creds=tls0",
    ]


def test_qemu_tools_over_tls(daemon: tuple[Served, Path, bytes], pki: Pki, tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    served, image, data = daemon
    out = tmp_path / "out.raw"
    opts = _qemu_opts(served, pki)
    run("qemu-img", "convert", "-O", "raw", *opts[:2], opts[2], opts[3], str(out))
    assert out.read_bytes() == data
    run("qemu-io", *opts, "-c", "write -P 0x5a 1M 192k", "-c", "read -P 0x5a 1M 192k")
    expected = bytearray(data)
    expected[1 << 20 : (1 << 20) + 196608] = b"\x5a" * 196608
    assert image.read_bytes() == bytes(expected)
    image.write_bytes(data)  # as it was, for the other tests of this module


# --- refusals, each followed by a client that is served ------------------------------------------------


def test_clear_text_client_against_require(daemon: tuple[Served, Path, bytes], pki: Pki) -> None:
    served, _, _ = daemon
    raw = Raw(served.port)
    for option, data in [
        (Opt.STRUCTURED_REPLY, b""),
        (Opt.LIST, b""),
        (Opt.INFO, _name("disk")),
        (Opt.GO, _name("disk")),
    ]:
        assert raw.option(option, data) == (Rep.ERR_TLS_REQD, f"Option {option:#x} not permitted before TLS".encode())
    raw.send_option(Opt.EXPORT_NAME, b"disk")
    assert raw.rest() == b""  # no reply exists for EXPORT_NAME: the server closes
    raw.close()
    proc = subprocess.run(["nbdinfo", f"nbd://127.0.0.1:{served.port}/disk"], capture_output=True, text=True, cwd="/")
    assert proc.returncode != 0
    proc = ours("info", f"nbd://127.0.0.1:{served.port}/disk", check=False)
    assert proc.returncode == 1 and "ERR_TLS_REQD" in proc.stderr, proc.stderr
    assert_serves(served, pki)


@pytest.mark.parametrize("who", ["rogue", "stranger"])
def test_refused_client_certificates(daemon: tuple[Served, Path, bytes], pki: Pki, who: str) -> None:
    """A certificate from another CA fails the handshake; one from our CA with a DN the authz does not
    list is refused after it (QEMU's message in the daemon's log)."""
    served, _, _ = daemon
    certs = pki.rogue if who == "rogue" else pki.stranger
    proc = subprocess.run(["nbdinfo", "--size", nbds(served, certs)], capture_output=True, text=True, cwd="/")
    assert proc.returncode != 0
    proc = ours("info", nbds(served, certs), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert_serves(served, pki)
    if who == "stranger":
        assert "TLS x509 authz check for C=GB,O=Example,CN=stranger is denied" in served.stderr()
    else:
        assert "TLS handshake failed" in served.stderr()


def test_garbage_and_dropped_handshakes(daemon: tuple[Served, Path, bytes], pki: Pki) -> None:
    served, _, _ = daemon
    raw = Raw(served.port)
    assert raw.option(Opt.STARTTLS) == (Rep.ACK, b"")
    raw.sock.sendall(b"\x16\x03\x01\x00\x05hello" + os.urandom(512))
    raw.rest()  # closed (a TLS alert at most)
    raw.close()
    assert_serves(served, pki)
    raw = Raw(served.port)
    assert raw.option(Opt.STARTTLS) == (Rep.ACK, b"")
    context = client_context(pki.client)
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    raw.sock.sendall(outgoing.read()[:40])  # half a ClientHello, then gone
    raw.close()
    assert_serves(served, pki)


def test_tls_client_against_tls_off(pki: Pki, tmp_path: Path) -> None:
    image = tmp_path / "plain.raw"
    random_image(image, 2)
    with serve(tmp_path, [f"disk={image},format=raw"], "--tls", "off") as plain:
        proc = subprocess.run(["nbdinfo", "--size", nbds(plain, pki.client)], capture_output=True, text=True, cwd="/")
        assert proc.returncode != 0
        proc = ours("info", nbds(plain, pki.client), check=False)
        assert proc.returncode == 1 and "NBD_OPT_STARTTLS" in proc.stderr and "ERR_POLICY" in proc.stderr
        assert int(run("nbdinfo", "--size", f"nbd://127.0.0.1:{plain.port}/disk", cwd="/").stdout) == SIZE


# --- our client against the peers' TLS servers -----------------------------------------------------------


def test_our_client_against_qemu_nbd_tls(pki: Pki, tmp_path: Path) -> None:
    image = tmp_path / "q.raw"
    data = random_image(image, 3)
    creds = ("--object", f"tls-creds-x509,id=t0,dir={pki.server},endpoint=server", "--tls-creds", "t0")
    with qemu_nbd(tmp_path, image, extra=creds) as peer:
        uri = f"nbds+unix:///disk?socket={peer.socket}&tls-certificates={pki.client}&tls-hostname=localhost"
        assert "with TLS" in ours("info", uri).stdout
        ours("copy", "--no-progress", uri, str(tmp_path / "out.raw"))
        assert (tmp_path / "out.raw").read_bytes() == data
        source = tmp_path / "src.raw"
        new = random_image(source, 4)
        ours("copy", "--no-progress", str(source), uri)  # the write direction
        proc = ours("info", peer.uri, check=False)  # clear text: qemu-nbd requires TLS
        assert proc.returncode == 1 and "ERR_TLS_REQD" in proc.stderr, proc.stderr
        proc = ours("info", uri.replace("localhost", "other.example"), check=False)
        assert proc.returncode == 1 and "TLS handshake failed" in proc.stderr, proc.stderr
    assert image.read_bytes() == new


def test_our_client_against_nbdkit_tls(pki: Pki, tmp_path: Path) -> None:
    image = tmp_path / "k.raw"
    data = random_image(image, 5)
    tls = ("--tls=require", f"--tls-certificates={pki.server}", "--tls-verify-peer")
    with nbdkit(tmp_path, *tls, "file", str(image), name="tls") as peer:
        uri = f"nbds+unix:///?socket={peer.socket}&tls-certificates={pki.client}"
        ours("copy", "--no-progress", uri, str(tmp_path / "out.raw"))
        assert (tmp_path / "out.raw").read_bytes() == data
        proc = ours("info", peer.uri, check=False)
        assert proc.returncode == 1 and "ERR_TLS_REQD" in proc.stderr, proc.stderr
    with nbdkit(tmp_path, "file", str(image), name="plain") as peer:  # no TLS offered: never a downgrade
        proc = ours("info", f"nbds+unix:///?socket={peer.socket}&tls-certificates={pki.client}", check=False)
        assert proc.returncode == 1 and "NBD_OPT_STARTTLS" in proc.stderr, proc.stderr


def test_backup_into_a_tls_qemu_nbd_target(pki: Pki, tmp_path: Path) -> None:
    source = tmp_path / "src.raw"
    data = random_image(source, 6)
    target = tmp_path / "t.raw"
    target.write_bytes(bytes(SIZE))
    creds = ("--object", f"tls-creds-x509,id=t0,dir={pki.server},endpoint=server", "--tls-creds", "t0")
    with our_daemon(tmp_path / "run") as daemon, qemu_nbd(tmp_path, target, extra=creds) as peer:
        with daemon.connect() as q:
            q.ok("blockdev-add", driver="file", filename=str(source), **{"node-name": "disk0"})
        uri = f"nbds+unix:///disk?socket={peer.socket}&tls-certificates={pki.client}&tls-hostname=localhost"
        proc = ours("backup", "--qmp", f"unix:{daemon.qmp_path}", "disk0", uri, "--mode", "existing", "--no-progress")
        assert proc.returncode == 0, proc.stderr
    assert target.read_bytes() == data
