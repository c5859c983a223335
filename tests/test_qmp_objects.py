"""QMP ``object-add``/``object-del`` in-process: the authorizer the NBD server looks up per connection
(an ``authz-listfile`` re-read when its file changed, a deleted or re-created object), credentials in
use, ``--allow-dir`` confinement of the credential paths, and ``verify-peer=off`` with an authz."""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path
from typing import Any

import pytest

from nbd.tls import ServerTls
from tests.test_qmp_commands import Harness
from tests.tlskit import CLIENT_DN, Pki, make_pki

STRANGER_DN = "C=GB,O=Example,CN=stranger"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def h(tmp_path: Path) -> Any:
    harness = Harness(tmp_path)
    yield harness
    await harness.reg.close()


def write_list(path: Path, *allowed: str) -> None:
    """Replace the file (a new inode, as editors and ``mv`` do) with a list allowing ``allowed``."""
    rules = [{"match": dn, "policy": "allow"} for dn in allowed]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"policy": "deny", "rules": rules}))
    os.replace(tmp, path)


def allows(h: Harness, object_id: str, dn: str) -> bool:
    """What the NBD server would decide for ``dn`` if it looked ``object_id`` up now."""
    authorizer = h.reg.objects.authorizer(object_id)
    return authorizer is not None and authorizer(dn)


async def test_authz_listfile_refresh(h: Harness, tmp_path: Path) -> None:
    path = tmp_path / "authz.json"
    write_list(path, CLIENT_DN)
    await h("object-add", **{"qom-type": "authz-listfile", "id": "live", "filename": str(path), "refresh": True})
    await h("object-add", **{"qom-type": "authz-listfile", "id": "fixed", "filename": str(path)})

    def live(dn: str) -> bool:
        return allows(h, "live", dn)

    def fixed(dn: str) -> bool:
        return allows(h, "fixed", dn)

    assert live(CLIENT_DN) and fixed(CLIENT_DN) and not live(STRANGER_DN)
    write_list(path, STRANGER_DN)
    assert live(STRANGER_DN) and not live(CLIENT_DN)  # re-read: the file changed
    assert fixed(CLIENT_DN) and not fixed(STRANGER_DN)  # without refresh: read once
    path.write_text("{broken")
    assert not live(STRANGER_DN) and not live(CLIENT_DN)  # a file that does not parse lets nobody in
    write_list(path, CLIENT_DN)
    assert live(CLIENT_DN)
    path.unlink()
    assert not live(CLIENT_DN)


async def test_server_looks_the_authz_up_per_connection(h: Harness, pki: Pki, tmp_path: Path) -> None:
    await h("object-add", **{"qom-type": "tls-creds-x509", "id": "s", "dir": str(pki.server), "endpoint": "server"})
    addr = {"type": "unix", "data": {"path": str(tmp_path / "n.sock")}}
    await h("nbd-server-start", addr=addr, **{"tls-creds": "s", "tls-authz": "who"})
    assert h.reg.nbd is not None
    tls = h.reg.nbd.tls
    assert isinstance(tls, ServerTls) and tls.mode == "require"
    assert tls.authorize(CLIENT_DN) == "the authorization object is gone"  # never created: nobody
    await h("object-add", **{"qom-type": "authz-simple", "id": "who", "identity": CLIENT_DN})
    assert tls.authorize(CLIENT_DN) is None and tls.authorize(STRANGER_DN) is not None
    await h("object-del", id="who")
    assert tls.authorize(CLIENT_DN) == "the authorization object is gone"
    rules = [{"match": "C=GB,O=Example,CN=s*", "policy": "allow", "format": "glob"}]
    await h("object-add", **{"qom-type": "authz-list", "id": "who", "rules": rules})
    assert tls.authorize(STRANGER_DN) is None and tls.authorize(CLIENT_DN) is not None
    assert await h.error("object-del", id="s") == (
        "GenericError",
        "object 's' is in use, can not be deleted (by the NBD server)",
    )
    await h("nbd-server-stop")
    await h("object-del", id="s")


