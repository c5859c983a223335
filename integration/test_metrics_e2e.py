"""``serve --metrics`` and ``--log-format json`` end to end: our daemon driven over QMP runs a backup
while qemu-io (a guest's NBD client) writes into the export being backed up; /metrics is scraped
before and during, and the counters must have moved by exactly what the test did (bytes, requests,
copy-before-write copies), with the histograms' buckets filled. The log must be one JSON object a
line holding each event with its figures, and nothing per request.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from conftest import require
from prometheus_client.parser import text_string_to_metric_families
from qmp_daemon import READY, make_image, our_daemon

SIZE = 16 << 20
WRITES = [(8 << 20) + i * (1 << 20) for i in range(5)]  # far from where the throttled job copies
WRITE_LENGTH = 65536

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):  # also checks the exposition format
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_move_by_what_a_backup_with_guest_writes_did(tmp_path: Path) -> None:
    require("qemu-io")
    image = make_image(tmp_path / "disk.raw", SIZE)
    sock = tmp_path / "nbd.sock"
    uri = f"nbd+unix:///disk0?socket={sock}"
    with our_daemon(tmp_path / "run", "--metrics", "127.0.0.1:0", "--log-format", "json") as daemon:
        found = re.search(rf"{READY} .*metrics=127\.0\.0\.1:(\d+)", daemon.stderr())
        assert found is not None, daemon.stderr()
        port = int(found.group(1))
        with daemon.connect() as q:
            q.ok("blockdev-add", driver="file", filename=str(image), **{"node-name": "disk0"})
            q.ok("block-dirty-bitmap-add", node="disk0", name="b0")
            q.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
            q.ok("block-export-add", type="nbd", id="e0", name="disk0", writable=True, **{"node-name": "disk0"})
            before = scrape(port)
            # speed 1 byte/s: the job copies its first chunk and then waits, so every guest write
            # below lands on clusters still to copy and must copy them first
            q.ok("drive-backup", **{"job-id": "j0"}, device="disk0", target=str(tmp_path / "b.raw"), sync="full",
                 speed=1)  # fmt: skip
            q.wait_job_status("j0", "running")
            commands = [arg for offset in WRITES for arg in ("-c", f"write -P 0x33 {offset} {WRITE_LENGTH}")]
            subprocess.run(["qemu-io", "-f", "raw", *commands, uri], check=True, timeout=60, capture_output=True)
            during = scrape(port)
            q.ok("block-job-cancel", device="j0", force=True)
            q.wait_event("BLOCK_JOB_CANCELLED", lambda d: d["device"] == "j0")
            q.wait_job_status("j0", "null")
            after = scrape(port)

    def moved(name: str, samples: Samples = during, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    n = len(WRITES)
    assert moved("nbd_backup_nbd_written_bytes_total", export="disk0") == n * WRITE_LENGTH
    assert moved("nbd_backup_nbd_requests_total", export="disk0", command="write") == n
    assert moved("nbd_backup_nbd_connections_total", export="disk0") == 1
    assert value(during, "nbd_backup_nbd_open_connections", export="disk0") == 0  # qemu-io has gone
    latency = "nbd_backup_nbd_request_duration_seconds"
    assert moved(f"{latency}_count", export="disk0", command="write") == n
    assert moved(f"{latency}_bucket", export="disk0", command="write", le="+Inf") == n
    assert value(during, f"{latency}_sum", export="disk0", command="write") > 0
    # copy-before-write: one copy per guest write, each delaying it; the histogram says by how much
    assert moved("nbd_backup_cbw_copies_total", node="disk0") == n
    assert moved("nbd_backup_cbw_delay_seconds_count", node="disk0") == n
    assert moved("nbd_backup_cbw_delay_seconds_bucket", node="disk0", le="+Inf") == n
    assert moved("nbd_backup_cbw_delay_seconds_bucket", node="disk0", le="10.0") == n
    assert value(during, "nbd_backup_cbw_delay_seconds_sum", node="disk0") > 0
    # the job, while it ran, and once it was cancelled
    assert value(during, "nbd_backup_job_state", job="j0", type="backup", state="running") == 1
    assert value(during, "nbd_backup_job_state", job="j0", type="backup", state="paused") == 0
    assert value(during, "nbd_backup_job_expected_bytes", job="j0", type="backup") == SIZE
    assert value(during, "nbd_backup_job_progress_bytes", job="j0", type="backup") > 0
    assert ("nbd_backup_job_state", frozenset({("job", "j0"), ("type", "backup"), ("state", "running")})) not in after
    assert moved("nbd_backup_jobs_ended_total", after, type="backup", outcome="cancelled") == 1
    # the bitmap counts what the guest dirtied, read when scraped
    assert value(during, "nbd_backup_bitmap_dirty_bytes", node="disk0", bitmap="b0") == n * WRITE_LENGTH
    assert value(during, "nbd_backup_process_resident_memory_bytes") > 0

    lines = [line for line in daemon.stderr().splitlines() if line and not line.startswith(READY)]
    records = [json.loads(line) for line in lines]  # every line but the ready line is one JSON object
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
    events: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if "event" in record:
            events.setdefault(record["event"], []).append(record)
    assert events["node-added"][0]["node"] == "disk0"
    assert events["export-added"][0]["level"] == "info"
    assert events["export-added"][0]["export"] == "disk0" and events["export-added"][0]["writable"] is True
    connected = events["client-connected"]
    assert [c["export"] for c in connected] == ["disk0"] and connected[0]["peer"] == "unix"
    (gone,) = events["client-disconnected"]
    assert gone["bytes-written"] == n * WRITE_LENGTH and gone["requests"] >= n and gone["seconds"] >= 0
    (created,) = events["job-created"]
    assert (created["job"], created["type"], created["node"]) == ("j0", "backup", "disk0")
    (cancelled,) = events["job-cancelled"]
    assert cancelled["job"] == "j0" and cancelled["bytes"] > 0 and cancelled["length"] == SIZE
    assert cancelled["seconds"] > 0 and "mib-per-second" in cancelled
    assert events["stopping"] and events["stopped"][0]["ok"] is True
    # nothing per request at INFO: the NBD server said only that it listened, and who came and went
    nbd_lines = [r["message"] for r in records if r["logger"] == "nbd.server"]
    assert len(nbd_lines) == 3, nbd_lines
