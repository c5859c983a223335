"""``NbdClient``: a remote NBD export as a ``BlockDevice``, over asyncio.

The protocol lives in ``nbd.client_core``, the handshake policy in ``nbd.client_negotiate`` and the
sockets (corking, ``sendfile`` payloads, the request-timeout watchdog) in ``nbd.client_transport``; this
module turns the device verbs into requests and keeps promises:

* Requests are pipelined up to ``max_in_flight`` across all connections, split to the server's maximum
  payload and aligned to its minimum block size (read-modify-write for unaligned writes).
* ``pwrite_from_fd`` sends a write's payload from a file descriptor (``sendfile`` into the socket).
* Several connections are opened when the server advertises ``CAN_MULTI_CONN`` (which is what makes a
  flush on one connection cover writes completed on the others).
* ``request_timeout``: a connection with requests in flight that receives nothing for that long is
  dropped (see :class:`~nbd.client_transport.RequestWatchdog`).
* ``close`` never leaves a socket open: it does not wait for requests stuck on a connection that has
  been silent for ``CLOSE_GRACE``, and connections whose orderly close (the DISC going out) does not
  finish within ``CLOSE_GRACE`` — a server that stopped reading — are aborted, as they are when
  ``close`` itself is cancelled.
* A dropped connection fails every pending request at once with :class:`DisconnectedError`, unless
  ``reconnect_delay`` is set: then (like QEMU's ``reconnect-delay``) new requests wait, and requests the
  server never acknowledged are replayed on a new connection — only once the old one is fully closed,
  and never a write over a range that a newer, acknowledged write has since covered.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, cast

from nbd import client_negotiate
from nbd import constants as c
from nbd.align import round_up
from nbd.client_core import ClientRequest, ClientTransmission
from nbd.client_negotiate import ExportInfo, ListedExport, open_session
from nbd.client_transport import (
    FLUSH_TIMEOUT_FACTOR,
    ClientConnection,
    Op,
    PayloadSource,
    RequestWatchdog,
    drop_silent,
)
from nbd.device import BlockLimits, Capabilities, Extent, FlushLatch, pread_padded
from nbd.errors import (
    DisconnectedError,
    HandshakeError,
    NbdError,
    NbdRequestError,
    ProtocolError,
    RequestTimeoutError,
    nbd_to_errno,
)
from nbd.uri import NbdUri, parse_uri

log = logging.getLogger(__name__)

DEFAULT_MAX_IN_FLIGHT = 64
DEFAULT_CONNECT_TIMEOUT = 30.0
MAX_AUTO_CONNECTIONS = 4
DEFAULT_MAX_PAYLOAD = c.MAX_PAYLOAD  # what we assume when the server does not say (spec: 32 MiB is safe)
_MAX_LENGTH32 = 0xFFFFFFFF
_RETRY_INTERVAL = 1.0
_ZEROES = bytes(1024 * 1024)
#: How long ``close`` lets connections send their DISC and close before aborting them.
CLOSE_GRACE = 2.0


_WRITE_CMDS = frozenset({c.Cmd.WRITE, c.Cmd.WRITE_ZEROES, c.Cmd.TRIM})


def _as_uri(uri: str | NbdUri) -> NbdUri:
    return uri if isinstance(uri, NbdUri) else parse_uri(uri)


class NbdClient:
    """A remote NBD export as a :class:`~nbd.device.BlockDevice`."""

    def __init__(
        self,
        uri: NbdUri,
        info: ExportInfo,
        *,
        max_in_flight: int,
        connect_timeout: float,
        request_timeout: float | None,
        reconnect_delay: float,
    ) -> None:
        self.uri = uri
        self.export_info = info
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout if request_timeout and request_timeout > 0 else None
        self._reconnect_delay = reconnect_delay
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_in_flight = max_in_flight
        self._conns: list[ClientConnection] = []
        self._watchdog = (
            RequestWatchdog(self._conns, self._request_timeout, str(uri)) if self._request_timeout else None
        )
        self._ready = asyncio.Event()
        self._closing = False
        self._closed = False
        self._broken: BaseException | None = None
        self._failing_fast = False
        self._rmw_lock = asyncio.Lock()
        self._write_seq = 0
        self._pending_writes: dict[int, Op] = {}  # seq → write op not yet acknowledged
        self._acked_log: list[tuple[int, int, int]] = []  # (seq, offset, end) acked while older writes pend
        self._tasks: set[asyncio.Task[None]] = set()
        self._flush_latch = FlushLatch(str(uri))  # a failed remote FLUSH fails every later flush and FUA write
        flags = info.flags
        minimum = info.block_minimum or 1
        maximum = info.block_maximum or DEFAULT_MAX_PAYLOAD
        maximum = min(maximum, DEFAULT_MAX_PAYLOAD) if maximum != _MAX_LENGTH32 else DEFAULT_MAX_PAYLOAD
        self._minimum = minimum
        self._max_payload = max(minimum, maximum - maximum % minimum)
        self._max_length = _MAX_LENGTH32 - _MAX_LENGTH32 % max(minimum, 1 << 20)  # zero/trim/status
        self._read_only = bool(flags & c.TransmissionFlag.READ_ONLY)
        self._capabilities = Capabilities(
            can_flush=bool(flags & c.TransmissionFlag.SEND_FLUSH),
            can_fua=bool(flags & c.TransmissionFlag.SEND_FUA),
            can_trim=bool(flags & c.TransmissionFlag.SEND_TRIM),
            can_zero=bool(flags & c.TransmissionFlag.SEND_WRITE_ZEROES),
            can_fast_zero=bool(flags & c.TransmissionFlag.SEND_FAST_ZERO),
            can_cache=bool(flags & c.TransmissionFlag.SEND_CACHE),
            can_multi_conn=bool(flags & c.TransmissionFlag.CAN_MULTI_CONN),
            can_extents=c.META_BASE_ALLOCATION in info.contexts,
            rotational=bool(flags & c.TransmissionFlag.ROTATIONAL),
        )
        self._block_limits = BlockLimits(
            minimum=minimum, preferred=max(info.block_preferred or 4096, minimum), maximum=self._max_payload
        )

    # -- construction

    @classmethod
    async def connect(
        cls,
        uri: str | NbdUri,
        *,
        connections: int | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        request_timeout: float | None = None,
        reconnect_delay: float = 0,
        map_context: str | None = None,
    ) -> NbdClient:
        """Connect and negotiate. ``connections=None`` opens up to 4 when the server allows multi-conn.
        ``request_timeout`` (seconds; None or 0: none) drops a connection that goes silent with requests
        in flight (see the module docstring). ``map_context`` selects a second meta context by name
        (``qemu:dirty-bitmap:NAME``, ``qemu:allocation-depth``) for ``context_map``."""
        target = _as_uri(uri)
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        first, info = await cls._open(target, connect_timeout, list_contexts=True, map_context=map_context)
        client = cls(
            target,
            info,
            max_in_flight=max_in_flight,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            reconnect_delay=reconnect_delay,
        )
        client._adopt(first)
        wanted = connections if connections is not None else MAX_AUTO_CONNECTIONS
        if wanted > 1 and not info.has(c.TransmissionFlag.CAN_MULTI_CONN):
            if connections is not None:
                log.info("%s: server does not allow multi-conn; using one connection", target)
            wanted = 1
        try:
            await client._open_more(target, connect_timeout, wanted - 1)
        except BaseException:
            await client.close()
            raise
        return client

    async def _open_more(self, target: NbdUri, timeout: float, count: int) -> None:
        """Open ``count`` more connections side by side (each handshake is a few round trips), adopting
        every one that opened, even when another failed or the caller was cancelled, so that ``close``
        finds them all; the first failure is raised."""
        if count <= 0:
            return
        opening = [
            asyncio.ensure_future(
                self._open(target, timeout, list_contexts=False, map_context=self.export_info.map_context)
            )
            for _ in range(count)
        ]
        try:
            await asyncio.wait(opening)
        finally:
            for task in opening:
                task.cancel()
            await asyncio.gather(*opening, return_exceptions=True)
            for task in opening:
                if not task.cancelled() and task.exception() is None:
                    self._adopt(task.result()[0])
        for task in opening:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    _open = staticmethod(open_session)  # connect and negotiate one connection

    @classmethod
    async def list_exports(
        cls, uri: str | NbdUri, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    ) -> list[ListedExport]:
        """``NBD_OPT_LIST`` (the export in ``uri`` is ignored)."""
        return await client_negotiate.list_exports(_as_uri(uri), connect_timeout)

    def _adopt(self, conn: ClientConnection) -> None:
        conn.on_replies = self._on_replies
        conn.on_lost = self._on_lost
        conn.ready = True
        if conn not in self._conns:
            self._conns.append(conn)
        self._ready.set()
        if self._watchdog is not None:
            self._watchdog.arm()

    # -- BlockDevice properties

    @property
    def size(self) -> int:
        return self.export_info.size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def block_limits(self) -> BlockLimits:
        return self._block_limits

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def request_timeout(self) -> float | None:
        return self._request_timeout

    def __repr__(self) -> str:
        return f"<NbdClient {self.uri} size={self.size} connections={len(self._conns)}>"

    # -- request machinery

    def _check_usable(self) -> None:
        if self._closed or self._closing:
            raise OSError(errno.EBADF, f"{self.uri}: client is closed")
        if self._broken is not None:
            raise DisconnectedError(f"{self.uri}: connection is gone ({self._broken})")

    async def _pick(self) -> ClientConnection:
        while True:
            self._check_usable()
            conns = [conn for conn in self._conns if conn.ready]
            if conns:
                return conns[0] if len(conns) == 1 else min(conns, key=_load)
            if self._failing_fast:
                raise DisconnectedError(f"{self.uri}: disconnected, reconnecting")
            self._ready.clear()
            await self._ready.wait()

    async def _submit(
        self,
        cmd: int,
        offset: int,
        length: int,
        flags: int = 0,
        *,
        data: bytes | bytearray | memoryview | None = None,
        buffer: bytearray | memoryview | None = None,
        fresh: bool = True,
        source: PayloadSource | None = None,
        source_offset: int = 0,
    ) -> ClientRequest:
        self._check_usable()
        loop = asyncio.get_running_loop()
        async with self._slots:
            conn = await self._pick()
            await conn.writable()
            if not conn.ready:
                conn = await self._pick()
            op = Op(cmd, offset, length, flags, loop.create_future(), data, buffer, fresh=fresh)
            if source is not None:
                op.source, op.source_offset = source, source_offset
            if cmd in _WRITE_CMDS:
                self._write_seq += 1
                op.seq = self._write_seq
                self._pending_writes[op.seq] = op
            conn.send(op)
            return await op.future

    def _on_replies(self, done: list[ClientRequest]) -> None:
        for req in done:
            op: Op = req.userdata
            if op.parent is not None:
                self._piece_done(op.parent, req)
                continue
            if op.seq:
                self._write_acked(op, ok=not req.error)
            future = op.future
            if future.done():
                continue
            if req.error:
                future.set_exception(_request_error(req))
            else:
                future.set_result(req)

    def _piece_done(self, parent: Op, req: ClientRequest) -> None:
        parent.parts -= 1
        if req.error and not parent.future.done():
            parent.future.set_exception(_request_error(req))
        if parent.parts:
            return
        self._write_acked(parent, ok=not parent.future.done())
        if not parent.future.done():
            parent.future.set_result(req)

    def _write_acked(self, op: Op, *, ok: bool) -> None:
        self._pending_writes.pop(op.seq, None)
        if not self._pending_writes:
            self._acked_log.clear()
            return
        oldest = next(iter(self._pending_writes))  # sequence numbers are inserted in increasing order
        if ok and op.seq > oldest:
            self._acked_log.append((op.seq, op.offset, op.offset + op.length))
        if self._acked_log and self._acked_log[0][0] < oldest:
            self._acked_log = [entry for entry in self._acked_log if entry[0] > oldest]

    def _on_lost(self, conn: ClientConnection, reason: BaseException) -> None:
        conn.ready = False
        ops = [req.userdata for req in conn.tx.inflight.values()] if conn.tx is not None else []
        if conn.tx is not None:
            conn.tx.inflight.clear()
        if self._closing or self._closed or self._reconnect_delay <= 0 or isinstance(reason, ProtocolError):
            self._fail(ops, reason)
            if not self._closing and not self._closed:
                self._broken = reason
                self._ready.set()  # wake waiters so they see the failure
                for other in self._conns:
                    if other is not conn and other.transport is not None:
                        other.abort(_copy_exception(reason))  # one cause, one message (a timeout stays one)
            return
        log.warning("%s: %s; reconnecting (requests wait up to %g s)", self.uri, reason, self._reconnect_delay)
        task = asyncio.get_running_loop().create_task(self._reconnect(conn, ops, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail(self, ops: Sequence[Op], reason: BaseException) -> None:
        for op in ops:
            op = op.parent or op
            if op.seq:
                self._pending_writes.pop(op.seq, None)
            if not op.future.done():
                op.future.set_exception(_copy_exception(reason))

    async def _reconnect(self, old: ClientConnection, ops: list[Op], reason: BaseException) -> None:
        """Wait for the old socket to be gone, then connect again and replay; give up after the delay."""
        try:
            await self._reconnect_loop(old, ops)
        except asyncio.CancelledError:
            self._fail(ops, DisconnectedError(f"{self.uri}: client closed while reconnecting ({reason})"))
            raise
        except BaseException as exc:
            self._fail(ops, exc)
            raise

    async def _reconnect_loop(self, old: ClientConnection, ops: list[Op]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._reconnect_delay
        await old.closed  # the old connection is fully closed before anything is replayed
        while True:
            remaining = deadline - loop.time()
            try:
                timeout = min(self._connect_timeout, remaining) if remaining > 0 else self._connect_timeout
                conn, info = await self._open(
                    self.uri, max(timeout, 0.1), list_contexts=False, map_context=self.export_info.map_context
                )
            except (OSError, NbdError, TimeoutError) as exc:
                if loop.time() >= deadline and not self._failing_fast:
                    self._failing_fast = True  # from now on new requests fail at once; we keep trying
                    self._fail(ops, DisconnectedError(f"{self.uri}: reconnect failed within the delay: {exc}"))
                    ops.clear()
                    self._ready.set()
                pause = _RETRY_INTERVAL if self._failing_fast else min(_RETRY_INTERVAL, max(remaining, 0.05))
                await asyncio.sleep(pause)
                continue
            if info.size != self.size:
                conn.abort(HandshakeError("export size changed"))
                self._broken = HandshakeError(f"{self.uri}: export size changed from {self.size} to {info.size}")
                self._fail(ops, self._broken)
                self._ready.set()
                return
            self._conns[self._conns.index(old)] = conn
            conn.on_replies = self._on_replies
            conn.on_lost = self._on_lost
            self._replay(conn, ops)
            self._failing_fast = False
            conn.ready = True
            self._ready.set()
            log.warning("%s: reconnected; replayed %d request(s)", self.uri, len(ops))
            return

    def _replay(self, conn: ClientConnection, ops: list[Op]) -> None:
        """Send again what the server never acknowledged, oldest first, minus superseded write ranges."""
        for op in sorted(ops, key=lambda o: o.seq):
            parent = op.parent or op
            if parent.future.done():  # timed out or cancelled by its caller: nothing to replay
                if parent.seq:
                    self._pending_writes.pop(parent.seq, None)
                continue
            if op.buffer is not None and op.fresh:
                op.buffer[:] = bytes(len(op.buffer))  # holes rely on a zeroed buffer
            if not op.seq:
                conn.send(op)
                continue
            pieces = self._unsuperseded(op)
            if pieces == [(op.offset, op.offset + op.length)]:
                conn.send(op)
                continue
            # Split: the pieces count against the parent; an empty split completes this op at once.
            parent.parts += len(pieces) - (1 if op.parent is not None else 0)
            if not pieces:
                done = ClientRequest(0, op.cmd, op.flags, op.offset, op.length)
                if op.parent is not None:
                    parent.parts += 1  # undo the -1 above, then count this piece as done
                    self._piece_done(parent, done)
                else:
                    self._write_acked(op, ok=False)
                    op.future.set_result(done)
                continue
            for start, end in pieces:
                data = None
                if op.data is not None:
                    data = memoryview(op.data)[start - op.offset : end - op.offset]
                piece = Op(op.cmd, start, end - start, op.flags, parent.future, data, None, op.seq, 0, parent)
                if op.source is not None:
                    piece.source, piece.source_offset = op.source, op.source_offset + start - op.offset
                conn.send(piece)

    def _unsuperseded(self, op: Op) -> list[tuple[int, int]]:
        """Parts of ``op``'s range that no newer acknowledged write has covered."""
        newer = [(start, end) for seq, start, end in self._acked_log if seq > op.seq]
        return subtract_ranges(op.offset, op.offset + op.length, newer)

    # -- alignment helpers

    def _bounds(self, offset: int, length: int, *, write: bool) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.ENOSPC if write else errno.EINVAL, f"{self.uri}: request beyond the end of the export")
        if write and self._read_only:
            raise OSError(errno.EPERM, f"{self.uri}: export is read-only")

    # -- BlockDevice verbs

    async def pread(self, offset: int, length: int) -> bytes:
        self._bounds(offset, length, write=False)
        if length == 0:
            return b""
        minimum = self._minimum
        if minimum > 1 and (offset % minimum or length % minimum):
            start = offset - offset % minimum
            end = min(round_up(offset + length, minimum), self.size)
            data = await self.pread(start, end - start)
            return data[offset - start : offset - start + length]
        if length <= self._max_payload:
            req = await self._submit(c.Cmd.READ, offset, length)
            assert isinstance(req.buffer, bytearray)
            return cast(bytes, req.buffer)  # a fresh bytearray: bytes-like and ours to give; copying costs
        buffer = bytearray(length)
        await self._read_into(offset, memoryview(buffer), fresh=True)
        return cast(bytes, buffer)

    async def pread_into(self, offset: int, buffer: bytearray | memoryview) -> None:
        """Read ``len(buffer)`` bytes into the caller's (reused) buffer: no allocation, no extra copy.

        Not part of ``BlockDevice``; ``nbd-backup copy`` uses it when a device has it."""
        length = len(buffer)
        self._bounds(offset, length, write=False)
        if length == 0:
            return
        minimum = self._minimum
        if minimum > 1 and (offset % minimum or length % minimum):
            buffer[:] = await self.pread(offset, length)
            return
        await self._read_into(offset, memoryview(buffer).cast("B"), fresh=False)

    async def _read_into(self, offset: int, view: memoryview, *, fresh: bool) -> None:
        length, step = len(view), self._max_payload
        await _gather(
            self._submit(c.Cmd.READ, offset + pos, min(step, length - pos), buffer=view[pos : pos + step], fresh=fresh)
            for pos in range(0, length, step)
        )

    def _write_request(self, offset: int, length: int, fua: bool) -> bool:
        """The checks every write makes first; True when the write is aligned and not empty (an
        unaligned one goes through ``_rmw``)."""
        self._bounds(offset, length, write=True)
        if fua:
            self._flush_latch.check()
        minimum = self._minimum
        return length > 0 and not (minimum > 1 and (offset % minimum or length % minimum))

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        length = len(data)
        if not self._write_request(offset, length, fua):
            if length:
                await self._rmw(offset, data, fua=fua)
            return
        flags = c.CmdFlag.FUA if fua and self._capabilities.can_fua else 0
        if length <= self._max_payload:
            await self._submit(c.Cmd.WRITE, offset, length, flags, data=data)
        else:
            view = memoryview(data)
            step = self._max_payload
            await _gather(
                self._submit(c.Cmd.WRITE, offset + pos, min(step, length - pos), flags, data=view[pos : pos + step])
                for pos in range(0, length, step)
            )
        if fua and not self._capabilities.can_fua:
            await self.flush()

    async def pwrite_from_fd(self, offset: int, fd: int, file_offset: int, length: int, *, fua: bool = False) -> None:
        """Write ``length`` bytes of the file ``fd`` (from ``file_offset``; past its end: zeroes) at
        ``offset``, sent with ``sendfile`` from the page cache into the socket — no copy through Python.

        Not part of ``BlockDevice``; ``nbd-backup copy`` uses it when the source is a raw file. ``fd`` is
        duplicated: the caller may close its own once this returns or is cancelled."""
        if not self._write_request(offset, length, fua):
            if length:
                await self.pwrite(offset, pread_padded(fd, file_offset, length), fua=fua)
            return
        flags = c.CmdFlag.FUA if fua and self._capabilities.can_fua else 0
        source = PayloadSource(fd)
        try:
            step = self._max_payload
            await _gather(
                self._submit(
                    c.Cmd.WRITE,
                    offset + pos,
                    min(step, length - pos),
                    flags,
                    source=source,
                    source_offset=file_offset + pos,
                )
                for pos in range(0, length, step)
            )
        finally:
            source.release()
        if fua and not self._capabilities.can_fua:
            await self.flush()

    async def _rmw(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool) -> None:
        """An unaligned write on a server with a minimum block size: read the edge blocks, merge, write."""
        minimum = self._minimum
        start = offset - offset % minimum
        end = min(round_up(offset + len(data), minimum), self.size)
        async with self._rmw_lock:
            merged = bytearray(await self.pread(start, end - start))
            merged[offset - start : offset - start + len(data)] = data
            await self.pwrite(start, merged, fua=fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        self._bounds(offset, length, write=True)
        if fua:
            self._flush_latch.check()
        if length == 0:
            return
        caps = self._capabilities
        if fast and not (caps.can_zero and caps.can_fast_zero):
            raise OSError(errno.ENOTSUP, f"{self.uri}: server cannot zero fast")
        minimum = self._minimum
        head = -offset % minimum if minimum > 1 else 0
        unaligned = minimum > 1 and bool(head or (offset + length) % minimum)
        if unaligned and fast:
            raise OSError(errno.ENOTSUP, f"{self.uri}: an unaligned zero needs writes, it cannot be fast")
        if unaligned:
            start = offset + min(head, length)
            end = max(start, offset + length - (offset + length) % minimum)
            if head:
                await self.pwrite(offset, _ZEROES[: min(head, length)], fua=fua)
            if end < offset + length:
                await self.pwrite(end, _ZEROES[: offset + length - end], fua=fua)
            offset, length = start, end - start
            if length == 0:
                return
        if not caps.can_zero:
            await self._write_zero_buffers(offset, length, fua=fua)
            return
        flags = 0 if may_trim else c.CmdFlag.NO_HOLE
        if fast:
            flags |= c.CmdFlag.FAST_ZERO
        if fua and caps.can_fua:
            flags |= c.CmdFlag.FUA
        await self._ranged(c.Cmd.WRITE_ZEROES, offset, length, flags)
        if fua and not caps.can_fua:
            await self.flush()

    async def _write_zero_buffers(self, offset: int, length: int, *, fua: bool) -> None:
        step = min(len(_ZEROES), self._max_payload)
        step -= step % self._minimum
        window = step * self._max_in_flight  # a few requests at a time, however big the range
        zeroes = memoryview(_ZEROES)
        for base in range(0, length, window):
            end = min(base + window, length)
            await _gather(
                self.pwrite(offset + pos, zeroes[: min(step, end - pos)], fua=fua) for pos in range(base, end, step)
            )

    async def _ranged(self, cmd: int, offset: int, length: int, flags: int = 0) -> None:
        step = self._max_length
        await _gather(self._submit(cmd, offset + pos, min(step, length - pos), flags) for pos in range(0, length, step))

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._bounds(offset, length, write=True)
        if fua:
            self._flush_latch.check()
        if not self._capabilities.can_trim:
            return  # advisory
        minimum = self._minimum
        start = round_up(offset, minimum)
        end = (offset + length) - (offset + length) % minimum
        if end <= start:
            return
        flags = c.CmdFlag.FUA if fua and self._capabilities.can_fua else 0
        await self._ranged(c.Cmd.TRIM, start, end - start, flags)
        if fua and not self._capabilities.can_fua:
            await self.flush()

    async def flush(self) -> None:
        self._check_usable()
        self._flush_latch.check()
        if self._capabilities.can_flush:
            try:
                await self._submit(c.Cmd.FLUSH, 0, 0)
            except OSError as exc:  # an error reply, a lost connection, a timeout: durability unknown
                self._flush_latch.failed(exc)
                raise

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._bounds(offset, length, write=False)
        if length == 0:
            return []
        if not self._capabilities.can_extents:
            return [Extent(length, 0)]
        minimum = self._minimum
        start = offset - offset % minimum
        end = min(round_up(offset + length, minimum), self.size)
        end = min(end, start + self._max_length)
        req = await self._submit(c.Cmd.BLOCK_STATUS, start, end - start)
        extents = [Extent(run_length, flags) for run_length, flags in _clip_runs(req.extents, offset - start, length)]
        if not extents:
            raise NbdRequestError(errno.EIO, f"{self.uri}: block status did not cover the request")
        return extents

    async def context_map(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Runs ``(length, flags)`` of the meta context selected at ``connect(map_context=…)`` from
        ``offset`` on (as far as the server answered, at most ``length`` bytes; flags as that context
        defines them: bit 0 = dirty for ``qemu:dirty-bitmap:…``, the depth for ``qemu:allocation-depth``)."""
        context = self.export_info.map_context
        if context is None:
            raise ValueError("no map context was selected when connecting")
        self._bounds(offset, length, write=False)
        if length == 0:
            return []
        minimum = self._minimum
        start = offset - offset % minimum
        end = min(round_up(offset + length, minimum), self.size)
        end = min(end, start + self._max_length)
        req = await self._submit(c.Cmd.BLOCK_STATUS, start, end - start)
        runs = req.extents if context == c.META_BASE_ALLOCATION else req.map_extents
        clipped = _clip_runs(runs, offset - start, length)
        if not clipped:
            raise NbdRequestError(errno.EIO, f"{self.uri}: {context} did not cover the request")
        return clipped

    async def cache(self, offset: int, length: int) -> None:
        self._bounds(offset, length, write=False)
        if length and self._capabilities.can_cache:
            await self._ranged(c.Cmd.CACHE, offset, length)

    async def close(self) -> None:
        """Wait for what is in flight, send ``NBD_CMD_DISC``, and close every connection; a connection
        that has not closed within ``CLOSE_GRACE`` (or when this is cancelled) is aborted."""
        if self._closed:
            return
        self._closing = True
        self._ready.set()  # requests waiting for a connection see the client closing
        for task in list(self._tasks):
            task.cancel()
        try:
            await self._drain_or_drop()
            for conn in self._conns:
                transport = conn.transport
                if transport is None or transport.is_closing():
                    continue
                if conn.ready and conn.tx is not None:
                    try:
                        conn.write_last(ClientTransmission.disconnect_request())
                    except (OSError, RuntimeError):
                        pass
                transport.close()
            self._closed = True
            self._stop_watchdog()
            if self._conns:
                await asyncio.wait([asyncio.ensure_future(conn.closed) for conn in self._conns], timeout=CLOSE_GRACE)
        finally:
            self._closed = True
            self._stop_watchdog()
            self._abort_unclosed()

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()

    def _abort_unclosed(self) -> None:
        """Drop the sockets an orderly close could not finish (a server that stopped reading): a closed
        client holds no connection, whatever the server does."""
        self._stop_watchdog()
        stuck = [conn for conn in self._conns if not conn.closed.done()]
        if stuck:
            log.warning("%s: aborting %d connection(s) that did not close", self.uri, len(stuck))
        for conn in stuck:
            conn.abort(DisconnectedError(f"{self.uri}: client closed"))

    async def _drain_or_drop(self) -> None:
        """Wait (up to the connect timeout) for the requests in flight, but not for those stuck on a
        connection that has been silent for ``CLOSE_GRACE`` (ten times that for FLUSH only, as for the
        request timeout): that one is dropped and they fail."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        drain = asyncio.ensure_future(self._drain())
        try:
            while not drain.done():
                drop_silent(self._conns, CLOSE_GRACE, label=str(self.uri), flush_factor=FLUSH_TIMEOUT_FACTOR)
                left = deadline - loop.time()
                if left <= 0:
                    log.warning("%s: closing with requests still in flight", self.uri)
                    return
                await asyncio.wait({drain}, timeout=min(left, CLOSE_GRACE / 4))
        finally:
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)

    async def _drain(self) -> None:
        """Wait until every request slot is free (then hand them back: late callers get EBADF, not a hang)."""
        taken = 0
        try:
            for _ in range(self._max_in_flight):
                await self._slots.acquire()
                taken += 1
        finally:
            for _ in range(taken):
                self._slots.release()

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def subtract_ranges(start: int, end: int, covers: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[start, end)`` minus every ``[a, b)`` of ``covers``, as sorted disjoint half-open ranges."""
    pieces = [(start, end)]
    for cover_start, cover_end in covers:
        remaining: list[tuple[int, int]] = []
        for a, b in pieces:
            if cover_end <= a or cover_start >= b:
                remaining.append((a, b))
                continue
            if a < cover_start:
                remaining.append((a, cover_start))
            if cover_end < b:
                remaining.append((cover_end, b))
        pieces = remaining
    return pieces


def _clip_runs(runs: Iterable[tuple[int, int]], skip: int, budget: int) -> list[tuple[int, int]]:
    """``(length, flags)`` runs from ``skip`` bytes in, at most ``budget`` bytes (a status request
    widened to the block size answers for more than was asked)."""
    clipped: list[tuple[int, int]] = []
    for run_length, flags in runs:
        if skip:
            cut = min(skip, run_length)
            run_length -= cut
            skip -= cut
        take = min(run_length, budget)
        if take <= 0:
            continue
        clipped.append((take, flags))
        budget -= take
        if budget == 0:
            break
    return clipped


def _load(conn: ClientConnection) -> int:
    return conn.inflight


def _request_error(req: ClientRequest) -> NbdRequestError:
    err = nbd_to_errno(req.error)
    name = c.Cmd(req.cmd).name if req.cmd in c.Cmd._value2member_map_ else str(req.cmd)
    where = f" at offset {req.error_offset}" if req.error_offset is not None else ""
    detail = f" ({req.message})" if req.message else ""
    return NbdRequestError(err, f"{os.strerror(err)}: {name} [{req.offset}, +{req.length}){where}{detail}")


def _copy_exception(reason: BaseException) -> BaseException:
    if isinstance(reason, RequestTimeoutError):
        return RequestTimeoutError(str(reason))
    if isinstance(reason, DisconnectedError):
        return DisconnectedError(str(reason))
    if isinstance(reason, NbdError):
        return DisconnectedError(str(reason))
    return DisconnectedError(f"connection lost: {reason}")


async def _gather(coros: Iterable[Coroutine[Any, Any, Any]]) -> None:
    """Run the pieces of one split request; the first failure wins, the rest are awaited (no orphans).

    The usual case is one piece: it is awaited directly (a task per request would cost more than the rest)."""
    pieces = list(coros)
    if len(pieces) == 1:
        await pieces[0]
        return
    tasks = [asyncio.ensure_future(piece) for piece in pieces]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


__all__ = ["ExportInfo", "ListedExport", "NbdClient"]
