"""``nbd-backup backup`` end to end against a running daemon: a live backup to a file and to an NBD
target, progress lines, and the exit status when the backup cannot start, fails, or is cancelled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from conftest import require
from peers import nbdkit_unix
from qmp_daemon import OurDaemon, make_image, nbd_backup_argv, our_daemon

ROOT = Path(__file__).resolve().parent.parent
SIZE = 4 << 20


def backup(daemon: OurDaemon, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        nbd_backup_argv("backup", "--qmp", f"unix:{daemon.qmp_path}", *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def add_disk(daemon: OurDaemon, image: Path, name: str = "disk0") -> None:
    with daemon.connect() as q:
        q.ok("blockdev-add", driver="file", filename=str(image), **{"node-name": name})


def test_backup_to_file_with_progress_fd(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw", SIZE)
    progress = tmp_path / "progress.txt"
    with our_daemon(tmp_path / "run") as daemon:
        add_disk(daemon, image)
        with open(progress, "w") as out:
            proc = subprocess.run(
                nbd_backup_argv(
                    "backup", "--qmp", f"unix:{daemon.qmp_path}", "disk0", str(tmp_path / "b.qcow2"),
                    "--format", "qcow2", "--speed", "16M", f"--progress={out.fileno()}",
                ),
                capture_output=True,
                text=True,
                timeout=120,
                cwd=ROOT,
                pass_fds=(out.fileno(),),
            )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "completed" in proc.stderr
        with daemon.connect() as q:
            assert q.ok("query-block-jobs") == []
    lines = progress.read_text().split()
    assert lines and lines[-1] == "100/100"
    require("qemu-img")
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(image), str(tmp_path / "b.qcow2")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_backup_to_nbd_target(tmp_path: Path) -> None:
    require("nbdkit")
    image = make_image(tmp_path / "disk.raw", SIZE)
    target = tmp_path / "t.raw"
    target.write_bytes(b"")
    os.truncate(target, SIZE)
    with our_daemon(tmp_path / "run") as daemon, nbdkit_unix(tmp_path, "t", "file", str(target)) as sock:
        add_disk(daemon, image)
        proc = backup(daemon, "disk0", f"nbd+unix:///?socket={sock}", "--mode", "existing", "--no-progress")
        assert proc.returncode == 0, proc.stderr
    assert target.read_bytes() == image.read_bytes()


def test_exit_status_when_backup_cannot_start(tmp_path: Path) -> None:
    with our_daemon(tmp_path / "run") as daemon:
        proc = backup(daemon, "nope", str(tmp_path / "b.raw"))
        assert proc.returncode == 1
        assert "Cannot find device='nope'" in proc.stderr
    proc = subprocess.run(
        nbd_backup_argv("backup", "--qmp", f"unix:{tmp_path}/absent.sock", "d", str(tmp_path / "b.raw")),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 1 and "cannot reach the daemon" in proc.stderr


def test_exit_status_when_backup_fails(tmp_path: Path) -> None:
    require("nbdkit")
    image = make_image(tmp_path / "disk.raw", SIZE)
    with (
        our_daemon(tmp_path / "run") as daemon,
        nbdkit_unix(
            tmp_path, "bad", "--filter=error", "memory", str(SIZE), "error-pwrite-rate=100%", "error=EIO"
        ) as sock,
    ):
        add_disk(daemon, image)
        proc = backup(daemon, "disk0", f"nbd+unix:///?socket={sock}", "--mode", "existing", "--no-progress")
        assert proc.returncode == 1, proc.stderr
        assert "backup failed: Input/output error" in proc.stderr
        with daemon.connect() as q:
            assert q.ok("query-jobs") == []


def test_exit_status_when_cancelled(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw", SIZE)
    with our_daemon(tmp_path / "run") as daemon:
        add_disk(daemon, image)
        result: list[subprocess.CompletedProcess[str]] = []
        worker = threading.Thread(
            target=lambda: result.append(backup(daemon, "disk0", str(tmp_path / "b.raw"), "--speed", "1", "-q"))
        )
        worker.start()
        with daemon.connect() as q:
            deadline = time.monotonic() + 60
            while not q.ok("query-block-jobs") and time.monotonic() < deadline:
                time.sleep(0.05)
            q.ok("block-job-cancel", device="disk0")
        worker.join(120)
        assert result and result[0].returncode == 1
        assert "cancelled" in result[0].stderr


def test_ctrl_c_cancels_the_job(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw", SIZE)
    with our_daemon(tmp_path / "run") as daemon:
        add_disk(daemon, image)
        with daemon.connect() as q:
            proc = subprocess.Popen(
                nbd_backup_argv(
                    "backup", "--qmp", f"unix:{daemon.qmp_path}", "disk0", str(tmp_path / "b.raw"), "--speed", "1"
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            try:
                q.wait_job_status("disk0", "running", timeout=60)  # the CLI has sent drive-backup
                proc.send_signal(signal.SIGINT)
                _, stderr = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            assert proc.returncode == 130, stderr
            assert "cancelled" in stderr
            q.wait_event("BLOCK_JOB_CANCELLED", lambda d: d["device"] == "disk0", timeout=30)
            q.wait_job_status("disk0", "null", timeout=30)
            assert q.ok("query-jobs") == []


def test_incremental_backup_by_bitmap(tmp_path: Path) -> None:
    """A full backup, guest writes through the daemon's node, then ``--sync incremental --bitmap`` into an
    overlay of the full one: the chain reads as the disk, and the overlay holds only the written clusters."""
    require("qemu-img", "qemu-io")
    image = make_image(tmp_path / "disk.raw", SIZE)
    full, inc = tmp_path / "full.qcow2", tmp_path / "inc.qcow2"
    with our_daemon(tmp_path / "run") as daemon:
        add_disk(daemon, image)
        with daemon.connect() as q:
            q.ok("block-dirty-bitmap-add", node="disk0", name="b0")
        proc = backup(daemon, "disk0", str(full), "--format", "qcow2")
        assert proc.returncode == 0, proc.stderr
        sock = tmp_path / "nbd.sock"
        with daemon.connect() as q:
            q.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
            q.ok("block-export-add", type="nbd", id="e", name="disk0", writable=True, **{"node-name": "disk0"})
        writes = [("0x5a", 65536 + 100, 1000), ("0x5b", 3 << 20, 65536)]
        commands = [
            arg for pattern, offset, length in writes for arg in ("-c", f"write -P {pattern} {offset} {length}")
        ]
        subprocess.run(["qemu-io", "-f", "raw", *commands, f"nbd+unix:///disk0?socket={sock}"], check=True, timeout=60)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(full), "-F", "qcow2", str(inc)], check=True
        )
        proc = backup(daemon, "disk0", str(inc), "--format", "qcow2", "--mode", "existing", "--sync", "incremental",
                      "--bitmap", "b0")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        with daemon.connect() as q:
            q.ok("block-export-del", id="e")
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(image), str(inc)], capture_output=True
    )
    assert compare.returncode == 0, compare.stdout
    top = json.loads(
        subprocess.run(["qemu-img", "map", "--output=json", str(inc)], capture_output=True, check=True).stdout
    )
    held = sorted((e["start"], e["length"]) for e in top if e["depth"] == 0 and e["data"])
    assert held == [(65536, 65536), (3 << 20, 65536)]
