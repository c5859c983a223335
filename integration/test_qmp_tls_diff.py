"""Differential tests of the QMP side of NBD over TLS: the same sequences against qemu-storage-daemon
7.2 and against us (``test_qmp_diff``'s harness), replies, error classes and texts compared exactly —
``object-add``/``object-del`` of ``tls-creds-x509``, ``authz-simple`` and ``authz-list``,
``nbd-server-start`` with ``tls-creds``/``tls-authz`` and ``blockdev-add`` driver ``nbd`` with
``tls-creds``/``tls-hostname`` against a TLS qemu-nbd and a clear-text one.

Where we mean to differ, each side is asserted on its own, beside the comparison:
``object-del`` of credentials a running NBD server or an open ``nbd`` node uses is refused by us
(QEMU 7.2 lets them go from under their user); ``nbd-server-start`` with ``tls-authz`` but no
``tls-creds`` is refused by us (QEMU 7.2 accepts it and then serves clear-text clients unchecked);
``authz-listfile`` works with us (QEMU 7.2's ``object-add`` refuses its own type).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require
from peers import Peer, qemu_nbd
from qmp_daemon import ReplyLog, make_image, on_both
from qsd import QmpSync
from test_qmp_diff import SIZE, Run, differential

from tests.tlskit import CLIENT_DN, Pki, make_pki

STRANGER_DN = "C=GB,O=Example,CN=stranger"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require("openssl")
    return make_pki(tmp_path_factory.mktemp("pki"))


def creds(run: Run, object_id: str, directory: Path | str, endpoint: str, **more: object) -> None:
    run(
        "object-add",
        **{"qom-type": "tls-creds-x509", "id": object_id, "dir": str(directory), "endpoint": endpoint},
        **more,
    )


def who_gets_in(run: Run, pki: Pki) -> None:
    """Record which of the two clients our CA certified (``CN=client``, ``CN=stranger``) the daemon's NBD
    server lets in now (nbdinfo over TLS on its unix socket), as a reply to compare."""
    sock = run.work / "n.sock"
    admitted = {}
    for who, certs in (("client", pki.client), ("stranger", pki.stranger)):
        uri = f"nbds+unix:///src?socket={sock}&tls-certificates={certs}&tls-hostname=localhost"
        done = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60, cwd="/")
        admitted[who] = done.returncode == 0 and done.stdout.strip() == str(SIZE)
    run.replies.append(("who gets in", admitted))


def test_object_add_and_del(tmp_path: Path, pki: Pki) -> None:
    def scenario(run: Run) -> list[str]:
        empty = run.work / "empty"
        empty.mkdir()
        only_ca = run.work / "only-ca"
        only_ca.mkdir()
        (only_ca / "ca-cert.pem").write_bytes((pki.server / "ca-cert.pem").read_bytes())
        creds(run, "s", pki.server, "server")
        creds(run, "s", run.work / "nowhere", "server")  # the id is checked before the files
        creds(run, "c", pki.client, "client", **{"verify-peer": True})
        run("object-add", **{"qom-type": "tls-creds-x509", "id": "c2", "dir": str(pki.client)})  # endpoint: client
        creds(run, "m1", run.work / "nowhere", "server")
        creds(run, "m2", empty, "client")
        creds(run, "m3", empty, "client", **{"verify-peer": False})  # QEMU 7.2 wants the CA anyway
        creds(run, "m4", only_ca, "server")
        creds(run, "m5", only_ca, "server", **{"verify-peer": False})
        run("object-add", **{"qom-type": "tls-creds-x509", "id": "m6", "endpoint": "server"})
        creds(run, "m7", pki.server, "bogus")
        run("object-add", **{"qom-type": "tls-creds-x509", "id": "m8", "dir": 5})
        creds(run, "m9", pki.server, "server", **{"verify-peer": "yes"})
        creds(run, "m10", pki.server, "server", bogus=1)
        creds(run, "9bad", pki.server, "server")
        run("object-add", **{"qom-type": "no-such-type", "id": "x"})
        run("object-add", **{"qom-type": "authz-simple", "id": "a1", "identity": CLIENT_DN})
        run("object-add", **{"qom-type": "authz-simple", "id": "a1", "identity": CLIENT_DN})
        run("object-add", **{"qom-type": "authz-simple", "id": "s", "identity": CLIENT_DN})  # one namespace
        run("object-add", **{"qom-type": "authz-simple", "id": "a2"})
        run("object-add", **{"qom-type": "authz-simple", "id": "a3", "identity": 3})
        rules = [{"match": "C=GB,O=Example,CN=c*", "policy": "allow", "format": "glob"}]
        run("object-add", **{"qom-type": "authz-list", "id": "l1", "policy": "deny", "rules": rules})
        run("object-add", **{"qom-type": "authz-list", "id": "l2"})
        run("object-add", **{"qom-type": "authz-list", "id": "l3", "policy": "maybe"})
        run("object-add", **{"qom-type": "authz-list", "id": "l4", "rules": [{"match": "x"}]})
        bad_format = [{"match": "x", "policy": "allow", "format": "regex"}]
        run("object-add", **{"qom-type": "authz-list", "id": "l5", "rules": bad_format})
        run("object-add", **{"qom-type": "authz-list", "id": "l6", "rules": "x"})
        run("object-add", **{"qom-type": "authz-listfile", "id": "f1"})
        run("object-del", id="nosuch")
        run("object-del", id="l1")
        run("object-del", id="l1")
        run("object-del", id="c2")
        run("object-add", **{"qom-type": "authz-simple", "id": "c2", "identity": CLIENT_DN})  # the id is free again
        run("object-del", id=7)
        return []

    differential(tmp_path, scenario)


def test_nbd_server_start_with_tls(tmp_path: Path, pki: Pki) -> None:
    def scenario(run: Run) -> list[str]:
        addr = {"type": "unix", "data": {"path": str(run.work / "n.sock")}}
        creds(run, "s", pki.server, "server")
        creds(run, "c", pki.client, "client")
        run("object-add", **{"qom-type": "authz-simple", "id": "a", "identity": CLIENT_DN})
        run("nbd-server-start", addr=addr, **{"tls-creds": "nosuch"})
        run("nbd-server-start", addr=addr, **{"tls-creds": "c"})  # a client endpoint
        run("nbd-server-start", addr=addr, **{"tls-creds": "a"})  # not credentials
        run("nbd-server-start", addr=addr, **{"tls-creds": 1})
        run("nbd-server-start", addr=addr, **{"tls-creds": "s", "tls-authz": "nosuch"})  # looked up per client
        run("block-export-add", type="nbd", id="e", **{"node-name": "src"})
        who_gets_in(run, pki)  # nobody: the authz object does not exist
        run("nbd-server-start", addr=addr, **{"tls-creds": "s", "tls-authz": "a"})
        run("block-export-del", id="e")
        run.q.wait_event("BLOCK_EXPORT_DELETED", timeout=60)
        run("nbd-server-stop")
        run("nbd-server-start", addr=addr, **{"tls-creds": "s", "tls-authz": "a"})
        run("block-export-add", type="nbd", id="e", **{"node-name": "src"})
        who_gets_in(run, pki)  # the client, not the stranger
        run("object-del", id="a")  # an authz object may go: then nobody is let in
        who_gets_in(run, pki)
        run("object-add", **{"qom-type": "authz-simple", "id": "a", "identity": STRANGER_DN})
        who_gets_in(run, pki)  # the object of that id now: the stranger only
        run("object-del", id="c")  # unused credentials
        run("block-export-del", id="e")
        run.q.wait_event("BLOCK_EXPORT_DELETED", timeout=60)
        run("nbd-server-stop")
        run("object-del", id="s")  # the server is gone: free on both
        return []

    _, ours = differential(tmp_path, scenario)
    assert [reply for command, reply in ours.replies if command == "who gets in"] == [
        {"client": False, "stranger": False},
        {"client": True, "stranger": False},
        {"client": False, "stranger": False},
        {"client": False, "stranger": True},
    ]


@pytest.fixture
def peers(tmp_path: Path, pki: Pki) -> Iterator[tuple[Peer, Peer]]:
    """A TLS qemu-nbd and a clear-text one, each serving its own image as ``disk``."""
    tls_image = make_image(tmp_path / "tls.raw", 1 << 20)
    plain_image = make_image(tmp_path / "plain.raw", 1 << 20)
    server = ("--object", f"tls-creds-x509,id=t0,dir={pki.server},endpoint=server", "--tls-creds", "t0")
    with qemu_nbd(tmp_path, tls_image, extra=server, name="tls") as tls, qemu_nbd(tmp_path, plain_image) as plain:
        yield tls, plain


def test_blockdev_add_nbd_with_tls(tmp_path: Path, pki: Pki, peers: tuple[Peer, Peer]) -> None:
    tls, plain = peers

    def scenario(run: Run) -> list[str]:
        creds(run, "c", pki.client, "client")
        creds(run, "s", pki.server, "server")
        run("object-add", **{"qom-type": "authz-simple", "id": "a", "identity": CLIENT_DN})

        def add(name: str, sock: Path, **more: object) -> None:
            server = {"type": "unix", "path": str(sock)}
            run("blockdev-add", driver="nbd", server=server, export="disk", **{"node-name": name}, **more)

        add("n", tls.socket, **{"tls-creds": "nosuch"})
        add("n", tls.socket, **{"tls-creds": "s"})  # a server endpoint
        add("n", tls.socket, **{"tls-creds": "a"})  # not credentials
        add("n", tls.socket)  # no TLS against a server that requires it
        add("n", plain.socket, **{"tls-creds": "c", "tls-hostname": "localhost"})  # never a silent downgrade
        add("n", tls.socket, **{"tls-creds": "c"})  # a unix socket names no host to check
        add("n", tls.socket, **{"tls-creds": "c", "tls-hostname": 5})
        add("n", tls.socket, **{"tls-creds": "c", "tls-hostname": "other.example"})
        add("n", tls.socket, **{"tls-creds": "c", "tls-hostname": "localhost"})
        run("blockdev-del", **{"node-name": "n"})
        run("object-del", id="c")  # the node is gone: free on both
        return []

    differential(tmp_path, scenario)


# --- where we differ from QEMU 7.2 on purpose: each side asserted on its own --------------------------


def test_stricter_than_qemu(tmp_path: Path, pki: Pki, peers: tuple[Peer, Peer]) -> None:
    """``object-del`` of credentials in use, and ``tls-authz`` without ``tls-creds``: QEMU 7.2 accepts both
    (credentials deleted from under a running server or an open node; an authz that is never consulted
    because clients come in clear text); we refuse both (README, "NBD over TLS")."""
    tls, _ = peers

    def scenario(q: QmpSync, work: Path) -> list[Any]:
        log = ReplyLog(q)
        addr = {"type": "unix", "data": {"path": str(work / "n.sock")}}
        log("object-add", **{"qom-type": "tls-creds-x509", "id": "s", "dir": str(pki.server), "endpoint": "server"})
        log("object-add", **{"qom-type": "tls-creds-x509", "id": "c", "dir": str(pki.client), "endpoint": "client"})
        log("object-add", **{"qom-type": "authz-simple", "id": "a", "identity": CLIENT_DN})
        log("nbd-server-start", addr=addr, **{"tls-authz": "a"})
        q.execute("nbd-server-stop")
        log("nbd-server-start", addr=addr, **{"tls-creds": "s"})
        log("object-del", id="s")  # the running server's credentials
        server = {"type": "unix", "path": str(tls.socket)}
        node = {"node-name": "n", "tls-creds": "c", "tls-hostname": "localhost"}
        log("blockdev-add", driver="nbd", server=server, export="disk", **node)
        log("object-del", id="c")  # an open node's credentials
        return [reply for _, reply in log.replies]

    theirs, ours = on_both(tmp_path, scenario)
    assert theirs == [{}, {}, {}, {}, {}, {}, {}, {}]
    refused = "'tls-authz' is only supported with 'tls-creds'"
    in_use = "object '{}' is in use, can not be deleted (by {})"
    assert ours == [
        {},
        {},
        {},
        {"class": "GenericError", "desc": refused},
        {},
        {"class": "GenericError", "desc": in_use.format("s", "the NBD server")},
        {},
        {"class": "GenericError", "desc": in_use.format("c", "node 'n'")},
    ]


def test_authz_listfile(tmp_path: Path) -> None:
    """QEMU 7.2's ``object-add`` refuses ``authz-listfile`` (its QAPI name; the QOM type is spelled
    ``authz-list-file``); ours takes it, with QEMU's texts for a file that does not read or parse."""
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"policy": "deny", "rules": [{"match": CLIENT_DN, "policy": "allow"}]}))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "policy.json").write_text('{"policy": "maybe"}')

    def scenario(q: QmpSync, work: Path) -> list[Any]:
        log = ReplyLog(q)

        def listfile(object_id: str, filename: str, **more: object) -> None:
            log("object-add", **{"qom-type": "authz-listfile", "id": object_id, "filename": filename}, **more)

        listfile("f1", str(good), refresh=True)
        listfile("f2", str(tmp_path / "missing.json"))
        listfile("f3", str(tmp_path / "broken.json"))
        listfile("f4", str(tmp_path / "list.json"))
        listfile("f5", str(tmp_path / "policy.json"))
        listfile("f6", "good.json", refresh=True)
        return [reply for _, reply in log.replies]

    theirs, ours = on_both(tmp_path, scenario)
    assert theirs == [{"class": "GenericError", "desc": "invalid object type: authz-listfile"}] * 6
    missing = tmp_path / "missing.json"
    assert ours[0] == {}
    assert ours[1:] == [
        {"class": "GenericError", "desc": f"Unable to read '{missing}': Failed to open file \u201c{missing}\u201d: "
         "No such file or directory"},
        {"class": "GenericError", "desc": ours[2]["desc"]},
        {"class": "GenericError", "desc": "Invalid parameter type for 'obj', expected: dict"},
        {"class": "GenericError", "desc": "Parameter 'policy' does not accept value 'maybe'"},
        {"class": "GenericError", "desc": "Filename must be an absolute path"},
    ]  # fmt: skip
    assert ours[2]["desc"].startswith("JSON parse error, ")


def test_authz_with_verify_peer_off(tmp_path: Path, pki: Pki) -> None:
    """Credentials with ``verify-peer: false`` and an authz object: QEMU 7.2 skips the authz check and lets
    any TLS client in; we still ask for the client's certificate and check its DN (README)."""

    def scenario(q: QmpSync, work: Path) -> dict[str, bool]:
        props = {"qom-type": "tls-creds-x509", "id": "s", "dir": str(pki.server), "endpoint": "server"}
        q.ok("object-add", props | {"verify-peer": False})
        q.ok("object-add", {"qom-type": "authz-simple", "id": "a", "identity": CLIENT_DN})
        q.ok("blockdev-add", driver="null-co", size=SIZE, **{"node-name": "src"})
        addr = {"type": "unix", "data": {"path": str(work / "n.sock")}}
        q.ok("nbd-server-start", addr=addr, **{"tls-creds": "s", "tls-authz": "a"})
        q.ok("block-export-add", type="nbd", id="e", **{"node-name": "src"})
        run = Run(q, work)
        who_gets_in(run, pki)
        return dict(run.replies[0][1])

    theirs, ours = on_both(tmp_path, scenario)
    assert theirs == {"client": True, "stranger": True}
    assert ours == {"client": True, "stranger": False}
