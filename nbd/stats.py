"""What the NBD server counts for ``serve --metrics``: plain ints and lists, no metrics library.

A request costs tens of microseconds here, so its accounting must cost well under one: each
connection counts into its own ``ConnStats`` (a few list increments and one ``bisect``, inlined in
the request path), and the metrics collector adds them up only when it is scraped. A connection's
counts are folded into its export's totals when it ends, after its last request, so a counter never
goes back. Without ``--metrics`` the server has no ``NbdStats`` and counts nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

from nbd.constants import Cmd

#: Upper bounds (seconds) of the request latency histogram buckets; one more bucket holds the rest.
LATENCY_BOUNDS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

#: Commands are small integers (``Cmd``): lists indexed by command are cheaper than dicts.
COMMANDS = max(int(c) for c in Cmd) + 1


def command_name(cmd: int) -> str:
    """The label of a command: the spec's name in lower case (``read``, ``write_zeroes`` …)."""
    try:
        return Cmd(cmd).name.lower()
    except ValueError:
        return str(cmd)


class ConnStats:
    """One connection's (or, folded, one export's) counts, indexed by command."""

    __slots__ = ("buckets", "bytes", "errors", "export", "seconds")

    def __init__(self, export: str = "") -> None:
        self.export = export
        #: Per command: request counts per latency bucket (``LATENCY_BOUNDS``, then +Inf).
        self.buckets = [[0] * (len(LATENCY_BOUNDS) + 1) for _ in range(COMMANDS)]
        self.seconds = [0.0] * COMMANDS  # total latency per command
        self.bytes = [0] * COMMANDS  # payload bytes per command (read and write carry any)
        self.errors = [0] * COMMANDS  # requests answered with an error

    def requests(self, cmd: int) -> int:
        return sum(self.buckets[cmd])

    @property
    def total_requests(self) -> int:
        return sum(sum(b) for b in self.buckets)

    def add(self, other: ConnStats) -> None:
        for mine, theirs in zip(self.buckets, other.buckets, strict=True):
            for i, n in enumerate(theirs):
                mine[i] += n
        for i in range(COMMANDS):
            self.seconds[i] += other.seconds[i]
            self.bytes[i] += other.bytes[i]
            self.errors[i] += other.errors[i]


class NbdStats:
    """The server's counts: totals of ended connections per export, and the connections alive."""

    def __init__(self) -> None:
        self.ended: dict[str, ConnStats] = {}
        self.live: dict[ConnStats, None] = {}  # insertion-ordered set
        self.connections_total: dict[str, int] = {}

    def connected(self, export: str) -> ConnStats:
        """A connection has chosen ``export``: its counts, to fill per request."""
        stats = ConnStats(export)
        self.live[stats] = None
        self.connections_total[export] = self.connections_total.get(export, 0) + 1
        return stats

    def ended_connection(self, stats: ConnStats) -> None:
        """The connection's last request is done: its counts join its export's totals."""
        if stats in self.live:  # once: a second call finds it gone
            del self.live[stats]
            self.ended.setdefault(stats.export, ConnStats(stats.export)).add(stats)

    def per_export(self) -> Iterator[ConnStats]:
        """Totals per export (ended and live connections together), as of now."""
        totals: dict[str, ConnStats] = {}
        for name, ended in self.ended.items():
            totals[name] = ConnStats(name)
            totals[name].add(ended)
        for stats in self.live:
            totals.setdefault(stats.export, ConnStats(stats.export)).add(stats)
        return iter(totals.values())

    def connections(self) -> dict[str, int]:
        """Connections open now, per export."""
        current: dict[str, int] = {}
        for stats in self.live:
            current[stats.export] = current.get(stats.export, 0) + 1
        return current
