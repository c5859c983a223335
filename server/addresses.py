"""The addresses given on the command line and in the configuration file, parsed by one set of rules:

* a monitor address (``serve --qmp``, ``qmp --qmp``, ``backup --qmp``): ``unix:PATH``,
  ``tcp:HOST:PORT`` or ``tcp:[IPV6]:PORT``, or a bare path that contains a ``/`` (a unix socket);
* an NBD listening address (``serve --nbd``): ``HOST[:PORT]`` or ``[IPV6][:PORT]``, each part
  optional, with the defaults the caller gives.

Both share the host and port rule: an IPv6 address is written in brackets (a host with a ``:`` is
refused rather than split at a guess), a port is decimal digits up to 65535.
"""

from __future__ import annotations

from typing import Literal

from server.errors import AddressError

MONITOR_FORMS = "unix:PATH or tcp:HOST:PORT"

MonitorAddress = tuple[Literal["unix"], str] | tuple[Literal["tcp"], tuple[str, int]]


def split_hostport(text: str, *, default_host: str | None, default_port: int | None) -> tuple[str, int]:
    """``HOST:PORT`` / ``[IPV6]:PORT`` → (host, port); a missing part takes its default, or is an error
    when the default is None."""
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise AddressError(f"bad address '{text}' (expected [IPV6]:PORT)")
        port_text = rest[1:]
    elif text.count(":") > 1:
        raise AddressError(f"bad address '{text}' (write IPv6 addresses as [ADDR]:PORT)")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        if default_host is None:
            raise AddressError(f"bad address '{text}' (no host)")
        host = default_host
    if not port_text:
        if default_port is None:
            raise AddressError(f"bad address '{text}' (no port)")
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()):
        raise AddressError(f"bad port in '{text}'")
    port = int(port_text)
    if port > 65535:
        raise AddressError(f"port {port} out of range")
    return host, port


def parse_monitor_address(text: str) -> MonitorAddress:
    """``unix:PATH`` → ("unix", PATH); ``tcp:HOST:PORT`` → ("tcp", (HOST, PORT)); ``/a/path`` → unix."""
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return "unix", rest
    if kind == "tcp" and rest:
        try:
            return "tcp", split_hostport(rest, default_host=None, default_port=None)
        except AddressError as exc:
            raise AddressError(f"bad QMP address '{text}': {exc}") from None
    if is_bare_path(text):
        return "unix", text
    raise AddressError(f"bad QMP address '{text}' (expected {MONITOR_FORMS})")


def is_bare_path(text: str) -> bool:
    """A monitor address written as a unix socket's path alone (no ``unix:``)."""
    return ":" not in text and "/" in text


def show_tcp(host: str, port: int) -> str:
    """``HOST:PORT`` as these rules read it back (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
