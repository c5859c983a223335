"""Differential QMP tests: the same sequences against qemu-storage-daemon 7.2 and against us.

Each scenario runs once on each daemon and records every reply (a ``return``'s *shape*, an error's
class and text) and, per job, the event sequence. Normalised away: timestamps, progress numbers
(``len``/``offset``/``current-progress`` …: only their types are compared), and QEMU's transient
``paused``→``running`` pairs that come from its internal drained sections (they appear with no user
command in between; ours has no such drains). Differences we mean to have are asserted separately:
a failed transaction leaves no target file behind with us (QEMU leaves the file it created).
"""

from __future__ import annotations

import filecmp
import json
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import require
from peers import nbdkit_unix
from qmp_daemon import make_image, our_daemon
from qsd import QmpSync, Qsd

SIZE = 4 << 20
SLOW = 64 << 10  # bytes/s: a job that is still running when the next command arrives
USER_VERBS = {"block-job-pause", "block-job-resume", "job-pause", "job-resume", "block-job-cancel", "job-cancel"}
#: Numbers that depend on timing; only their presence and type are compared.
VOLATILE = {"len", "offset", "current-progress", "total-progress", "busy", "filename", "file", "actual-size"}


@dataclass
class Run:
    """What one daemon answered: replies in order, and the transcript for the events."""

    q: QmpSync
    work: Path
    replies: list[Any] = field(default_factory=list)

    def __call__(self, command: str, /, **args: Any) -> dict[str, Any]:
        reply = self.q.execute(command, args)
        normal = normalise_reply(reply)
        if normal[0] == "error":  # each daemon has its own directory: paths in messages differ by it
            normal = (*normal[:2], normal[2].replace(str(self.work), "WORK"))
        self.replies.append((command, normal))
        return reply

    def wait_gone(self, job_id: str) -> None:
        self.q.wait_job_status(job_id, "null", timeout=60)

    def resume_after_error(self, job_id: str, fault: Path) -> dict[str, Any]:
        """A job with on-*-error=stop met ``fault``: wait until it reports the error and pauses, then clear
        the fault, resume it and wait until it is gone; returns ``query-block-jobs`` while it was paused."""
        self.q.wait_event("BLOCK_JOB_ERROR", lambda d: d["device"] == job_id, timeout=60)
        self.q.wait_job_status(job_id, "paused", timeout=60)
        paused = self("query-block-jobs")
        fault.unlink()
        self("block-job-resume", device=job_id)
        self.wait_gone(job_id)
        return paused


def failing_nbdkit(run: Run, name: str, op: str, fault: Path, error: str, *plugin: str) -> AbstractContextManager[Path]:
    """nbdkit serving ``plugin`` whose ``op`` (pread/pwrite) requests fail with ``error`` while ``fault`` exists."""
    fault.touch()
    return nbdkit_unix(
        run.work,
        name,
        "--filter=error",
        *plugin,
        f"error-{op}-rate=100%",
        f"error-{op}-file={fault}",
        f"error={error}",
    )


