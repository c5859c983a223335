"""``nbd-backup serve``: run the daemon in the foreground (logs on stderr; SIGTERM/SIGINT stop it)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from dataclasses import dataclass, field, fields

from backup.errors import BackupError
from nbd.constants import DEFAULT_PORT, MAX_STRING
from nbd.loop import run
from nbd.server import ServerLimits
from nbd.tls import TLS_MODES, ServerTls, TlsConfigError, fixed_server_tls
from server.activation import listen_fds
from server.addresses import parse_monitor_address, split_hostport
from server.config import apply_config, load_config
from server.daemon import Daemon
from server.errors import ConfigError, QmpError, ShutdownError
from server.logs import LOG_FORMATS, LOG_LEVELS, configure
from server.paths import PathPolicy
from server.repos import RepoExports, RepoSpec, open_repos, parse_repo

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"

EPILOG = f"""\
exports:
  --export NAME=PATH[,readonly][,format=raw|qcow2][,description=TEXT]
      opens the image PATH as block node NAME and exports it over NBD as NAME (writable unless
      'readonly'; the format is probed when not given, and a qcow2 image is never served as raw).
      As in QEMU, a probed image is restricted (a warning says so): clients cannot write a first
      sector that would make a raw image probe as another format, and a probed qcow2 image that
      names a backing file is refused. Give format= to lift this. Repeat it for several exports.
      Without --nbd/--nbd-socket it listens on {DEFAULT_HOST}:{DEFAULT_PORT}.

for qemu-nbd users:
  qemu-nbd -x NAME -f FMT [-r] FILE   -->  --export NAME=FILE[,format=FMT][,readonly]
  qemu-nbd -b HOST -p PORT            -->  --nbd HOST:PORT
  qemu-nbd -k PATH                    -->  --nbd-socket PATH   (TCP and unix sockets may be used at once)
  qemu-nbd -e N / --shared=N          -->  --max-connections N
  qemu-nbd -D TEXT                    -->  --export NAME=FILE,description=TEXT
  clients connect with nbd://HOST:PORT/NAME or nbd+unix:///NAME?socket=PATH, as with qemu-nbd.

QMP monitor (QEMU's commands: blockdev-add, nbd-server-start, block-export-add, drive-backup,
blockdev-backup, transaction, query-block-jobs, block-job-cancel …):
  --qmp unix:PATH          a unix socket, created mode 0600 (repeatable, and combinable with tcp:)
  --qmp tcp:HOST:PORT      TCP; keep HOST 127.0.0.1 unless the network is trusted
  (an IPv6 HOST in brackets, tcp:[::1]:4444; a path with a '/' alone means unix:PATH, as for the qmp command)
  With only --qmp, nothing listens for NBD until a client runs nbd-server-start.
  --allow-dir DIR          confine the files QMP clients may open or create (blockdev-add,
                           drive-backup targets) to DIR, symlinks resolved (repeatable)
  --repo [ID=]DIR          open a backup repository (repeatable; ID 'default' when left out) for the
                           repo-snapshot-begin/-commit/-abort/-open and query-repo-snapshots commands
                           (the directory obeys --allow-dir like every path)
  --repo-key-file [ID=]FILE  the key file of encrypted repository ID (repeatable; made by
                           nbd-backup repo init --key-file FILE)
  --repo-exports           every snapshot a read-only NBD export DISK@ID and DISK@latest (REPO:DISK@ID
                           in a repository other than 'default'), listed by nbdinfo --list; snapshots
                           committed later appear at once, @latest follows the newest
  --config FILE            the same settings from TOML: qmp = ["unix:/run/nbd-backup/qmp.sock"],
                           nbd = ["127.0.0.1:10809"], export = ["disk=/img/disk.qcow2"],
                           allow-dir = ["/backups"], pid-file = "...", max-connections = 16,
                           idle-timeout = 600 …
                           (the command line wins; repeatable settings add up)

