"""The QMP monitor: framing (bytes ↔ JSON messages), argument schemas, the command registry, the server."""

from server.qmp.dispatch import CommandRegistry
from server.qmp.server import QmpServer

__all__ = ["CommandRegistry", "QmpServer"]
