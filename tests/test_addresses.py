"""One address parser for every caller: ``serve --qmp``/``--nbd``, ``qmp --qmp``, ``backup --qmp`` and
the configuration file read an address by the same rules and refuse the same malformed ones."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from server.addresses import parse_monitor_address, show_tcp, split_hostport
from server.commands.serve import config_from_args, parse_hostport
from server.config import load_config
from server.errors import AddressError, ConfigError
from server.qmp.client import QmpClient, QmpClientError


def serve_args(**kw: object) -> argparse.Namespace:
    values: dict[str, object] = {"nbd": [], "nbd_socket": [], "export": [], "qmp": []}
    values.update(kw)
    return argparse.Namespace(**values)


#: Addresses the two monitor parsers used to disagree on: each caller now refuses all of them.
DISPUTED = ["tcp:h:1:2", "tcp:h:+5", "tcp:h: 5", "tcp:h:\u0665"]


@pytest.mark.parametrize("text", DISPUTED)
def test_serve_refuses_what_the_client_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="bad QMP address"):
        config_from_args(serve_args(qmp=[text]))


@pytest.mark.parametrize("text", DISPUTED)
async def test_client_refuses_what_serve_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="bad QMP address"):
        await QmpClient.connect(text)


def test_a_bare_socket_path_is_a_monitor_address_for_every_caller(tmp_path: Path) -> None:
    assert parse_monitor_address("/run/q.sock") == ("unix", "/run/q.sock")
    assert config_from_args(serve_args(qmp=["/run/q.sock"])).qmp == ["/run/q.sock"]
    config = tmp_path / "serve.toml"
    config.write_text('qmp = ["sub/q.sock"]\n')
    assert load_config(config)["qmp"] == [f"{tmp_path}/sub/q.sock"]


async def test_client_connects_to_a_bare_path_like_serve_listens_there(tmp_path: Path) -> None:
    with pytest.raises(QmpClientError, match="cannot connect"):
        await QmpClient.connect(str(tmp_path / "none.sock"))


def test_monitor_and_nbd_addresses_share_the_host_port_rule() -> None:
    assert parse_monitor_address("tcp:[::1]:4444") == ("tcp", ("::1", 4444))
    assert parse_hostport("[::1]:4444") == ("::1", 4444)
    for rest in ("::1:4444", "h:70000", "h:x", "[::1"):
        with pytest.raises(AddressError):
            parse_monitor_address(f"tcp:{rest}")
        with pytest.raises(AddressError):
            parse_hostport(rest)
    # the parts that may be missing differ by caller, not the rule
    assert split_hostport(":5", default_host="0.0.0.0", default_port=None) == ("0.0.0.0", 5)
    with pytest.raises(AddressError):
        split_hostport("h", default_host=None, default_port=None)


def test_show_tcp_reads_back() -> None:
    for host, port in (("127.0.0.1", 1), ("::1", 2)):
        text = show_tcp(host, port)
        assert split_hostport(text, default_host=None, default_port=None) == (host, port)
