"""The copy-before-write invariant under random interleavings (hypothesis state machine).

Guest writes, write-zeroes and trims — aligned, unaligned, crossing clusters, touching the partial
last cluster — run as concurrent tasks while the job copies, pauses, resumes and changes speed, and
while the target fails writes for a while (guest writes over uncopied clusters then fail, the job's
``ignore`` policy retries; a target flush that fails fails the job). At the end the target must equal
the snapshot model (the source as it was when the filter went in; for ``sync=none`` the clusters the
guest overwrote, nothing else but possibly old data), no cluster may have been copied twice, and
everything must finish (a hang fails the ``wait_for``).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
from typing import Any

from backup_faults import FaultyDevice
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from backup.backup_job import BackupJob, BackupOptions
from backup.events import EventBus
from backup.memory import MemoryDevice
from backup.node import BlockNode

CS = 65536
CLUSTERS = 6
SIZE = CLUSTERS * CS + 1536  # plus a partial last cluster
DEADLINE = 20.0  # seconds for everything to settle: only a deadlock gets near it

offsets = st.one_of(
    st.integers(0, SIZE - 1),
    st.sampled_from([0, CS - 1, CS, 2 * CS - 3, CLUSTERS * CS, SIZE - 1]),
)
lengths = st.one_of(st.integers(1, 3 * CS), st.sampled_from([1, 512, 4096, CS, CS + 1, 2 * CS]))


class CopyBeforeWriteMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.guests: list[asyncio.Task[None]] = []
        self.touched: set[int] = set()  # clusters of guest requests that succeeded
        self.job: BackupJob | None = None

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, DEADLINE))

    @initialize(
        seed=st.integers(0, 255),
        sync=st.sampled_from(["full", "full", "none"]),
        zero_init=st.booleans(),
        workers=st.integers(1, 3),
        chunk_clusters=st.integers(1, 3),
    )
    def start(self, seed: int, sync: str, zero_init: bool, workers: int, chunk_clusters: int) -> None:
        data = bytearray((seed + i * 13) % 256 for i in range(SIZE))
        data[2 * CS : 3 * CS] = bytes(CS)  # a zero cluster: skipped or sent as write-zeroes
        self.source = MemoryDevice(SIZE, data=bytes(data))
        self.snapshot = bytes(data)
        self.node = BlockNode("disk", self.source)
        self.target_mem = MemoryDevice(SIZE)
        if not zero_init:
            self.target_mem._data[:] = b"\x5a" * SIZE  # an existing target full of junk
        self.target = FaultyDevice(self.target_mem)
        self.sync = sync
        self.zero_init = zero_init
        options = BackupOptions(
            sync=sync, max_workers=workers, max_chunk=chunk_clusters * CS, on_target_error="ignore", retry_delay=0
        )
        self.job = BackupJob("sm", self.node, self.target, options, events=EventBus(), target_zero_init=zero_init)

        async def attach_and_start() -> None:
            assert self.job is not None
            await self.job.attach()
            self.job.start()

        self.run(attach_and_start())

    @rule(offset=offsets, length=lengths, verb=st.sampled_from(["write", "zero", "trim"]), fill=st.integers(1, 255))
    def guest_request(self, offset: int, length: int, verb: str, fill: int) -> None:
        length = min(length, SIZE - offset)
        clusters = range(offset // CS, (offset + length - 1) // CS + 1)
        node = self.node
        if verb == "write":
            coro = node.pwrite(offset, bytes([fill]) * length)
        elif verb == "zero":
            coro = node.zero(offset, length, may_trim=bool(fill & 1))
        else:
            coro = node.trim(offset, length)
        task = self.loop.create_task(coro)

        def done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is None:
                self.touched.update(clusters)

        task.add_done_callback(done)
        self.guests.append(task)

    @rule(on=st.booleans())
    def target_fault(self, on: bool) -> None:
        self.target.fail_writes = errno.EIO if on else None

    @rule(steps=st.integers(1, 12))
    def progress(self, steps: int) -> None:
        async def spin() -> None:
            for _ in range(steps):
                await asyncio.sleep(0)

        self.run(spin())

    @precondition(lambda self: self.job is not None and self.job.status == "running" and not self.job.user_paused)
    @rule()
    def pause(self) -> None:
        assert self.job is not None
        self.job.pause()

    @precondition(lambda self: self.job is not None and self.job.user_paused and not self.job.is_completed)
    @rule()
    def resume(self) -> None:
        assert self.job is not None
        self.job.resume()

    @precondition(lambda self: self.job is not None and self.job.status in ("running", "paused"))
    @rule(speed=st.sampled_from([0, 1, 4096, 1 << 40]))
    def set_speed(self, speed: int) -> None:
        assert self.job is not None
        self.job.set_speed(speed)

    @invariant()
    def nothing_copied_twice(self) -> None:
        """No byte of a zero-initialised target is written twice. Guest writes copy the granules they
        overwrite (4 KiB, finer than a cluster) and the job the rest of the cluster later, so the check is
        on bytes, not clusters."""
        if self.job is None or not self.zero_init:
            return
        assert all(verb == "write" for verb, _, _ in self.target.writes)
        spans = sorted((offset, offset + length) for _, offset, length in self.target.writes)
        for (_, end), (next_start, _) in itertools.pairwise(spans):
            assert end <= next_start, f"bytes from {next_start} copied twice"

    def teardown(self) -> None:
        try:
            if self.job is not None:
                self.run(self._settle())
                self._check_target()
        finally:
            self.loop.close()

    async def _settle(self) -> None:
        job = self.job
        assert job is not None
        self.target.fail_writes = None
        if job.status in ("running", "paused"):
            job.set_speed(0)
            if job.user_paused:
                job.resume()
        results = await asyncio.gather(*self.guests, return_exceptions=True)
        for result in results:  # only copy-before-write refusals may fail a guest request
            assert result is None or (isinstance(result, OSError) and result.errno == errno.EIO), result
        if self.sync == "none" and not job.is_completed:
            job.cancel()
        await job.wait()
        if self.target.failed_flushes and self.sync != "none":
            # The copy finished while the target failed: its flush failed, which fails the job
            # whatever the policy (written data may be lost); the copy itself is still checked.
            assert job.error is not None
        else:
            assert job.error is None or self.sync == "none", job.error

    def _check_target(self) -> None:
        target = self.target_mem.data
        if self.sync == "full":
            assert target == self.snapshot
            return
        for cluster in range(CLUSTERS + 1):
            lo, hi = cluster * CS, min((cluster + 1) * CS, SIZE)
            if cluster in self.touched:
                assert target[lo:hi] == self.snapshot[lo:hi], f"cluster {cluster}"
            else:  # a refused request may still have copied some of its clusters first
                junk = bytes(hi - lo) if self.zero_init else b"\x5a" * (hi - lo)
                assert target[lo:hi] in (junk, self.snapshot[lo:hi]), f"untouched cluster {cluster} holds garbage"


TestCopyBeforeWrite = CopyBeforeWriteMachine.TestCase
TestCopyBeforeWrite.settings = settings(
    max_examples=80,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
