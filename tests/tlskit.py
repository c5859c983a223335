"""Certificates for TLS tests, made with ``openssl`` at test time (no key is ever committed).

``make_pki(root)`` writes QEMU's credential directory layout: ``root/server`` (ca-cert.pem,
server-cert.pem, server-key.pem), ``root/client`` (ca-cert.pem, client-cert.pem, client-key.pem) signed
by the same CA, ``root/rogue`` — a client directory whose certificate comes from a second CA (it trusts
our server's CA, so only the server's check of the client certificate fails) — and ``root/stranger``,
a client our CA signed with another DN (``CN=stranger``). ``root/ca`` holds both CAs.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CLIENT_SUBJECT = "/C=GB/O=Example/CN=client"
CLIENT_DN = "C=GB,O=Example,CN=client"  # QEMU's spelling: certificate order, no spaces
SERVER_SUBJECT = "/C=GB/O=Example/CN=localhost"
_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")  # quick to make, and gnutls takes it


@dataclass(frozen=True)
class Pki:
    server: Path
    client: Path
    rogue: Path
    stranger: Path  # our CA signed it, but its DN is not the one the tests authorize


def _run(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _ca(dir_: Path, name: str) -> tuple[Path, Path]:
    key, cert = dir_ / f"{name}-key.pem", dir_ / f"{name}-cert.pem"
    _run("req", "-x509", *_KEY, "-nodes", "-keyout", key, "-out", cert, "-days", "2",
         "-subj", f"/O=Example/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    return key, cert


def _leaf(dir_: Path, ca: tuple[Path, Path], stem: str, subject: str, ext: str) -> None:
    key, csr, cert = dir_ / f"{stem}-key.pem", dir_ / f"{stem}.csr", dir_ / f"{stem}-cert.pem"
    extfile = dir_ / f"{stem}.ext"
    extfile.write_text(ext)
    _run("req", *_KEY, "-nodes", "-keyout", key, "-out", csr, "-subj", subject)
    _run("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial", "-out", cert,
         "-days", "2", "-extfile", extfile)  # fmt: skip
    csr.unlink()
    extfile.unlink()
    key.chmod(0o600)


_SERVER_EXT = (
    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
)
_CLIENT_EXT = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"


def make_pki(root: Path) -> Pki:
    work = root / "ca"
    server, client, rogue, stranger = root / "server", root / "client", root / "rogue", root / "stranger"
    for d in (work, server, client, rogue, stranger):
        d.mkdir(parents=True)
    ca = _ca(work, "ca")
    other = _ca(work, "other-ca")
    _leaf(server, ca, "server", SERVER_SUBJECT, _SERVER_EXT)
    _leaf(client, ca, "client", CLIENT_SUBJECT, _CLIENT_EXT)
    _leaf(rogue, other, "client", CLIENT_SUBJECT, _CLIENT_EXT)
    _leaf(stranger, ca, "client", "/C=GB/O=Example/CN=stranger", _CLIENT_EXT)
    for d in (server, client, rogue, stranger):
        shutil.copy(ca[1], d / "ca-cert.pem")  # the rogue client trusts our server; we do not trust it
    return Pki(server=server, client=client, rogue=rogue, stranger=stranger)
