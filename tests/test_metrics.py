"""The metrics of ``serve --metrics``: what the NBD server counts per connection and how it folds,
each collector's families (names, labels, cumulative buckets), and the HTTP endpoint."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_server import RawClient, run_on, serving

from backup.cbw import CBW_STATS, DELAY_BOUNDS, CbwStats, cbw_stats
from backup.dirty_bitmap import DirtyBitmap
from backup.events import EventBus
from backup.memory import MemoryDevice
from backup.node import BlockNode
from nbd.constants import Cmd
from nbd.server import NbdServer
from nbd.stats import LATENCY_BOUNDS, NbdStats
from server.job_watch import JobWatch
from server.metrics import (
    BitmapCollector,
    CbwCollector,
    JobCollector,
    MetricsServer,
    NbdCollector,
    RepoCollector,
    build_registry,
    histogram_buckets,
)
from server.registry import Registry
from server.repo_totals import totals

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples_of(*collectors: Any) -> Samples:
    """Collect through a registry and parse the text back, as Prometheus would."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    out: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_histogram_buckets_are_cumulative_and_end_with_inf() -> None:
    assert histogram_buckets((0.1, 1.0), [2, 0, 3]) == [("0.1", 2), ("1.0", 2), ("+Inf", 5)]


def test_connection_counts_fold_into_their_export_once_ended() -> None:
    stats = NbdStats()
    a = stats.connected("disk")
    b = stats.connected("disk")
    a.bytes[Cmd.WRITE] += 4096
    a.buckets[Cmd.WRITE][0] += 1
    b.buckets[Cmd.READ][3] += 2
    assert stats.connections() == {"disk": 2}
    stats.ended_connection(a)
    stats.ended_connection(a)  # twice: counted once
    a.buckets[Cmd.WRITE][0] += 100  # after it ended: not counted (never happens; proves the fold is a copy)
    (disk,) = stats.per_export()
    assert (disk.requests(Cmd.WRITE), disk.requests(Cmd.READ), disk.bytes[Cmd.WRITE]) == (1, 2, 4096)
    assert stats.connections() == {"disk": 1} and stats.connections_total == {"disk": 2}
    stats.ended_connection(b)
    (disk,) = stats.per_export()
    assert disk.total_requests == 3 and stats.connections() == {}


def test_nbd_collector_families() -> None:
    stats = NbdStats()
    conn = stats.connected("disk")
    conn.buckets[Cmd.READ][0] += 3
    conn.buckets[Cmd.READ][len(LATENCY_BOUNDS)] += 1  # beyond the last bound
    conn.seconds[Cmd.READ] = 5.0
    conn.bytes[Cmd.READ] = 4 * 512
    conn.errors[Cmd.READ] = 1
    s = samples_of(NbdCollector(stats))
    labels = {"export": "disk", "command": "read"}
    assert get(s, "nbd_backup_nbd_requests_total", **labels) == 4
    assert get(s, "nbd_backup_nbd_request_errors_total", **labels) == 1
    assert get(s, "nbd_backup_nbd_read_bytes_total", export="disk") == 2048
    assert get(s, "nbd_backup_nbd_written_bytes_total", export="disk") == 0
    assert get(s, "nbd_backup_nbd_request_duration_seconds_bucket", **labels, le=str(LATENCY_BOUNDS[0])) == 3
    assert get(s, "nbd_backup_nbd_request_duration_seconds_bucket", **labels, le=str(LATENCY_BOUNDS[-1])) == 3
    assert get(s, "nbd_backup_nbd_request_duration_seconds_bucket", **labels, le="+Inf") == 4
    assert get(s, "nbd_backup_nbd_request_duration_seconds_sum", **labels) == 5.0
    assert get(s, "nbd_backup_nbd_open_connections", export="disk") == 1
    assert get(s, "nbd_backup_nbd_connections_total", export="disk") == 1
    assert not any(labels.get("command") == "write" for _, labels in map(lambda k: (k[0], dict(k[1])), s))


BROKEN = 1 << 19


class HalfBroken(MemoryDevice):
    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        if offset >= BROKEN:
            raise OSError(errno.EIO, "broken")
        await super().pwrite(offset, data, fua=fua)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_server_counts_each_request_with_its_bytes(loop: str) -> None:
    stats = NbdStats()

    async def body(server: NbdServer, port: int) -> None:
        server.stats = stats
        client = await RawClient.connect(port)
        await client.go("disk", structured=False)
        client.request(Cmd.WRITE, 1, 0, 4096, data=b"\x01" * 4096)
        assert (await client.reply())[1:3] == (1, 0)
        client.request(Cmd.READ, 2, 0, 512)
        assert (await client.reply())[1:3] == (2, 0)
        await client.reader.readexactly(512)
        client.request(Cmd.WRITE, 3, BROKEN, 512, data=bytes(512))  # the device fails it
        assert (await client.reply())[1] == 3
        (live,) = stats.live
        assert (live.requests(Cmd.WRITE), live.requests(Cmd.READ), live.errors[Cmd.WRITE]) == (2, 1, 1)
        assert (live.bytes[Cmd.WRITE], live.bytes[Cmd.READ]) == (4096 + 512, 512)
        client.request(Cmd.DISC, 4)
        assert await asyncio.wait_for(client.reader.read(), 5) == b""
        await client.close()
        for _ in range(100):  # the server sees the close a little after the client
            if not stats.live:
                break
            await asyncio.sleep(0.01)

    run_on(loop, serving(HalfBroken(1 << 20), body))
    assert not stats.live
    (disk,) = stats.per_export()
    assert disk.total_requests == 3 and disk.bytes[Cmd.WRITE] == 4608
    assert stats.connections_total == {"disk": 1}


