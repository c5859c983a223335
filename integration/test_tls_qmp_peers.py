"""NBD over TLS set up through QMP, with the real peers, byte-exact (certificates from ``tests.tlskit``).

* qemu-storage-daemon's ``blockdev-backup`` into our TLS export: our daemon's ``object-add``
  ``tls-creds-x509`` + ``authz-listfile``, ``nbd-server-start`` with ``tls-creds``/``tls-authz``; QEMU's
  target is its own ``blockdev-add`` driver ``nbd`` with its own ``tls-creds-x509`` object.
* A client whose DN the authz refuses is refused and the next client is served; editing the
  ``authz-listfile`` file (``refresh``) changes who is let in, with no QMP command.
* Our daemon's backups into a TLS qemu-nbd: ``blockdev-backup`` to a ``blockdev-add`` driver ``nbd``
  node with ``tls-creds``/``tls-hostname``, and ``drive-backup`` to an ``nbds+unix://`` URI.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import require, run
from peers import qemu_nbd
from qmp_daemon import make_image, our_daemon
from qsd import Qsd

from tests.tlskit import CLIENT_DN, Pki, make_pki

SIZE = 4 << 20
STRANGER_DN = "C=GB,O=Example,CN=stranger"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require("openssl")
    return make_pki(tmp_path_factory.mktemp("pki"))


def allow(path: Path, *dns: str) -> None:
    """An ``authz-list`` file allowing exactly ``dns``, replaced in one rename (as an editor saves)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"policy": "deny", "rules": [{"match": dn, "policy": "allow"} for dn in dns]}))
    os.replace(tmp, path)


def nbdinfo(sock: Path, certs: Path) -> subprocess.CompletedProcess[str]:
    uri = f"nbds+unix:///disk?socket={sock}&tls-certificates={certs}&tls-hostname=localhost"
    return subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60, cwd="/")


def test_qsd_backup_into_our_tls_export_and_authz(pki: Pki, tmp_path: Path) -> None:
    require("qemu-storage-daemon", "nbdinfo")
    source = make_image(tmp_path / "src.raw", SIZE)
    target = tmp_path / "target.raw"
    target.write_bytes(bytes(SIZE))
    authz = tmp_path / "authz.json"
    allow(authz, CLIENT_DN)
    sock = tmp_path / "ours-nbd.sock"
    with our_daemon(tmp_path / "ours") as daemon, daemon.connect() as ours:
        props = {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(pki.server), "endpoint": "server"}
        ours.ok("object-add", props)
        listfile = {"qom-type": "authz-listfile", "id": "auth0", "filename": str(authz), "refresh": True}
        ours.ok("object-add", listfile)
        addr = {"type": "unix", "data": {"path": str(sock)}}
        ours.ok("nbd-server-start", addr=addr, **{"tls-creds": "tls0", "tls-authz": "auth0"})
        ours.ok("blockdev-add", driver="file", filename=str(target), **{"node-name": "t"})
        ours.ok("block-export-add", type="nbd", id="e", name="disk", writable=True, **{"node-name": "t"})

        (tmp_path / "qsd").mkdir()
        with Qsd.start(tmp_path / "qsd") as qsd, qsd.connect() as q:
            q.ok("object-add", {"qom-type": "tls-creds-x509", "id": "c", "dir": str(pki.client), "endpoint": "client"})
            q.ok("blockdev-add", driver="file", filename=str(source), **{"node-name": "src"})
            server = {"type": "unix", "path": str(sock)}
            tls = {"tls-creds": "c", "tls-hostname": "localhost"}
            q.ok("blockdev-add", driver="nbd", server=server, export="disk", **{"node-name": "tgt"}, **tls)
            q.ok("blockdev-backup", **{"job-id": "j"}, device="src", target="tgt", sync="full")
            done = q.wait_event("BLOCK_JOB_COMPLETED", lambda d: d["device"] == "j", timeout=120)
            assert "error" not in done["data"], done
            q.ok("blockdev-del", **{"node-name": "tgt"})
        assert target.read_bytes() == source.read_bytes()

        refused = nbdinfo(sock, pki.stranger)  # our CA signed it, but the list does not name its DN
        assert refused.returncode != 0
        assert nbdinfo(sock, pki.client).stdout.strip() == str(SIZE)  # still serving
        assert f"TLS x509 authz check for {STRANGER_DN} is denied" in daemon.stderr()

        allow(authz, STRANGER_DN)  # refresh: the file is read again at the next connection
        assert nbdinfo(sock, pki.stranger).stdout.strip() == str(SIZE)
        assert nbdinfo(sock, pki.client).returncode != 0
        ours.ok("object-del", id="auth0")  # gone: nobody is let in
        assert nbdinfo(sock, pki.stranger).returncode != 0
        assert "the authorization object is gone" in daemon.stderr()


def test_our_backups_into_a_tls_qemu_nbd(pki: Pki, tmp_path: Path) -> None:
    require("qemu-nbd", "qemu-img")
    source = make_image(tmp_path / "src.raw", SIZE)
    first, second = tmp_path / "t1.raw", tmp_path / "t2.raw"
    for target in (first, second):
        target.write_bytes(bytes(SIZE))
    creds = ("--object", f"tls-creds-x509,id=t0,dir={pki.server},endpoint=server", "--tls-creds", "t0")
    with (
        our_daemon(tmp_path / "ours") as daemon,
        daemon.connect() as q,
        qemu_nbd(tmp_path, first, extra=creds, name="q1") as peer1,
        qemu_nbd(tmp_path, second, extra=creds, name="q2") as peer2,
    ):
        q.ok("object-add", {"qom-type": "tls-creds-x509", "id": "c", "dir": str(pki.client), "endpoint": "client"})
        q.ok("blockdev-add", driver="file", filename=str(source), **{"node-name": "src"})
        server = {"type": "unix", "path": str(peer1.socket)}
        tls = {"tls-creds": "c", "tls-hostname": "localhost"}
        q.ok("blockdev-add", driver="nbd", server=server, export="disk", **{"node-name": "tgt"}, **tls)
        q.ok("blockdev-backup", **{"job-id": "j1"}, device="src", target="tgt", sync="full")
        done = q.wait_event("BLOCK_JOB_COMPLETED", lambda d: d["device"] == "j1", timeout=120)
        assert "error" not in done["data"], done
        q.ok("blockdev-del", **{"node-name": "tgt"})
        q.ok("object-del", id="c")  # the node is gone, and with it the last user

        uri = f"nbds+unix:///disk?socket={peer2.socket}&tls-certificates={pki.client}&tls-hostname=localhost"
        q.ok("drive-backup", **{"job-id": "j2"}, device="src", target=uri, sync="full", mode="existing")
        done = q.wait_event("BLOCK_JOB_COMPLETED", lambda d: d["device"] == "j2", timeout=120)
        assert "error" not in done["data"], done
    for target in (first, second):
        assert target.read_bytes() == source.read_bytes()
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), str(second))
