"""``BlockNode``: a named block node — an opened image plus the stack of filters jobs put on top.

Exports and jobs hold the node, never the device under it, so a backup can insert its
copy-before-write filter under a running export (QEMU's graph change) and take it out again. Each
request is forwarded to the top of the stack. ``drained()`` stops new requests and waits for those in
flight, which is how a backup (or a transaction of several) fixes its point in time: no guest write
is half-way through while filters are inserted.

Exports, jobs and parent nodes ``hold`` the node while they use it and ``release`` it after;
``users`` says who holds it, so that it is not deleted under them.

Dirty bitmaps live on the node, not on a filter or the image, because every write reaches the node
first, whoever sends it (an NBD export, a job writing into the node as its target, a guest write that
copy-before-write passes through): ``pwrite``, ``zero`` and ``trim`` mark the recording bitmaps after
the request, as QEMU does, also when it failed (part of it may have landed). A node without bitmaps
pays one truth test per write.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from backup import persistent_bitmaps
from backup.dirty_bitmap import (
    PLAN_GENERATION,
    DirtyBitmap,
    MarkingPlan,
    mark_plan,
    marking_plan,
    plans_changed,
)
from backup.errors import BackupError, InvalidArgument
from backup.filter import BlockFilter
from nbd.device import BlockDevice, BlockLimits, Capabilities, Extent, direct_read_fd

log = logging.getLogger(__name__)


class BlockNode:
    """Implements ``BlockDevice`` by forwarding to the top of its filter stack."""

    def __init__(self, name: str, device: BlockDevice, *, driver: str = "raw", filename: str | None = None) -> None:
        self.name = name
        self.device = device  # the opened image, bottom of the stack
        self.driver = driver
        self.filename = filename
        self.filters: list[BlockFilter] = []  # bottom-most first
        self.top: BlockDevice = device
        self._users: set[object] = set()  # exports, jobs and parent nodes: see ``hold``
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain_depth = 0
        self._undrained = asyncio.Event()
        self._undrained.set()
        #: By name, in QEMU's listing order (newest first): see ``add_bitmap``.
        self.bitmaps: dict[str, DirtyBitmap] = {}
        self._plan: MarkingPlan = ()  # see ``_marking``
        self._plan_generation = -1
        store = persistent_bitmaps.store_of(device)
        if store is not None:  # a qcow2 image's stored bitmaps are the node's from its open on
            for bitmap in persistent_bitmaps.load(store, device.size):
                self.add_bitmap(bitmap)

    @property
    def image(self) -> BlockDevice:
        """The opened image at the very bottom: through nodes stacked on nodes (a format node over
        a file node), never a filter."""
        device = self.device
        while isinstance(device, BlockNode):
            device = device.device
        return device

    # --- ownership -------------------------------------------------------------------------------

    def hold(self, user: object) -> None:
        """``user`` (an export, a job, a node built on this one) needs the node: it may not be deleted."""
        self._users.add(user)

    def release(self, user: object) -> None:
        """``user`` is done with the node (releasing twice, or without holding, is harmless)."""
        self._users.discard(user)

    @property
    def users(self) -> frozenset[object]:
        """Who holds the node now."""
        return frozenset(self._users)

    # --- dirty bitmaps -------------------------------------------------------------------------

    def add_bitmap(self, bitmap: DirtyBitmap) -> None:
        """Attach ``bitmap``; it is listed first (QEMU lists a node's bitmaps newest first)."""
        if bitmap.name in self.bitmaps:
            raise InvalidArgument(f"Bitmap already exists: {bitmap.name}")
        ordered = {bitmap.name: bitmap, **self.bitmaps}
        self.bitmaps.clear()  # in place: whoever holds the mapping sees the change
        self.bitmaps.update(ordered)
        plans_changed()

    def bitmap(self, name: str) -> DirtyBitmap:
        """The bitmap ``name``, with QEMU's refusal when there is none."""
        try:
            return self.bitmaps[name]
        except KeyError:
            raise InvalidArgument(f"Dirty bitmap '{name}' not found") from None

    def remove_bitmap(self, name: str) -> DirtyBitmap:
        """Detach the bitmap ``name`` (refused while a job or export uses it, or when it is stored in an
        image opened read-only; an inconsistent one may go)."""
        bitmap = self.bitmap(name)
        bitmap.check_usable(readonly=True, inconsistent=False)
        del self.bitmaps[name]
        plans_changed()
        return bitmap

    def _marking(self) -> MarkingPlan:
        """The plan that marks this node's bitmaps (``dirty_bitmap.marking_plan``), made again when
        stale: one tuple walk per write, and none for bitmaps that do not record."""
        if self._plan_generation != PLAN_GENERATION[0]:
            self._plan = marking_plan(self.bitmaps.values())
            self._plan_generation = PLAN_GENERATION[0]
        return self._plan

    def forget_bitmap(self, bitmap: DirtyBitmap) -> None:
        """Drop ``bitmap`` if it is this node's (a transaction's commit or abort), without the checks
        of ``remove_bitmap``."""
        if self.bitmaps.get(bitmap.name) is bitmap:
            del self.bitmaps[bitmap.name]
            plans_changed()

    def _mark(self, offset: int, length: int) -> None:
        plan = self._marking()
        if plan:
            mark_plan(plan, offset, length)

    # --- graph changes ---------------------------------------------------------------------------

    def insert_filter(self, make_filter: Callable[[BlockDevice], BlockFilter]) -> BlockFilter:
        """Put a filter on top of the stack; call inside ``drained()`` so no request straddles it."""
        new = make_filter(self.top)
        self.filters.append(new)
        self.top = new
        return new

    def remove_filter(self, old: BlockFilter) -> None:
        """Take a filter out wherever it sits in the stack, relinking the one above it."""
        try:
            index = self.filters.index(old)
        except ValueError:
            raise InvalidArgument(f"filter is not on node '{self.name}'") from None
        below = self.filters[index - 1] if index > 0 else self.device
        if index + 1 < len(self.filters):
            self.filters[index + 1].next = below
        del self.filters[index]
        self.top = self.filters[-1] if self.filters else self.device

    @asynccontextmanager
    async def drained(self) -> AsyncIterator[None]:
        """Hold new requests back and wait until none is in flight (QEMU's drained section)."""
        self._drain_depth += 1
        self._undrained.clear()
        try:
            await self._idle.wait()
            yield
        finally:
            self._drain_depth -= 1
            if self._drain_depth == 0:
                self._undrained.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def _enter(self) -> None:
        if self._drain_depth:
            await self._undrained.wait()
        self._in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    # --- BlockDevice -----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.top.size

    @property
    def read_only(self) -> bool:
        return self.top.read_only

    @property
    def capabilities(self) -> Capabilities:
        return self.top.capabilities

    @property
    def block_limits(self) -> BlockLimits:
        return self.top.block_limits

    def direct_read_fd(self) -> int | None:
        """The descriptor reads may be served from: the top of the stack's (see ``BlockFilter``)."""
        return direct_read_fd(self.top)

    async def pread(self, offset: int, length: int) -> bytes:
        await self._enter()
        try:
            return await self.top.pread(offset, length)
        finally:
            self._leave()

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        await self._enter()
        try:
            await self.top.pwrite(offset, data, fua=fua)
        finally:
            if self.bitmaps:
                plan = self._plan if self._plan_generation == PLAN_GENERATION[0] else self._marking()
                if plan:
                    mark_plan(plan, offset, data.nbytes if type(data) is memoryview else len(data))
            self._leave()

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        await self._enter()
        try:
            await self.top.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)
        finally:
            if self.bitmaps:
                self._mark(offset, length)
            self._leave()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._enter()
        try:
            await self.top.trim(offset, length, fua=fua)
        finally:
            if self.bitmaps:
                self._mark(offset, length)
            self._leave()

    async def flush(self) -> None:
        await self._enter()
        try:
            await self.top.flush()
        finally:
            self._leave()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        await self._enter()
        try:
            return await self.top.block_status(offset, length)
        finally:
            self._leave()

    async def cache(self, offset: int, length: int) -> None:
        await self._enter()
        try:
            await self.top.cache(offset, length)
        finally:
            self._leave()

    async def close(self) -> None:
        """Close the image, handing it the persistent bitmaps to store first (a qcow2 image writes
        them at its clean close); filters are removed by the jobs that own them before this."""
        store = persistent_bitmaps.store_of(self.device)
        if store is not None:
            try:
                persistent_bitmaps.save(store, self.bitmaps)
            except (OSError, BackupError) as exc:  # the image still closes; its bitmaps stay in_use
                log.error("node '%s': persistent bitmaps not stored: %s", self.name, exc)
        await self.device.close()