def shape(value: Any, key: str | None = None) -> Any:
    if key in VOLATILE:
        return type(value).__name__
    if isinstance(value, dict):
        return {k: shape(v, k) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return value


def normalise_reply(reply: dict[str, Any]) -> Any:
    if "error" in reply:
        return ("error", reply["error"]["class"], reply["error"]["desc"])
    return ("return", shape(reply["return"]))


def job_events(q: QmpSync, job_id: str) -> list[Any]:
    """The job's events with drain-induced paused→running pairs removed and repeats collapsed."""
    out: list[Any] = []
    pending_pause: int | None = None  # index in ``out`` of a paused not yet explained by a user command
    for entry in q.transcript.entries:
        if entry[0] == "cmd":
            if entry[1] in USER_VERBS:
                pending_pause = None
            continue
        if entry[0] != "event":
            continue
        name, data = entry[1], entry[2]
        if name == "JOB_STATUS_CHANGE":
            if data["id"] != job_id:
                continue
            status = data["status"]
            if status == "running" and pending_pause is not None and pending_pause == len(out) - 1:
                out.pop()
                pending_pause = None
                continue
            pending_pause = len(out) if status == "paused" else None
            out.append(("status", status))
        elif job_id in (data.get("device"), data.get("id")):
            item = (name, shape(data))
            if not out or out[-1] != item:  # several in-flight requests may fail with one cause
                out.append(item)
            pending_pause = None
    return out


@contextmanager
def qsd_side(work: Path) -> Iterator[Run]:
    with Qsd.start(work) as qsd, qsd.connect() as q:
        yield Run(q, work)


@contextmanager
def our_side(work: Path) -> Iterator[Run]:
    with our_daemon(work) as daemon, daemon.connect() as q:
        yield Run(q, work)


Scenario = Callable[[Run], list[str]]


def differential(tmp_path: Path, scenario: Scenario) -> tuple[Run, Run]:
    """Run ``scenario`` on both daemons, each with node ``src`` (raw over file) of ``SIZE`` bytes;
    compare replies and the events of every job id the scenario returns."""
    require("qemu-storage-daemon", "qemu-img")
    runs: list[Run] = []
    results: list[tuple[list[Any], dict[str, list[Any]]]] = []
    for label, side in (("qsd", qsd_side), ("ours", our_side)):
        work = tmp_path / label
        work.mkdir()
        image = make_image(work / "src.raw", SIZE)
        with side(work) as run:
            run.q.ok("blockdev-add", driver="file", filename=str(image), **{"node-name": "src-file"})
            run.q.ok("blockdev-add", driver="raw", file="src-file", **{"node-name": "src"})
            job_ids = scenario(run)
            results.append((run.replies, {j: job_events(run.q, j) for j in job_ids}))
            runs.append(run)
    (qsd_replies, qsd_events), (our_replies, our_events) = results
    assert our_replies == qsd_replies
    assert our_events == qsd_events
    return runs[0], runs[1]


def target(run: Run, name: str) -> str:
    return str(run.work / name)


# --- scenarios -----------------------------------------------------------------------------------


def test_backup_full(tmp_path: Path) -> None:
    def scenario(run: Run) -> list[str]:
        run("drive-backup", **{"job-id": "j1"}, device="src", target=target(run, "b.raw"), sync="full", format="raw")
        run.wait_gone("j1")
        run("query-block-jobs")
        return ["j1"]

    qsd, ours = differential(tmp_path, scenario)
    for run in (qsd, ours):
        assert filecmp.cmp(run.work / "src.raw", run.work / "b.raw", shallow=False)


def test_cancel(tmp_path: Path) -> None:
    def scenario(run: Run) -> list[str]:
        run("drive-backup", **{"job-id": "j1"}, device="src", target=target(run, "b.raw"), sync="full", speed=SLOW)
        run("block-job-cancel", device="j1")
        run.wait_gone("j1")
        run("block-job-cancel", device="j1")
        run("job-cancel", id="j1")
        run("query-jobs")
        return ["j1"]

    differential(tmp_path, scenario)


def test_pause_resume(tmp_path: Path) -> None:
    def scenario(run: Run) -> list[str]:
        run("drive-backup", **{"job-id": "j1"}, device="src", target=target(run, "b.raw"), sync="full", speed=SLOW)
        run.q.pending_events.clear()  # forget the start's transient paused/running
        run("block-job-pause", device="j1")
        run.q.wait_job_status("j1", "paused", timeout=60)  # QEMU pauses a job busy with I/O a bit later
        run("query-block-jobs")
        run("block-job-pause", device="j1")
        run("block-job-resume", device="j1")
        run("block-job-resume", device="j1")
        run("job-pause", id="j1")
        run("job-pause", id="j1")
        run("job-resume", id="j1")
        run("job-resume", id="j1")
        run("block-job-complete", device="j1")
        run("block-job-set-speed", device="j1", speed=0)
        run.wait_gone("j1")
        return ["j1"]

    differential(tmp_path, scenario)


def test_set_speed_negative(tmp_path: Path) -> None:
    def scenario(run: Run) -> list[str]:
        run("drive-backup", **{"job-id": "j1"}, device="src", target=target(run, "b.raw"), sync="full", speed=SLOW)
        run("block-job-set-speed", device="j1", speed=-1)
        run("query-block-jobs")
        run("block-job-set-speed", device="nope", speed=5)
        run("block-job-set-speed", device="j1", speed=0)
        run.wait_gone("j1")
        return ["j1"]

    differential(tmp_path, scenario)


def test_transaction_with_abort(tmp_path: Path) -> None:
    def scenario(run: Run) -> list[str]:
        backup = {"job-id": "t1", "device": "src", "target": target(run, "t1.raw"), "sync": "full", "format": "raw"}
        run("transaction", actions=[{"type": "drive-backup", "data": backup}, {"type": "abort", "data": {}}])
        run("query-jobs")
        bad = {"job-id": "t2", "device": "src", "target": "nope", "sync": "full"}
        run(
            "transaction",
            actions=[{"type": "drive-backup", "data": backup}, {"type": "blockdev-backup", "data": bad}],
        )
        run("query-block-jobs")
        run("transaction", actions=[{"type": "frob", "data": {}}])
        run("transaction", actions=[{"type": "abort"}])
        run("transaction", actions=[])
        return ["t1", "t2"]

    _, ours = differential(tmp_path, scenario)
    assert not (ours.work / "t1.raw").exists(), "an aborted transaction must leave nothing behind"


def test_unknown_device_and_job(tmp_path: Path) -> None:
    def scenario(run: Run) -> list[str]:
        run("drive-backup", **{"job-id": "j1"}, device="nope", target=target(run, "x.raw"), sync="full")
        run("blockdev-backup", **{"job-id": "j1"}, device="nope", target="src", sync="full")
        run("blockdev-backup", **{"job-id": "j1"}, device="src", target="src", sync="full")
        run("block-job-pause", device="nope")
        run("block-job-resume", device="nope")
        run("block-job-dismiss", id="nope")
        run("block-job-finalize", id="nope")
        run("job-pause", id="nope")
        run("job-dismiss", id="nope")
        run("job-finalize", id="nope")
        run("blockdev-del", **{"node-name": "nope"})
        run("blockdev-del", **{"node-name": "src-file"})
        run("drive-backup", device="src", target=target(run, "x.raw"), sync="bogus")
        run("drive-backup", device="src", target=target(run, "x.raw"))
        return []

    differential(tmp_path, scenario)


def test_duplicate_job_id(tmp_path: Path) -> None:
    def scenario(run: Run) -> list[str]:
        run("drive-backup", **{"job-id": "j1"}, device="src", target=target(run, "a.raw"), sync="full", speed=SLOW)
        run("drive-backup", **{"job-id": "j1"}, device="src", target=target(run, "b.raw"), sync="full")
        run("drive-backup", **{"job-id": "1bad"}, device="src", target=target(run, "c.raw"), sync="full")
        run("query-jobs")
        run("job-cancel", id="j1")
        run.wait_gone("j1")
        return ["j1"]

    differential(tmp_path, scenario)


def test_manual_finalize_and_dismiss(tmp_path: Path) -> None:
    def scenario(run: Run) -> list[str]:
        run(
            "drive-backup",
            **{"job-id": "j1", "auto-finalize": False, "auto-dismiss": False},
            device="src",
            target=target(run, "b.raw"),
            sync="full",
        )
        run.q.wait_job_status("j1", "pending", timeout=60)
        run("job-dismiss", id="j1")
        run("query-jobs")
        run("block-job-finalize", id="j1")
        run.q.wait_job_status("j1", "concluded", timeout=60)
        run("query-block-jobs")
        run("block-job-cancel", device="j1")
        run("block-job-dismiss", id="j1")
        run("query-jobs")
        return ["j1"]

    differential(tmp_path, scenario)


def _backup_into_failing_target(run: Run, sock: Path, policy: str = "stop") -> None:
    """Job ``e1``: the source backed up into a failing target with ``on-target-error: POLICY``."""
    run(
        "drive-backup",
        **{"job-id": "e1", "on-target-error": policy},
        device="src",
        target=f"nbd+unix:///?socket={sock}",
        sync="full",
        format="raw",
        mode="existing",
    )


def test_on_target_error_stop(tmp_path: Path) -> None:
    require("nbdkit")

    def scenario(run: Run) -> list[str]:
        with failing_nbdkit(run, "target", "pwrite", run.work / "fault", "ENOSPC", "memory", str(SIZE)) as sock:
            _backup_into_failing_target(run, sock)
            info = run.resume_after_error("e1", run.work / "fault")
            assert info["return"][0]["io-status"] == "nospace"
        return ["e1"]

    differential(tmp_path, scenario)


def test_cancel_of_a_paused_job_needs_force(tmp_path: Path) -> None:
    """block-job-cancel without force refuses a user-paused job and one stopped by an error (the job
    stays paused); force=true and job-cancel cancel it; once resumed, no force is needed."""
    require("nbdkit")

    def scenario(run: Run) -> list[str]:
        run("drive-backup", **{"job-id": "j1"}, device="src", target=target(run, "j1.raw"), sync="full", speed=SLOW)
        run("drive-backup", **{"job-id": "j2"}, device="src", target=target(run, "j2.raw"), sync="full", speed=SLOW)
        run.q.pending_events.clear()  # forget the starts' transient paused/running
        run("block-job-pause", device="j1")
        run("job-pause", id="j2")
        run.q.wait_job_status("j1", "paused", timeout=60)
        run.q.wait_job_status("j2", "paused", timeout=60)
        run("block-job-cancel", device="j1")
        run("block-job-cancel", device="j1", force=False)
        run("query-block-jobs")
        run("block-job-cancel", device="j2", force=True)
        run.wait_gone("j2")
        run("block-job-resume", device="j1")
        run.q.wait_job_status("j1", "running", timeout=60)
        run("block-job-cancel", device="j1")
        run.wait_gone("j1")
        fault = run.work / "fault"
        with failing_nbdkit(run, "target", "pwrite", fault, "ENOSPC", "memory", str(SIZE)) as sock:
            _backup_into_failing_target(run, sock)
            run.q.pending_events.clear()
            run.q.wait_event("BLOCK_JOB_ERROR", lambda d: d["device"] == "e1", timeout=60)
            run.q.wait_job_status("e1", "paused", timeout=60)
            run("block-job-cancel", device="e1")
            run("query-block-jobs")
            run("job-cancel", id="e1")
            run.wait_gone("e1")
        return ["j1", "j2", "e1"]

    differential(tmp_path, scenario)


@pytest.mark.parametrize("policy", ["report"])
def test_on_target_error_report(tmp_path: Path, policy: str) -> None:
    require("nbdkit")

    def scenario(run: Run) -> list[str]:
        with nbdkit_unix(
            run.work, "target", "--filter=error", "memory", str(SIZE), "error-pwrite-rate=100%", "error=EIO"
        ) as sock:
            _backup_into_failing_target(run, sock, policy)
            run.wait_gone("e1")
        return ["e1"]

    differential(tmp_path, scenario)


def test_nbd_server_and_exports(tmp_path: Path) -> None:
    def scenario(run: Run) -> list[str]:
        sock = {"type": "unix", "data": {"path": str(run.work / "nbd.sock")}}
        run("block-export-add", type="nbd", id="e0", **{"node-name": "src"})
        run("nbd-server-stop")
        run("nbd-server-start", addr=sock)
        run("nbd-server-start", addr=sock)
        run("block-export-add", type="nbd", id="e0", **{"node-name": "src"}, writable=True, description="d")
        run("block-export-add", type="nbd", id="e0", **{"node-name": "src"})
        run("block-export-add", type="nbd", id="e1", **{"node-name": "nope"})
        run("block-export-add", type="nbd", id="e1", **{"node-name": "src-file"}, name="src")
        run("block-export-add", type="nbd", id="e1", **{"node-name": "src-file"}, name="other")
        run("query-block-exports")
        run("blockdev-del", **{"node-name": "src"})
        run("block-export-del", id="e0")
        run("block-export-del", id="e0")
        run("nbd-server-stop")
        run("query-block-exports")
        run("blockdev-del", **{"node-name": "src"})
        return []

    qsd, ours = differential(tmp_path, scenario)
    assert ours.q.transcript.events("BLOCK_EXPORT_DELETED") == qsd.q.transcript.events("BLOCK_EXPORT_DELETED")


def test_blockdev_add_and_del(tmp_path: Path) -> None:
    def scenario(run: Run) -> list[str]:
        other = make_image(run.work / "other.raw", SIZE)
        run("query-named-block-nodes")
        run("blockdev-add", driver="file", filename=str(other), **{"node-name": "src"})
        run("blockdev-add", driver="file", filename=str(run.work / "missing.raw"), **{"node-name": "x"})
        run("blockdev-add", driver="file", filename=str(run.work), **{"node-name": "x"})
        run("blockdev-add", driver="raw", file="nope", **{"node-name": "x"})
        run("blockdev-add", driver="null-co", **{"node-name": "1bad"})
        run("blockdev-add", driver="null-co")
        run("blockdev-add", driver="qcow2", file={"driver": "file", "filename": str(other)}, **{"node-name": "x"})
        run("blockdev-add", driver="file", filename=str(other), **{"node-name": "o", "read-only": True})
        run("query-named-block-nodes")
        run("blockdev-del", **{"node-name": "o"})
        run("blockdev-del", **{"node-name": "o"})
        run("blockdev-del", **{"node-name": "src-file"})
        run("blockdev-del", **{"node-name": "src"})
        run("blockdev-del", **{"node-name": "src-file"})
        run("query-named-block-nodes")
        return []

    differential(tmp_path, scenario)


def test_blockdev_backup_to_nbd_node(tmp_path: Path) -> None:
    require("nbdkit")

    def scenario(run: Run) -> list[str]:
        with nbdkit_unix(run.work, "target", "memory", str(SIZE)) as sock:
            server = {"type": "unix", "path": str(sock)}
            run("blockdev-add", driver="nbd", server=server, **{"node-name": "tgt"})
            run(
                "blockdev-add",
                driver="nbd",
                server={"type": "unix", "path": str(run.work / "none")},
                **{"node-name": "x"},
            )
            run("blockdev-backup", **{"job-id": "b1"}, device="src", target="tgt", sync="full")
            run.wait_gone("b1")
            run("blockdev-backup", **{"job-id": "b2"}, device="src", target="tgt", sync="full", speed=SLOW)
            run("blockdev-del", **{"node-name": "tgt"})
            run("block-job-cancel", device="b2")
            run.wait_gone("b2")
            run("blockdev-del", **{"node-name": "tgt"})
        return ["b1", "b2"]

    differential(tmp_path, scenario)


def test_legacy_nbd_server_add_remove(tmp_path: Path) -> None:
    def scenario(run: Run) -> list[str]:
        run("nbd-server-add", device="src")
        run("nbd-server-remove", name="src")
        run("nbd-server-start", addr={"type": "unix", "data": {"path": str(run.work / "nbd.sock")}})
        run("blockdev-add", driver="null-co", size=SIZE, **{"node-name": "ro", "read-only": True})
        run("nbd-server-add", device="src", writable=True)
        run("nbd-server-add", device="ro", writable=True, name="r", description="read only")
        run("nbd-server-add", device="nope")
        run("nbd-server-add", device="src")
        run("query-block-exports")
        run("nbd-server-remove", name="src")
        run("nbd-server-remove", name="src")
        run("nbd-server-remove", name="r", mode="hard")
        run("query-block-exports")
        return []

    qsd, ours = differential(tmp_path, scenario)
    assert ours.q.transcript.events("BLOCK_EXPORT_DELETED") == qsd.q.transcript.events("BLOCK_EXPORT_DELETED")


def test_sync_none_and_top_new_images(tmp_path: Path) -> None:
    def scenario(run: Run) -> list[str]:
        run("drive-backup", **{"job-id": "n0"}, device="src", target=target(run, "n0.raw"), sync="none")
        run(
            "drive-backup",
            **{"job-id": "n1"},
            device="src",
            target=target(run, "n1.qcow2"),
            sync="none",
            format="qcow2",
        )
        run("query-block-jobs")
        run("block-job-cancel", device="n1")
        run.wait_gone("n1")
        # sync=top of an image without a backing file copies everything, like full
        run("drive-backup", **{"job-id": "t0"}, device="src", target=target(run, "t0.raw"), sync="top")
        run.wait_gone("t0")
        return ["n0", "n1", "t0"]

    qsd, ours = differential(tmp_path, scenario)
    for run in (qsd, ours):
        assert filecmp.cmp(run.work / "src.raw", run.work / "t0.raw", shallow=False)
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", str(run.work / "n1.qcow2")],
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(info.stdout)["full-backing-filename"] == str(run.work / "src.raw")


def test_sync_top_of_a_qcow2_with_backing(tmp_path: Path) -> None:
    def scenario(run: Run) -> list[str]:
        base = make_image(run.work / "base.raw", SIZE, pattern=0x11)
        top = run.work / "top.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(top)], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x77 1M 512K", str(top)], check=True)
        run("blockdev-add", driver="qcow2", file={"driver": "file", "filename": str(top)}, **{"node-name": "top"})
        run("drive-backup", **{"job-id": "k"}, device="top", target=target(run, "k.qcow2"), sync="top")
        run.wait_gone("k")
        return ["k"]

    qsd, ours = differential(tmp_path, scenario)
    for run in (qsd, ours):
        compare = subprocess.run(
            ["qemu-img", "compare", str(run.work / "top.qcow2"), str(run.work / "k.qcow2")],
            capture_output=True,
            text=True,
        )
        assert compare.returncode == 0, compare.stdout + compare.stderr
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", str(run.work / "k.qcow2")], capture_output=True, text=True, check=True
        )
        assert json.loads(info.stdout)["full-backing-filename"] == str(run.work / "base.raw")
        mapping = subprocess.run(
            ["qemu-img", "map", "--output=json", str(run.work / "k.qcow2")], capture_output=True, text=True, check=True
        )
        in_top = [m for m in json.loads(mapping.stdout) if m["depth"] == 0 and m["data"]]
        assert [(m["start"], m["length"]) for m in in_top] == [(1 << 20, 512 << 10)], in_top


