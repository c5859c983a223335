"""NBD URI parsing: the spec's examples, IPv6, unix sockets, QEMU's legacy syntax and clear refusals."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbd.errors import UriError
from nbd.uri import NbdUri, TlsParams, looks_like_uri, parse_uri


@pytest.mark.parametrize(
    ("text", "export"),
    [
        ("nbd://example.com/disk", "disk"),
        ("nbd+unix:///disk?socket=sock", "disk"),
        ("nbd://example.com/", ""),
        ("nbd://example.com", ""),
        ("nbd://example.com//disk", "/disk"),
        ("nbd://example.com/hello%20world", "hello world"),
        ("nbd://example.com/caf%C3%A9", "café"),
    ],
)
def test_spec_export_names(text: str, export: str) -> None:
    assert parse_uri(text).export == export


def test_tcp_host_and_port() -> None:
    uri = parse_uri("nbd://localhost:10810/x")
    assert (uri.host, uri.port, uri.socket, uri.is_unix) == ("localhost", 10810, None, False)
    assert parse_uri("nbd://localhost/x").port == 10809
    assert parse_uri("nbd+tcp://h/x").host == "h"


def test_ipv6_literals() -> None:
    uri = parse_uri("nbd://[::1]:10900/e")
    assert (uri.host, uri.port, uri.export) == ("::1", 10900, "e")
    assert parse_uri("nbd://[fe80::1]").host == "fe80::1"
    assert str(uri) == "nbd://[::1]:10900/e"


def test_unix_socket() -> None:
    uri = parse_uri("nbd+unix:///exp?socket=/tmp/my%20sock")
    assert (uri.socket, uri.export, uri.host, uri.is_unix) == ("/tmp/my sock", "exp", None, True)
    assert parse_uri("nbd+unix://?socket=s").export == ""
    assert parse_uri("nbd+unix:///?socket=%00/abstract").socket == "\0/abstract"


def test_experimental_parameters_are_ignored() -> None:
    assert parse_uri("nbd://h/e?x-foo=1").export == "e"


def test_nbds_uris_carry_their_tls_parameters() -> None:
    uri = parse_uri("nbds://h:10900/e?tls-certificates=/etc/pki/qemu&tls-hostname=nbd.example&tls-verify-peer=0")
    assert (uri.host, uri.port, uri.export) == ("h", 10900, "e")
    assert uri.tls == TlsParams(certificates="/etc/pki/qemu", verify_peer=False, hostname="nbd.example")
    assert parse_uri(str(uri)) == uri  # the canonical spelling keeps TLS
    assert parse_uri("NBDS://h/").tls == TlsParams()
    unix = parse_uri("nbds+unix:///e?socket=/s&tls-certificates=/d&tls-type=x509")
    assert (unix.socket, unix.tls) == ("/s", TlsParams(certificates="/d"))
    assert str(unix) == "nbds+unix:///e?socket=/s&tls-certificates=/d"
    assert unix.with_export("f").tls == unix.tls
    assert parse_uri("nbd://h/e").tls is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nbd://h/e?tls-type=x509", "use an nbds:// or nbds\\+unix:// URI"),
        ("nbd+unix:///e?socket=s&tls-certificates=/d", "use an nbds://"),
        ("nbds://h/?tls-verify-peer=yes", "tls-verify-peer must be 0 or 1"),
        ("nbds://h/?tls-type=psk", "x509 only"),
        ("nbds://h/?tls-psk-file=/k", "pre-shared keys"),
        ("nbds+unix:///e", "needs a socket=PATH"),
    ],
)
def test_tls_parameters_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(UriError, match=message):
        parse_uri(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("disk.img", "no scheme"),
        ("http://h/e", "unknown scheme"),
        ("nbd+unix:///e", "socket=PATH"),
        ("nbd+unix://host/e?socket=s", "no host"),
        ("nbd://h/e?socket=s", "only for nbd\\+unix"),
        ("nbd://h/e?foo=1", "unknown query"),
        ("nbd://h:99999/e", "out of range|Port"),
        ("nbd:///e", "no host"),
        ("nbd://h/e#frag", "fragment"),
        ("nbd://h/%FF", "UTF-8"),
        ("nbd://h/a%00b", "NUL"),
        ("nbd+rdma://h/e", "not supported"),
        ("nbd:", "expected nbd:HOST:PORT"),
        ("nbd:unix:", "no socket path"),
        ("nbd://h/?socket=a&socket=b", "socket=PATH|only for|twice"),
    ],
)
def test_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(UriError, match=message):
        parse_uri(text)


def test_export_name_length_limit() -> None:
    assert parse_uri("nbd://h/" + "a" * 4096).export == "a" * 4096
    with pytest.raises(UriError, match="longer than"):
        parse_uri("nbd://h/" + "a" * 4097)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nbd:localhost:10809", NbdUri(host="localhost", port=10809)),
        ("nbd:127.0.0.1:10900:exportname=disk", NbdUri(export="disk", host="127.0.0.1", port=10900)),
        ("nbd:[::1]:10900:exportname=a:b", NbdUri(export="a:b", host="::1", port=10900)),
        ("nbd:unix:/run/nbd.sock", NbdUri(socket="/run/nbd.sock")),
        ("nbd:unix:/run/nbd.sock:exportname=x", NbdUri(export="x", socket="/run/nbd.sock")),
        ("nbd:myhost", NbdUri(host="myhost")),
    ],
)
def test_qemu_legacy_syntax(text: str, expected: NbdUri) -> None:
    assert parse_uri(text) == expected


def test_looks_like_uri() -> None:
    for text in ("nbd://h/e", "nbd+unix:///?socket=s", "nbd:h:1", "nbds://h/"):
        assert looks_like_uri(text)
    for text in ("disk.img", "/tmp/nbd.img", "./nbd://x"):
        assert not looks_like_uri(text)


names = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=40)


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(export=names, port=st.integers(1, 65535))
def test_str_round_trips_tcp(export: str, port: int) -> None:
    uri = NbdUri(export=export, host="example.com", port=port)
    assert parse_uri(str(uri)) == uri


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(export=names, socket=st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), min_size=1))
def test_str_round_trips_unix(export: str, socket: str) -> None:
    uri = NbdUri(export=export, socket=socket)
    assert parse_uri(str(uri)) == uri


@pytest.mark.parametrize(
    ("text", "local"),
    [
        ("nbd+unix:///disk?socket=/run/nbd.sock", True),
        ("nbd://localhost/disk", True),
        ("nbd://127.0.0.1:10810/disk", True),
        ("nbd://127.8.9.10/disk", True),
        ("nbd://[::1]/disk", True),
        ("nbd://192.168.1.20/disk", False),
        ("nbd://[2001:db8::1]/disk", False),
        ("nbd://backup.example.com/disk", False),
        ("nbd:127.0.0.1:10809", True),
    ],
)
def test_is_local_means_unix_socket_or_loopback(text: str, local: bool) -> None:
    assert parse_uri(text).is_local is local
