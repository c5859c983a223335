"""Differential tests: the same job scenario against qemu-storage-daemon 7.2 and against our ``Job``.

Each scenario drives a backup job through verbs and waits, collecting what a QMP client sees
(the job's events in order, error texts, query results without timing-dependent fields). The QEMU
side is qemu-storage-daemon over QMP (``blockdev-backup``); our side is ``backup.job.Job`` with a
plain copy loop (``CopyJob`` below) between the same kinds of devices — a raw file, or an nbdkit
``memory`` target behind the ``error`` filter, whose faults are switched with ``error-*-file``.
Both sides must observe exactly the same things.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import require
from peers import nbdkit_unix
from qsd import QmpAsync, Qsd, job_events_of, qsd_daemon  # noqa: F401 (a fixture)

from backup.errors import BackupError, JobStateError
from backup.events import Event, EventBus
from backup.job import Job
from backup.policy import ErrorAction, OnError
from backup.transaction import AbortAction, CompletionMode, Transaction, TransactionAction, run_transaction
from nbd.device import BlockDevice

SIZE = 4 << 20
CHUNK = 64 << 10
Json = dict[str, Any]


class CopyJob(Job):
    """A minimal full copy with QEMU's job semantics: pause points, throttle, error policies."""

    job_type = "backup"

    def __init__(
        self, job_id: str, source: BlockDevice, target: BlockDevice, *, on_target_error: str, **kwargs: Any
    ) -> None:
        super().__init__(job_id, **kwargs)
        self.source = source
        self.target = target
        self.on_target_error = OnError(on_target_error)
        self.progress_set_remaining(source.size)  # QEMU knows len as soon as the job exists

    async def run(self) -> None:
        size = self.source.size
        for offset in range(0, size, CHUNK):
            length = min(CHUNK, size - offset)
            data = await self.source.pread(offset, length)
            while True:
                await self.pause_point()
                try:
                    await self.target.pwrite(offset, data)
                    break
                except OSError as exc:
                    if await self.handle_error(exc, self.on_target_error, is_read=False) is ErrorAction.REPORT:
                        raise
            self.progress_done(length)
            await self.throttle(length)
        await self.target.flush()


class BackupAction:
    """Our blockdev-backup transaction action, shaped as QEMU's (see backup/transaction.py)."""

    def __init__(self, side: OurSide, txn: Transaction, spec: Json) -> None:
        self.side = side
        self.txn = txn
        self.spec = spec
        self.job: CopyJob | None = None

    async def prepare(self) -> None:
        device = await self.side.open_target(self.spec.get("target", "file"))
        opts = {k: v for k, v in self.spec.items() if k not in ("backup", "target")}
        self.job = self.side.make_job(self.spec["backup"], device, opts)
        self.txn.add_job(self.job)
        self.job.pause_internal()  # the drained section of the action

    def commit(self) -> None:
        assert self.job is not None
        self.job.start()

    async def abort(self) -> None:
        if self.job is None:
            return
        with contextlib.suppress(JobStateError):  # its group may have aborted it already
            self.job.cancel(force=True)
        await self.job.wait()

    async def clean(self) -> None:
        if self.job is not None and self.job.started:
            self.job.resume_internal()


