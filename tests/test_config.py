"""--config TOML: the same settings as the command line, validated, merged under the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from server.config import apply_config, load_config
from server.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "serve.toml"
    path.write_text(text)
    return path


def test_full_config(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        """
qmp = ["unix:qmp.sock", "tcp:127.0.0.1:4444"]
nbd = "127.0.0.1:10809"
handshake-timeout = 5
idle-timeout = 0
max-connections-per-client = 4
allow-dir = ["images", "/srv/backups"]
pid-file = "run/serve.pid"
max-connections = 8

[[export]]
name = "b"
path = "b.qcow2"
format = "qcow2"
readonly = true
""",
    )
    values = load_config(cfg)
    base = tmp_path.resolve()
    assert values["qmp"] == [f"unix:{base}/qmp.sock", "tcp:127.0.0.1:4444"]
    assert values["nbd"] == ["127.0.0.1:10809"]
    assert values["handshake_timeout"] == 5.0
    assert values["idle_timeout"] == 0.0 and values["max_connections_per_client"] == 4
    assert values["allow_dir"] == [f"{base}/images", "/srv/backups"]
    assert values["pid_file"] == f"{base}/run/serve.pid"
    assert values["max_connections"] == 8
    assert values["export"] == [f"b={base}/b.qcow2,readonly,format=qcow2"]
    assert load_config(write(tmp_path, 'export = ["a=/img/a.raw,readonly"]'))["export"] == ["a=/img/a.raw,readonly"]


def test_command_line_wins_and_lists_concatenate(tmp_path: Path) -> None:
    values = load_config(write(tmp_path, 'max-connections = 3\npid-file = "/p"\nqmp = "unix:/a"\n'))
    args = argparse.Namespace(max_connections=7, pid_file=None, qmp=["unix:/b"])
    apply_config(args, values)
    assert args.max_connections == 7
    assert args.pid_file == "/p"
    assert args.qmp == ["unix:/a", "unix:/b"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("bogus = 1", "unknown setting 'bogus'"),
        ("max-connections = -1", "non-negative"),
        ("max-connections = true", "non-negative"),
        ("pid-file = 5", "non-empty string"),
        ("handshake-timeout = 0", "positive number"),
        ("idle-timeout = -5", "number of seconds"),
        ("max-connections-per-client = -1", "non-negative"),
        ("qmp = [1]", "non-empty strings"),
        ("[[export]]\nname = 'x'", "need 'name' and 'path'"),
        ("[[export]]\nname = 'x'\npath = 'p'\nformat = 'vmdk'", "'format'"),
        ("[[export]]\nname = 'x'\npath = 'p'\nextra = 1", "unknown key"),
        ("nbd = ", "invalid TOML"),
    ],
)
def test_invalid(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")
