"""The daemon's log: JSON lines with the event's fields, the levels, the job lines with their figures,
the serve options for logs and metrics, and no line per NBD request above DEBUG."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from test_server import RawClient, run_on, serving

from backup.events import EventBus
from backup.memory import MemoryDevice
from nbd.constants import Cmd
from nbd.server import NbdServer
from server.cli import build_parser
from server.commands.serve import config_from_args
from server.errors import ConfigError
from server.job_watch import JobWatch
from server.logs import configure, mib_per_second


@pytest.fixture
def restore_logging() -> Any:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_time_level_logger_message_and_fields(restore_logging: None) -> None:
    out = io.StringIO()
    configure("json", "info", stream=out)
    log = logging.getLogger("nbd_backup.test")
    log.info("job '%s' done", "j0", extra={"event": "job-completed", "job": "j0", "bytes": 42})
    log.debug("not shown at info")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "job 'j0' done" and first["level"] == "info" and first["logger"] == "nbd_backup.test"
    assert (first["event"], first["job"], first["bytes"]) == ("job-completed", "j0", 42)
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert second["level"] == "error" and "ValueError: boom" in second["exception"]


def test_text_format_and_levels(restore_logging: None) -> None:
    out = io.StringIO()
    configure("text", "warning", stream=out)
    logging.getLogger("x").info("quiet")
    logging.getLogger("x").warning("loud %d", 1, extra={"event": "e"})
    (line,) = out.getvalue().splitlines()
    assert line.endswith("x WARNING: loud 1")
    with pytest.raises(ValueError):
        configure("xml", "info")
    with pytest.raises(ValueError):
        configure("text", "verbose")


class FakeNode:
    name = "disk0"


class FakeJob:
    type = "backup"
    source = FakeNode()
    target = None


def test_job_lines_have_their_figures(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    now = [0.0]
    watch = JobWatch({"j0": FakeJob(), "j1": FakeJob(), "j2": FakeJob()}, clock=lambda: now[0])  # type: ignore[dict-item]
    bus = EventBus()
    bus.subscribe(watch)
    for job_id in ("j0", "j1", "j2"):
        bus.emit("JOB_STATUS_CHANGE", {"id": job_id, "status": "created"})
    now[0] = 4.0
    data = {"type": "backup", "len": 64 << 20, "offset": 32 << 20, "speed": 0}
    bus.emit("BLOCK_JOB_COMPLETED", {**data, "device": "j0"})
    bus.emit("BLOCK_JOB_CANCELLED", {**data, "device": "j1"})
    bus.emit("BLOCK_JOB_COMPLETED", {**data, "device": "j2", "error": "Input/output error"})
    by_event = {r.event: r for r in caplog.records if hasattr(r, "event")}  # type: ignore[attr-defined]
    created = by_event["job-created"]
    assert (created.job, created.type, created.node) == ("j2", "backup", "disk0")  # type: ignore[attr-defined]
    done = by_event["job-completed"]
    assert done.levelno == logging.INFO
    assert (done.bytes, done.seconds, getattr(done, "mib-per-second")) == (32 << 20, 4.0, 8.0)  # type: ignore[attr-defined]
    assert done.getMessage() == "job 'j0' completed after 4.0 s: 33554432 of 67108864 bytes, 8.0 MiB/s"
    assert by_event["job-cancelled"].job == "j1"  # type: ignore[attr-defined]
    failed = by_event["job-failed"]
    assert failed.levelno == logging.WARNING and failed.error == "Input/output error"  # type: ignore[attr-defined]
    assert watch.ended == {("backup", "completed"): 1, ("backup", "cancelled"): 1, ("backup", "failed"): 1}
    assert mib_per_second(1 << 20, 0) == 0.0


@pytest.mark.parametrize("metrics", [False, True])
def test_no_line_per_request_above_debug(caplog: pytest.LogCaptureFixture, metrics: bool) -> None:
    caplog.set_level(logging.INFO)

    async def body(server: NbdServer, port: int) -> None:
        if metrics:
            from nbd.stats import NbdStats

            server.stats = NbdStats()
        client = await RawClient.connect(port)
        await client.go("disk", structured=False)
        for cookie in range(1, 51):
            client.request(Cmd.WRITE, cookie, 0, 512, data=bytes(512))
            assert (await client.reply())[1:3] == (cookie, 0)
        client.request(Cmd.DISC, 99)
        assert await asyncio.wait_for(client.reader.read(), 5) == b""
        await client.close()
        for _ in range(100):  # the server sees the close a little after the client
            if not server.connections:
                break
            await asyncio.sleep(0.01)

    run_on("asyncio", serving(MemoryDevice(1 << 20), body))
    records = [r for r in caplog.records if r.name == "nbd.server" and "listening" not in r.getMessage()]
    assert [getattr(r, "event", None) for r in records] == ["client-connected", "client-disconnected"]
    gone = records[1]
    assert gone.export == "disk" and gone.peer.startswith("127.0.0.1:")  # type: ignore[attr-defined]
    if metrics:
        assert (gone.requests, getattr(gone, "bytes-written")) == (50, 50 * 512)  # type: ignore[attr-defined]


def test_serve_options_for_logs_and_metrics(tmp_path: Path) -> None:
    def config(*argv: str) -> Any:
        return config_from_args(build_parser().parse_args(["serve", *argv]))

    default = config()
    assert (default.metrics, default.log_format, default.log_level) == (None, "text", "info")
    given = config("--metrics", ":9810", "--log-format", "json", "--log-level", "warning")
    assert (given.metrics, given.log_format, given.log_level) == (("127.0.0.1", 9810), "json", "warning")
    with pytest.raises(ConfigError):
        config("--metrics", "127.0.0.1")  # no port
    toml = tmp_path / "serve.toml"
    toml.write_text('metrics = "127.0.0.2:9000"\nlog-format = "json"\nlog-level = "debug"\n')
    from_file = config("--config", str(toml))
    assert (from_file.metrics, from_file.log_format, from_file.log_level) == (("127.0.0.2", 9000), "json", "debug")
    toml.write_text('log-format = "xml"\n')
    with pytest.raises(ConfigError):
        config("--config", str(toml))


async def test_snapshot_commit_and_abort_are_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from backup.repo.repository import Repository
    from server.repo_totals import TOTALS, totals
    from tests.test_qmp_commands import Harness

    caplog.set_level(logging.INFO)
    h = Harness(tmp_path)
    h.reg.repos["logtest"] = Repository.init(tmp_path / "repo", 65536)
    TOTALS.pop("logtest", None)
    try:
        await h("repo-snapshot-begin", repo="logtest", disk="d", size=3 * 65536, parent="none", **{"node-name": "s"})
        await h.reg.node("s").pwrite(0, b"\x01" * 65536)
        await h("repo-snapshot-commit", **{"node-name": "s"})
        await h("repo-snapshot-begin", repo="logtest", disk="d", size=3 * 65536, **{"node-name": "t"})
        await h.reg.node("t").pwrite(65536, b"\x01" * 65536)  # the same chunk again: deduplicated
        await h("repo-snapshot-commit", **{"node-name": "t"})
        await h("repo-snapshot-begin", repo="logtest", disk="d", size=3 * 65536, **{"node-name": "u"})
        await h("repo-snapshot-abort", **{"node-name": "u"})
    finally:
        await h.reg.close()
    events = [r for r in caplog.records if getattr(r, "event", "").startswith("snapshot-")]
    assert [r.event for r in events] == ["snapshot-committed", "snapshot-committed", "snapshot-aborted"]  # type: ignore[attr-defined]
    first = events[0]
    assert (first.repo, first.disk, getattr(first, "new-bytes"), getattr(first, "zero-bytes")) == (  # type: ignore[attr-defined]
        "logtest",
        "d",
        65536,
        2 * 65536,
    )
    counted = totals("logtest")
    assert (counted.committed, counted.aborted, counted.new_bytes) == (2, 1, 65536)
    # the second snapshot: chunk 0 kept from its parent, chunk 1 written with data stored already
    assert counted.reused_bytes == 2 * 65536
    TOTALS.pop("logtest", None)