def test_two_jobs_listed_newest_first(tmp_path: Path) -> None:
    def scenario(run: Run) -> list[str]:
        for job in ("a1", "a2"):
            run(
                "drive-backup",
                **{"job-id": job},
                device="src",
                target=target(run, f"{job}.raw"),
                sync="full",
                speed=SLOW,
            )
        run("query-jobs")
        run("query-block-jobs")
        run("job-cancel", id="a1")
        run("job-cancel", id="a2")
        run.wait_gone("a1")
        run.wait_gone("a2")
        return ["a1", "a2"]

    differential(tmp_path, scenario)


def test_on_source_error_stop(tmp_path: Path) -> None:
    require("nbdkit")

    def scenario(run: Run) -> list[str]:
        remote = make_image(run.work / "remote.raw", SIZE, pattern=0x33)
        with failing_nbdkit(run, "source", "pread", run.work / "fault", "EIO", "file", str(remote)) as sock:
            run("blockdev-add", driver="nbd", server={"type": "unix", "path": str(sock)}, **{"node-name": "bad"})
            run(
                "drive-backup",
                **{"job-id": "s1", "on-source-error": "stop"},
                device="bad",
                target=target(run, "s1.raw"),
                sync="full",
                format="raw",
            )
            run.resume_after_error("s1", run.work / "fault")
            run("blockdev-del", **{"node-name": "bad"})
        return ["s1"]

    qsd, ours = differential(tmp_path, scenario)
    for run in (qsd, ours):
        assert filecmp.cmp(run.work / "remote.raw", run.work / "s1.raw", shallow=False)
