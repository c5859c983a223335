"""``nbd-backup serve --config FILE``: the same settings as the command line, from TOML.

Every key is a long option without its dashes (``qmp``, ``nbd``, ``nbd-socket``, ``export``,
``allow-dir``, ``pid-file`` …); repeatable options take a list. Exports may also be written as tables::

    qmp = ["unix:/run/nbd-backup/qmp.sock"]
    nbd = ["127.0.0.1:10809"]
    allow-dir = ["/var/lib/nbd-backup"]
    repo = ["/var/lib/nbd-backup/repo", "offsite=/mnt/offsite/repo"]
    repo-exports = true
    pid-file = "/run/nbd-backup/serve.pid"
    tls = "require"
    tls-dir = "/etc/pki/qemu"
    tls-authz = ["C=GB,O=Example,CN=backup-*"]
    metrics = "127.0.0.1:9810"
    log-format = "json"

    [[export]]
    name = "disk0"
    path = "/var/lib/images/disk0.qcow2"
    format = "qcow2"
    readonly = false

The command line wins for single-valued settings; repeatable ones are the config file's entries
followed by the command line's. Relative paths in the file are relative to the file's directory
(so a config file can live next to its images), while command-line paths keep meaning the cwd.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from server.addresses import is_bare_path
from server.errors import ConfigError
from server.registry import id_wellformed

Kind = Literal["str", "int", "number", "seconds", "bool", "list", "path", "paths", "addresses", "repos"]


@dataclass(frozen=True, slots=True)
class Setting:
    key: str
    kind: Kind

    @property
    def dest(self) -> str:
        return self.key.replace("-", "_")

    @property
    def repeatable(self) -> bool:
        return self.kind in ("list", "paths", "addresses", "repos")


#: Keys the configuration file accepts; ``serve`` defines a command-line option for each.
SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in (
        Setting("qmp", "addresses"),
        Setting("nbd", "list"),
        Setting("nbd-socket", "paths"),
        Setting("export", "list"),
        Setting("max-connections", "int"),
        Setting("handshake-timeout", "number"),
        Setting("idle-timeout", "seconds"),
        Setting("max-connections-per-client", "int"),
        Setting("pid-file", "path"),
        Setting("allow-dir", "paths"),
        Setting("tls", "str"),
        Setting("tls-dir", "path"),
        Setting("tls-authz", "list"),
        Setting("tls-verify-peer", "bool"),
        Setting("repo", "repos"),
        Setting("repo-key-file", "repos"),
        Setting("repo-exports", "bool"),
        Setting("state-file", "path"),
        Setting("metrics", "str"),
        Setting("log-format", "str"),
        Setting("log-level", "str"),
    )
}


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a TOML config file; returns ``{dest: value}`` for the keys present."""
    file = Path(path)
    try:
        with file.open("rb") as stream:
            raw = tomllib.load(stream)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}") from exc
    base = file.resolve().parent
    values: dict[str, Any] = {}
    for key, value in raw.items():
        setting = SETTINGS.get(key)
        if setting is None:
            known = ", ".join(sorted(SETTINGS))
            raise ConfigError(f"{file}: unknown setting '{key}' (known: {known})")
        values[setting.dest] = _convert(file, base, setting, value)
    return values


def apply_config(args: argparse.Namespace, values: dict[str, Any]) -> argparse.Namespace:
    """Merge config values under the command line's (see the module docstring for the rules)."""
    for dest, value in values.items():
        current = getattr(args, dest, None)
        if SETTINGS[dest.replace("_", "-")].repeatable:
            setattr(args, dest, [*value, *(current or [])])
        elif current is None:
            setattr(args, dest, value)
    return args


def _convert(file: Path, base: Path, setting: Setting, value: Any) -> Any:
    where = f"{file}: '{setting.key}'"
    kind = setting.kind
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where} must be a non-negative integer")
        return value
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{where} must be a positive number")
        return float(value)
    if kind == "seconds":
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{where} must be a number of seconds (0: never)")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value
    if kind in ("str", "path"):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} must be a non-empty string")
        return _relative_to(base, value) if kind == "path" else value
    # repeatable: a single value is accepted as a list of one
    items = value if isinstance(value, list) else [value]
    result: list[str] = []
    for item in items:
        if setting.key == "export" and isinstance(item, dict):
            result.append(_export_table(where, base, item))
            continue
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{where} entries must be non-empty strings")
        if kind == "paths":
            result.append(_relative_to(base, item))
        elif kind == "repos":  # [ID=]DIR (or FILE): the path relative to the file, the id kept
            head, sep, rest = item.partition("=")
            keep_id = bool(sep) and id_wellformed(head)
            result.append(f"{head}={_relative_to(base, rest)}" if keep_id else _relative_to(base, item))
        elif kind == "addresses":
            result.append(_address(base, item))
        else:
            result.append(item)
    return result


def _relative_to(base: Path, value: str) -> str:
    expanded = os.path.expanduser(value)
    return expanded if os.path.isabs(expanded) else str(base / expanded)


def _address(base: Path, value: str) -> str:
    """A unix socket's path (``unix:PATH`` or a bare path) is made absolute; ``tcp:HOST:PORT`` is left alone."""
    if value.startswith("unix:"):
        return "unix:" + _relative_to(base, value[len("unix:") :])
    if is_bare_path(value):
        return _relative_to(base, value)
    return value


def _export_table(where: str, base: Path, table: dict[str, Any]) -> str:
    """``{name, path, readonly, format}`` → the command line's ``NAME=PATH[,readonly][,format=F]``."""
    unknown = set(table) - {"name", "path", "readonly", "format"}
    if unknown:
        raise ConfigError(f"{where} table has unknown key(s): {', '.join(sorted(unknown))}")
    name, path = table.get("name"), table.get("path")
    if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
        raise ConfigError(f"{where} tables need 'name' and 'path' strings")
    if "," in path or "=" in name or "," in name:
        raise ConfigError(f"{where}: names may not contain '=' or ',', paths may not contain ','")
    spec = f"{name}={_relative_to(base, path)}"
    readonly = table.get("readonly", False)
    if not isinstance(readonly, bool):
        raise ConfigError(f"{where}: 'readonly' must be true or false")
    if readonly:
        spec += ",readonly"
    fmt = table.get("format")
    if fmt is not None:
        if fmt not in ("raw", "qcow2"):
            raise ConfigError(f"{where}: 'format' must be 'raw' or 'qcow2'")
        spec += f",format={fmt}"
    return spec
