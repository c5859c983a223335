"""``nbd-backup serve`` argument parsing: addresses, export specs, the default listener."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.cli import build_parser
from server.commands.serve import ExportSpec, build_daemon, config_from_args, parse_export, parse_hostport
from server.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:10810", ("127.0.0.1", 10810)),
        ("localhost", ("localhost", 10809)),
        (":0", ("127.0.0.1", 0)),
        ("[::1]:5000", ("::1", 5000)),
        ("[::1]", ("::1", 10809)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["host:port", "::1:80", "[::1", "h:70000", "[::1]x"])
def test_parse_hostport_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_hostport(text)


def test_parse_export() -> None:
    assert parse_export("d=/a/b.img") == ExportSpec("d", "/a/b.img")
    assert parse_export("d=/x,readonly,format=qcow2,description=hi there") == ExportSpec(
        "d", "/x", readonly=True, format="qcow2", description="hi there"
    )
    for bad in ("d", "=x", "d=", "d=/x,format=vmdk", "d=/x,bogus", "x" * 5000 + "=/y"):
        with pytest.raises(ConfigError):
            parse_export(bad)


def test_export_without_listener_listens_on_default() -> None:
    args = build_parser().parse_args(["serve", "--export", "d=/x"])
    config = config_from_args(args)
    assert config.tcp == [("127.0.0.1", 10809)] and config.unix == []
    args = build_parser().parse_args(["serve", "--nbd-socket", "/s", "--export", "d=/x"])
    assert config_from_args(args).tcp == []
    args = build_parser().parse_args(["serve", "--export", "d=/x", "--export", "d=/y"])
    with pytest.raises(ConfigError, match="duplicate"):
        config_from_args(args)
    args = build_parser().parse_args(["serve", "--nbd", "0.0.0.0:1", "--nbd", "[::1]:2", "--max-connections", "0"])
    with pytest.raises(ConfigError, match="max-connections"):
        config_from_args(args)


def test_connection_limits_reach_the_nbd_server(tmp_path: Path) -> None:
    """--idle-timeout and --max-connections-per-client (or their config keys) end up in NbdServer."""
    config_file = tmp_path / "serve.toml"
    config_file.write_text("idle-timeout = 30\nmax-connections-per-client = 3\n")
    args = build_parser().parse_args(["serve", "--config", str(config_file), "--idle-timeout", "120", "--nbd", ":0"])
    config = config_from_args(args)
    assert (config.limits.idle_timeout, config.limits.max_connections_per_client) == (120.0, 3)
    default = config_from_args(build_parser().parse_args(["serve", "--max-connections", "10"]))
    assert (default.limits.idle_timeout, default.limits.max_connections_per_client) == (0.0, None)

    async def main() -> None:
        daemon = await build_daemon(config)
        try:
            assert daemon.nbd is not None
            assert (daemon.nbd.idle_timeout, daemon.nbd.max_connections_per_client) == (120.0, 3)
        finally:
            await daemon.shutdown()

    asyncio.run(main())
    for bad in (["--idle-timeout", "-1"], ["--max-connections-per-client", "0"]):
        with pytest.raises(ConfigError, match=bad[0][2:]):
            config_from_args(build_parser().parse_args(["serve", *bad]))
