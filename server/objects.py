"""The daemon's user-creatable objects (QMP ``object-add``): TLS credentials and authorizers, by id.

As in qemu-storage-daemon 7.2: ids share one namespace whatever the type; ``tls-creds-x509`` checks
its credential files when it is added (not at the first connection); the NBD server and ``nbd``
block nodes name the objects by id, and the NBD server looks its authorizer up per connection, so a
deleted ``authz-*`` object lets nobody in. ``authz-listfile`` re-reads its file when the file has
changed (``refresh``): the check runs at each lookup (a stat), where QEMU watches with inotify — the
effect for a client is the same and no thread or timer is needed. The error texts are QEMU's.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nbd.tls import (
    Authorizer,
    AuthzList,
    Endpoint,
    TlsConfigError,
    check_credentials,
    client_context,
    server_context,
)
from nbd.uri import TlsParams
from server.errors import QmpError
from server.qmp.schema import ROOT, Enum, Struct

if TYPE_CHECKING:
    from backup.node import BlockNode

log = logging.getLogger(__name__)

POLICY = Enum("QAuthZListPolicy", ["deny", "allow"])
#: ``AuthZListProperties``: what ``authz-list`` takes and what an ``authz-listfile`` file holds.
AUTHZ_LIST = Struct(
    "AuthZListProperties",
    {
        "*policy": POLICY,
        "*rules": [
            Struct(
                "QAuthZListRule",
                {"match": "str", "policy": POLICY, "*format": Enum("QAuthZListFormat", ["exact", "glob"])},
            )
        ],
    },
)


def _generic(desc: str) -> QmpError:
    return QmpError(desc, "GenericError")


@dataclass
class TlsCredsX509:
    """``tls-creds-x509``: a credential directory in QEMU's layout for one endpoint."""

    id: str
    dir: str
    endpoint: Endpoint
    verify_peer: bool = True
    _server_contexts: dict[bool, ssl.SSLContext] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # QEMU 7.2 needs the CA on both ends (even without verify-peer); a client's own certificate
        # and key only when it has one of them.
        try:
            check_credentials(self.dir, self.endpoint, verify_peer=True)
            if self.endpoint == "server":
                self._server_contexts[self.verify_peer] = server_context(self.dir, verify_peer=self.verify_peer)
            else:  # loaded once now so that a broken certificate or key is reported here
                client_context(self.dir, verify_peer=self.verify_peer)
        except TlsConfigError as exc:
            raise _generic(str(exc)) from None

    def server_context(self, *, client_certificates: bool) -> ssl.SSLContext:
        """The server's context; ``client_certificates`` asks for (and verifies) client certificates
        even with ``verify-peer=off`` — an authz object needs them (QEMU 7.2 skips the authz then)."""
        want = self.verify_peer or client_certificates
        if want not in self._server_contexts:
            self._server_contexts[want] = server_context(self.dir, verify_peer=want)
        return self._server_contexts[want]

    def client_tls(self, hostname: str | None) -> TlsParams:
        """What our NBD client needs to connect with these credentials."""
        return TlsParams(certificates=self.dir, verify_peer=self.verify_peer, hostname=hostname)


@dataclass
class AuthzObject:
    """``authz-simple`` / ``authz-list``: a fixed authorizer."""

    id: str
    authorizer: Authorizer

    def current(self) -> Authorizer | None:
        return self.authorizer


