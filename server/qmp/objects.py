"""QMP ``object-add`` / ``object-del`` for the objects NBD over TLS needs, as qemu-storage-daemon 7.2.

``tls-creds-x509`` (``dir``, ``endpoint``, ``verify-peer``), ``authz-simple`` (``identity``),
``authz-list`` (``policy``, ``rules``) and ``authz-listfile`` (``filename``, ``refresh``), with QEMU's
checks in QEMU's order: the schema, a well-formed id, a free id, then the object's own checks (the
credential files). Two differences, both stricter: ``object-del`` refuses credentials that the
running NBD server or an ``nbd`` block node uses (QEMU 7.2 lets them go from under their users), and
``authz-listfile`` works (QEMU 7.2's ``object-add`` refuses it: its QOM type is ``authz-list-file``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nbd.tls import CA_CERT, AuthzSimple
from server.objects import AUTHZ_LIST, AuthzListFile, AuthzObject, QmpObject, TlsCredsX509, authz_list
from server.qmp.dispatch import CommandRegistry
from server.qmp.schema import Enum, Union
from server.registry import Registry, generic, id_wellformed

OBJECT_OPTIONS = Union(
    "ObjectOptions",
    {
        "qom-type": Enum("ObjectType", ["authz-list", "authz-listfile", "authz-simple", "tls-creds-x509"]),
        "id": "str",
    },
    "qom-type",
    {
        "tls-creds-x509": {
            "*verify-peer": "bool",
            "*dir": "str",
            "*endpoint": Enum("QCryptoTLSCredsEndpoint", ["client", "server"]),
            "*priority": "str",
            "*loaded": "bool",
            "*sanity-check": "bool",
            "*passwordid": "str",
        },
        "authz-simple": {"identity": "str"},
        "authz-list": AUTHZ_LIST,
        "authz-listfile": {"filename": "str", "*refresh": "bool"},
    },
)


def make_object(reg: Registry, args: dict[str, Any]) -> QmpObject:
    """Build (and check) the object ``args`` describes; nothing is registered here."""
    object_id, kind = args["id"], args["qom-type"]
    if kind == "tls-creds-x509":
        for unsupported in ("priority", "passwordid"):
            if unsupported in args:
                raise generic(f"tls-creds-x509 '{unsupported}' is not supported (Python's ssl, no gnutls)")
        if "dir" not in args:
            raise generic("Missing 'dir' property value")
        directory = args["dir"]
        if reg.paths.confined:  # a client-named path: the directory must lie inside --allow-dir
            directory = str(reg.paths.resolve(Path(directory) / CA_CERT).parent)
        return TlsCredsX509(object_id, directory, args.get("endpoint", "client"), args.get("verify-peer", True))
    if kind == "authz-simple":
        return AuthzObject(object_id, AuthzSimple(args["identity"]))
    if kind == "authz-list":
        return AuthzObject(object_id, authz_list(args))
    filename = args["filename"]
    if reg.paths.confined:
        filename = str(reg.paths.resolve(filename))
    return AuthzListFile(object_id, filename, args.get("refresh", False))


def creds_users(reg: Registry, object_id: str) -> list[str]:
    """Who uses the credentials ``object_id`` now: the running NBD server, ``nbd`` nodes still open."""
    users = []
    if reg.nbd is not None and reg.nbd_tls_creds == object_id:
        users.append("the NBD server")
    users += [f"node '{node.name}'" for node in reg.objects.open_nodes(object_id, reg.nodes)]
    return users


def register(commands: CommandRegistry) -> None:
    """Add ``object-add`` and ``object-del``; handlers get the daemon's ``Registry`` as ``ctx``."""

    @commands.command("object-add", args=OBJECT_OPTIONS)
    async def object_add(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Create a TLS credentials or client authorization object."""
        if not id_wellformed(args["id"]):
            raise generic("Parameter 'id' expects an identifier")
        reg.objects.check_new_id(args["id"])
        reg.objects.add(make_object(reg, args))
        return {}

    @commands.command("object-del", args={"id": "str"})
    async def object_del(reg: Registry, args: dict[str, Any]) -> dict[str, Any]:
        """Delete an object; credentials still in use are refused (stricter than QEMU 7.2)."""
        object_id = args["id"]
        obj = reg.objects.objects.get(object_id)
        if isinstance(obj, TlsCredsX509):
            users = creds_users(reg, object_id)
            if users:
                raise generic(f"object '{object_id}' is in use, can not be deleted (by {', '.join(users)})")
        reg.objects.remove(object_id)
        return {}