def test_cbw_stats_and_collector() -> None:
    mine = CbwStats()
    mine.observe(0.00001)
    mine.observe(100.0)
    assert mine.copies == 2 and mine.buckets[0] == 1 and mine.buckets[len(DELAY_BOUNDS)] == 1
    node_stats = cbw_stats("metrics-test-node")
    assert cbw_stats("metrics-test-node") is node_stats
    node_stats.observe(0.003)
    try:
        s = samples_of(CbwCollector())
        assert get(s, "nbd_backup_cbw_copies_total", node="metrics-test-node") == 1
        assert get(s, "nbd_backup_cbw_delay_seconds_bucket", node="metrics-test-node", le="0.0025") == 0
        assert get(s, "nbd_backup_cbw_delay_seconds_bucket", node="metrics-test-node", le="0.005") == 1
        assert get(s, "nbd_backup_cbw_delay_seconds_count", node="metrics-test-node") == 1
    finally:
        del CBW_STATS["metrics-test-node"]


class FakeJob:
    def __init__(self, job_id: str, status: str) -> None:
        from backup.job import JobStatus

        self.id, self.type, self.status = job_id, "backup", JobStatus(status)
        self.current_progress, self.total_progress = 1 << 20, 4 << 20


def test_job_collector_state_progress_and_ended() -> None:
    now = [100.0]
    jobs: dict[str, Any] = {"j0": FakeJob("j0", "running")}
    watch = JobWatch(jobs, clock=lambda: now[0])
    bus = EventBus()
    bus.subscribe(watch)
    bus.emit("JOB_STATUS_CHANGE", {"id": "j0", "status": "created"})
    now[0] = 102.0
    bus.emit("BLOCK_JOB_CANCELLED", {"type": "backup", "device": "old", "len": 10, "offset": 5, "speed": 0})
    registry: Any = type("R", (), {"jobs": jobs})()
    s = samples_of(JobCollector(registry, watch))
    assert get(s, "nbd_backup_job_state", job="j0", type="backup", state="running") == 1
    assert get(s, "nbd_backup_job_state", job="j0", type="backup", state="concluded") == 0
    assert get(s, "nbd_backup_job_progress_bytes", job="j0", type="backup") == 1 << 20
    assert get(s, "nbd_backup_job_expected_bytes", job="j0", type="backup") == 4 << 20
    assert get(s, "nbd_backup_job_throughput_bytes_per_second", job="j0", type="backup") == (1 << 20) / 2
    assert get(s, "nbd_backup_jobs_ended_total", type="backup", outcome="cancelled") == 1
    assert get(s, "nbd_backup_job_bytes_total", type="backup") == 5


def test_bitmap_collector_reads_dirty_bytes_when_scraped() -> None:
    registry = Registry()
    node = BlockNode("n0", MemoryDevice(1 << 20))
    registry.add_node(node)
    bitmap = DirtyBitmap("b0", 1 << 20, granularity=65536)
    node.add_bitmap(bitmap)
    bitmap.mark(100, 1)
    assert get(samples_of(BitmapCollector(registry)), "nbd_backup_bitmap_dirty_bytes", node="n0", bitmap="b0") == 65536
    bitmap.mark(65536 * 3, 65536 * 2)
    assert get(samples_of(BitmapCollector(registry)), "nbd_backup_bitmap_dirty_bytes", node="n0", bitmap="b0") == 196608


def test_repo_collector_counts_commits_and_aborts() -> None:
    t = totals("metrics-test-repo")
    t.add_commit({"new-bytes": 100, "reused-bytes": 900, "zero-bytes": 24, "seconds": 1.5})
    t.aborted += 1
    s = samples_of(RepoCollector())
    assert get(s, "nbd_backup_repo_snapshots_total", repo="metrics-test-repo", outcome="committed") == 1
    assert get(s, "nbd_backup_repo_snapshots_total", repo="metrics-test-repo", outcome="aborted") == 1
    assert get(s, "nbd_backup_repo_written_bytes_total", repo="metrics-test-repo") == 100
    assert get(s, "nbd_backup_repo_deduplicated_bytes_total", repo="metrics-test-repo") == 900
    assert get(s, "nbd_backup_repo_zero_bytes_total", repo="metrics-test-repo") == 24


async def test_http_endpoint_serves_metrics_and_nothing_else() -> None:
    registry = Registry()
    server = MetricsServer(build_registry(registry, NbdStats(), JobWatch(registry.jobs)))
    host, port = await server.listen("127.0.0.1", 0)

    async def ask(request: bytes, *, eof: bool = False) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        if eof:
            writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return reply

    try:
        reply = await ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Type: text/plain" in head
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert {"nbd_backup_process_resident_memory_bytes", "nbd_backup_nbd_requests"} <= names
        assert (await ask(b"GET /other HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
        assert (await ask(b"POST /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
        head = await ask(b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        assert await ask(b"garbage without an end", eof=True) == b""  # the client stops short: nothing served
    finally:
        await server.stop()