class Side(ABC):
    """One daemon under test, seen the way a QMP client sees it."""

    def __init__(self, workdir: Path, source: Path) -> None:
        self.workdir = workdir
        self.source = source
        self.fault = workdir / "fault"
        # a second disk: a transaction of backups of *different* disks (QEMU resumes jobs of one
        # shared drained node in its own order)
        self.source2 = workdir / "src2.img"
        self.source2.write_bytes(source.read_bytes()[::-1])
        self.stack = contextlib.AsyncExitStack()
        # peers (nbdkit) stop after the daemon that is their client: nbdkit waits for its clients
        self.peers = contextlib.ExitStack()
        self.stack.enter_context(self.peers)
        self.targets = itertools.count()

    async def backup(self, job_id: str, target: str = "file", /, **opts: Any) -> str | None:
        """Start a backup; returns the error text if refused. ``target``: "file" or "nbd:ERR".

        Consumes the start-up events (created, running, paused, running: the job starts inside the
        command's drained section), so later waits only see what the scenario caused.
        """
        error = await self._backup(job_id, target, **opts)
        if error is None:
            for status in ("created", "running", "paused", "running"):
                await self.wait_status(job_id, status)
        return error

    @abstractmethod
    async def _backup(self, job_id: str, target: str, /, **opts: Any) -> str | None: ...

    @abstractmethod
    async def transaction(self, actions: list[Json], *, grouped: bool = False) -> str | None:
        """Run a transaction of ``{"backup": ID, "target": T, **opts}`` / ``{"abort": True}`` actions."""

    @abstractmethod
    async def verb(self, command: str, **args: Any) -> str | None:
        """Run a job verb command (job-pause …, block-job-set-speed); returns the error text or None."""

    @abstractmethod
    async def wait(self, name: str, match: Callable[[Json], bool]) -> None:
        """Wait for the oldest event not consumed by an earlier wait that matches; consume it."""

    @abstractmethod
    async def query(self, command: str) -> list[Json]: ...

    @abstractmethod
    def events(self) -> list[tuple[str, Json]]: ...

    async def wait_status(self, job_id: str, status: str) -> None:
        await self.wait("JOB_STATUS_CHANGE", lambda d: d["id"] == job_id and d["status"] == status)

    def job_events(self, job_id: str, *, drop: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
        return job_events_of(self.events(), job_id, drop=drop)

    def nbd_target_args(self, err: str) -> list[str]:
        return [
            "--filter=error",
            "memory",
            str(SIZE),
            f"error-pwrite={err}",
            "error-pwrite-rate=1",
            f"error-pwrite-file={self.fault}",
        ]


class QemuSide(Side):
    async def start(self) -> QemuSide:
        qsd = self.stack.enter_context(Qsd.start(self.workdir))
        self.qmp: QmpAsync = await qsd.connect_async()
        self.stack.push_async_callback(self.qmp.close)
        await self.qmp.ok("blockdev-add", driver="file", filename=str(self.source), **{"node-name": "src"})
        await self.qmp.ok("blockdev-add", driver="file", filename=str(self.source2), **{"node-name": "src2"})
        return self

    async def _add_target(self, target: str) -> str:
        if target == "nope":
            return target  # a node that does not exist
        node = f"t{next(self.targets)}"
        if target == "file":
            path = self.workdir / f"{node}.img"
            path.write_bytes(b"")
            os.truncate(path, SIZE)
            await self.qmp.ok("blockdev-add", driver="file", filename=str(path), **{"node-name": node})
        else:
            sock = self.peers.enter_context(nbdkit_unix(self.workdir, node, *self.nbd_target_args(target[4:])))
            server = {"type": "unix", "path": str(sock)}
            await self.qmp.ok("blockdev-add", driver="nbd", server=server, **{"node-name": node})
        return node

    async def _backup(self, job_id: str, target: str, /, **opts: Any) -> str | None:
        node = await self._add_target(target)
        reply = await self.qmp.execute(
            "blockdev-backup", device="src", target=node, sync="full", **{"job-id": job_id}, **opts
        )
        return reply["error"]["desc"] if "error" in reply else None

    async def transaction(self, actions: list[Json], *, grouped: bool = False) -> str | None:
        wire: list[Json] = []
        for spec in actions:
            if spec.get("abort"):
                wire.append({"type": "abort", "data": {}})
                continue
            opts = {k: v for k, v in spec.items() if k not in ("backup", "target", "device")}
            node = await self._add_target(spec.get("target", "file"))
            device = spec.get("device", "src")
            data = {"device": device, "target": node, "sync": "full", "job-id": spec["backup"], **opts}
            wire.append({"type": "blockdev-backup", "data": data})
        args: Json = {"actions": wire}
        if grouped:
            args["properties"] = {"completion-mode": "grouped"}
        reply = await self.qmp.execute("transaction", args)
        return reply["error"]["desc"] if "error" in reply else None

    async def verb(self, command: str, **args: Any) -> str | None:
        reply = await self.qmp.execute(command, **args)
        return reply["error"]["desc"] if "error" in reply else None

    async def wait(self, name: str, match: Callable[[Json], bool]) -> None:
        await self.qmp.wait_event(name, match)

    async def query(self, command: str) -> list[Json]:
        result: list[Json] = await self.qmp.ok(command)
        return result

    def events(self) -> list[tuple[str, Json]]:
        return self.qmp.transcript.events()


class OurSide(Side):
    async def start(self) -> OurSide:
        from backup.rawfile import RawFileDevice

        self.bus = EventBus()
        self.seen: list[Event] = []
        self.unconsumed: list[Event] = []
        self.arrived = asyncio.Event()
        self.bus.subscribe(self._on_event)
        self.jobs: dict[str, Job] = {}
        self.src = await RawFileDevice.open(self.source, read_only=True)
        self.stack.push_async_callback(self.src.close)
        self.src2 = await RawFileDevice.open(self.source2, read_only=True)
        self.stack.push_async_callback(self.src2.close)
        return self

    def _on_event(self, event: Event) -> None:
        self.seen.append(event)
        self.unconsumed.append(event)
        if event.name == "JOB_STATUS_CHANGE" and event.data["status"] == "null":
            self.jobs.pop(event.data["id"], None)
        self.arrived.set()
        self.arrived = asyncio.Event()

    async def open_target(self, target: str) -> BlockDevice:
        from backup.rawfile import RawFileDevice
        from nbd.client import NbdClient

        if target == "nope":
            raise BackupError(f"Cannot find device='{target}' nor node-name='{target}'")
        node = f"t{next(self.targets)}"
        device: BlockDevice
        if target == "file":
            device = await RawFileDevice.create(str(self.workdir / f"{node}.img"), SIZE)
        else:
            sock = self.peers.enter_context(nbdkit_unix(self.workdir, node, *self.nbd_target_args(target[4:])))
            device = await NbdClient.connect(f"nbd+unix:///?socket={sock}", connections=1)
        self.stack.push_async_callback(device.close)
        return device

    def make_job(self, job_id: str, device: BlockDevice, opts: Json) -> CopyJob:
        if job_id in self.jobs:
            raise BackupError(f"Job ID '{job_id}' already in use")
        job = CopyJob(
            job_id,
            self.src2 if opts.get("device") == "src2" else self.src,
            device,
            events=self.bus,
            on_target_error=opts.get("on-target-error", "report"),
            speed=opts.get("speed", 0),
            auto_finalize=opts.get("auto-finalize", True),
            auto_dismiss=opts.get("auto-dismiss", True),
        )
        self.jobs[job_id] = job
        return job

    async def _backup(self, job_id: str, target: str, /, **opts: Any) -> str | None:
        # blockdev-backup is a transaction of one action
        return await self.transaction([{"backup": job_id, "target": target, **opts}])

    async def transaction(self, actions: list[Json], *, grouped: bool = False) -> str | None:
        txn = Transaction(CompletionMode.GROUPED if grouped else CompletionMode.INDIVIDUAL)
        steps: list[TransactionAction] = [
            AbortAction() if spec.get("abort") else BackupAction(self, txn, spec) for spec in actions
        ]
        try:
            await run_transaction(steps)
        except BackupError as exc:
            return str(exc)
        return None

    async def verb(self, command: str, **args: Any) -> str | None:
        job = self.jobs.get(args.get("id") or args.get("device", ""))
        if job is None:
            return "Job not found"
        actions: dict[str, Callable[[], None]] = {
            "job-pause": job.pause,
            "job-resume": job.resume,
            "job-cancel": lambda: job.cancel(force=True),
            "job-complete": job.complete,
            "job-finalize": job.finalize,
            "job-dismiss": job.dismiss,
            "block-job-set-speed": lambda: job.set_speed(args["speed"]),
        }
        try:
            actions[command]()
        except BackupError as exc:
            return str(exc)
        await asyncio.sleep(0)
        return None

    async def wait(self, name: str, match: Callable[[Json], bool]) -> None:
        while True:
            for index, event in enumerate(self.unconsumed):
                if event.name == name and match(event.data):
                    del self.unconsumed[index]
                    return
            await self.arrived.wait()

    async def query(self, command: str) -> list[Json]:
        if command == "query-jobs":
            return [job.query_job() for job in self.jobs.values()]
        return [job.query_block_job() for job in self.jobs.values()]

    def events(self) -> list[tuple[str, Json]]:
        return [(e.name, e.data) for e in self.seen]


Scenario = Callable[[Side], Awaitable[list[Any]]]


def without(items: list[Json], *keys: str) -> list[Json]:
    return [{k: v for k, v in item.items() if k not in keys} for item in items]


async def scenario_success(side: Side) -> list[Any]:
    assert await side.backup("j") is None
    await side.wait_status("j", "null")
    return side.job_events("j")


async def scenario_manual_finalize_dismiss(side: Side) -> list[Any]:
    obs: list[Any] = [await side.backup("j", **{"auto-finalize": False, "auto-dismiss": False})]
    await side.wait_status("j", "pending")
    await side.wait("BLOCK_JOB_PENDING", lambda d: d["id"] == "j")
    obs += [await side.query("query-jobs"), without(await side.query("query-block-jobs"), "busy")]
    obs.append(await side.verb("job-dismiss", id="j"))
    obs.append(await side.verb("job-finalize", id="j"))
    await side.wait_status("j", "concluded")
    obs += [await side.query("query-jobs"), await side.query("query-block-jobs")]
    obs.append(await side.verb("job-cancel", id="j"))
    obs.append(await side.verb("job-pause", id="j"))
    obs.append(await side.verb("job-resume", id="j"))
    obs.append(await side.verb("block-job-set-speed", device="j", speed=-1))
    obs.append(await side.verb("job-complete", id="j"))
    obs.append(await side.verb("job-dismiss", id="j"))
    await side.wait_status("j", "null")
    obs.append(await side.query("query-jobs"))
    obs.append(await side.verb("job-dismiss", id="j"))
    return [*obs, side.job_events("j")]


async def scenario_throttled_pause_resume_cancel(side: Side) -> list[Any]:
    obs: list[Any] = [await side.backup("j", speed=65536)]
    obs.append(await side.verb("block-job-set-speed", device="j", speed=-1))
    obs.append(await side.verb("job-complete", id="j"))
    obs.append(await side.verb("job-resume", id="j"))
    obs.append(await side.verb("job-pause", id="j"))
    obs.append(await side.verb("job-pause", id="j"))
    await side.wait_status("j", "paused")
    obs.append(without(await side.query("query-block-jobs"), "offset"))
    obs.append(await side.verb("block-job-set-speed", device="j", speed=32768))
    obs.append(await side.verb("job-resume", id="j"))
    await side.wait_status("j", "running")
    obs.append(without(await side.query("query-block-jobs"), "offset", "busy"))
    obs.append(await side.verb("job-cancel", id="j"))
    await side.wait_status("j", "null")
    return [*obs, side.job_events("j", drop=("offset",))]


async def scenario_cancel_paused_keeps_error(side: Side) -> list[Any]:
    obs: list[Any] = [await side.backup("j", speed=65536, **{"auto-dismiss": False})]
    obs.append(await side.verb("job-pause", id="j"))
    await side.wait_status("j", "paused")
    obs.append(await side.verb("job-cancel", id="j"))
    await side.wait_status("j", "concluded")
    obs.append(without(await side.query("query-jobs"), "current-progress"))
    obs.append(without(await side.query("query-block-jobs"), "offset"))
    obs.append(await side.verb("job-dismiss", id="j"))
    await side.wait_status("j", "null")
    return [*obs, side.job_events("j", drop=("offset",))]


async def scenario_negative_speed(side: Side) -> list[Any]:
    obs: list[Any] = [await side.backup("j", speed=-1)]
    await side.wait_status("j", "null")
    return [*obs, await side.query("query-jobs"), side.job_events("j")]


def error_scenario(policy: str, err: str) -> Scenario:
    async def scenario(side: Side) -> list[Any]:
        side.fault.touch()
        obs: list[Any] = [await side.backup("j", f"nbd:{err}", **{"on-target-error": policy})]
        await side.wait("BLOCK_JOB_ERROR", lambda d: d["device"] == "j")
        action = next(d["action"] for name, d in side.events() if name == "BLOCK_JOB_ERROR")
        if action == "stop":
            await side.wait_status("j", "paused")
            obs.append(without(await side.query("query-block-jobs"), "busy"))
            obs.append(await side.verb("job-pause", id="j"))
            obs.append(await side.verb("block-job-set-speed", device="j", speed=100))
            obs.append(await side.verb("block-job-set-speed", device="j", speed=0))
            side.fault.unlink()
            obs.append(await side.verb("job-resume", id="j"))
            obs.append(without(await side.query("query-block-jobs"), "busy", "offset"))
        elif action == "ignore":
            side.fault.unlink()
        await side.wait_status("j", "null")
        events = side.job_events("j")
        collapsed = [e for i, e in enumerate(events) if i == 0 or e != events[i - 1] or e[0] != "BLOCK_JOB_ERROR"]
        return [*obs, collapsed]

    return scenario


async def scenario_stop_retry_then_cancel(side: Side) -> list[Any]:
    """Resume with the fault still there stops again; cancel while stopped ends the job."""
    side.fault.touch()
    obs: list[Any] = [await side.backup("j", "nbd:EIO", **{"on-target-error": "stop", "auto-dismiss": False})]
    await side.wait_status("j", "paused")
    obs.append(await side.verb("job-resume", id="j"))
    await side.wait_status("j", "running")
    await side.wait_status("j", "paused")
    obs.append(without(await side.query("query-block-jobs"), "busy"))
    obs.append(await side.verb("job-cancel", id="j"))
    await side.wait_status("j", "concluded")
    obs.append(await side.query("query-jobs"))
    obs.append(without(await side.query("query-block-jobs"), "busy"))
    obs.append(await side.verb("job-dismiss", id="j"))
    events = side.job_events("j")
    assert [name for name, _ in events].count("BLOCK_JOB_ERROR") == 2
    return [*obs, events]


def all_events(side: Side, *, drop: tuple[str, ...] = ("offset",)) -> list[tuple[Any, ...]]:
    """Every event in order, status changes as ("status", id, S), others without ``drop`` fields."""
    out: list[tuple[Any, ...]] = []
    for name, data in side.events():
        if name == "JOB_STATUS_CHANGE":
            out.append(("status", data["id"], data["status"]))
        else:
            out.append((name, {k: v for k, v in data.items() if k not in drop}))
    return out


async def scenario_txn_abort(side: Side) -> list[Any]:
    error = await side.transaction([{"backup": "t1"}, {"backup": "t2", "device": "src2"}, {"abort": True}])
    await side.wait_status("t1", "null")
    return [error, await side.query("query-jobs"), all_events(side)]


async def scenario_txn_failing_second_action(side: Side) -> list[Any]:
    error = await side.transaction([{"backup": "x1"}, {"backup": "x2", "device": "src2", "target": "nope"}])
    await side.wait_status("x1", "null")
    dup = await side.transaction([{"backup": "y1"}, {"backup": "y1", "device": "src2"}])
    await side.wait_status("y1", "null")
    return [error, dup, await side.query("query-jobs"), all_events(side)]


async def scenario_txn_individual(side: Side) -> list[Any]:
    error = await side.transaction([{"backup": "t1"}, {"backup": "t2", "device": "src2"}])
    await side.wait_status("t1", "null")
    await side.wait_status("t2", "null")
    events = all_events(side)
    return [error, events[:8], side.job_events("t1"), side.job_events("t2")]


SLOW = 256 << 10  # g1 sleeps for seconds after its first chunk; set-speed 0 wakes it


async def scenario_txn_grouped_complete_together(side: Side) -> list[Any]:
    error = await side.transaction([{"backup": "g1", "speed": SLOW}, {"backup": "g2", "device": "src2"}], grouped=True)
    await side.wait_status("g2", "waiting")
    obs = [error, await side.verb("block-job-set-speed", device="g1", speed=0)]
    await side.wait_status("g1", "null")
    return [*obs, all_events(side)]


async def scenario_txn_grouped_manual_finalize(side: Side) -> list[Any]:
    actions: list[Json] = [{"backup": "g1", "speed": SLOW, "auto-finalize": False}, {"backup": "g2", "device": "src2"}]
    error = await side.transaction(actions, grouped=True)
    await side.wait_status("g2", "waiting")
    obs = [error, await side.verb("block-job-set-speed", device="g1", speed=0)]
    await side.wait("BLOCK_JOB_PENDING", lambda d: d["id"] == "g1")
    obs.append(await side.verb("job-finalize", id="g2"))
    await side.wait_status("g1", "null")
    return [*obs, all_events(side)]


async def scenario_txn_grouped_one_fails(side: Side) -> list[Any]:
    side.fault.touch()
    error = await side.transaction(
        [{"backup": "g1", "speed": SLOW}, {"backup": "g2", "device": "src2", "target": "nbd:EIO"}], grouped=True
    )
    await side.wait_status("g1", "null")
    return [error, all_events(side)]


async def scenario_txn_grouped_cancel_waiting(side: Side) -> list[Any]:
    error = await side.transaction([{"backup": "g1"}, {"backup": "g2", "device": "src2", "speed": SLOW}], grouped=True)
    await side.wait_status("g1", "waiting")
    obs = [error, await side.verb("job-cancel", id="g1")]
    await side.wait_status("g1", "null")
    return [*obs, all_events(side)]


SCENARIOS: dict[str, Scenario] = {
    "success": scenario_success,
    "manual-finalize-dismiss": scenario_manual_finalize_dismiss,
    "throttled-pause-resume-cancel": scenario_throttled_pause_resume_cancel,
    "cancel-paused-keeps-error": scenario_cancel_paused_keeps_error,
    "negative-speed": scenario_negative_speed,
    "report-EIO": error_scenario("report", "EIO"),
    "stop-EIO": error_scenario("stop", "EIO"),
    "enospc-ENOSPC": error_scenario("enospc", "ENOSPC"),
    "enospc-EIO": error_scenario("enospc", "EIO"),
    "auto-ENOSPC": error_scenario("auto", "ENOSPC"),
    "ignore-EIO": error_scenario("ignore", "EIO"),
    "stop-retry-then-cancel": scenario_stop_retry_then_cancel,
    "txn-abort": scenario_txn_abort,
    "txn-failing-second-action": scenario_txn_failing_second_action,
    "txn-individual": scenario_txn_individual,
    "txn-grouped-complete-together": scenario_txn_grouped_complete_together,
    "txn-grouped-manual-finalize": scenario_txn_grouped_manual_finalize,
    "txn-grouped-one-fails": scenario_txn_grouped_one_fails,
    "txn-grouped-cancel-waiting": scenario_txn_grouped_cancel_waiting,
}


@contextlib.asynccontextmanager
async def side_of(kind: type[QemuSide] | type[OurSide], workdir: Path, source: Path) -> AsyncIterator[Side]:
    os.mkdir(workdir)
    side = kind(workdir, source)
    try:
        yield await side.start()
    finally:
        await side.stack.aclose()


@pytest.fixture(scope="module")
def source_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "src.img"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_same_as_qemu_storage_daemon(name: str, tmp_path: Path, source_image: Path) -> None:
    require("qemu-storage-daemon", "nbdkit")
    scenario = SCENARIOS[name]
    async with side_of(QemuSide, tmp_path / "qemu", source_image) as qemu:
        expected = await asyncio.wait_for(scenario(qemu), 60)
    async with side_of(OurSide, tmp_path / "ours", source_image) as ours:
        got = await asyncio.wait_for(scenario(ours), 60)
    assert got == expected


async def test_recorded_qemu_sequences(tmp_path: Path, source_image: Path) -> None:
    """Pin what the docstring of backup/job.py states about qemu-storage-daemon 7.2."""
    require("qemu-storage-daemon", "nbdkit")
    async with side_of(QemuSide, tmp_path / "qemu", source_image) as qemu:
        assert await scenario_success(qemu) == [
            ("status", "created"),
            ("status", "running"),
            ("status", "paused"),
            ("status", "running"),
            ("status", "waiting"),
            ("status", "pending"),
            ("BLOCK_JOB_COMPLETED", {"type": "backup", "device": "j", "len": SIZE, "offset": SIZE, "speed": 0}),
            ("status", "concluded"),
            ("status", "null"),
        ]
        qemu.fault.touch()
        assert await qemu.backup("r", "nbd:EIO") is None
        await qemu.wait_status("r", "null")
        assert qemu.job_events("r")[4:] == [
            ("BLOCK_JOB_ERROR", {"device": "r", "operation": "write", "action": "report"}),
            ("status", "aborting"),
            (
                "BLOCK_JOB_COMPLETED",
                {"type": "backup", "device": "r", "len": SIZE, "offset": 0, "speed": 0, "error": "Input/output error"},
            ),
            ("status", "concluded"),
            ("status", "null"),
        ]


def test_harness_sync_client(qsd_daemon: Qsd, source_image: Path) -> None:  # noqa: F811 (the fixture)
    """The blocking client: replies with their ids, errors, events in order, waits that consume."""
    with qsd_daemon.connect() as qmp:
        assert "qemu" in qmp.greeting["QMP"]["version"]
        version = qmp.ok("query-version")
        assert version["qemu"]["major"] >= 7
        reply = qmp.execute("job-cancel", id="nope")
        assert reply["error"] == {"class": "GenericError", "desc": "Job not found"} and reply["id"] == 3
        qmp.ok("blockdev-add", driver="file", filename=str(source_image), **{"node-name": "src"})
        qmp.ok("blockdev-add", driver="null-co", size=SIZE, **{"node-name": "sink"})
        qmp.ok("blockdev-backup", device="src", target="sink", sync="full", **{"job-id": "j"})
        assert qmp.wait_job_status("j", "null")["data"] == {"id": "j", "status": "null"}
        assert qmp.wait_job_status("j", "created")["event"] == "JOB_STATUS_CHANGE"  # older events stay queued
        assert qmp.transcript.job_statuses("j")[-1] == "null"
        assert [name for name, _ in qmp.transcript.job_events("j") if name != "status"] == ["BLOCK_JOB_COMPLETED"]
        with pytest.raises(TimeoutError):
            qmp.wait_event("BLOCK_JOB_ERROR", timeout=0.2)
