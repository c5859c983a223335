"""``serve --metrics HOST:PORT``: Prometheus metrics (design §3.8), served on the daemon's own loop.

Nothing here runs per request: the NBD server and the copy-before-write filter count in plain ints
(``nbd.stats``, ``backup.cbw.CbwStats``), and the collectors below turn those, the registry's jobs
and bitmaps and the repositories' totals into metric families when Prometheus scrapes. The HTTP
side is a few lines on the event loop (not prometheus_client's thread), so a scrape reads the
daemon's state between two of its callbacks, never while it changes. The registry is our own
``CollectorRegistry``: nothing registered globally by an imported library leaks into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from backup.cbw import CBW_STATS, DELAY_BOUNDS
from backup.job import JobStatus
from nbd.stats import COMMANDS, LATENCY_BOUNDS, NbdStats, command_name
from server.job_watch import JobWatch
from server.repo_totals import TOTALS

if TYPE_CHECKING:
    from server.registry import Registry

log = logging.getLogger(__name__)

PREFIX = "nbd_backup"
REQUEST_TIMEOUT = 10.0  # seconds a scraper may take to send its request
MAX_REQUEST = 16 * 1024  # bytes of request line and headers


def histogram_buckets(bounds: Iterable[float], counts: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (the last one beyond every bound) as Prometheus's cumulative ``le`` buckets."""
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip([*bounds, float("inf")], counts, strict=True):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return buckets


class NbdCollector(Collector):
    """NBD requests, bytes, latency and connections, per export (and command)."""

    def __init__(self, stats: NbdStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(f"{PREFIX}_nbd_requests", "NBD requests answered", labels=["export", "command"])
        errors = CounterMetricFamily(
            f"{PREFIX}_nbd_request_errors", "NBD requests answered with an error", labels=["export", "command"]
        )
        read = CounterMetricFamily(f"{PREFIX}_nbd_read_bytes", "Bytes read by NBD clients", labels=["export"])
        written = CounterMetricFamily(f"{PREFIX}_nbd_written_bytes", "Bytes written by NBD clients", labels=["export"])
        latency = HistogramMetricFamily(
            f"{PREFIX}_nbd_request_duration_seconds",
            "Time from an NBD request's arrival to its reply being queued",
            labels=["export", "command"],
        )
        for totals in self.stats.per_export():
            name = totals.export
            read.add_metric([name], totals.bytes[0])
            written.add_metric([name], totals.bytes[1])
            for cmd in range(COMMANDS):
                count = totals.requests(cmd)
                if not count:
                    continue
                label = [name, command_name(cmd)]
                requests.add_metric(label, count)
                errors.add_metric(label, totals.errors[cmd])
                latency.add_metric(
                    label, histogram_buckets(LATENCY_BOUNDS, totals.buckets[cmd]), sum_value=totals.seconds[cmd]
                )
        current = GaugeMetricFamily(
            f"{PREFIX}_nbd_open_connections", "NBD connections open now (negotiated)", labels=["export"]
        )
        for name, n in self.stats.connections().items():
            current.add_metric([name], n)
        total = CounterMetricFamily(
            f"{PREFIX}_nbd_connections", "NBD connections that chose an export", labels=["export"]
        )
        for name, n in self.stats.connections_total.items():
            total.add_metric([name], n)
        yield from (requests, errors, read, written, latency, current, total)


class JobCollector(Collector):
    """Jobs now (state, progress, throughput) and jobs ended since the start."""

    def __init__(self, registry: Registry, watch: JobWatch) -> None:
        self.registry = registry
        self.watch = watch

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            f"{PREFIX}_job_state",
            "1 for the state a job is in (QEMU's JobStatus), 0 for the others",
            labels=["job", "type", "state"],
        )
        current = GaugeMetricFamily(
            f"{PREFIX}_job_progress_bytes", "Bytes a job has done (current-progress)", labels=["job", "type"]
        )
        expected = GaugeMetricFamily(
            f"{PREFIX}_job_expected_bytes", "Bytes a job expects to do in all (total-progress)", labels=["job", "type"]
        )
        rate = GaugeMetricFamily(
            f"{PREFIX}_job_throughput_bytes_per_second",
            "A job's bytes done divided by the seconds since it was created",
            labels=["job", "type"],
        )
        for job in list(self.registry.jobs.values()):
            label = [job.id, job.type]
            for status in JobStatus:
                state.add_metric([*label, str(status)], 1 if job.status is status else 0)
            current.add_metric(label, job.current_progress)
            expected.add_metric(label, job.total_progress)
            seconds = self.watch.seconds(job.id)
            rate.add_metric(label, job.current_progress / seconds if seconds > 0 else 0.0)
        ended = CounterMetricFamily(
            f"{PREFIX}_jobs_ended",
            "Jobs that ended, by outcome (completed, cancelled, failed)",
            labels=["type", "outcome"],
        )
        for (job_type, outcome), n in self.watch.ended.items():
            ended.add_metric([job_type, outcome], n)
        copied = CounterMetricFamily(f"{PREFIX}_job_bytes", "Bytes done by jobs that ended", labels=["type"])
        for job_type, n in self.watch.bytes.items():
            copied.add_metric([job_type], n)
        yield from (state, current, expected, rate, ended, copied)