TLS (x509; as qemu-nbd --object tls-creds-x509,dir=DIR,endpoint=server --tls-creds ... --tls-authz ...):
  --tls-dir DIR            ca-cert.pem, server-cert.pem, server-key.pem (QEMU's layout); checked at start
  --tls require            only STARTTLS/ABORT before TLS; other options get NBD_REP_ERR_TLS_REQD and
                           NBD_OPT_EXPORT_NAME closes (the default once --tls-dir is given, as qemu-nbd)
  --tls on                 TLS offered, clear-text clients still served; --tls off: STARTTLS refused
  --tls-verify-peer on|off clients must present a certificate signed by ca-cert.pem (default on)
  --tls-authz DN           only clients whose certificate's DN matches (repeatable; a glob with * ? [..]).
                           The DN is spelled as QEMU does: subject parts in certificate order, comma-joined
                           without spaces, e.g. C=GB,O=Example,CN=backup-host (not openssl's RFC 2253 order)
  clients: nbdinfo nbds://HOST/NAME?tls-certificates=DIR (DIR: ca-cert.pem, client-cert.pem, client-key.pem)
  A failed, garbled or refused TLS handshake closes that connection only.

limits (whatever clients do, connections and memory stay bounded):
  --max-connections N (default 100), --max-connections-per-client N (one TCP address, default half
  of it), --handshake-timeout SECONDS (10), --idle-timeout SECONDS (0: never). A full server drops
  sockets that have said nothing since their greeting first. Request data, write payloads and
  unsent replies are held to 64 MiB per connection and 256 MiB in all (a client address gets at
  most half): beyond that, requests wait unread; a client that leaves its replies unread or its
  write payload unfinished for 60 s is disconnected.

examples:
  nbd-backup serve --export disk=disk.img
  nbd-backup serve --qmp unix:/run/nbd-backup/qmp.sock --allow-dir /backups --pid-file /run/nbd-backup.pid
  nbd-backup serve --config /etc/nbd-backup/serve.toml
  nbd-backup serve --qmp unix:qmp.sock --repo /backups/repo --repo-exports

socket activation (systemd; contrib/systemd/): sockets passed with LISTEN_FDS/LISTEN_PID and the
LISTEN_FDNAMES "nbd" and "qmp" (FileDescriptorName=) are served instead of binding: a passed nbd socket
replaces --nbd/--nbd-socket (and starts the NBD server), a passed qmp socket replaces --qmp.

state across restarts (--state-file PATH, TOML state-file = "..."):
  the nodes (blockdev-add, as given), repo-snapshot-open nodes, the NBD server (nbd-server-start),
  exports and object-add objects are kept in PATH (JSON, rewritten atomically after every change;
  removals drop them) and set up again at start through the same checks as over QMP: a node whose
  path left --allow-dir or whose image is gone is refused with a log line, the rest comes up, and
  the file as it was is kept in PATH.unrestored. Persistent dirty bitmaps come back with their qcow2
  image; non-persistent ones are not recreated (their bits died with the process), which is logged.
  Jobs are never resumed. A corrupt state file stops the start (move it aside to start empty).

The daemon writes --pid-file and prints a line starting with "nbd-backup: ready" on stderr once
every socket is listening. SIGTERM/SIGINT (or QMP quit) cancel running jobs, flush and exit 0 (1 when
an image could not be flushed or closed).
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
    limits: ServerLimits = field(default_factory=ServerLimits)
    qmp: list[str] = field(default_factory=list)
    pid_file: str | None = None
    allow_dirs: list[str] = field(default_factory=list)
    tls: ServerTls | None = None
    repos: list[RepoSpec] = field(default_factory=list)
    repo_key_files: list[RepoSpec] = field(default_factory=list)
    repo_exports: bool = False
    #: Sockets passed by systemd (``nbd``, ``qmp``); each name replaces the addresses given for it.
    passed: dict[str, list[socket.socket]] = field(default_factory=dict)
    state_file: str | None = None
    metrics: tuple[str, int] | None = None
    log_format: str = "text"
    log_level: str = "info"


def parse_hostport(text: str, *, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``--nbd HOST[:PORT]`` or ``[IPV6][:PORT]`` → (host, port), each part optional."""
    return split_hostport(text.strip(), default_host=DEFAULT_HOST, default_port=default_port)


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
        "--max-connections", type=int, default=None, metavar="N", help="NBD connections at once (default 100)"
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="drop NBD clients that have not finished the handshake by then (default 10)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="close NBD connections that send no request for SECONDS (default 0: never, as qemu-nbd; "
        "qemu's NBD client stays connected while its guest is idle, so set it where clients reconnect)",
    )
    parser.add_argument(
        "--max-connections-per-client",
        type=int,
        default=None,
        metavar="N",
        help="NBD connections at once from one TCP address (default: half of --max-connections)",
    )
    parser.add_argument(
        "--qmp",
        action="append",
        default=[],
        metavar="unix:PATH|tcp:HOST:PORT",
        help="open the QMP monitor there (repeatable)",
    )
    parser.add_argument(
        "--tls", choices=TLS_MODES, default=None, help="NBD over TLS: off, on (offered) or require (see below)"
    )
    parser.add_argument(
        "--tls-dir", metavar="DIR", help="x509 credentials in QEMU's layout (ca-cert.pem, server-*.pem)"
    )
    parser.add_argument(
        "--tls-authz",
        action="append",
        default=[],
        metavar="DN",
        help="allow only clients with this certificate DN (repeatable; glob patterns; QEMU's spelling)",
    )
    parser.add_argument(
        "--tls-verify-peer",
        type=_on_off,
        default=None,
        metavar="on|off",
        help="require a client certificate signed by the CA (default on)",
    )
    parser.add_argument("--config", metavar="FILE", help="read settings from a TOML file (see below)")
    parser.add_argument("--pid-file", metavar="FILE", help="write the daemon's pid here once it is listening")
    parser.add_argument(
        "--allow-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="only let QMP clients open or create images under DIR (repeatable; default: anywhere)",
    )
    parser.add_argument(
        "--repo",
        action="append",
        default=[],
        metavar="[ID=]DIR",
        help="open a backup repository for the repo-* QMP commands (repeatable; ID defaults to 'default')",
    )
    parser.add_argument(
        "--repo-key-file",
        action="append",
        default=[],
        metavar="[ID=]FILE",
        help="the key file of the encrypted repository ID (repeatable; ID defaults to 'default')",
    )
    parser.add_argument(
        "--repo-exports",
        action="store_true",
        default=None,
        help="export every snapshot read-only over NBD as DISK@ID and DISK@latest",
    )
    parser.add_argument(
        "--state-file",
        metavar="PATH",
        help="keep what QMP sets up (nodes, exports, the NBD server, TLS objects) here and set it up "
        "again at the next start (see 'state across restarts' below)",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to 127.0.0.1)",
    )
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, default=None, help="text (default) or json (one object a line)"
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=None, help="default info (-v: debug)")
    parser.set_defaults(func=main)


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError("expected on or off")
    return text == "on"


def tls_from_args(args: argparse.Namespace) -> ServerTls | None:
    """``--tls``/``--tls-dir``/``--tls-authz``/``--tls-verify-peer``: the credentials loaded now, so a
    missing file stops the daemon at start with its name."""
    mode = getattr(args, "tls", None)
    directory = getattr(args, "tls_dir", None)
    authz = list(getattr(args, "tls_authz", None) or [])
    verify = getattr(args, "tls_verify_peer", None)
    if mode is None:
        mode = "require" if directory else "off"
    if mode not in TLS_MODES:
        raise ConfigError(f"--tls must be one of {', '.join(TLS_MODES)}, not '{mode}'")
    if mode == "off":
        if authz or verify is not None:
            raise ConfigError("--tls-authz and --tls-verify-peer need --tls on or require")
        return None
    if not directory:
        raise ConfigError(f"--tls {mode} needs --tls-dir DIR (ca-cert.pem, server-cert.pem, server-key.pem)")
    if authz and verify is False:
        raise ConfigError("--tls-authz needs client certificates: it cannot be used with --tls-verify-peer off")
    try:
        return fixed_server_tls(mode, directory, verify_peer=verify is not False, authz=authz)
    except TlsConfigError as exc:
        raise ConfigError(str(exc)) from None


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The command line (merged over ``--config`` when given) as a ``ServeConfig``."""
    if getattr(args, "config", None):
        apply_config(args, load_config(args.config))
    given = {f.name: getattr(args, f.name, None) for f in fields(ServerLimits)}  # None: not given
    limits = ServerLimits(**{name: value for name, value in given.items() if value is not None})
    config = ServeConfig(
        tcp=[parse_hostport(a) for a in args.nbd],
        unix=list(args.nbd_socket),
        exports=[parse_export(e) for e in args.export],
        limits=limits,
        qmp=list(getattr(args, "qmp", None) or []),
        pid_file=getattr(args, "pid_file", None),
        allow_dirs=list(getattr(args, "allow_dir", None) or []),
        tls=tls_from_args(args),
        repos=[parse_repo(r) for r in getattr(args, "repo", None) or []],
        repo_key_files=[parse_repo(r) for r in getattr(args, "repo_key_file", None) or []],
        repo_exports=bool(getattr(args, "repo_exports", None)),
        state_file=getattr(args, "state_file", None),
        metrics=_metrics_address(getattr(args, "metrics", None)),
        log_format=getattr(args, "log_format", None) or "text",
        log_level=getattr(args, "log_level", None) or ("debug" if getattr(args, "verbose", 0) else "info"),
    )
    if config.log_format not in LOG_FORMATS:
        raise ConfigError(f"log-format must be one of {', '.join(LOG_FORMATS)}")
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"log-level must be one of {', '.join(LOG_LEVELS)}")
    for address in config.qmp:
        parse_monitor_address(address)
    for directory in config.allow_dirs:
        if not os.path.isdir(directory):
            raise ConfigError(f"--allow-dir {directory}: not a directory")
    if limits.max_connections < 1:
        raise ConfigError("--max-connections must be at least 1")
    if limits.handshake_timeout <= 0:
        raise ConfigError("--handshake-timeout must be positive")
    if limits.idle_timeout < 0:
        raise ConfigError("--idle-timeout must be 0 (never) or positive")
    if limits.max_connections_per_client is not None and limits.max_connections_per_client < 1:
        raise ConfigError("--max-connections-per-client must be at least 1")
    names = [e.name for e in config.exports]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"duplicate export name(s): {', '.join(duplicates)}")
    if config.repo_exports and not config.repos:
        raise ConfigError("--repo-exports needs at least one --repo")
    use_passed_sockets(config, listen_fds())
    if (config.exports or config.repo_exports) and not config.tcp and not config.unix and not config.passed:
        config.tcp.append((DEFAULT_HOST, DEFAULT_PORT))
    return config


def use_passed_sockets(config: ServeConfig, passed: dict[str, list[socket.socket]]) -> None:
    """Sockets passed by systemd replace what the daemon would bind for that name (design §3.1)."""
    config.passed = passed
    if "nbd" in passed:
        if config.tcp or config.unix:
            log.info("socket activation: the passed nbd socket(s) replace --nbd/--nbd-socket")
        config.tcp, config.unix = [], []
    if "qmp" in passed:
        if config.qmp:
            log.info("socket activation: the passed qmp socket(s) replace --qmp")
        config.qmp = []


def _metrics_address(text: str | None) -> tuple[str, int] | None:
    """``--metrics HOST:PORT`` (or ``:PORT``, or ``[IPV6]:PORT``); the port must be given."""
    if text is None:
        return None
    return split_hostport(text.strip(), default_host=DEFAULT_HOST, default_port=None)


async def build_daemon(config: ServeConfig) -> Daemon:
    """Open every image, start listening (NBD, then QMP) and export; on failure nothing stays open."""
    daemon = Daemon(
        limits=config.limits,
        paths=PathPolicy(config.allow_dirs),
        pid_file=config.pid_file,
        tls=config.tls,
        state_file=config.state_file,
    )
    try:
        daemon.registry.repos.update(open_repos(config.repos, daemon.registry.paths, config.repo_key_files))
        if config.repo_exports:
            daemon.registry.export_resolver = RepoExports(daemon.registry.repos)
        for spec in config.exports:
            await daemon.open_node(spec.name, spec.path, format=spec.format, read_only=spec.readonly)
        nbd_sockets = config.passed.get("nbd", [])
        if config.tcp or config.unix or nbd_sockets:
            await daemon.listen_nbd(config.tcp, config.unix, nbd_sockets)
        for spec in config.exports:
            daemon.export(spec.name, writable=not spec.readonly, description=spec.description)
        await daemon.restore_state()
        await daemon.listen_qmp(config.qmp, config.passed.get("qmp", []))
        if config.metrics is not None:
            await daemon.listen_metrics(*config.metrics)
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
        configure(config.log_format, config.log_level)
        run(serve(config))
    except (ConfigError, BackupError, QmpError) as exc:
        print(f"nbd-backup serve: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"nbd-backup serve: error: {exc}", file=sys.stderr)
        return 1
    except ShutdownError as exc:
        print(f"nbd-backup serve: error while shutting down: {exc}", file=sys.stderr)
        return 1
    return 0
