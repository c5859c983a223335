"""NBD URIs (the NBD project's ``nbd-uri.md``) and QEMU's legacy ``nbd:`` syntax, parsed in one place.

Accepted forms::

    nbd://HOST[:PORT][/EXPORT]              TCP; IPv6 literals in brackets; port defaults to 10809
    nbd+unix:///[EXPORT]?socket=PATH        unix domain socket
    nbd:HOST:PORT[:exportname=EXPORT]       QEMU's legacy syntax
    nbd:unix:PATH[:exportname=EXPORT]
    nbds://HOST[:PORT][/EXPORT][?TLS]       TLS (x509) over TCP
    nbds+unix:///[EXPORT]?socket=PATH[&TLS] TLS over a unix socket

The export name is the path without its leading ``/``, percent-decoded (so ``nbd://h//disk`` names
``/disk``); an empty path is the default export. ``nbds`` URIs take the spec's ``tls-certificates=DIR``
(QEMU's client layout: ``ca-cert.pem``, optional ``client-cert.pem``/``client-key.pem``; the system's
CAs without it), ``tls-verify-peer=0|1`` (default 1), ``tls-hostname=NAME`` (the name the server's
certificate must carry; default the URI's host) and ``tls-type=x509``. ``tls-*`` parameters on a
clear-text ``nbd`` URI are refused: TLS is asked for by the scheme, never guessed.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from nbd.constants import DEFAULT_PORT, MAX_STRING
from nbd.errors import UriError

_TCP_SCHEMES = {"nbd", "nbd+tcp"}
_UNIX_SCHEMES = {"nbd+unix"}
_TLS_SCHEMES = {"nbds", "nbds+tcp", "nbds+unix"}
_UNSUPPORTED_SCHEMES = {"nbd+rdma", "nbd+vsock", "nbds+vsock", "nbd+ssh"}
_TLS_PARAMS = {"tls-type", "tls-hostname", "tls-verify-peer", "tls-certificates", "tls-psk-file", "tls-username"}


@dataclass(frozen=True, slots=True)
class TlsParams:
    """What an ``nbds`` URI asks of TLS (``nbd.tls.client_context`` makes the context)."""

    certificates: str | None = None  # a directory in QEMU's client layout; None: the system's CAs
    verify_peer: bool = True
    hostname: str | None = None  # checked against the server's certificate instead of the URI's host


@dataclass(frozen=True, slots=True)
class NbdUri:
    """Where an NBD export lives: a TCP ``host``/``port`` or a unix ``socket``, and the ``export`` name."""

    export: str = ""
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None
    tls: TlsParams | None = None

    @property
    def is_unix(self) -> bool:
        return self.socket is not None

    @property
    def is_local(self) -> bool:
        """On this machine: a unix socket or a loopback address (no network latency to cover)."""
        if self.socket is not None:
            return True
        host = self.host or ""
        if host.lower() in ("localhost", "localhost.localdomain"):
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False  # a host name: may be anywhere

    def __str__(self) -> str:
        """The canonical ``nbd://`` / ``nbd+unix://`` spelling (percent-encoded), for messages and logs."""
        path = "/" + quote(self.export, safe="")
        scheme = "nbd" if self.tls is None else "nbds"
        query = self._tls_query()
        if self.socket is not None:
            return f"{scheme}+unix://{path}?socket={quote(self.socket, safe='/')}{'&' + query if query else ''}"
        host = self.host or ""
        if ":" in host:
            host = f"[{host}]"
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        return f"{scheme}://{host}{port}{path}{'?' + query if query else ''}"

    def _tls_query(self) -> str:
        tls = self.tls
        if tls is None:
            return ""
        parts = []
        if tls.certificates is not None:
            parts.append(f"tls-certificates={quote(tls.certificates, safe='/')}")
        if not tls.verify_peer:
            parts.append("tls-verify-peer=0")
        if tls.hostname is not None:
            parts.append(f"tls-hostname={quote(tls.hostname, safe='')}")
        return "&".join(parts)

    def with_export(self, export: str) -> NbdUri:
        return NbdUri(export=export, host=self.host, port=self.port, socket=self.socket, tls=self.tls)


def looks_like_uri(text: str) -> bool:
    """True when ``text`` names an NBD endpoint rather than a file (the ``copy`` command's SRC/DST)."""
    lowered = text.lower()
    return lowered.startswith("nbd:") or bool(re.match(r"^nbds?(\+[a-z]+)?://", lowered))


def parse_uri(text: str) -> NbdUri:
    """Parse an NBD URI or QEMU legacy ``nbd:`` string; raise :class:`UriError` saying what is wrong."""
    if not isinstance(text, str) or not text:
        raise UriError("empty NBD URI")
    scheme, sep, _ = text.partition(":")
    scheme = scheme.lower()
    if not sep:
        raise UriError(f"not an NBD URI (no scheme): {text!r}")
    if scheme in _UNSUPPORTED_SCHEMES:
        raise UriError(f"{text!r}: the {scheme}:// transport is not supported")
    if scheme == "nbd" and not text[len(scheme) + 1 :].startswith("//"):
        return _parse_legacy(text)
    if scheme not in _TCP_SCHEMES | _UNIX_SCHEMES | _TLS_SCHEMES:
        raise UriError(f"{text!r}: unknown scheme {scheme!r} (expected nbd://, nbd+unix:// or nbd:HOST:PORT)")
    return _parse_rfc3986(text, scheme)


