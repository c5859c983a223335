"""A backup whose NBD target stops (SIGSTOP), through the daemon over QMP: a guest write through our
export never waits past ``x-cbw-timeout`` — it fails with EIO (``break-guest-write``) or goes through
and fails the backup (``x-on-cbw-error: break-snapshot``) — and however the job ends with the target
still stopped (force cancel, failure), the daemon keeps no connection to the target, which can then
exit on SIGTERM. Outcomes are asserted, not timings; every wait is bounded generously."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import require
from peers import Peer, nbdkit, stop_process
from qmp_daemon import OurDaemon, make_image, our_daemon
from qsd import QmpSync

SIZE = 8 << 20
BLOCK = 4096
BOUND = 60.0  # generous: nothing here may hang


@dataclass
class Rig:
    daemon: OurDaemon
    qmp: QmpSync
    target: Peer
    image: Path
    export_uri: str
    baseline: set[str]  # the daemon's sockets before the backup

    def sockets(self) -> set[str]:
        return daemon_sockets(self.daemon.proc.pid)

    def guest_write(self, pattern: int, offset: int = SIZE - BLOCK) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["qemu-io", "-f", "raw", "-c", f"write -P {pattern:#x} {offset} {BLOCK}", self.export_uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd="/",
        )

    def backup(self, **extra: Any) -> None:
        """A slow full backup to the target; returns once it has copied something."""
        self.qmp.ok(
            "drive-backup",
            {"job-id": "j", "device": "disk0", "target": self.target.uri, "sync": "full", "speed": 1 << 20, **extra},
        )
        wait_for(lambda: any(job["offset"] > 0 for job in self.qmp.ok("query-block-jobs")), "backup progress")

    def last_block(self) -> bytes:
        with open(self.image, "rb") as f:
            f.seek(SIZE - BLOCK)
            return f.read(BLOCK)


def daemon_sockets(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:"):
            found.add(link)
    return found


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = BOUND) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=BOUND)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"qemu-io did not finish: {out}")
    return proc.returncode, out


@contextmanager
def rig(tmp_path: Path) -> Iterator[Rig]:
    require("nbdkit", "qemu-io")
    image = make_image(tmp_path / "disk.raw", SIZE)
    with (
        nbdkit(tmp_path, "memory", f"size={SIZE}", name="target") as target,  # multi-conn: 4 connections
        our_daemon(tmp_path / "run") as daemon,
        daemon.connect(timeout=BOUND) as qmp,
    ):
        sock = tmp_path / "export.sock"
        qmp.ok("blockdev-add", driver="file", filename=str(image), **{"node-name": "disk0"})
        qmp.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        qmp.ok("block-export-add", type="nbd", id="e0", **{"node-name": "disk0"}, writable=True)
        proc = target.procs[0]
        try:
            yield Rig(daemon, qmp, target, image, f"nbd+unix:///disk0?socket={sock}", daemon_sockets(daemon.proc.pid))
        finally:
            proc.send_signal(signal.SIGCONT)
        assert stop_process(proc, 30), "the target could not exit on SIGTERM"


def no_connection_to_the_target(r: Rig) -> None:
    """After the job: the daemon's sockets are what they were before it (the QMP connection and the
    listeners); the target's connections, and the guest's, are gone."""
    wait_for(lambda: r.qmp.ok("query-jobs") == [], "the job to go")
    wait_for(lambda: r.sockets() <= r.baseline, "the daemon's connections to the target to close")


def test_break_guest_write_fails_the_write_then_force_cancel_holds_no_connection(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        old = r.last_block()
        r.backup(**{"x-cbw-timeout": 1})
        r.target.procs[0].send_signal(signal.SIGSTOP)
        rc, out = finish(r.guest_write(0x42))  # its old data cannot reach the stopped target
        assert "write failed: Input/output error" in out, (rc, out)
        assert r.last_block() == old  # refused: the point in time is intact
        assert [job["status"] for job in r.qmp.ok("query-jobs")] == ["running"]  # the backup goes on
        r.qmp.ok("block-job-cancel", device="j", force=True)
        r.qmp.wait_event("BLOCK_JOB_CANCELLED", lambda d: d["device"] == "j", timeout=BOUND)
        no_connection_to_the_target(r)
        assert r.target.procs[0].poll() is None  # still stopped, not dead


def test_break_snapshot_lets_the_write_through_and_fails_the_backup(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.backup(**{"x-cbw-timeout": 1, "x-on-cbw-error": "break-snapshot"})
        r.target.procs[0].send_signal(signal.SIGSTOP)
        rc, out = finish(r.guest_write(0x42))
        assert rc == 0 and "wrote 4096/4096" in out, out
        assert r.last_block() == b"\x42" * BLOCK
        completed = r.qmp.wait_event("BLOCK_JOB_COMPLETED", lambda d: d["device"] == "j", timeout=BOUND)["data"]
        assert completed.get("error") == "Connection timed out", completed
        no_connection_to_the_target(r)  # the failed job closed its target, still stopped


def test_force_cancel_frees_a_guest_write_stuck_on_a_stopped_target(tmp_path: Path) -> None:
    """Without a cbw timeout a guest write waits for its copy; force cancel ends the job promptly, the
    write goes through and no connection to the (still stopped) target is left."""
    with rig(tmp_path) as r:
        r.backup()
        r.target.procs[0].send_signal(signal.SIGSTOP)
        with_target = r.sockets()
        writer = r.guest_write(0x43)
        wait_for(lambda: bool(r.sockets() - with_target) or writer.poll() is not None, "the guest's connection")
        r.qmp.ok("block-job-cancel", device="j", force=True)
        r.qmp.wait_event("BLOCK_JOB_CANCELLED", lambda d: d["device"] == "j", timeout=BOUND)
        rc, out = finish(writer)
        assert rc == 0 and "wrote 4096/4096" in out, out
        assert r.last_block() == b"\x43" * BLOCK
        no_connection_to_the_target(r)
