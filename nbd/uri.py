"""NBD URIs (the NBD project's ``nbd-uri.md``) and QEMU's legacy ``nbd:`` syntax, parsed in one place.

Accepted forms::

    nbd://HOST[:PORT][/EXPORT]              TCP; IPv6 literals in brackets; port defaults to 10809
    nbd+unix:///[EXPORT]?socket=PATH        unix domain socket
    nbd:HOST:PORT[:exportname=EXPORT]       QEMU's legacy syntax
    nbd:unix:PATH[:exportname=EXPORT]

The export name is the path without its leading ``/``, percent-decoded (so ``nbd://h//disk`` names
``/disk``); an empty path is the default export. ``nbds://`` and ``nbds+unix://`` (and ``tls-*``
query parameters) are refused with a clear :class:`~nbd.errors.UriError` because TLS is not configured.
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
class NbdUri:
    """Where an NBD export lives: a TCP ``host``/``port`` or a unix ``socket``, and the ``export`` name."""

    export: str = ""
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None

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
        if self.socket is not None:
            return f"nbd+unix://{path}?socket={quote(self.socket, safe='/')}"
        host = self.host or ""
        if ":" in host:
            host = f"[{host}]"
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        return f"nbd://{host}{port}{path}"

    def with_export(self, export: str) -> NbdUri:
        return NbdUri(export=export, host=self.host, port=self.port, socket=self.socket)


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
    if scheme in _TLS_SCHEMES:
        raise UriError(f"{text!r}: {scheme}:// needs TLS, but TLS is not configured (use nbd:// or nbd+unix://)")
    if scheme in _UNSUPPORTED_SCHEMES:
        raise UriError(f"{text!r}: the {scheme}:// transport is not supported")
    if scheme == "nbd" and not text[len(scheme) + 1 :].startswith("//"):
        return _parse_legacy(text)
    if scheme not in _TCP_SCHEMES | _UNIX_SCHEMES:
        raise UriError(f"{text!r}: unknown scheme {scheme!r} (expected nbd://, nbd+unix:// or nbd:HOST:PORT)")
    return _parse_rfc3986(text, scheme)


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
    socket = params.pop("socket", None)
    if params:
        unknown = ", ".join(sorted(params))
        raise UriError(f"{text!r}: unknown query parameter(s): {unknown}")
    if scheme in _UNIX_SCHEMES:
        if parts.hostname or port_value is not None:
            raise UriError(f"{text!r}: nbd+unix:// URIs take no host or port (use ?socket=PATH)")
        if not socket:
            raise UriError(f"{text!r}: nbd+unix:// needs a socket=PATH query parameter")
        return NbdUri(export=export, socket=socket)
    if socket is not None:
        raise UriError(f"{text!r}: the socket parameter is only for nbd+unix:// URIs")
    host = parts.hostname
    if not host:
        raise UriError(f"{text!r}: no host in the URI")
    port = DEFAULT_PORT if port_value is None else port_value
    if not 0 < port < 65536:
        raise UriError(f"{text!r}: port {port} out of range")
    return NbdUri(export=export, host=_decode(text, host), port=port)


def _query(text: str, query: str) -> dict[str, str]:
    params: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise UriError(f"{text!r}: malformed query string {query!r}") from None
    for key, value in pairs:
        if key in _TLS_PARAMS:
            raise UriError(f"{text!r}: {key} asks for TLS, but TLS is not configured")
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
