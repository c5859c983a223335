"""``nbd-backup serve``: run the daemon in the foreground (logs on stderr; SIGTERM/SIGINT stop it)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field

from backup.errors import BackupError
from nbd.constants import DEFAULT_PORT, MAX_STRING
from nbd.loop import run
from server.daemon import Daemon
from server.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"

EPILOG = f"""\
exports:
  --export NAME=PATH[,readonly][,format=raw|qcow2][,description=TEXT]
      opens the image PATH as block node NAME and exports it over NBD as NAME (writable unless
      'readonly'; the format is probed when not given, and a qcow2 image is never served as raw).
      Repeat it for several exports. Without --nbd/--nbd-socket it listens on {DEFAULT_HOST}:{DEFAULT_PORT}.

for qemu-nbd users:
  qemu-nbd -x NAME -f FMT [-r] FILE   -->  --export NAME=FILE[,format=FMT][,readonly]
  qemu-nbd -b HOST -p PORT            -->  --nbd HOST:PORT
  qemu-nbd -k PATH                    -->  --nbd-socket PATH   (TCP and unix sockets may be used at once)
  qemu-nbd -e N / --shared=N          -->  --max-connections N
  qemu-nbd -D TEXT                    -->  --export NAME=FILE,description=TEXT
  clients connect with nbd://HOST:PORT/NAME or nbd+unix:///NAME?socket=PATH, as with qemu-nbd.

The daemon prints a line starting with "nbd-backup: ready" on stderr once it is listening.
"""


@dataclass
class ExportSpec:
    name: str
    path: str
    readonly: bool = False
    format: str | None = None
    description: str = ""


@dataclass
class ServeConfig:
    tcp: list[tuple[str, int]] = field(default_factory=list)
    unix: list[str] = field(default_factory=list)
    exports: list[ExportSpec] = field(default_factory=list)
    max_connections: int = 100
    handshake_timeout: float = 10.0


def parse_hostport(text: str, *, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST[:PORT]`` or ``[IPV6][:PORT]`` → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"bad address '{text}' (expected [IPV6]:PORT)")
        port_text = rest[1:]
    elif text.count(":") > 1:
        raise ConfigError(f"bad address '{text}' (write IPv6 addresses as [ADDR]:PORT)")
    else:
        host, _, port_text = text.partition(":")
    host = host or DEFAULT_HOST
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"bad port in '{text}'") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} out of range")
    return host, port


def parse_export(text: str) -> ExportSpec:
    """``NAME=PATH[,readonly][,format=raw|qcow2][,description=TEXT]``."""
    head, *options = text.split(",")
    name, sep, path = head.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"bad --export '{text}' (expected NAME=PATH[,readonly][,format=raw|qcow2])")
    if len(name.encode()) > MAX_STRING:
        raise ConfigError(f"export name longer than {MAX_STRING} bytes")
    spec = ExportSpec(name=name, path=path)
    for option in options:
        key, _, value = option.partition("=")
        if key in ("readonly", "read-only", "ro") and not value:
            spec.readonly = True
        elif key == "format" and value in ("raw", "qcow2"):
            spec.format = value
        elif key == "description":
            spec.description = value
        else:
            raise ConfigError(f"bad option '{option}' in --export '{text}' (readonly, format=raw|qcow2, description=)")
    return spec


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the daemon: serve disk images over NBD (like qemu-nbd)",
        description="Run the nbd-backup daemon in the foreground: export disk images over NBD.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--nbd",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help=f"listen for NBD clients on TCP (repeatable; port defaults to {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--nbd-socket", action="append", default=[], metavar="PATH", help="listen for NBD clients on a unix socket"
    )
    parser.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="NAME=PATH[,readonly][,format=raw|qcow2]",
        help="open an image and export it over NBD (repeatable)",
    )
    parser.add_argument(
        "--max-connections", type=int, default=100, metavar="N", help="NBD connections at once (default 100)"
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="drop NBD clients that have not finished the handshake by then (default 10)",
    )
    parser.set_defaults(func=main)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    config = ServeConfig(
        tcp=[parse_hostport(a) for a in args.nbd],
        unix=list(args.nbd_socket),
        exports=[parse_export(e) for e in args.export],
        max_connections=args.max_connections,
        handshake_timeout=args.handshake_timeout,
    )
    if config.max_connections < 1:
        raise ConfigError("--max-connections must be at least 1")
    if config.handshake_timeout <= 0:
        raise ConfigError("--handshake-timeout must be positive")
    names = [e.name for e in config.exports]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"duplicate export name(s): {', '.join(duplicates)}")
    if config.exports and not config.tcp and not config.unix:
        config.tcp.append((DEFAULT_HOST, DEFAULT_PORT))
    return config


async def build_daemon(config: ServeConfig) -> Daemon:
    """Open every image, export it and start listening; on failure nothing stays open."""
    daemon = Daemon(max_connections=config.max_connections, handshake_timeout=config.handshake_timeout)
    try:
        for spec in config.exports:
            await daemon.open_node(spec.name, spec.path, format=spec.format, read_only=spec.readonly)
            daemon.export(spec.name, writable=not spec.readonly, description=spec.description)
        await daemon.listen_nbd(config.tcp, config.unix)
    except BaseException:
        await daemon.shutdown()
        raise
    return daemon


async def serve(config: ServeConfig) -> None:
    daemon = await build_daemon(config)
    await daemon.run()


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        run(serve(config))
    except (ConfigError, BackupError) as exc:
        print(f"nbd-backup serve: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"nbd-backup serve: error: {exc}", file=sys.stderr)
        return 1
    return 0
