"""QMP NBD commands: ``nbd-server-start``/``-stop``, ``block-export-add``/``-del``, ``query-block-exports``.

As in qemu-storage-daemon, the NBD server is one per daemon: started by ``--nbd``/``--nbd-socket``
or ``nbd-server-start``, and an export (``block-export-add`` type ``nbd``) serves a block node under
an export name (default: the node-name), read-only unless ``writable``. A unix socket path given to
``nbd-server-start`` is confined by ``--allow-dir`` like every other path a client names. With
``tls-creds`` (an ``object-add`` ``tls-creds-x509``) the server requires TLS; ``tls-authz`` names the
authz object consulted at each connection.
"""

from __future__ import annotations

from typing import Any

from nbd.tls import ServerTls
from server.qmp.dispatch import CommandRegistry
from server.qmp.schema import Alternate, Enum, Union
from server.qmp.sockets import SOCKET_ADDRESS_LEGACY, port_number, unix_path
from server.registry import Registry, generic

BITMAP_OR_STR = Alternate("BlockDirtyBitmapOrStr", ["str", {"node": "str", "name": "str"}])
REMOVE_MODE = Enum("BlockExportRemoveMode", ["safe", "hard"])

BLOCK_EXPORT_OPTIONS = Union(
    "BlockExportOptions",
    {
        "type": Enum("BlockExportType", ["nbd"]),
        "id": "str",
        "*fixed-iothread": "bool",
        "*iothread": "str",
        "node-name": "str",
        "*writable": "bool",
        "*writethrough": "bool",
    },
    "type",
    {"nbd": {"*name": "str", "*description": "str", "*bitmaps": [BITMAP_OR_STR], "*allocation-depth": "bool"}},
)


def listen_address(addr: dict[str, Any]) -> tuple[list[tuple[str, int]], list[str]]:
    """A ``SocketAddressLegacy`` as (tcp, unix) listen lists."""
    data = addr["data"]
    if addr["type"] == "inet":
        if "to" in data:
            raise generic("port ranges ('to') are not supported")
        port = port_number(data["port"])
        if not 0 <= port <= 65535:
            raise generic(f"Invalid port '{data['port']}'")
        return [(data["host"], port)], []
    if addr["type"] == "unix":
        return [], [unix_path(data)]
    raise generic(f"NBD server on '{addr['type']}' sockets is not supported")


def server_tls(reg: Registry, creds_id: str | None, authz_id: str | None) -> ServerTls | None:
    """``tls-creds`` (an ``endpoint=server`` object; TLS is then required, as QEMU) and ``tls-authz``
    (looked up by id at each connection: deleted or never created, it lets nobody in). QEMU 7.2 takes
    ``tls-authz`` without ``tls-creds`` and then authorizes nobody's certificate yet serves every
    clear-text client; we refuse it."""
    if creds_id is None:
        if authz_id is not None:
            raise generic("'tls-authz' is only supported with 'tls-creds'")
        return None
    creds = reg.objects.tls_creds(creds_id, "server")
    context = creds.server_context(client_certificates=authz_id is not None)
    if authz_id is None:
        return ServerTls("require", lambda: context)
    return ServerTls("require", lambda: context, lambda: reg.objects.authorizer(authz_id))


def register(commands: CommandRegistry) -> None:
    """Add the NBD server and export commands; handlers get the daemon's ``Registry`` as ``ctx``."""

    @commands.command(
        "nbd-server-start",
        # QEMU 7.2's members in its order ('addr' first; handshake-max-seconds came in 10.0)
        args={
            "addr": SOCKET_ADDRESS_LEGACY,
            "*tls-creds": "str",
            "*tls-authz": "str",
            "*max-connections": "uint32",
        },
    )
    async def nbd_server_start(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Start the NBD server on one address (TCP or unix socket)."""
        if reg.nbd is not None:
            raise generic("NBD server already running")
        tcp, unix = listen_address(args["addr"])
        if reg.paths.confined:  # a client-named path, confined like images (and bound where it resolved)
            unix = [str(reg.paths.resolve(path)) for path in unix]
        tls = server_tls(reg, args.get("tls-creds"), args.get("tls-authz"))
        await reg.start_nbd(tcp=tcp, unix=unix, max_connections=args.get("max-connections") or None, tls=tls)
        reg.nbd_tls_creds = args.get("tls-creds")
        return {}

    @commands.command("nbd-server-stop")
    async def nbd_server_stop(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Stop the NBD server; every NBD export is removed first."""
        await reg.stop_nbd()
        return {}

    @commands.command("block-export-add", args=BLOCK_EXPORT_OPTIONS)
    async def block_export_add(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Export a block node over NBD (read-only unless writable)."""
        if args.get("iothread") or args.get("fixed-iothread"):
            raise generic("iothreads are not supported (nbd-backup runs one event loop)")
        reg.add_export(
            args["id"],
            args["node-name"],
            name=args.get("name"),
            writable=args.get("writable", False),
            description=args.get("description", ""),
            bitmaps=args.get("bitmaps", []),
            allocation_depth=args.get("allocation-depth", False),
        )
        return {}

    @commands.command("block-export-del", args={"id": "str", "*mode": REMOVE_MODE})
    async def block_export_del(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Remove an export (``mode: hard`` disconnects its clients)."""
        reg.remove_export(args["id"], mode=args.get("mode", "safe"))
        return {}

    @commands.command(
        "nbd-server-add",
        args={"*name": "str", "*description": "str", "device": "str", "*writable": "bool", "*bitmap": "str"},
    )
    async def nbd_server_add(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Export a node over NBD (the older form of block-export-add; the export id is its name)."""
        if reg.nbd is None:
            raise generic("NBD server not running")
        name = args.get("name", args["device"])
        node = reg.node(args["device"])
        writable = args.get("writable", False) and not node.read_only  # QEMU downgrades, as here
        bitmaps = [args["bitmap"]] if "bitmap" in args else []
        reg.add_export(
            name, args["device"], name=name, writable=writable, description=args.get("description", ""), bitmaps=bitmaps
        )
        return {}

    @commands.command("nbd-server-remove", args={"name": "str", "*mode": REMOVE_MODE})
    async def nbd_server_remove(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Remove an export added by nbd-server-add (or block-export-add) by its name."""
        reg.remove_export(args["name"], mode=args.get("mode", "safe"))
        return {}

    @commands.command("query-block-exports")
    async def query_block_exports(reg: Registry, args: dict[str, Any]) -> list[dict[str, Any]]:
        """Every export, newest first."""
        return [entry.info() for entry in reversed(list(reg.exports.values()))]
