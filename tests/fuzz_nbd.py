"""A fuzzer for the asyncio NBD server (``nbd.server``) over real sockets, not only its sans-I/O core.

One run serves a memory (or raw file) export and, per example, opens several fuzz connections at once.
Each follows a script drawn from a seeded ``random.Random``: a valid or broken handshake, then valid and
invalid requests (every command, random flags, offsets and lengths in range, past the end and absurd,
lengths of 0 and over the maximum payload, unknown commands), each split at random points, with
send-side pauses and read-side stalls (the client stops reading replies for a while, keeps sending, then
resumes), and an end: ``NBD_CMD_DISC``, a bad request magic, a half-close or an abort, the last two
possibly in the middle of a header or a payload. Meanwhile a well-behaved ``NbdClient`` keeps writing
and reading back its own region of the same export. The device under the export may suspend, fail or
cancel its own work; the export may have a minimum block size; a run may end with ``NbdServer.stop``
while connections are in any of these states.

Oracles (a violation raises ``FuzzFailure`` naming the seed, example and connection):

* every request sent in full gets exactly one reply with its cookie: never two, never an unknown
  cookie, never one for a request the server did not receive in full — and, unless the client aborted,
  none is missing when the server closes;
* replies are well-formed for what was negotiated (no simple reply to a READ once structured replies
  are on, read chunks inside the range and covering it exactly, block status from the selected context),
  error values are among the spec's, and requests that are plainly valid succeed and plainly invalid
  ones fail;
* read data and block status "zero" extents agree with a shadow of the data: each connection owns a
  region and only checks bytes that no request still in flight may change;
* the server never crashes or leaks: each connection's server side ends with nothing in flight and no
  task; after the run no connection (not even an unreferenced object), no task and no socket is left;
* the well-behaved client is served during every stall and after every example.

``tests/test_server_fuzz.py`` runs a few seeded examples; ``bench/fuzz_server.py`` runs it for longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import random
import socket
import struct
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backup.filter import BlockFilter
from backup.memory import MemoryDevice
from nbd import constants as c
from nbd import wire
from nbd.client import NbdClient
from nbd.constants import Cmd, CmdFlag, Opt, Rep, ReplyType, TransmissionFlag
from nbd.device import BlockDevice, BlockLimits, Extent
from nbd.server import Export, NbdServer, ServerLimits

MAX = c.MAX_PAYLOAD
GOOD_REGION = 1 << 20  # the well-behaved client's part of the export, at its start
BLOCK = 512  # granularity of the shadow's in-flight bookkeeping
READ_LIMIT = 32 << 10  # what a stalled client buffers before the socket pushes back on the server
WAIT = 60.0  # seconds after which a wait that should end is a failure (a hang), not slowness
ERRNOS = frozenset(int(e) for e in c.Errno)
OK, ERR, ANY = "ok", "error", "any"
_HEADER = wire.REQUEST_FAST
# Plain ints: ``~`` of an IntFlag member keeps only the known bits, and the fuzzer sends unknown ones.
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = (
    int(f) for f in (CmdFlag.FUA, CmdFlag.NO_HOLE, CmdFlag.DF, CmdFlag.REQ_ONE, CmdFlag.FAST_ZERO)
)
DONE = int(c.ReplyFlag.DONE)
_U32 = struct.Struct(">I")


class FuzzFailure(AssertionError):
    """An oracle saw the server misbehave."""


class Evicted(Exception):
    """The server closed a fuzz connection because it is stopping (which ends a script early)."""


@dataclass(frozen=True)
class FuzzConfig:
    """The shape of a run. ``region`` is each fuzz connection's own part of the export: make it bigger
    than ``MAX`` for ``large_writes`` (writes of 16 MiB to the maximum payload)."""

    slots: int = 3  # fuzz connections at once
    connections: int = 2  # connections per slot and example, one after the other
    ops: int = 40  # requests per connection, at most
    region: int = 1 << 20
    max_length: int = 256 << 10  # longest ordinary request
    large_writes: float = 0.0  # share of writes over 16 MiB
    stall: float = 0.05  # longest read-side stall (seconds)
    pause: float = 0.01  # longest send-side pause (seconds)
    faults: float = 0.0  # share of device verbs (outside the good region) that fail
    suspend: float = 0.3  # share of device verbs that suspend first (task path, reordering)
    bad_handshakes: float = 0.15  # share of connections whose handshake is broken
    handshake_timeout: float = 1.0  # long enough for a valid handshake on a loaded machine
    max_in_flight: int = 8  # the server's per-connection limit: low, so reading pauses and resumes often
    unix: bool = False
    raw: bool = False  # a raw file (sendfile, I/O thread) instead of memory; no fault injection then
    stop_under_load: bool = False  # end with ``NbdServer.stop`` while a last example's connections run
    stop_timeout: float = 0.5  # what ``stop`` gives in-flight requests before it aborts
    minimum: int = 1  # the export's minimum block size (a power of two): unaligned requests must fail

    @property
    def size(self) -> int:
        return GOOD_REGION + self.slots * self.region


@dataclass
class Stats:
    connections: int = 0
    requests: int = 0
    replies: int = 0
    errors: int = 0
    verified_reads: int = 0
    verified_bytes: int = 0
    stalls: int = 0
    good_probes: int = 0
    ends: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        ends = ", ".join(f"{k} {v}" for k, v in sorted(self.ends.items()))
        return (
            f"{self.connections} connections, {self.requests} requests, {self.replies} replies "
            f"({self.errors} errors), {self.verified_reads} reads verified ({self.verified_bytes >> 10} KiB), "
            f"{self.stalls} stalls, {self.good_probes} good-client round trips; ends: {ends}"
        )


# --- the device under the export ------------------------------------------------------------------


class FuzzDevice(BlockFilter):
    """Verbs that may suspend first (so replies overtake each other and the adapter's task path runs)
    and may fail outside the good client's region (errnos the mapping knows or not, a plain bug, a
    cancellation of the device's own)."""

    FAILURES = (errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.ENOTSUP, errno.EPERM, errno.EINVAL, errno.ESTALE)

    def __init__(
        self, next_device: BlockDevice, rng: random.Random, *, suspend: float, faults: float, minimum: int = 1
    ) -> None:
        super().__init__(next_device)
        self.rng = rng
        self.suspend = suspend
        self.faults = faults
        self.minimum = minimum

    @property
    def block_limits(self) -> BlockLimits:
        limits = self.next.block_limits
        return BlockLimits(max(limits.minimum, self.minimum), max(limits.preferred, self.minimum), limits.maximum)

    async def _first(self, offset: int) -> None:
        rng = self.rng
        if rng.random() < self.suspend:
            await asyncio.sleep(0 if rng.random() < 0.8 else 0.001)
        if offset >= GOOD_REGION and rng.random() < self.faults:
            r = rng.random()
            if r < 0.1:
                raise RuntimeError("injected bug")
            if r < 0.15:
                raise asyncio.CancelledError  # a device that cancels its own work
            err = rng.choice(self.FAILURES)
            raise OSError(err, os.strerror(err))

    async def pread(self, offset: int, length: int) -> bytes:
        await self._first(offset)
        return await super().pread(offset, length)

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        await self._first(offset)
        await super().pwrite(offset, data, fua=fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        await self._first(offset)
        await super().zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._first(offset)
        await super().trim(offset, length, fua=fua)

    async def flush(self) -> None:
        await self._first(GOOD_REGION)
        await super().flush()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        await self._first(offset)
        return await super().block_status(offset, length)

    async def cache(self, offset: int, length: int) -> None:
        await self._first(offset)
        await super().cache(offset, length)


# --- the shadow of one region ---------------------------------------------------------------------


class Region:
    """What a fuzz slot knows of its part of the export: the bytes (``known`` marks the ones it is sure
    of) and, per block, the mutations in flight and a version bumped by each one sent or finished."""

    def __init__(self, start: int, size: int) -> None:
        self.start = start
        self.end = start + size
        self.data = bytearray(size)  # the export starts as zeroes
        self.known = bytearray(b"\x01") * size
        blocks = -(-size // BLOCK)
        self.pending = [0] * blocks
        self.clobbered = [False] * blocks
        self.version = [0] * blocks

    def _blocks(self, offset: int, length: int) -> range:
        lo, hi = max(offset, self.start), min(offset + length, self.end)
        if hi <= lo:
            return range(0)
        return range((lo - self.start) // BLOCK, (hi - self.start - 1) // BLOCK + 1)

    def _clip(self, offset: int, length: int) -> tuple[int, int]:
        lo, hi = max(offset, self.start), min(offset + length, self.end)
        return lo - self.start, max(lo, hi) - self.start

    def mutation_sent(self, offset: int, length: int) -> None:
        for b in self._blocks(offset, length):
            self.pending[b] += 1
            self.version[b] += 1
            if self.pending[b] > 1:
                self.clobbered[b] = True

    def mutation_done(self, offset: int, length: int, data: bytes | None, *, applied: bool) -> None:
        """A mutation finished; ``applied`` with ``data`` (None: zeroes) when it surely wrote exactly
        that, otherwise its range becomes unknown."""
        blocks = self._blocks(offset, length)
        clean = applied and not any(self.clobbered[b] for b in blocks)
        lo, hi = self._clip(offset, length)
        if hi > lo:
            if clean:
                skip = self.start + lo - offset
                self.data[lo:hi] = bytes(hi - lo) if data is None else data[skip : skip + hi - lo]
                self.known[lo:hi] = b"\x01" * (hi - lo)
            else:
                self.known[lo:hi] = bytes(hi - lo)
        for b in blocks:
            self.pending[b] -= 1
            self.version[b] += 1
            if self.pending[b] == 0:
                self.clobbered[b] = False

    def snapshot(self, offset: int, length: int) -> tuple[int, ...] | None:
        """A token for a read sent now, or None when a mutation in flight makes its result unknowable."""
        blocks = self._blocks(offset, length)
        if any(self.pending[b] for b in blocks):
            return None
        return tuple(self.version[b] for b in blocks)

    def expected(self, offset: int, length: int, token: tuple[int, ...] | None) -> tuple[bytes, bytes] | None:
        """(data, known mask) a read sent with ``token`` must agree with, or None when unknowable."""
        if token is None or token != self.snapshot(offset, length):
            return None
        if offset < self.start or offset + length > self.end:
            return None
        lo, hi = offset - self.start, offset + length - self.start
        return bytes(self.data[lo:hi]), bytes(self.known[lo:hi])


def _mismatch(got: bytes | bytearray, want: bytes, known: bytes) -> int | None:
    """The first offset where ``got`` differs from ``want`` on a known byte."""
    if got == want:
        return None
    pos, n = 0, len(want)
    while pos < n:
        start = known.find(1, pos)
        if start < 0:
            return None
        stop = known.find(0, start)
        stop = n if stop < 0 else stop
        if got[start:stop] != want[start:stop]:
            return start + next(i for i in range(stop - start) if got[start + i] != want[start + i])
        pos = stop
    return None


# --- scripts --------------------------------------------------------------------------------------


@dataclass
class Send:
    cmd: int
    flags: int
    offset: int
    length: int
    payload: bytes | None = field(default=None, repr=False)  # a write's payload (None for the others)
    cut: int | None = None  # send only this many bytes of header + payload (the end follows)
    splits: tuple[int, ...] = ()
    dawdle: float = 0.0  # seconds between the pieces (a slow sender, stopping mid-header or mid-payload)
    magic: int = c.REQUEST_MAGIC


@dataclass
class Stall:
    seconds: float


@dataclass
class Resume:
    pass


@dataclass
class Pause:
    seconds: float


@dataclass
class Drain:
    pass


@dataclass
class End:
    kind: str  # disc | bad-magic | half-close | abort
    linger: bool = False  # an abort during a stall waits for the stall first (replies pile up)


Action = Send | Stall | Resume | Pause | Drain | End


@dataclass
class Handshake:
    kind: str  # ok, or how it is broken
    export: str = "disk"
    structured: bool = True
    meta: bool = True
    go: bool = True
    no_zeroes: bool = True
    noise: list[tuple[int, bytes]] = field(default_factory=list, repr=False)  # options answered, then GO
    garbage: bytes = b""


@dataclass
class Script:
    handshake: Handshake
    actions: list[Action]
    cookie_base: int


BROKEN = ("bad-flags", "bad-option-magic", "abort", "unknown-export-name", "garbage", "silent", "too-many-options")


def _pattern(rng: random.Random, n: int) -> bytes:
    unit = rng.randbytes(61) + bytes([rng.randrange(256)]) * rng.randrange(0, 67)  # data and runs
    return (unit * (n // len(unit) + 1))[:n]


def _name_data(name: str) -> bytes:
    return wire.InfoRequest.build({"name": name, "requests": []})


def _handshake(rng: random.Random, cfg: FuzzConfig) -> Handshake:
    if rng.random() < cfg.bad_handshakes:
        kind = rng.choice(BROKEN)
        return Handshake(kind, garbage=rng.randbytes(rng.randrange(1, 40)), export=rng.choice(["nope", "disk\x00"]))
    structured = rng.random() < 0.75
    noise: list[tuple[int, bytes]] = []
    for _ in range(rng.choice([0, 0, 1, 2])):
        noise.append(
            rng.choice(
                [
                    (Opt.LIST, b""),
                    (Opt.INFO, _name_data(rng.choice(["disk", "ro", "", "nope"]))),
                    (Opt.GO, _name_data("nope")),
                    (Opt.STARTTLS, b""),
                    (rng.randrange(12, 1 << 32), rng.randbytes(rng.randrange(0, 64))),
                    (Opt.EXTENDED_HEADERS, b""),
                    (Opt.INFO, rng.randbytes(rng.randrange(0, 20))),  # malformed
                    (Opt.LIST, bytes(70_000)),  # over the option data limit: discarded
                ]
            )
        )
    return Handshake(
        "ok",
        export="ro" if rng.random() < 0.1 else "disk",
        structured=structured,
        meta=structured and rng.random() < 0.8,
        go=rng.random() < 0.85,
        no_zeroes=rng.random() < 0.8,
        noise=noise,
    )


def _range(rng: random.Random, cfg: FuzzConfig, region: Region, longest: int) -> tuple[int, int]:
    size = cfg.size
    r = rng.random()
    if r < 0.8:
        room = region.end - region.start
        k = rng.random()
        if k < 0.05:
            length = 0
        elif k < 0.4:
            length = rng.randrange(1, 4097)
        elif k < 0.7:
            length = rng.randrange(1, 64) * 512
        else:
            length = rng.randrange(1, max(2, min(longest, room)))
        length = min(length, room)
        offset = region.start + rng.randrange(0, room - length + 1)
        if rng.random() < 0.5:
            offset -= (offset - region.start) % 512
        if cfg.minimum > 1 and rng.random() < 0.7:  # mostly aligned, so most requests get through
            offset -= offset % cfg.minimum
            length -= length % cfg.minimum
        return offset, length
    if r < 0.9:  # across the end of the export
        offset = size - rng.randrange(0, 8193)
        return offset, size - offset + rng.randrange(1, 65536)
    offset = rng.choice([size, size + 1, 1 << 40, (1 << 63) - 1, (1 << 64) - 1, region.start])
    length = rng.choice([0, 1, 4096, MAX + 1, 1 << 31, (1 << 32) - 1])
    return offset, length


def _flags(rng: random.Random, usual: int) -> int:
    r = rng.random()
    if r < 0.7:
        return 0
    if r < 0.9:
        return usual
    return rng.getrandbits(16)


def _splits(rng: random.Random, n: int) -> tuple[int, ...]:
    if n <= 1 or rng.random() < 0.7:
        return ()
    return tuple(sorted(rng.randrange(1, n) for _ in range(rng.randrange(1, 4))))


def make_script(rng: random.Random, cfg: FuzzConfig, region: Region) -> Script:
    """A connection's whole plan, drawn in advance (replies never change it, so a seed replays it)."""
    handshake = _handshake(rng, cfg)
    actions: list[Action] = []
    stalled = 0
    for _ in range(rng.randrange(1, cfg.ops + 1)):
        r = rng.random()
        if stalled:
            stalled -= 1
            if stalled == 0:
                actions.append(Resume())
        elif r < 0.05:
            actions.append(Stall(rng.uniform(0, cfg.stall)))
            stalled = rng.randrange(1, 20)
            continue
        if r < 0.08:
            actions.append(Pause(rng.uniform(0, cfg.pause)))
        elif r < 0.11:
            actions.append(Drain())
        cmd: int = rng.choices(
            [Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS, Cmd.CACHE, -1],
            [30, 30, 5, 6, 8, 10, 3, 3],
        )[0]
        if cmd == -1:
            cmd = rng.choice([Cmd.RESIZE, 9, 0xFF, 0xFFFF, rng.randrange(8, 1 << 16)])
        usuals: dict[int, int] = {
            Cmd.READ: DF,
            Cmd.WRITE: FUA,
            Cmd.TRIM: FUA,
            Cmd.WRITE_ZEROES: rng.choice([NO_HOLE, FUA, FAST_ZERO]),
            Cmd.BLOCK_STATUS: REQ_ONE,
        }
        flags = _flags(rng, usuals.get(cmd, 0))
        if cmd == Cmd.WRITE and rng.random() < cfg.large_writes and region.end - region.start >= MAX:
            length = rng.randrange(16 << 20, MAX + 1)
            offset = region.start + rng.randrange(0, region.end - region.start - length + 1)
        else:
            offset, length = _range(rng, cfg, region, cfg.max_length)
        if cmd == Cmd.FLUSH and rng.random() < 0.8:
            offset = length = 0
        if cmd in (Cmd.TRIM, Cmd.WRITE_ZEROES) and offset + length <= cfg.size and offset + length > region.end:
            length = cfg.size - offset + 1  # a long one must not reach another slot's region: past the end
        payload = None
        cut = None
        if cmd == Cmd.WRITE:
            if length > MAX:  # the server would discard the whole payload: send a little, then end
                payload = _pattern(rng, rng.randrange(0, 65536))
                cut = 28 + len(payload)
            else:
                payload = _pattern(rng, length)
        total = 28 + (len(payload) if payload is not None and cut is None else 0)
        if cut is None and rng.random() < 0.015:
            cut = rng.randrange(0, total)  # a truncated header or payload
        splits = _splits(rng, total if cut is None else cut)
        dawdle = rng.uniform(0, cfg.pause) if splits and rng.random() < 0.2 else 0.0
        actions.append(Send(cmd, flags, offset, length, payload, cut, splits, dawdle))
        if cut is not None:
            actions.append(End(rng.choice(["half-close", "abort"]), linger=rng.random() < 0.5))
            break
    else:
        kind = rng.choices(["disc", "bad-magic", "half-close", "abort"], [5, 2, 2, 2])[0]
        if kind == "bad-magic":
            magic = rng.choice([0, c.EXTENDED_REQUEST_MAGIC, c.SIMPLE_REPLY_MAGIC, rng.getrandbits(32)])
            if magic == c.REQUEST_MAGIC:
                magic ^= 1
            actions.append(Send(Cmd.READ, 0, region.start, 512, magic=magic))
        actions.append(End(kind, linger=rng.random() < 0.5))
    return Script(handshake, actions, rng.getrandbits(24) << 40)


# --- one fuzz connection --------------------------------------------------------------------------


@dataclass
class Negotiated:
    size: int = 0
    flags: int = 0
    structured: bool = False
    meta: int = 0  # the base:allocation context id, 0 when none
    minimum: int = 1  # the export's minimum block size, which the server enforces


@dataclass
class Pending:
    send: Send
    cookie: int
    expect: str
    whole: bool  # sent in full: the server must answer it
    token: tuple[int, ...] | None = field(default=None, repr=False)
    error: int = 0
    chunks: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (offset, length) of read chunks
    data: bytearray | None = field(default=None, repr=False)
    zero_runs: list[tuple[int, int]] = field(default_factory=list, repr=False)  # block status ZERO extents


def expectation(send: Send, n: Negotiated, faults: bool) -> str:
    """What the spec (and nothing subtler) says about a request: OK when plainly valid, ERR when
    plainly invalid, ANY when it leaves the choice to the server."""
    cmd, flags, offset, length = send.cmd, send.flags, send.offset, send.length
    tf = n.flags
    inside = offset + length <= n.size
    read_only = bool(tf & TransmissionFlag.READ_ONLY)
    ok = ANY if faults else OK
    if cmd != Cmd.FLUSH and (offset | length) % n.minimum:
        return ERR  # the spec: a server SHOULD refuse requests not aligned to the minimum block size
    if cmd == Cmd.READ:
        if flags & ~DF or (flags and not tf & TransmissionFlag.SEND_DF) or length > MAX or not inside:
            return ERR
        return ANY if length == 0 else ok
    if cmd == Cmd.WRITE:
        fua_bad = flags & FUA and not tf & TransmissionFlag.SEND_FUA
        if flags & ~FUA or fua_bad or length > MAX or not inside or read_only:
            return ERR
        return ok
    if cmd == Cmd.FLUSH:
        if flags:
            return ERR
        return ok if not offset and not length and tf & TransmissionFlag.SEND_FLUSH else ANY
    if cmd in (Cmd.TRIM, Cmd.WRITE_ZEROES):
        allowed = FUA if tf & TransmissionFlag.SEND_FUA else 0
        if cmd == Cmd.WRITE_ZEROES:
            allowed |= NO_HOLE
            if tf & TransmissionFlag.SEND_FAST_ZERO:
                allowed |= FAST_ZERO
        if flags & ~allowed or read_only or not inside:
            return ERR
        return ANY if flags & FAST_ZERO else ok
    if cmd == Cmd.CACHE:
        if flags or not inside:
            return ERR
        return ok if tf & TransmissionFlag.SEND_CACHE else ANY
    if cmd == Cmd.BLOCK_STATUS:
        if not n.meta or flags & ~REQ_ONE or length == 0 or not inside:
            return ERR
        return ok
    return ERR


def _mutates(cmd: int) -> bool:
    return cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)


class FuzzConnection:
    """Carries out one script against the server and checks every reply as it comes."""

    def __init__(self, run: FuzzRun, script: Script, region: Region, label: str) -> None:
        self.run = run
        self.cfg = run.cfg
        self.script = script
        self.region = region
        self.label = label
        self.n = Negotiated()
        self.pending: dict[int, Pending] = {}
        self.cookies = 0
        self.reading = asyncio.Event()
        self.reading.set()
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter
        self.reader_task: asyncio.Task[None] | None = None
        self.log: list[str] = []
        self.failure: FuzzFailure | None = None
        self._stall_seconds = 0.0
        self._last_cookie = 0

    def closed(self, message: str) -> Exception:
        """A failure about the connection ending, unless the server is being stopped (then it may end
        anywhere, and requests it had not read go unanswered)."""
        return Evicted(message) if self.run.stopping else self.fail(message)

    def _refused(self, message: str, reply: int) -> Exception:
        """An option refused: only a server that is stopping may (it refuses every option of a client
        that connected as it began to stop)."""
        return self.closed(message) if reply == Rep.ERR_POLICY else self.fail(message)

    def fail(self, message: str) -> FuzzFailure:
        recent = "\n    ".join(self.log[-12:])
        err = FuzzFailure(f"{self.label}: {message}\n  last actions:\n    {recent}")
        self.failure = self.failure or err
        return err

    # -- the whole connection

    async def main(self) -> Any:
        """Connect, run the script, end; returns the server's side of the connection."""
        run = self.run
        loop = asyncio.get_running_loop()
        self.reader, self.writer, conn = await run.connect()
        connected = loop.time()
        sock = self.writer.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            with contextlib.suppress(OSError):  # the server may have closed it already (stopping)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with asyncio.timeout(WAIT):
                if await self._handshake():
                    self.reader_task = loop.create_task(self._read_replies())
                    await self._transmission()
        except TimeoutError:
            raise self.fail("the connection hung (no progress for a minute)") from None
        except Evicted:
            pass
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            # A handshake slower than the server's timeout (a loaded machine) may be cut off; nothing else.
            timed_out = conn.export is None and loop.time() - connected >= run.cfg.handshake_timeout
            if timed_out:
                run.stats.ends["handshake:timed-out"] = run.stats.ends.get("handshake:timed-out", 0) + 1
            elif self.failure is None and not run.stopping:
                raise self.fail(f"the server dropped the connection: {exc!r}") from exc
        finally:
            if self.reader_task is not None and not self.reader_task.done():
                self.reader_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self.reader_task
            self.writer.transport.abort()
        if self.failure is not None:
            raise self.failure
        return conn

    def _write(self, data: bytes, *, eof: bool = False) -> None:
        """Send, or fail as a closed connection does (uvloop raises RuntimeError on a closed transport)."""
        if self.writer.transport.is_closing():
            if self.failure is not None:
                raise self.failure
            raise ConnectionResetError("the connection is closed")
        if data:
            self.writer.write(data)
        if eof:
            self.writer.write_eof()

    async def _until_eof(self) -> None:
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass

    # -- handshake

    async def _option(self, opt: int, data: bytes) -> None:
        self._write(wire.OptionHeader.build({"option": opt, "length": len(data)}) + data)

    async def _option_reply(self, opt: int) -> tuple[int, bytes]:
        head = await self.reader.readexactly(20)
        magic, got, reply, length = struct.unpack(">QIII", head)
        if magic != c.OPT_REPLY_MAGIC or got != opt:
            raise self.fail(f"bad option reply {magic:#x} for option {got} (sent {opt})")
        return reply, await self.reader.readexactly(length)

    async def _final_reply(self, opt: int) -> int:
        while True:
            reply, _ = await self._option_reply(opt)
            if reply == Rep.ACK or c.rep_is_error(reply):
                return reply

    async def _handshake(self) -> bool:
        """True when transmission begins; a broken handshake must end with the server hanging up."""
        hs = self.script.handshake
        self.n.minimum = self.run.server.exports["disk"].entry().minimum
        self.log.append(f"handshake {hs}, noise {[(opt, len(data)) for opt, data in hs.noise]}")
        if hs.kind != "ok":
            self.run.stats.ends[f"handshake:{hs.kind}"] = self.run.stats.ends.get(f"handshake:{hs.kind}", 0) + 1
            if hs.kind == "bad-flags":
                self._write(struct.pack(">I", 0xFFFF_FFFC | c.ClientFlag.C_FIXED_NEWSTYLE))
            elif hs.kind != "silent":
                self._write(struct.pack(">I", c.ClientFlag.C_FIXED_NEWSTYLE | c.ClientFlag.C_NO_ZEROES))
            if hs.kind == "bad-option-magic":
                self._write(struct.pack(">QII", 0x1234, Opt.GO, 0))
            elif hs.kind == "abort":
                await self._option(Opt.ABORT, b"")
            elif hs.kind == "unknown-export-name":
                await self._option(Opt.EXPORT_NAME, hs.export.encode())
            elif hs.kind == "garbage":
                self._write(hs.garbage, eof=True)  # the server closes at the end of the stream, not its timeout
            elif hs.kind == "too-many-options":
                for _ in range(self.run.server.max_options + 4 * len(self.run.server.exports) + 8):
                    await self._option(Opt.LIST, b"")
            await self._until_eof()  # the server hangs up (at the latest after its handshake timeout)
            return False
        flags = c.ClientFlag.C_FIXED_NEWSTYLE | (c.ClientFlag.C_NO_ZEROES if hs.no_zeroes else 0)
        self._write(struct.pack(">I", flags))
        for opt, data in hs.noise:
            await self._option(opt, data)
            if await self._final_reply(opt) == Rep.ACK and opt in (Opt.GO, Opt.STARTTLS):
                raise self.fail(f"option {opt} with {data[:32]!r} was accepted")
        if hs.structured:
            await self._option(Opt.STRUCTURED_REPLY, b"")
            reply, _ = await self._option_reply(Opt.STRUCTURED_REPLY)
            if reply != Rep.ACK:
                raise self._refused("structured replies refused", reply)
            self.n.structured = True
        if hs.meta:
            await self._option(
                Opt.SET_META_CONTEXT,
                wire.MetaContextRequest.build({"name": hs.export, "queries": [c.META_BASE_ALLOCATION]}),
            )
            reply, payload = await self._option_reply(Opt.SET_META_CONTEXT)
            if reply != Rep.META_CONTEXT or payload[4:] != c.META_BASE_ALLOCATION.encode():
                raise self._refused(f"base:allocation not selected: {reply:#x} {payload!r}", reply)
            self.n.meta = _U32.unpack_from(payload)[0]
            if await self._final_reply(Opt.SET_META_CONTEXT) != Rep.ACK:
                raise self.fail("SET_META_CONTEXT did not end with an ACK")
        if hs.go:
            await self._option(Opt.GO, _name_data(hs.export))
            while True:
                reply, payload = await self._option_reply(Opt.GO)
                if reply == Rep.ACK:
                    break
                if reply != Rep.INFO:
                    raise self._refused(f"GO {hs.export!r} refused: {reply:#x} {payload!r}", reply)
                info = struct.unpack_from(">H", payload)[0]
                if info == c.Info.EXPORT:
                    self.n.size, self.n.flags = struct.unpack_from(">QH", payload, 2)
                elif info == c.Info.BLOCK_SIZE and struct.unpack_from(">I", payload, 2)[0] != self.n.minimum:
                    raise self.fail(f"minimum block size {struct.unpack_from('>I', payload, 2)[0]} advertised")
        else:
            await self._option(Opt.EXPORT_NAME, hs.export.encode())
            self.n.size, self.n.flags = struct.unpack(">QH", await self.reader.readexactly(10))
            if not hs.no_zeroes and await self.reader.readexactly(124) != bytes(124):
                raise self.fail("EXPORT_NAME reply padding is not zeroes")
        if self.n.size != self.cfg.size:
            raise self.fail(f"export size {self.n.size}, expected {self.cfg.size}")
        if bool(self.n.flags & TransmissionFlag.READ_ONLY) != (hs.export == "ro"):
            raise self.fail(f"transmission flags {self.n.flags:#x} for export {hs.export!r}")
        if not self.n.structured and self.n.flags & TransmissionFlag.SEND_DF:
            raise self.fail("SEND_DF advertised without structured replies")
        return True

    # -- transmission

    async def _transmission(self) -> None:
        stats = self.run.stats
        stalled = False
        for action in self.script.actions:
            self.log.append(repr(action)[:200])
            if self.failure is not None:
                raise self.failure
            if isinstance(action, Send):
                await self._send(action, stalled)
            elif isinstance(action, Stall):
                stats.stalls += 1
                stalled = True
                self.reading.clear()
                self._stall_seconds = action.seconds
            elif isinstance(action, Resume):
                await self._end_stall()
                stalled = False
            elif isinstance(action, Pause):
                await asyncio.sleep(action.seconds)
            elif isinstance(action, Drain):
                if stalled:
                    await self._end_stall()
                    stalled = False
                await self._drain()
            elif isinstance(action, End):
                stats.ends[action.kind] = stats.ends.get(action.kind, 0) + 1
                if action.kind == "abort":
                    if stalled and action.linger:
                        await asyncio.sleep(self._stall_seconds)
                    self.writer.transport.abort()
                    return
                if stalled:
                    await self._end_stall()
                if action.kind == "half-close":
                    self._write(b"", eof=True)
                elif action.kind == "disc":
                    self._register(Send(Cmd.DISC, 0, 0, 0), whole=False)
                    self._write(_HEADER.pack(c.REQUEST_MAGIC, 0, Cmd.DISC, self._last_cookie, 0, 0))
                assert self.reader_task is not None
                await self.reader_task  # until the server hangs up
                if self.failure is not None:
                    raise self.failure
                missing = [p for p in self.pending.values() if p.whole]
                if missing:
                    raise self.closed(f"the server closed without answering {len(missing)} requests: {missing[:3]}")
                return
        raise AssertionError("a script ends with End")

    async def _end_stall(self) -> None:
        await asyncio.sleep(self._stall_seconds)
        if not self.run.stopping:
            await self.run.good.probe()  # served while this connection is not reading
        self.reading.set()

    async def _drain(self) -> None:
        while any(p.whole for p in self.pending.values()):
            if self.failure is not None:
                raise self.failure
            assert self.reader_task is not None
            if self.reader_task.done():
                raise self.closed("the server closed with requests unanswered")
            await asyncio.sleep(0.001)

    def _register(self, send: Send, *, whole: bool) -> Pending:
        self.cookies += 1
        cookie = self.script.cookie_base | self.cookies
        self._last_cookie = cookie
        pending = Pending(send, cookie, expectation(send, self.n, self.cfg.faults > 0), whole)
        if send.cmd in (Cmd.READ, Cmd.BLOCK_STATUS):
            pending.token = self.region.snapshot(send.offset, send.length)
        elif _mutates(send.cmd) and whole:
            self.region.mutation_sent(send.offset, send.length)
        self.pending[cookie] = pending
        return pending

    async def _send(self, send: Send, stalled: bool) -> None:
        whole = send.cut is None
        if send.magic == c.REQUEST_MAGIC:
            pending = self._register(send, whole=whole)
            cookie = pending.cookie
            self.run.stats.requests += 1
        else:
            cookie = self.script.cookie_base  # never registered: any reply to it is for an unknown cookie
        data = _HEADER.pack(send.magic, send.flags, send.cmd, cookie, send.offset, send.length)
        if send.payload is not None:
            data += send.payload
        if send.cut is not None:
            data = data[: send.cut]
        pos = 0
        for split in (*send.splits, len(data)):
            if split <= pos:
                continue
            if pos and send.dawdle:
                await asyncio.sleep(send.dawdle)
            self._write(data[pos:split])
            pos = split
            if stalled:
                await asyncio.sleep(0)
            else:
                await self.writer.drain()  # the reader runs: the server can always make progress

    # -- replies

    def _pending(self, cookie: int) -> Pending:
        pending = self.pending.get(cookie)
        if pending is None:
            raise self.fail(f"reply for unknown cookie {cookie:#x} (never sent, or already answered)")
        if pending.send.cmd == Cmd.DISC:
            raise self.fail("reply to NBD_CMD_DISC")
        if not pending.whole:
            raise self.fail(f"reply to {pending.send!r} which the server never received in full")
        return pending

    async def _read_replies(self) -> None:
        try:
            await self._replies()
        except FuzzFailure:
            self.writer.transport.abort()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.closed(f"reply stream broken: {exc!r}")
            self.writer.transport.abort()

    async def _replies(self) -> None:
        r = self.reader
        while True:
            await self.reading.wait()
            head = await r.read(4)
            if not head:
                return  # the server hung up between replies
            if len(head) < 4:
                head += await r.readexactly(4 - len(head))
            (magic,) = _U32.unpack(head)
            if magic == c.SIMPLE_REPLY_MAGIC:
                error, cookie = struct.unpack(">IQ", await r.readexactly(12))
                p = self._pending(cookie)
                if p.send.cmd == Cmd.READ and self.n.structured:
                    raise self.fail(f"simple reply to a READ after structured replies: {p.send!r}")
                if error and error not in ERRNOS:
                    raise self.fail(f"error {error} is not an NBD error value")
                if p.send.cmd == Cmd.READ and not error:
                    p.data = bytearray(await r.readexactly(p.send.length))
                    p.chunks.append((p.send.offset, p.send.length))
                p.error = error
                self._complete(p)
            elif magic == c.STRUCTURED_REPLY_MAGIC:
                if not self.n.structured:
                    raise self.fail("structured reply chunk without structured replies")
                flags, rtype, cookie, length = struct.unpack(">HHQI", await r.readexactly(16))
                payload = await r.readexactly(length)
                p = self._pending(cookie)
                self._chunk(p, flags, rtype, payload)
                if flags & DONE:
                    self._complete(p)
            else:
                raise self.fail(f"reply magic {magic:#x}")

    def _chunk(self, p: Pending, flags: int, rtype: int, payload: bytes) -> None:
        send = p.send
        start, end = send.offset, send.offset + send.length
        if flags & ~DONE:
            raise self.fail(f"chunk flags {flags:#x}")
        if rtype == ReplyType.NONE:
            if payload or not flags & DONE:
                raise self.fail("NONE chunk with a payload or without DONE")
        elif rtype in (ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE):
            if send.cmd != Cmd.READ:
                raise self.fail(f"read chunk {rtype} for {send!r}")
            if rtype == ReplyType.OFFSET_DATA:
                if len(payload) < 8:
                    raise self.fail("OFFSET_DATA chunk shorter than 8 bytes")
                (offset,) = struct.unpack_from(">Q", payload)
                length = len(payload) - 8
            else:
                if len(payload) != 12:
                    raise self.fail("OFFSET_HOLE chunk of the wrong length")
                offset, length = struct.unpack(">QI", payload)
            if length == 0 or offset < start or offset + length > end:
                raise self.fail(f"read chunk [{offset}, +{length}) outside [{start}, {end})")
            if p.data is None:
                p.data = bytearray(send.length)
            if rtype == ReplyType.OFFSET_DATA:
                p.data[offset - start : offset - start + length] = payload[8:]
            p.chunks.append((offset, length))
        elif rtype == ReplyType.BLOCK_STATUS:
            if send.cmd != Cmd.BLOCK_STATUS or len(payload) < 12 or (len(payload) - 4) % 8:
                raise self.fail(f"BLOCK_STATUS chunk of {len(payload)} bytes for {send!r}")
            (context,) = _U32.unpack_from(payload)
            if context != self.n.meta:
                raise self.fail(f"block status for context {context}, selected {self.n.meta}")
            descriptors = [struct.unpack_from(">II", payload, i) for i in range(4, len(payload), 8)]
            if send.flags & REQ_ONE and len(descriptors) != 1:
                raise self.fail(f"{len(descriptors)} descriptors with REQ_ONE")
            pos = start
            for i, (length, status) in enumerate(descriptors):
                if length == 0 or status & ~3:
                    raise self.fail(f"block status descriptor ({length}, {status:#x})")
                if pos + length > end and (i < len(descriptors) - 1 or send.flags & REQ_ONE):
                    raise self.fail(f"block status descriptors past the requested {send.length} bytes")
                if status & c.State.ZERO:
                    p.zero_runs.append((pos, min(length, end - pos)))
                pos += length
            p.chunks.append((start, 1))
        elif c.reply_type_is_error(rtype):
            if len(payload) < 6:
                raise self.fail("error chunk shorter than 6 bytes")
            error, message = struct.unpack_from(">IH", payload)
            extra = 8 if rtype == ReplyType.ERROR_OFFSET else 0
            if rtype not in (ReplyType.ERROR, ReplyType.ERROR_OFFSET) or len(payload) != 6 + message + extra:
                raise self.fail(f"error chunk type {rtype:#x} of {len(payload)} bytes, message {message}")
            if error == 0 or error not in ERRNOS:
                raise self.fail(f"error {error} is not an NBD error value")
            p.error = p.error or error
        else:
            raise self.fail(f"unknown chunk type {rtype:#x}")

    def _complete(self, p: Pending) -> None:
        del self.pending[p.cookie]
        stats = self.run.stats
        stats.replies += 1
        send = p.send
        if p.error:
            stats.errors += 1
            if p.expect == OK:
                raise self.fail(f"{send!r} failed with {p.error}, expected success")
        else:
            if p.expect == ERR:
                raise self.fail(f"{send!r} succeeded, expected an error")
            if send.cmd == Cmd.READ:
                self._check_read(p)
            elif send.cmd == Cmd.BLOCK_STATUS:
                if not p.chunks:
                    raise self.fail(f"block status succeeded without a BLOCK_STATUS chunk: {send!r}")
                self._check_zeroes(p)
        if _mutates(send.cmd):
            data = send.payload if send.cmd == Cmd.WRITE else None
            self.region.mutation_done(send.offset, send.length, data, applied=not p.error and send.cmd != Cmd.TRIM)

    def _check_read(self, p: Pending) -> None:
        send = p.send
        chunks = sorted(p.chunks)
        pos = send.offset
        for offset, length in chunks:
            if offset != pos:
                raise self.fail(f"read chunks overlap or leave a gap at {pos}: {chunks[:8]}")
            pos += length
        if pos != send.offset + send.length:
            raise self.fail(f"read chunks cover {pos - send.offset} of {send.length} bytes")
        want = self.region.expected(send.offset, send.length, p.token)
        if want is None or not send.length:
            return
        data = p.data if p.data is not None else bytearray()
        bad = _mismatch(data, *want)
        if bad is not None:
            raise self.fail(
                f"{send!r} returned {bytes(data[bad : bad + 8]).hex()} at +{bad}, "
                f"the shadow says {want[0][bad : bad + 8].hex()}"
            )
        self.run.stats.verified_reads += 1
        self.run.stats.verified_bytes += send.length

    def _check_zeroes(self, p: Pending) -> None:
        send = p.send
        want = self.region.expected(send.offset, send.length, p.token)
        if want is None:
            return
        data, known = want
        for offset, length in p.zero_runs:
            lo = offset - send.offset
            bad = _mismatch(bytes(length), data[lo : lo + length], known[lo : lo + length])
            if bad is not None:
                raise self.fail(f"block status says [{offset}, +{length}) reads as zeroes; byte {bad} is not")

    def orphans(self) -> None:
        """The server's side is gone: mutations never answered may or may not have happened."""
        for p in self.pending.values():
            if _mutates(p.send.cmd) and p.whole:
                self.region.mutation_done(p.send.offset, p.send.length, None, applied=False)
        self.pending.clear()


# --- the well-behaved client ----------------------------------------------------------------------


class GoodClient:
    """A real ``NbdClient`` writing and reading back its own region: it must always be served."""

    def __init__(self, client: NbdClient, rng: random.Random, stats: Stats) -> None:
        self.client = client
        self.rng = rng
        self.stats = stats
        self.lock = asyncio.Lock()
        self.closed = False

    async def close(self) -> None:
        """Close once no probe is running; later probes do nothing (the server is being stopped)."""
        async with self.lock:
            self.closed = True
            await self.client.close()

    async def probe(self) -> None:
        rng = self.rng
        async with self.lock:
            if self.closed:
                return
            length = rng.choice([512, 4096, 65536])
            offset = rng.randrange(0, GOOD_REGION - length + 1)
            data = _pattern(rng, length)
            try:
                async with asyncio.timeout(WAIT):
                    await self.client.pwrite(offset, data)
                    got = await self.client.pread(offset, length)
            except TimeoutError:
                raise FuzzFailure("the well-behaved client was not served for a minute") from None
            if got != data:
                raise FuzzFailure(f"the well-behaved client read back other data at {offset}")
            self.stats.good_probes += 1

    async def keep_going(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.probe()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.01):
                    await stop.wait()


# --- a run ----------------------------------------------------------------------------------------


class _TracebacksAsText(logging.Filter):
    """Turns a record's exception into text: a handler that keeps records (pytest's) would otherwise keep
    the server's frames, and so its connection objects, alive past the leak check."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.exc_text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return True


def _sockets() -> set[str]:
    """The process's open sockets (fds the event loop opens once for itself, such as uvloop's reserve
    ``/dev/null``, are not leaks of the server)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:"):
                found.add(f"{fd}:{target}")
    return found


def _connection_state(conn: Any) -> str:
    """Everything that can keep a server connection open, for a failure message (a hang is
    otherwise hard to tell apart from slowness)."""
    transport = getattr(conn, "transport", None)
    unsent = transport.get_write_buffer_size() if transport is not None and not transport.is_closing() else 0
    return (
        f"{conn._in_flight} in flight, {len(conn._tasks)} tasks, {len(conn._backlog)} backlogged,"
        f" charged {conn._charge} (held {conn._held}, payload {conn._precharged}, reserved {conn._reserved}),"
        f" waiting for budget {conn._waiting}, reading paused {conn._reading_paused},"
        f" writing paused {conn._writing_paused}, closing {conn._closing}, lost {conn._lost},"
        f" phase {conn.core.phase.name}, {unsent} bytes unsent, server charged {conn.server.buffered}"
    )


class FuzzRun:
    """A server, its export, the well-behaved client and the fuzz slots of one seed."""

    def __init__(self, cfg: FuzzConfig, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        self.rng = random.Random(seed)
        self.stats = Stats()
        self.server = NbdServer(
            limits=ServerLimits(handshake_timeout=cfg.handshake_timeout), max_in_flight=cfg.max_in_flight
        )
        self.regions = [Region(GOOD_REGION + i * cfg.region, cfg.region) for i in range(cfg.slots)]
        self._seen: weakref.WeakSet[Any] = weakref.WeakSet()
        self._claim = asyncio.Lock()
        self._address: tuple[str, int] | str = ""
        self.good: GoodClient
        self.stopping = False

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Any]:
        """Open a fuzz connection; returns its streams and the server's object for it (found by
        reading the greeting, which the server sends once it has registered the connection)."""
        async with self._claim:
            try:
                if isinstance(self._address, str):
                    reader, writer = await asyncio.open_unix_connection(self._address, limit=READ_LIMIT)
                else:
                    reader, writer = await asyncio.open_connection(*self._address, limit=READ_LIMIT)
                async with asyncio.timeout(WAIT):
                    greeting = wire.ServerGreeting.parse(await reader.readexactly(18))
            except (OSError, asyncio.IncompleteReadError) as exc:
                if self.stopping:
                    raise Evicted(repr(exc)) from exc
                raise
            if greeting.handshake_flags != c.HandshakeFlag.FIXED_NEWSTYLE | c.HandshakeFlag.NO_ZEROES:
                raise FuzzFailure(f"greeting flags {greeting.handshake_flags:#x}")
            new = [conn for conn in self.server._connections if conn not in self._seen]
            if not new and self.stopping:
                writer.transport.abort()
                raise Evicted("the server stopped right after the greeting")
            if len(new) != 1:
                raise FuzzFailure(f"{len(new)} new server connections for one client")
            self._seen.add(new[0])
            return reader, writer, new[0]

    async def _slot(self, example: int, slot: int) -> None:
        region = self.regions[slot]
        for i in range(self.cfg.connections):
            if self.stopping:
                return
            label = f"seed {self.seed} example {example} slot {slot} connection {i}"
            rng = random.Random(f"{self.seed}/{example}/{slot}/{i}")
            fuzz = FuzzConnection(self, make_script(rng, self.cfg, region), region, label)
            self.stats.connections += 1
            try:
                conn = await fuzz.main()
            except Evicted:
                return
            await self._server_side_gone(conn, fuzz)
            fuzz.orphans()

    async def _server_side_gone(self, conn: Any, fuzz: FuzzConnection) -> None:
        try:
            async with asyncio.timeout(WAIT):
                await asyncio.shield(conn.closed)
                while conn._tasks:  # a finished request's task leaves the set one callback later
                    await asyncio.sleep(0.001)
        except TimeoutError:
            raise fuzz.fail(f"the server never finished the connection: {_connection_state(conn)}") from None
        if conn in self.server._connections or conn._in_flight or conn._charge or conn._backlog:
            raise fuzz.fail(
                f"server connection left behind: {conn._in_flight} in flight, {conn._charge} bytes charged,"
                f" {len(conn._backlog)} requests not started"
            )

    async def example(self, example: int) -> None:
        async with asyncio.TaskGroup() as group:
            for slot in range(self.cfg.slots):
                group.create_task(self._slot(example, slot))
        await self.good.probe()

    async def stop_under_load(self, example: int, stop_good: Callable[[], Any]) -> None:
        """Stop the server in the middle of an example: its connections end wherever they are, in-flight
        requests are answered (or cut off after the stop timeout), and nothing may be left behind."""
        async with asyncio.TaskGroup() as group:
            for slot in range(self.cfg.slots):
                group.create_task(self._slot(example, slot))
            await asyncio.sleep(random.Random(f"{self.seed}/stop").uniform(0, 0.5))
            self.stopping = True
            await stop_good()
            try:
                async with asyncio.timeout(WAIT):
                    await self.server.stop(timeout=self.cfg.stop_timeout)
            except TimeoutError:
                raise FuzzFailure(f"seed {self.seed}: NbdServer.stop did not return") from None

    async def run(self, examples: int | None, *, until: Callable[[], bool] = lambda: False) -> Stats:
        """Run ``examples`` examples (or until ``until()``), then check that nothing is left behind."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        with contextlib.ExitStack() as files:
            server_log = logging.getLogger("nbd.server")
            texts = _TracebacksAsText()
            server_log.addFilter(texts)
            files.callback(server_log.removeFilter, texts)
            tmp = Path(files.enter_context(tempfile.TemporaryDirectory(prefix="nbd-fuzz-")))
            base: Any
            if cfg.raw:
                from backup.rawfile import RawFileDevice

                (tmp / "disk.raw").write_bytes(bytes(cfg.size))
                base = await RawFileDevice.open(tmp / "disk.raw")
                device: Any = base
            else:
                base = MemoryDevice(cfg.size)
                rng = random.Random(f"{self.seed}/device")
                device = FuzzDevice(base, rng, suspend=cfg.suspend, faults=cfg.faults, minimum=cfg.minimum)
            sockets = _sockets()
            server = self.server
            server.add_export(Export("disk", device))
            server.add_export(Export("ro", device, writable=False))
            if cfg.unix:
                self._address = str(tmp / "nbd.sock")
                await server.listen_unix(self._address)
                uri = f"nbd+unix:///disk?socket={self._address}"
            else:
                self._address = await server.listen_tcp("127.0.0.1", 0)
                uri = f"nbd://127.0.0.1:{self._address[1]}/disk"
            stop = asyncio.Event()
            client = await NbdClient.connect(uri, connections=1, max_in_flight=4)
            self._seen.update(server._connections)
            self.good = GoodClient(client, random.Random(f"{self.seed}/good"), self.stats)
            keep_going = loop.create_task(self.good.keep_going(stop))

            async def stop_good() -> None:
                if stop.is_set():
                    return
                stop.set()
                with contextlib.suppress(Exception):
                    await keep_going
                await self.good.close()

            try:
                example = 0
                while (examples is None or example < examples) and not until():
                    await self.example(example)
                    example += 1
                    if keep_going.done():
                        keep_going.result()
                if cfg.stop_under_load:
                    await self.stop_under_load(example, stop_good)
            finally:
                await stop_good()
                if not self.stopping:
                    await self._quiet()
                await server.stop()
            keep_going.result()
            await self._no_leaks(sockets)
            await base.close()
        return self.stats

    async def _quiet(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WAIT):
                while self.server._connections:
                    await asyncio.sleep(0.01)
        if self.server._connections:
            raise FuzzFailure(f"seed {self.seed}: {len(self.server._connections)} connections left on the server")
        if self.server.buffered:
            raise FuzzFailure(f"seed {self.seed}: {self.server.buffered} bytes still charged with every client gone")

    async def _no_leaks(self, sockets: set[str]) -> None:
        current = asyncio.current_task()
        for _ in range(200):  # closing transports and finishing tasks take a few loop iterations
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            gc.collect()
            kept = len(self._seen)  # server connection objects still referenced from anywhere
            if not tasks and not kept and _sockets() <= sockets:
                return
            await asyncio.sleep(0.005)
        raise FuzzFailure(
            f"seed {self.seed}: left behind tasks {tasks}, {kept} connection objects "
            f"and sockets {sorted(_sockets() - sockets)}"
        )


async def fuzz(cfg: FuzzConfig, seed: int, examples: int | None = None, **kwargs: Any) -> Stats:
    """Fuzz a fresh server with ``cfg`` from ``seed``; raises ``FuzzFailure`` on the first oracle violated."""
    return await FuzzRun(cfg, seed).run(examples, **kwargs)