@dataclass
class AuthzListFile:
    """``authz-listfile``: an ``authz-list`` read from a JSON file, re-read when it changed (``refresh``).
    A file that no longer reads or parses denies everyone until it is fixed, as QEMU."""

    id: str
    filename: str
    refresh: bool = False
    _authorizer: Authorizer | None = field(default=None, repr=False)
    _stamp: tuple[int, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.refresh:
            directory, base = os.path.split(self.filename)
            if directory in ("", "."):
                raise _generic("Filename must be an absolute path")
            if base in ("", "."):
                raise _generic("Path has no trailing filename component")
        self._stamp = self._file_stamp()
        self._authorizer = load_authz_list_file(self.filename)

    def _file_stamp(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.filename)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def current(self) -> Authorizer | None:
        if self.refresh:
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._authorizer = load_authz_list_file(self.filename)
                except QmpError as exc:
                    log.error("authz-listfile %s: %s (nobody is let in until it is fixed)", self.id, exc.desc)
                    self._authorizer = None
        return self._authorizer if self._authorizer is not None else _deny_all


def _deny_all(identity: str) -> bool:
    return False


QmpObject = TlsCredsX509 | AuthzObject | AuthzListFile


def authz_list(props: dict[str, Any]) -> AuthzList:
    """``AuthZListProperties`` already validated against the schema."""
    try:
        return AuthzList.from_json(props)
    except TlsConfigError as exc:  # pragma: no cover (the schema refused it first)
        raise _generic(str(exc)) from None


def load_authz_list_file(filename: str) -> AuthzList:
    """Read and check an ``authz-listfile`` file, with QEMU's texts for each failure."""
    try:
        with open(filename, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise _generic(
            f"Unable to read '{filename}': Failed to open file \u201c{filename}\u201d: {exc.strerror}"
        ) from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise _generic(f"JSON parse error, {exc}") from None
    if not isinstance(data, dict):
        raise _generic("Invalid parameter type for 'obj', expected: dict")
    return authz_list(AUTHZ_LIST.check(data, ROOT))


class ObjectStore:
    """Objects by id (one namespace for every type, as QEMU's ``/objects`` container)."""

    def __init__(self) -> None:
        self.objects: dict[str, QmpObject] = {}
        #: The block nodes opened with each credentials id (``object-del`` refuses while one is open).
        self.holders: dict[str, list[BlockNode]] = {}

    def hold(self, object_id: str, node: BlockNode, nodes: Mapping[str, BlockNode]) -> None:
        """``node`` (registered in ``nodes``) was opened with the credentials ``object_id``."""
        self.holders[object_id] = [*self.open_nodes(object_id, nodes), node]

    def open_nodes(self, object_id: str, nodes: Mapping[str, BlockNode]) -> list[BlockNode]:
        """The nodes opened with the credentials ``object_id`` that are still open (the others forgotten)."""
        live = [node for node in self.holders.get(object_id, []) if nodes.get(node.name) is node]
        if live:
            self.holders[object_id] = live
        else:
            self.holders.pop(object_id, None)
        return live

    def check_new_id(self, object_id: str) -> None:
        if object_id in self.objects:
            raise _generic(f"attempt to add duplicate property '{object_id}' to object (type 'container')")

    def add(self, obj: QmpObject) -> None:
        self.check_new_id(obj.id)
        self.objects[obj.id] = obj

    def remove(self, object_id: str) -> QmpObject:
        obj = self.objects.get(object_id)
        if obj is None:
            raise _generic(f"object '{object_id}' not found")
        del self.objects[object_id]
        return obj

    def tls_creds(self, object_id: str, endpoint: Endpoint) -> TlsCredsX509:
        """The credentials ``nbd-server-start`` (server) or ``blockdev-add`` (client) names."""
        obj = self.objects.get(object_id)
        if obj is None:
            raise _generic(f"No TLS credentials with id '{object_id}'")
        if not isinstance(obj, TlsCredsX509):
            raise _generic(f"Object with id '{object_id}' is not TLS credentials")
        if obj.endpoint != endpoint:
            raise _generic(f"Expected TLS credentials for a {endpoint} endpoint")
        return obj

    def authorizer(self, object_id: str) -> Authorizer | None:
        """The authorizer of the moment for an ``authz-*`` id; None when there is none (deleted, never
        created, or another type): then nobody is let in."""
        obj = self.objects.get(object_id)
        if isinstance(obj, AuthzObject | AuthzListFile):
            return obj.current()
        return None
