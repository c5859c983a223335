"""``PeerLog``: the logger of one connection (an NBD client, a QMP client).

Whom a message is about is said once, when the connection learns its peer, instead of being
formatted into every call: each message starts with the connection's name (``NBD client
127.0.0.1:40522: …``), and each record carries it as ``peer`` for handlers that want it apart.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any


class PeerLog(logging.LoggerAdapter[logging.Logger]):
    """``logger``'s messages about one connection, prefixed with ``what`` and ``peer``."""

    def __init__(self, logger: logging.Logger, what: str, peer: str) -> None:
        super().__init__(logger, {"peer": peer})
        self._prefix = f"{what} {peer}: "

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = kwargs.get("extra")
        msg, kwargs = super().process(msg, kwargs)
        if extra:  # the record carries the caller's fields too (an event's, for a JSON log)
            kwargs["extra"] = {**self.extra, **extra} if self.extra else extra
        return self._prefix + str(msg), kwargs