def _tls_params(text: str, scheme: str, params: dict[str, str]) -> TlsParams | None:
    """Take the ``tls-*`` parameters out of ``params``: TlsParams for an ``nbds`` scheme."""
    given = {key: params.pop(key) for key in sorted(_TLS_PARAMS & params.keys())}
    if scheme not in _TLS_SCHEMES:
        if given:
            raise UriError(f"{text!r}: {', '.join(given)} asks for TLS: use an nbds:// or nbds+unix:// URI")
        return None
    for key in ("tls-psk-file", "tls-username"):
        if key in given:
            raise UriError(f"{text!r}: {key}: TLS with pre-shared keys is not supported (x509 only)")
    if given.get("tls-type", "x509") != "x509":
        raise UriError(f"{text!r}: tls-type={given['tls-type']} is not supported (x509 only)")
    verify = given.get("tls-verify-peer", "1")
    if verify not in ("0", "1"):
        raise UriError(f"{text!r}: tls-verify-peer must be 0 or 1")
    certificates = given.get("tls-certificates") or None
    hostname = given.get("tls-hostname") or None
    return TlsParams(certificates=certificates, verify_peer=verify == "1", hostname=hostname)


def _parse_rfc3986(text: str, scheme: str) -> NbdUri:
    try:
        parts = urlsplit(text)
        port_value = parts.port
    except ValueError as exc:
        raise UriError(f"{text!r}: {exc}") from None
    if parts.fragment:
        raise UriError(f"{text!r}: NBD URIs have no fragment")
    export = _decode(text, parts.path[1:] if parts.path.startswith("/") else parts.path)
    params = _query(text, parts.query)
    tls = _tls_params(text, scheme, params)
    socket = params.pop("socket", None)
    if params:
        unknown = ", ".join(sorted(params))
        raise UriError(f"{text!r}: unknown query parameter(s): {unknown}")
    if scheme in _UNIX_SCHEMES or scheme == "nbds+unix":
        if parts.hostname or port_value is not None:
            raise UriError(f"{text!r}: {scheme}:// URIs take no host or port (use ?socket=PATH)")
        if not socket:
            raise UriError(f"{text!r}: {scheme}:// needs a socket=PATH query parameter")
        return NbdUri(export=export, socket=socket, tls=tls)
    if socket is not None:
        raise UriError(f"{text!r}: the socket parameter is only for nbd+unix:// URIs")
    host = parts.hostname
    if not host:
        raise UriError(f"{text!r}: no host in the URI")
    port = DEFAULT_PORT if port_value is None else port_value
    if not 0 < port < 65536:
        raise UriError(f"{text!r}: port {port} out of range")
    return NbdUri(export=export, host=_decode(text, host), port=port, tls=tls)


def _query(text: str, query: str) -> dict[str, str]:
    params: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise UriError(f"{text!r}: malformed query string {query!r}") from None
    for key, value in pairs:
        if key.startswith("x-"):
            continue  # experimental parameters of other clients: harmless to ignore
        if key in params:
            raise UriError(f"{text!r}: query parameter {key!r} given twice")
        params[key] = value
    return params


def _decode(text: str, value: str) -> str:
    try:
        decoded = unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise UriError(f"{text!r}: percent-encoding is not valid UTF-8") from None
    if "\0" in decoded and not decoded.startswith("\0"):
        raise UriError(f"{text!r}: NUL character in the URI")
    if len(decoded.encode()) > MAX_STRING:
        raise UriError(f"{text!r}: export name longer than {MAX_STRING} bytes")
    return decoded


def _parse_legacy(text: str) -> NbdUri:
    """QEMU's ``nbd:HOST:PORT[:exportname=X]`` and ``nbd:unix:PATH[:exportname=X]``."""
    rest = text[4:]
    export = ""
    marker = rest.find(":exportname=")
    if marker >= 0:
        export = rest[marker + len(":exportname=") :]
        rest = rest[:marker]
    if rest.startswith("unix:"):
        path = rest[5:]
        if not path:
            raise UriError(f"{text!r}: no socket path after nbd:unix:")
        return NbdUri(export=export, socket=path)
    match = re.fullmatch(r"\[([0-9A-Fa-f:.%a-zA-Z]+)\]:(\d+)|([^:\[\]]+):(\d+)|\[([^\]]+)\]|([^:\[\]]+)", rest)
    if not match:
        raise UriError(f"{text!r}: expected nbd:HOST:PORT[:exportname=NAME] or nbd:unix:PATH[:exportname=NAME]")
    host = match.group(1) or match.group(3) or match.group(5) or match.group(6)
    port_text = match.group(2) or match.group(4)
    port = int(port_text) if port_text else DEFAULT_PORT
    if not 0 < port < 65536:
        raise UriError(f"{text!r}: port {port} out of range")
    return NbdUri(export=export, host=host, port=port)
