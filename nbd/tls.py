"""x509 credentials, peer names and client authorization for NBD over TLS, as QEMU lays them out.

Pieces the server, the client and the QMP objects (``tls-creds-x509``, ``authz-*``) share:

* :func:`check_credentials` / :func:`server_context` / :func:`client_context`: a credential directory
  in QEMU's layout (``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``; ``client-cert.pem``,
  ``client-key.pem``) made into an ``ssl.SSLContext`` (TLS 1.2 or later). A missing file is a
  :class:`TlsConfigError` naming it, raised when the credentials are loaded, not at the first client.
* :func:`peer_dn`: the peer certificate's distinguished name spelled as QEMU (gnutls) spells it for
  ``authz-simple``'s ``identity``: the subject's parts in certificate order, comma-joined without
  spaces (``C=GB,O=Example,CN=client``) — the reverse of ``openssl -nameopt RFC2253``.
* :class:`AuthzList` (``authz-list``: exact and glob rules, first match wins, a default policy) and
  :class:`AuthzSimple`: an authorizer is any ``Callable[[str], bool]`` over that DN.
* :class:`ServerTls`: what ``NbdServer`` consults per connection — the mode, a function returning the
  context and a function returning the authorizer, so QMP can replace or delete either while the
  server runs (an authz lookup that returns None lets nobody in).
"""

from __future__ import annotations

import fnmatch
import os
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

TlsMode = Literal["off", "on", "require"]
TLS_MODES: tuple[TlsMode, ...] = ("off", "on", "require")
Endpoint = Literal["server", "client"]
Authorizer = Callable[[str], bool]

CA_CERT = "ca-cert.pem"
FILES: dict[Endpoint, tuple[str, str]] = {
    "server": ("server-cert.pem", "server-key.pem"),
    "client": ("client-cert.pem", "client-key.pem"),
}

# Attribute short names as gnutls prints them (RFC 4514 plus gnutls's own for the rest).
_SHORT = {
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "commonName": "CN",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
    "emailAddress": "EMAIL",
    "serialNumber": "serialNumber",
    "title": "title",
    "surname": "surName",
    "givenName": "givenName",
    "initials": "initials",
    "pseudonym": "pseudonym",
    "generationQualifier": "generationQualifier",
    "dnQualifier": "dnQualifier",
    "name": "name",
    "postalCode": "postalCode",
}


class TlsConfigError(ValueError):
    """Credentials that cannot be used (a missing or unreadable file, a key that does not match)."""


def check_credentials(directory: str | os.PathLike[str], endpoint: Endpoint, *, verify_peer: bool = True) -> None:
    """Raise :class:`TlsConfigError` naming the first file of the layout that is not there, in QEMU's
    words (``Unable to access credentials DIR/ca-cert.pem: No such file or directory``).

    As QEMU 7.2: a server needs all three files (the CA even when it does not verify clients); a
    client needs the CA when it verifies the server, and its own certificate and key only when it
    has either (a client without them sends none)."""
    base = Path(directory)
    cert, key = FILES[endpoint]
    needed: list[str] = []
    if verify_peer or endpoint == "server":
        needed.append(CA_CERT)
    if endpoint == "server" or (base / cert).exists() or (base / key).exists():
        needed += [cert, key]
    for name in needed:
        if not (base / name).is_file():
            raise TlsConfigError(f"Unable to access credentials {base / name}: No such file or directory")


def _context(purpose: ssl.Purpose, directory: Path, endpoint: Endpoint, verify_peer: bool) -> ssl.SSLContext:
    check_credentials(directory, endpoint, verify_peer=verify_peer)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if endpoint == "server" else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = (directory / name for name in FILES[endpoint])
    try:
        if (directory / CA_CERT).is_file():
            ctx.load_verify_locations(cafile=str(directory / CA_CERT))
        if cert.exists():
            ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"Unable to load TLS credentials from '{directory}': {exc}") from exc
    if endpoint == "client":
        ctx.check_hostname = verify_peer
    ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    return ctx


def server_context(directory: str | os.PathLike[str], *, verify_peer: bool = True) -> ssl.SSLContext:
    """The server's context: its certificate and key; with ``verify_peer`` clients must present a
    certificate the directory's CA signed (QEMU's default)."""
    return _context(ssl.Purpose.CLIENT_AUTH, Path(directory), "server", verify_peer)


def client_context(directory: str | os.PathLike[str] | None, *, verify_peer: bool = True) -> ssl.SSLContext:
    """The client's context: the CA that must have signed the server's certificate (the system's when
    ``directory`` is None) and, when the directory has them, the client's own certificate and key.
    The host name is checked by ``ssl`` against ``server_hostname`` when ``verify_peer`` is on."""
    if directory is None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if not verify_peer:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return _context(ssl.Purpose.SERVER_AUTH, Path(directory), "client", verify_peer)