async def test_verify_peer_off_with_authz_still_asks_for_certificates(h: Harness, pki: Pki, tmp_path: Path) -> None:
    """QEMU 7.2 skips the authz check when the credentials do not verify the peer; we ask for (and
    verify) the client's certificate whenever an authz object is named."""
    props = {"qom-type": "tls-creds-x509", "id": "s", "dir": str(pki.server), "endpoint": "server"}
    await h("object-add", **props, **{"verify-peer": False})
    addr = {"type": "unix", "data": {"path": str(tmp_path / "n.sock")}}
    await h("nbd-server-start", addr=addr, **{"tls-creds": "s"})
    assert h.reg.nbd is not None and h.reg.nbd.tls is not None
    assert h.reg.nbd.tls.credentials().verify_mode == ssl.CERT_NONE
    await h("nbd-server-stop")
    await h("nbd-server-start", addr=addr, **{"tls-creds": "s", "tls-authz": "a"})
    assert h.reg.nbd is not None and h.reg.nbd.tls is not None
    assert h.reg.nbd.tls.credentials().verify_mode == ssl.CERT_REQUIRED
    assert h.reg.nbd.tls.authorize(None) is not None


async def test_credential_paths_are_confined(tmp_path: Path, pki: Pki) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    h = Harness(tmp_path, allow=[allowed])
    try:
        props = {"qom-type": "tls-creds-x509", "id": "s", "dir": str(pki.server), "endpoint": "server"}
        cls, desc = await h.error("object-add", **props)
        assert cls == "GenericError" and "outside the allowed directories" in desc
        listfile = {"qom-type": "authz-listfile", "id": "f", "filename": str(tmp_path / "authz.json")}
        cls, desc = await h.error("object-add", **listfile)
        assert cls == "GenericError" and "outside the allowed directories" in desc
        inside = allowed / "creds"
        inside.mkdir()
        for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
            (inside / name).write_bytes((pki.server / name).read_bytes())
        await h("object-add", **(props | {"dir": str(inside)}))
    finally:
        await h.reg.close()


async def test_nbd_node_with_tls_creds_holds_them(h: Harness, pki: Pki, tmp_path: Path) -> None:
    """``blockdev-add`` driver nbd with ``tls-creds`` against our own TLS server (one event loop): the
    node's credentials cannot be deleted while it is open, and are free once it is gone."""
    image = h.image("disk.raw")
    await h("blockdev-add", driver="file", filename=str(image), **{"node-name": "disk"})
    await h("object-add", **{"qom-type": "tls-creds-x509", "id": "s", "dir": str(pki.server), "endpoint": "server"})
    await h("object-add", **{"qom-type": "tls-creds-x509", "id": "c", "dir": str(pki.client), "endpoint": "client"})
    sock = tmp_path / "n.sock"
    await h("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}}, **{"tls-creds": "s"})
    await h("block-export-add", type="nbd", id="e", **{"node-name": "disk"})
    server = {"type": "unix", "path": str(sock)}
    for _ in range(2):  # added and deleted twice: only open nodes hold the credentials
        tls = {"tls-creds": "c", "tls-hostname": "localhost"}
        await h("blockdev-add", driver="nbd", server=server, export="disk", **{"node-name": "n"}, **tls)
        assert await h.error("object-del", id="c") == (
            "GenericError",
            "object 'c' is in use, can not be deleted (by node 'n')",
        )
        assert h.reg.nodes["n"].size == image.stat().st_size
        await h("blockdev-del", **{"node-name": "n"})
    assert await h.error("blockdev-add", driver="nbd", server=server, export="disk", **{"node-name": "n"}) == (
        "GenericError",
        "TLS negotiation required before option 7 (go)",
    )
    await h("object-del", id="c")
    assert h.reg.objects.open_nodes("c", h.reg.nodes) == []
