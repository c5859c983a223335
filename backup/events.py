"""Job and block events as QEMU emits them on QMP, decoupled from any transport.

The block layer only *emits* ``Event``s (name and data exactly QEMU's QMP event name and data, in
QEMU's field order); the QMP server subscribes and serialises them. Timestamps come from the bus's
injectable clock so tests can pin them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Subscriber = Callable[["Event"], None]


@dataclass(frozen=True, slots=True)
class Event:
    """One QMP event: ``name`` (e.g. ``JOB_STATUS_CHANGE``), ``data`` and a POSIX timestamp in seconds."""

    name: str
    data: dict[str, Any]
    timestamp: float

    def to_qmp(self) -> dict[str, Any]:
        """The wire object of the QMP spec: ``{"event", "data", "timestamp": {"seconds", "microseconds"}}``."""
        micros = round(self.timestamp * 1_000_000)
        seconds, microseconds = divmod(micros, 1_000_000)
        return {
            "event": self.name,
            "data": self.data,
            "timestamp": {"seconds": seconds, "microseconds": microseconds},
        }


class EventBus:
    """Synchronous fan-out of events to subscribers, in emission order.

    Delivery is synchronous so the order subscribers see is exactly the order the state machine
    produced; a subscriber that needs to do I/O queues the event itself. A failing subscriber is
    logged and does not stop delivery to the others (the job that emitted must not fail for it).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._subscribers: list[Subscriber] = []

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns a function that removes it again (idempotent)."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            try:
                self._subscribers.remove(callback)
            except ValueError:
                pass

        return unsubscribe

    def emit(self, name: str, data: dict[str, Any]) -> Event:
        """Stamp the event with the bus clock and hand it to every current subscriber."""
        event = Event(name, data, self.clock())
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                log.exception("event subscriber %r failed on %s", callback, name)
        return event
