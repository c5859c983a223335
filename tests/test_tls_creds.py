"""``nbd.tls``: QEMU's credential layout checked with one-line errors, DNs in QEMU's spelling, the
authz rules (exact, glob, first match, default policy), and ``serve``'s TLS flags and config keys."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest

from nbd.tls import (
    AuthzList,
    AuthzRule,
    AuthzSimple,
    ServerTls,
    TlsConfigError,
    check_credentials,
    client_context,
    format_dn,
    server_context,
)
from server.cli import build_parser
from server.commands.serve import config_from_args
from server.errors import ConfigError
from tests.tlskit import CLIENT_DN, Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_contexts_from_qemu_layout(pki: Pki) -> None:
    server = server_context(pki.server)
    assert server.verify_mode == ssl.CERT_REQUIRED and server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server_context(pki.server, verify_peer=False).verify_mode == ssl.CERT_NONE
    client = client_context(pki.client)
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED
    relaxed = client_context(pki.client, verify_peer=False)
    assert not relaxed.check_hostname and relaxed.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize(
    ("endpoint", "missing"),
    [("server", "ca-cert.pem"), ("server", "server-cert.pem"), ("server", "server-key.pem"), ("client", "ca-cert.pem")],
)
def test_a_missing_file_is_named(pki: Pki, tmp_path: Path, endpoint: str, missing: str) -> None:
    source = pki.server if endpoint == "server" else pki.client
    for name in os.listdir(source):
        if name != missing:
            (tmp_path / name).write_bytes((source / name).read_bytes())
    with pytest.raises(TlsConfigError, match=f"^Unable to access credentials {tmp_path / missing}: No such file"):
        check_credentials(tmp_path, endpoint)  # type: ignore[arg-type]
    with pytest.raises(TlsConfigError, match=f"^Unable to access credentials {tmp_path}/nowhere/ca-cert.pem: No such"):
        check_credentials(tmp_path / "nowhere", "server", verify_peer=False)  # QEMU wants the CA even then


def test_client_certificate_is_optional_but_a_half_pair_is_not(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "ca-cert.pem").write_bytes((pki.client / "ca-cert.pem").read_bytes())
    check_credentials(tmp_path, "client")  # a client without a certificate of its own
    (tmp_path / "client-cert.pem").write_bytes((pki.client / "client-cert.pem").read_bytes())
    with pytest.raises(TlsConfigError, match=r"client-key\.pem"):
        client_context(tmp_path)
    (tmp_path / "client-key.pem").write_bytes((pki.rogue / "client-key.pem").read_bytes())
    with pytest.raises(TlsConfigError, match="Unable to load TLS credentials"):  # a key of another cert
        client_context(tmp_path)


def test_dn_in_qemus_spelling(pki: Pki) -> None:
    cert = ssl._ssl._test_decode_cert(str(pki.client / "client-cert.pem"))  # type: ignore[attr-defined]
    assert format_dn(cert["subject"]) == CLIENT_DN == "C=GB,O=Example,CN=client"
    subject = (
        (("countryName", "GB"),),
        (("organizationName", "A, B+C"),),
        (("organizationalUnitName", "x"), ("commonName", "y")),
        (("emailAddress", "a@b"),),
    )
    assert format_dn(subject) == r"C=GB,O=A\, B\+C,OU=x+CN=y,EMAIL=a@b"


def test_authz_rules() -> None:
    allow = AuthzList.from_patterns(["C=GB,O=Example,CN=client", "C=GB,O=Example,CN=backup-*"])
    assert allow("C=GB,O=Example,CN=client") and allow("C=GB,O=Example,CN=backup-7")
    assert not allow("C=GB,O=Example,CN=clients") and not allow("C=FR,O=Example,CN=backup-7")
    first_wins = AuthzList((AuthzRule("*CN=eve", "deny", "glob"), AuthzRule("*", "allow", "glob")))
    assert first_wins("O=x,CN=bob") and not first_wins("O=x,CN=eve")
    assert AuthzList(policy="allow")("anyone") and not AuthzList()("anyone")
    listed = AuthzList.from_json({"policy": "deny", "rules": [{"match": "CN=*", "format": "glob"}]})
    assert listed("CN=x") and not listed("O=x")
    with pytest.raises(TlsConfigError):
        AuthzList.from_json({"rules": [{"match": "x", "policy": "maybe"}]})
    assert AuthzSimple("CN=a")("CN=a") and not AuthzSimple("CN=a")("CN=b")


def test_server_tls_authorize() -> None:
    def ctx() -> ssl.SSLContext:
        raise AssertionError

    current: list[AuthzSimple | None] = [AuthzSimple("CN=a")]
    tls = ServerTls("require", ctx, lambda: current[0])
    assert tls.authorize("CN=a") is None
    assert tls.authorize("CN=b") == "TLS x509 authz check for CN=b is denied"
    assert tls.authorize(None) == "the client sent no verified certificate"
    current[0] = None
    assert tls.authorize("CN=a") == "the authorization object is gone"
    assert ServerTls("on", ctx).authorize(None) is None


def _serve_args(*argv: str) -> object:
    return config_from_args(build_parser().parse_args(["serve", "--nbd", "127.0.0.1:0", *argv]))


def test_serve_tls_flags(pki: Pki) -> None:
    assert _serve_args().tls is None  # type: ignore[attr-defined]
    tls = _serve_args("--tls-dir", str(pki.server)).tls  # type: ignore[attr-defined]
    assert tls.mode == "require" and tls.authz is None  # as qemu-nbd --tls-creds
    tls = _serve_args("--tls", "on", "--tls-dir", str(pki.server), "--tls-authz", "CN=a", "--tls-authz", "O=*").tls  # type: ignore[attr-defined]
    assert tls.mode == "on" and tls.authorize("CN=a") is None and tls.authorize("O=x") is None
    assert tls.authorize("CN=b") is not None
    assert tls.credentials().verify_mode == ssl.CERT_REQUIRED
    open_tls = _serve_args("--tls-dir", str(pki.server), "--tls-verify-peer", "off").tls  # type: ignore[attr-defined]
    assert open_tls.credentials().verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls", "require"], "needs --tls-dir"),
        (["--tls-authz", "CN=a"], "need --tls on or require"),
        (["--tls", "off", "--tls-verify-peer", "on"], "need --tls on or require"),
        (["--tls-dir", "{server}", "--tls-authz", "CN=a", "--tls-verify-peer", "off"], "cannot be used"),
        (["--tls-dir", "{client}"], "server-cert.pem: No such file"),
    ],
)
def test_serve_tls_errors(pki: Pki, argv: list[str], message: str) -> None:
    argv = [a.format(server=pki.server, client=pki.client) for a in argv]
    with pytest.raises(ConfigError, match=message):
        _serve_args(*argv)


def test_serve_tls_config_file(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "creds").symlink_to(pki.server)
    config = tmp_path / "serve.toml"
    config.write_text('tls = "on"\ntls-dir = "creds"\ntls-authz = ["C=GB,O=Example,CN=*"]\ntls-verify-peer = true\n')
    tls = _serve_args("--config", str(config), "--tls-authz", "CN=x").tls  # type: ignore[attr-defined]
    assert tls.mode == "on" and tls.authorize(CLIENT_DN) is None and tls.authorize("CN=x") is None
    config.write_text('tls = "maybe"\ntls-dir = "creds"\n')
    with pytest.raises(ConfigError, match="--tls must be one of off, on, require"):
        _serve_args("--config", str(config))
    config.write_text('tls-verify-peer = "yes"\n')
    with pytest.raises(ConfigError, match="must be true or false"):
        _serve_args("--config", str(config))