# --- distinguished names -------------------------------------------------------------------------


def _escape(value: str) -> str:
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def format_dn(subject: Iterable[Sequence[tuple[str, str]]]) -> str:
    """A subject as ``ssl.getpeercert()`` gives it (RDNs in certificate order) in QEMU's spelling."""
    rdns = []
    for rdn in subject:
        rdns.append("+".join(f"{_SHORT.get(name, name)}={_escape(value)}" for name, value in rdn))
    return ",".join(rdns)


def peer_dn(ssl_object: Any) -> str | None:
    """The verified peer certificate's DN in QEMU's spelling, or None when there is none (a peer that
    sent no certificate, or one that was not verified: ``getpeercert()`` is then empty)."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert or "subject" not in cert:
        return None
    return format_dn(cert["subject"])


# --- authorization -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthzRule:
    """One ``QAuthZListRule``: ``match`` compared exactly or as a shell glob (``?``, ``*``, ``[...]``)."""

    match: str
    policy: Literal["allow", "deny"] = "allow"
    format: Literal["exact", "glob"] = "exact"

    def matches(self, identity: str) -> bool:
        if self.format == "glob":
            return fnmatch.fnmatchcase(identity, self.match)
        return identity == self.match


@dataclass(frozen=True)
class AuthzList:
    """``authz-list``: the first matching rule decides; none matching, ``policy`` does (deny by default)."""

    rules: tuple[AuthzRule, ...] = ()
    policy: Literal["allow", "deny"] = "deny"

    def __call__(self, identity: str) -> bool:
        for rule in self.rules:
            if rule.matches(identity):
                return rule.policy == "allow"
        return self.policy == "allow"

    @classmethod
    def from_patterns(cls, patterns: Iterable[str]) -> AuthzList:
        """The ``--tls-authz`` list: each an allowed DN, a glob when it has ``*``, ``?`` or ``[``."""
        rules = tuple(AuthzRule(p, "allow", "glob" if any(ch in p for ch in "*?[") else "exact") for p in patterns)
        return cls(rules=rules)

    @classmethod
    def from_json(cls, data: Any) -> AuthzList:
        """``AuthZListProperties`` as QMP or an ``authz-listfile`` file spells it."""
        if not isinstance(data, dict):
            raise TlsConfigError("authz list: expected a JSON object")
        policy = data.get("policy", "deny")
        rules = []
        for raw in data.get("rules", []):
            if not isinstance(raw, dict) or not isinstance(raw.get("match"), str):
                raise TlsConfigError("authz list: each rule needs a 'match' string")
            rule_policy, fmt = raw.get("policy", "allow"), raw.get("format", "exact")
            if rule_policy not in ("allow", "deny") or fmt not in ("exact", "glob") or policy not in ("allow", "deny"):
                raise TlsConfigError("authz list: policy is allow|deny, format is exact|glob")
            rules.append(AuthzRule(raw["match"], rule_policy, fmt))
        return cls(rules=tuple(rules), policy=policy)


@dataclass(frozen=True)
class AuthzSimple:
    """``authz-simple``: exactly one identity is allowed."""

    identity: str

    def __call__(self, identity: str) -> bool:
        return identity == self.identity


@dataclass
class ServerTls:
    """The server's TLS settings, consulted per connection.

    ``credentials()`` returns the context for the next handshake (raising if the credentials are
    gone); ``authz`` is None for no client authorization, else ``authz()`` returns the authorizer of
    the moment, or None when it has been deleted — then nobody is let in."""

    mode: TlsMode
    credentials: Callable[[], ssl.SSLContext]
    authz: Callable[[], Authorizer | None] | None = None

    def authorize(self, dn: str | None) -> str | None:
        """None when the peer ``dn`` may connect, else why not (for the log)."""
        if self.authz is None:
            return None
        authorizer = self.authz()
        if authorizer is None:
            return "the authorization object is gone"
        if dn is None:
            return "the client sent no verified certificate"
        if not authorizer(dn):
            return f"TLS x509 authz check for {dn} is denied"
        return None


def fixed_server_tls(
    mode: TlsMode, directory: str | os.PathLike[str], *, verify_peer: bool = True, authz: Sequence[str] = ()
) -> ServerTls:
    """``serve --tls --tls-dir --tls-authz``: credentials loaded (and checked) once, now."""
    ctx = server_context(directory, verify_peer=verify_peer or bool(authz))
    authorizer = AuthzList.from_patterns(authz) if authz else None
    return ServerTls(mode, lambda: ctx, (lambda: authorizer) if authorizer is not None else None)