class CbwCollector(Collector):
    """Copy-before-write: guest writes that copied old data first, and the delay that added to them."""

    def collect(self) -> Iterator[Metric]:
        copies = CounterMetricFamily(
            f"{PREFIX}_cbw_copies", "Guest write requests that copied old data to a backup first", labels=["node"]
        )
        delay = HistogramMetricFamily(
            f"{PREFIX}_cbw_delay_seconds",
            "Delay copy-before-write added to a guest write request",
            labels=["node"],
        )
        for node, stats in list(CBW_STATS.items()):
            copies.add_metric([node], stats.copies)
            delay.add_metric([node], histogram_buckets(DELAY_BOUNDS, stats.buckets), sum_value=stats.seconds)
        yield from (copies, delay)


class BitmapCollector(Collector):
    """Dirty bytes of every dirty bitmap, read at scrape time (a write only sets bits)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        dirty = GaugeMetricFamily(
            f"{PREFIX}_bitmap_dirty_bytes", "Bytes a dirty bitmap marks dirty", labels=["node", "bitmap"]
        )
        for node in list(self.registry.nodes.values()):
            for bitmap in list(node.bitmaps.values()):
                dirty.add_metric([node.name, bitmap.name], bitmap.count)
        yield dirty


class RepoCollector(Collector):
    """Snapshots committed and aborted, and what their bytes cost the repository."""

    def collect(self) -> Iterator[Metric]:
        snapshots = CounterMetricFamily(
            f"{PREFIX}_repo_snapshots", "Snapshots ended, by outcome (committed, aborted)", labels=["repo", "outcome"]
        )
        new = CounterMetricFamily(
            f"{PREFIX}_repo_written_bytes", "Bytes of committed snapshots stored new", labels=["repo"]
        )
        reused = CounterMetricFamily(
            f"{PREFIX}_repo_deduplicated_bytes",
            "Bytes of committed snapshots found in the repository already (not stored again)",
            labels=["repo"],
        )
        zero = CounterMetricFamily(
            f"{PREFIX}_repo_zero_bytes", "Bytes of committed snapshots that were zeroes", labels=["repo"]
        )
        for repo, totals in list(TOTALS.items()):
            snapshots.add_metric([repo, "committed"], totals.committed)
            snapshots.add_metric([repo, "aborted"], totals.aborted)
            new.add_metric([repo], totals.new_bytes)
            reused.add_metric([repo], totals.reused_bytes)
            zero.add_metric([repo], totals.zero_bytes)
        yield from (snapshots, new, reused, zero)


def build_registry(registry: Registry, nbd_stats: NbdStats, watch: JobWatch) -> CollectorRegistry:
    """The daemon's metrics: our collectors and the process's (CPU, memory, open files)."""
    metrics = CollectorRegistry(auto_describe=False)
    for collector in (
        NbdCollector(nbd_stats),
        JobCollector(registry, watch),
        CbwCollector(),
        BitmapCollector(registry),
        RepoCollector(),
    ):
        metrics.register(collector)
    ProcessCollector(namespace=PREFIX, registry=metrics)
    return metrics


class MetricsServer:
    """``GET /metrics`` over HTTP/1.x, one request per connection, on the running loop."""

    def __init__(self, metrics: CollectorRegistry) -> None:
        self.metrics = metrics
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST)
        bound = self._server.sockets[0].getsockname()
        log.info("metrics on http://%s:%d/metrics", bound[0], bound[1])
        return bound[0], bound[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            parts = head.split(b"\r\n", 1)[0].split()
            method = parts[0] if parts else b""
            path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
            if method not in (b"GET", b"HEAD"):
                status, body, kind = "405 Method Not Allowed", b"only GET\n", "text/plain"
            elif path not in (b"/metrics", b"/"):
                status, body, kind = "404 Not Found", b"metrics are at /metrics\n", "text/plain"
            else:
                status, body, kind = "200 OK", generate_latest(self.metrics), CONTENT_TYPE_LATEST
            header = (
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(header if method == b"HEAD" else header + body)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            self._clients.discard(task)
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
