"""EventBus delivery order, injectable clock, unsubscribe, and the QMP wire shape."""

from __future__ import annotations

import logging

import pytest

from backup.events import Event, EventBus


def test_emit_order_clock_and_unsubscribe() -> None:
    ticks = iter([10.0, 11.5, 12.25])
    bus = EventBus(clock=lambda: next(ticks))
    seen_a: list[Event] = []
    seen_b: list[Event] = []
    unsubscribe_a = bus.subscribe(seen_a.append)
    bus.subscribe(seen_b.append)
    bus.emit("JOB_STATUS_CHANGE", {"id": "j", "status": "created"})
    bus.emit("JOB_STATUS_CHANGE", {"id": "j", "status": "running"})
    unsubscribe_a()
    unsubscribe_a()  # idempotent
    bus.emit("BLOCK_JOB_ERROR", {"device": "j", "operation": "read", "action": "stop"})
    assert [(e.name, e.data.get("status"), e.timestamp) for e in seen_a] == [
        ("JOB_STATUS_CHANGE", "created", 10.0),
        ("JOB_STATUS_CHANGE", "running", 11.5),
    ]
    assert [e.timestamp for e in seen_b] == [10.0, 11.5, 12.25]


def test_failing_subscriber_does_not_stop_delivery(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus(clock=lambda: 1.0)
    seen: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("boom")

    bus.subscribe(broken)
    bus.subscribe(lambda e: seen.append(e.name))
    with caplog.at_level(logging.ERROR):
        bus.emit("X", {})
    assert seen == ["X"]
    assert "boom" in caplog.text


def test_to_qmp_splits_timestamp() -> None:
    event = Event("BLOCK_JOB_PENDING", {"type": "backup", "id": "j"}, 1700000000.25)
    assert event.to_qmp() == {
        "event": "BLOCK_JOB_PENDING",
        "data": {"type": "backup", "id": "j"},
        "timestamp": {"seconds": 1700000000, "microseconds": 250000},
    }
