"""The daemon's log: ``--log-format text|json`` and ``--log-level``, and how an event is written.

An event is one INFO line (a client connected, a job finished …) whose figures travel as the
record's fields: ``log.info("…", extra={"event": "job-finished", "job": "b0", "bytes": n})``. The
text format shows the message (which already says what matters to a reader); the JSON format, for
log shippers, is one object per line with ``time``, ``level``, ``logger``, ``message`` and the
fields. Nothing is logged per NBD request above DEBUG.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"

#: Attributes every ``LogRecord`` has: anything else on a record was given as a field (``extra``).
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(fmt: str = "text", level: str = "info", stream: TextIO | None = None) -> None:
    """Send every log record at ``level`` and above to ``stream`` (stderr) in ``fmt``, replacing the
    handlers set up before (the command line's default)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def mib_per_second(nbytes: int, seconds: float) -> float:
    """The rate for a log line or a gauge (0 when no time has passed)."""
    return round(nbytes / seconds / (1024 * 1024), 2) if seconds > 0 else 0.0
