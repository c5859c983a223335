"""The QMP monitor: framing (bytes ↔ JSON messages), argument schemas, the command registry, the server,
and the daemon's commands (``block``: nodes and exports; ``nbd``: the NBD server; ``jobs``: backups and
job verbs; ``sockets``: the socket addresses they take)."""

from server.qmp.dispatch import CommandRegistry
from server.qmp.server import QmpServer

__all__ = ["CommandRegistry", "QmpServer"]
