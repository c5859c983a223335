"""QMP block-node commands: ``blockdev-add``, ``blockdev-del``, ``query-named-block-nodes``, ``query-block``.

``blockdev-add`` takes QEMU's ``BlockdevOptions`` for the drivers we have: ``file`` (a local file),
``raw`` and ``qcow2`` (formats over a ``file`` given inline or by node-name), ``nbd`` (a remote
export, through our NBD client; over TLS with ``tls-creds``/``tls-hostname``) and ``null-co`` (reads
zeroes, discards writes). Every path goes through the daemon's ``--allow-dir`` policy. Nothing is
registered until everything opened, and a failure closes whatever was opened on the way.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

from backup.filter import BlockFilter
from backup.node import BlockNode
from backup.null import NullDevice
from nbd import constants as c
from nbd.device import BlockDevice, backing_of, cluster_size, file_path
from nbd.errors import HandshakeError, NbdError
from nbd.uri import NbdUri, TlsParams
from server.errors import QmpError
from server.qmp.dispatch import CommandRegistry
from server.qmp.schema import Alternate, Enum, Union
from server.qmp.sockets import SOCKET_ADDRESS, port_number, unix_path
from server.registry import Registry, generic

DRIVERS = ("file", "nbd", "null-co", "qcow2", "raw")
NULL_CO_DEFAULT_SIZE = 1 << 30  # QEMU's null-co default

BLOCKDEV_OPTIONS = Union(
    "BlockdevOptions",
    {
        "driver": Enum("BlockdevDriver", DRIVERS),
        "*node-name": "str",
        "*discard": Enum("BlockdevDiscardOptions", ["ignore", "unmap"]),
        "*read-only": "bool",
        "*auto-read-only": "bool",
        "*force-share": "bool",
    },
    "driver",
    {},
)
BLOCKDEV_REF = Alternate("BlockdevRef", [BLOCKDEV_OPTIONS, "str"])
BLOCKDEV_OPTIONS.set_variant(
    "file",
    {
        "filename": "str",
        "*locking": Enum("OnOffAuto", ["auto", "on", "off"]),
        "*aio": Enum("BlockdevAioOptions", ["threads", "native", "io_uring"]),
    },
)
BLOCKDEV_OPTIONS.set_variant("raw", {"file": BLOCKDEV_REF})
BLOCKDEV_OPTIONS.set_variant("qcow2", {"file": BLOCKDEV_REF, "*backing": BLOCKDEV_REF})
BLOCKDEV_OPTIONS.set_variant(
    "nbd",
    {
        "server": SOCKET_ADDRESS,
        "*export": "str",
        "*tls-creds": "str",
        "*tls-hostname": "str",
        "*reconnect-delay": "uint32",
        "*open-timeout": "uint32",
        "*x-request-timeout": "uint32",  # our extension: seconds a silent server may hold requests (0: none)
    },
)
BLOCKDEV_OPTIONS.set_variant("null-co", {"*size": "int", "*read-zeroes": "bool"})


class ReadOnlyFilter(BlockFilter):
    """``read-only: true`` over a device that could write (a writable NBD export)."""

    passes_reads = True

    @property
    def read_only(self) -> bool:
        return True

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        raise OSError(errno.EPERM, "node is read-only")

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        raise OSError(errno.EPERM, "node is read-only")

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        raise OSError(errno.EPERM, "node is read-only")

    async def close(self) -> None:
        await self.next.close()


@dataclass
class _Opened:
    """The result of opening one level of ``BlockdevOptions``: the device (a ``BlockNode`` when the
    level has its own node-name or refers to an existing node) and how to describe it."""

    device: BlockDevice
    driver: str
    filename: str | None
    new_nodes: list[BlockNode] = field(default_factory=list)  # created here, registered on success
    referenced: list[BlockNode] = field(default_factory=list)  # existing nodes the new one will use
    tls_creds: list[str] = field(default_factory=list)  # credentials objects it connected with


async def blockdev_add(reg: Registry, options: dict[str, Any]) -> BlockNode:
    """Open the node tree ``options`` describes and register its named nodes (all or nothing)."""
    reg.check_new_node_name(options.get("node-name"))
    opened = await _open(reg, options, read_only=bool(options.get("read-only", False)), names=set())
    top = opened.device
    assert isinstance(top, BlockNode)
    try:
        for node in opened.new_nodes:  # re-check: another client may have taken a name meanwhile
            reg.check_new_node_name(node.name)
    except QmpError:
        await _close_opened(opened)
        raise
    for node in opened.new_nodes:
        reg.add_node(node)
    for child in opened.referenced:
        child.hold(top)
    for creds_id in opened.tls_creds:  # object-del refuses them while the node is open
        reg.objects.hold(creds_id, top, reg.nodes)
    return top


async def _open(reg: Registry, options: dict[str, Any], *, read_only: bool, names: set[str]) -> _Opened:
    name = options.get("node-name")
    if name is not None:
        if name in names:
            raise generic(f"Duplicate nodes with node-name='{name}'")
        reg.check_new_node_name(name)
        names.add(name)
    read_only = bool(options.get("read-only", read_only))
    driver = options["driver"]
    opened = await _open_driver(reg, driver, options, read_only=read_only, names=names)
    if name is None:
        return opened
    try:
        node = BlockNode(name, opened.device, driver=opened.driver, filename=opened.filename)
    except BaseException:
        await _close_opened(opened)
        raise
    if isinstance(opened.device, BlockNode):
        opened.device.hold(node)
    opened.new_nodes.append(node)
    opened.device = node
    return opened


async def _open_driver(
    reg: Registry, driver: str, options: dict[str, Any], *, read_only: bool, names: set[str]
) -> _Opened:
    if driver == "file":
        path = str(reg.paths.resolve(options["filename"]))
        check_not_open(reg, path, read_only=read_only)
        from backup.rawfile import RawFileDevice

        try:
            device: BlockDevice = await RawFileDevice.open(path, read_only=read_only)
        except OSError as exc:
            raise generic(f"Could not open '{options['filename']}': {exc.strerror or exc}") from exc
        return _Opened(device, "file", path)
    if driver == "null-co":
        size = options.get("size", NULL_CO_DEFAULT_SIZE)
        if size < 0:
            raise generic("Parameter 'size' expects a non-negative value")
        desc = json.dumps({"driver": "null-co", "size": size})
        return _Opened(NullDevice(size, read_only=read_only), "null-co", f"json:{desc}")
    if driver == "nbd":
        return await _open_nbd(reg, options, read_only=read_only)
    if driver == "raw":
        return await _open_raw(reg, options["file"], read_only=read_only, names=names)
    if driver == "qcow2":
        return await _open_qcow2(reg, options["file"], read_only=read_only, names=names, backing=options.get("backing"))
    raise generic(f"Parameter 'driver' does not accept value '{driver}'")  # pragma: no cover (schema)


async def _open_raw(reg: Registry, ref: str | dict[str, Any], *, read_only: bool, names: set[str]) -> _Opened:
    if isinstance(ref, str):
        child = reg.node(ref)
        if not read_only and child.read_only:
            raise generic(f"Block node is read-only: '{ref}'")
        return _Opened(child, "raw", child.filename, referenced=[child])
    inner = await _open(reg, ref, read_only=read_only, names=names)
    inner.driver = "raw"
    return inner


async def _open_qcow2(
    reg: Registry,
    ref: str | dict[str, Any],
    *,
    read_only: bool,
    names: set[str],
    backing: str | dict[str, Any] | None = None,
) -> _Opened:
    """qcow2 needs a local file: ``file`` is a ``file`` node (by name) or an inline ``file`` driver.
    ``backing`` (absent: the image's own backing file) names an existing node to read unallocated
    clusters from instead — the live source under a fleecing overlay."""
    referenced: list[BlockNode] = []
    backing_device: BlockDevice | None = None
    if isinstance(backing, dict):
        raise generic("give the qcow2 node's backing as the node-name of a node added before")
    if isinstance(backing, str):
        backing_node = reg.nodes.get(backing)
        if backing_node is None:
            raise generic(f"Could not open backing file: Cannot find device='{backing}' nor node-name='{backing}'")
        backing_device = backing_node
        referenced.append(backing_node)
    if isinstance(ref, str):
        child = reg.node(ref)
        if child.driver != "file" or child.filename is None:
            raise generic(f"qcow2 needs a 'file' node below it; '{ref}' is a '{child.driver}' node")
        path = child.filename
        referenced.append(child)
    else:
        if ref["driver"] != "file":
            raise generic(f"qcow2 images must be on a 'file' node, not '{ref['driver']}'")
        if "node-name" in ref:
            raise generic("give the qcow2 node's file inline without a node-name, or add it first and refer to it")
        path = str(reg.paths.resolve(ref["filename"]))
        check_not_open(reg, path, read_only=read_only)
    from backup.images import open_image, probe_format

    try:
        if probe_format(path) != "qcow2":
            raise generic("Image is not in qcow2 format")  # QEMU's text
        device = await open_image(
            path,
            format="qcow2",
            read_only=read_only,
            check_backing=reg.paths.check_backing,
            backing_device=backing_device,
        )
    except OSError as exc:
        raise generic(f"Could not open '{path}': {exc.strerror or exc}") from exc
    return _Opened(device, "qcow2", path, referenced=referenced)


def check_not_open(reg: Registry, path: str, *, read_only: bool) -> None:
    """One writer per image, as QEMU's image locking enforces: a file another node has open may be
    opened again only if both are read-only (use a node reference to stack a format on a file node)."""
    other = reg.filename_in_use(path)
    if other is not None and not (read_only and other.read_only):
        raise generic(f"Failed to get \"write\" lock: '{path}' is already open as node '{other.name}'")


def nbd_uri(server: dict[str, Any], export: str) -> NbdUri:
    """A ``SocketAddress`` and export name as our client's ``NbdUri``."""
    if server["type"] == "inet":
        return NbdUri(export=export, host=server["host"], port=port_number(server["port"]))
    if server["type"] == "unix":
        return NbdUri(export=export, socket=unix_path(server))
    raise generic(f"NBD over '{server['type']}' sockets is not supported")


def confine_socket(reg: Registry, uri: NbdUri) -> NbdUri:
    """A unix socket the daemon is told to connect to is a client-named path like any image: with
    ``--allow-dir`` it must resolve inside an allowed directory (and is connected where it resolved)."""
    if uri.socket is None or not reg.paths.confined:
        return uri
    return replace(uri, socket=str(reg.paths.resolve(uri.socket)))


async def _open_nbd(reg: Registry, options: dict[str, Any], *, read_only: bool) -> _Opened:
    uri = confine_socket(reg, nbd_uri(options["server"], options.get("export", "")))
    creds_id = options.get("tls-creds")
    if creds_id is not None:
        uri = replace(uri, tls=client_tls(reg, creds_id, options.get("tls-hostname"), uri))
    from nbd.client import NbdClient

    timeout = options.get("open-timeout") or 30
    try:
        client = await NbdClient.connect(
            uri,
            connect_timeout=float(timeout),
            reconnect_delay=float(options.get("reconnect-delay", 0)),
            request_timeout=float(options.get("x-request-timeout", 0)) or None,
        )
    except (OSError, NbdError) as exc:
        where = f"{uri.host}:{uri.port}" if uri.socket is None else uri.socket
        raise generic(tls_failure(exc, uri) or f"Failed to connect to '{where}': {_reason(exc)}") from exc
    device: BlockDevice = client
    if read_only and not client.read_only:
        device = ReadOnlyFilter(client)
    return _Opened(device, "nbd", str(uri), tls_creds=[creds_id] if creds_id is not None else [])


def client_tls(reg: Registry, creds_id: str, hostname: str | None, uri: NbdUri) -> TlsParams:
    """``tls-creds`` (an ``endpoint=client`` object) and ``tls-hostname`` as our client's TLS settings.
    The server's certificate must carry ``tls-hostname`` or the TCP host; over a unix socket without
    ``tls-hostname`` there is no name to check, which QEMU refuses when it verifies the peer."""
    creds = reg.objects.tls_creds(creds_id, "client")
    if creds.verify_peer and hostname is None and uri.host is None:
        raise generic("No hostname for certificate validation")
    return creds.client_tls(hostname)


def tls_failure(exc: BaseException, uri: NbdUri) -> str | None:
    """QEMU's text for a failed TLS connection, where our client's error says which it was."""
    if not isinstance(exc, HandshakeError):
        return None
    if exc.reply == c.Rep.ERR_TLS_REQD:  # a clear-text client against a server that requires TLS
        return "TLS negotiation required before option 7 (go)"
    if "NBD_OPT_STARTTLS" in str(exc):  # STARTTLS refused: an nbds target never falls back
        return "Denied by server for option 5 (starttls)"
    if "Hostname mismatch" in str(exc) and uri.tls is not None:  # ssl's words for it
        return f"Certificate does not match the hostname {uri.tls.hostname or uri.host}"
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def _close_opened(opened: _Opened) -> None:
    """Undo a partial open: close the devices this call opened (never referenced nodes)."""
    device = opened.device
    while isinstance(device, BlockNode):
        if device in opened.referenced:
            return
        device = device.device
    with contextlib.suppress(Exception):
        await device.close()


# --- queries -------------------------------------------------------------------------------------


def _chain_depth(device: Any) -> int:
    depth, backing = 0, backing_of(device)
    while backing is not None and depth < 64:
        depth += 1
        backing = backing_of(backing)
    return depth


def image_info(node: BlockNode) -> dict[str, Any]:
    """QEMU's ``ImageInfo`` for a node."""
    filename = node.filename or ""
    info: dict[str, Any] = {"virtual-size": node.size, "filename": filename, "format": node.driver}
    bottom = node.image
    clusters = cluster_size(bottom)
    if clusters is not None:
        info["cluster-size"] = clusters
    if node.driver in ("file", "raw", "qcow2") and filename and not filename.startswith(("json:", "nbd")):
        with contextlib.suppress(OSError):
            info["actual-size"] = os.stat(filename).st_blocks * 512
        info["dirty-flag"] = False
    elif node.driver == "null-co":
        info["actual-size"] = 0
    backing_path = file_path(backing_of(bottom))
    if backing_path is not None:
        info["backing-filename"] = backing_path
        info["full-backing-filename"] = os.path.abspath(backing_path)
    return info


def block_device_info(node: BlockNode) -> dict[str, Any]:
    """QEMU 7.2's ``BlockDeviceInfo`` (query-named-block-nodes), same members and order."""
    info: dict[str, Any] = {
        "iops_rd": 0,
        "detect_zeroes": "off",
        "image": image_info(node),
        "iops_wr": 0,
        "ro": node.read_only,
        "node-name": node.name,
        "backing_file_depth": _chain_depth(node.image),
        "drv": node.driver,
        "iops": 0,
        "bps_wr": 0,
        "write_threshold": 0,
    }
    if node.bitmaps:  # QEMU leaves the member out for a node without bitmaps
        info["dirty-bitmaps"] = [bitmap.info() for bitmap in node.bitmaps.values()]
    info |= {
        "encrypted": False,
        "bps": 0,
        "bps_rd": 0,
        "cache": {"no-flush": False, "direct": False, "writeback": True},
        "file": node.filename or "",
    }
    if "backing-filename" in info["image"]:
        info["backing_file"] = info["image"]["backing-filename"]
    backing = backing_of(node.image)
    if isinstance(backing, BlockNode) and backing.filename:  # ``backing`` = a node (a fleecing overlay)
        info["backing_file"] = backing.filename  # QEMU lists its file here, not in ``image``
    return info


def register(commands: CommandRegistry) -> None:
    """Add the block-node commands; handlers get the daemon's ``Registry`` as ``ctx``."""

    @commands.command("blockdev-add", args=BLOCKDEV_OPTIONS)
    async def blockdev_add_cmd(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Open an image (file, raw, qcow2, nbd, null-co) as a named block node."""
        await blockdev_add(reg, args)
        return {}

    @commands.command("blockdev-del", args={"node-name": "str"})
    async def blockdev_del(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Close a block node that no export, job or other node uses."""
        await reg.remove_node(args["node-name"])
        return {}

    @commands.command("query-named-block-nodes", args={"*flat": "bool"})
    async def query_named_block_nodes(reg: Registry, args: dict[str, Any]) -> list[dict[str, Any]]:
        """Every named block node, newest first (as QEMU lists them)."""
        return [block_device_info(node) for node in reversed(list(reg.nodes.values()))]

    @commands.command("query-block")
    async def query_block(reg: Registry, args: dict[str, Any]) -> list[dict[str, Any]]:
        """The root nodes (no other node above them) as anonymous block devices."""
        children = {id(n.device) for n in reg.nodes.values() if isinstance(n.device, BlockNode)}
        return [
            {
                "device": "",
                "locked": False,
                "removable": False,
                "inserted": block_device_info(node),
                "type": "unknown",
            }
            for node in reg.nodes.values()
            if id(node) not in children
        ]
