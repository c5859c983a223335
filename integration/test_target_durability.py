"""Data safety of backup targets against real peers: an NBD target whose FLUSH fails once (an nbdkit
``eval`` target that fails flushes while a trigger file exists — the error filter of nbdkit 1.32
cannot fail flushes) fails the job whatever its ``on-target-error``, and our client latches the
failure; ``drive-backup`` through the daemon leaves no file behind when cancelled, a clean one in
place when it completes (``qemu-img check``), an existing qcow2 image marked corrupt when it did not
complete; ``nbd-backup serve`` exits non-zero when an image cannot be flushed at shutdown."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from backup_rig import MiB, served_source, start_backup, write_random_image
from conftest import require
from peers import Peer, nbdkit
from qmp_daemon import make_image, start_daemon

from backup.backup_job import BackupOptions
from backup.targets import open_target
from nbd.client import NbdClient

SIZE = 4 * MiB
BOUND = 30.0


@contextmanager
def flaky_flush_target(tmp: Path) -> Iterator[tuple[Peer, Path]]:
    """An nbdkit target backed by a file whose FLUSH fails (EIO) while the returned trigger exists."""
    require("nbdkit")
    image = tmp / "flaky-target.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    trigger = tmp / "flush-fails"
    with nbdkit(
        tmp,
        "eval",
        f"get_size=echo {SIZE}",
        "can_write=exit 0",
        "can_flush=exit 0",
        f"pread=dd if={image} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
        f"pwrite=dd of={image} seek=$4 conv=notrunc oflag=seek_bytes status=none",
        f'flush=if [ -e {trigger} ]; then echo "EIO injected flush failure" >&2; exit 1; fi',
        name="flaky",
    ) as peer:
        yield peer, trigger


async def test_the_nbd_client_latches_a_failed_flush(tmp_path: Path) -> None:
    with flaky_flush_target(tmp_path) as (peer, trigger):
        async with await NbdClient.connect(peer.uri) as client:
            await client.pwrite(0, b"d" * 65536)
            trigger.touch()
            with pytest.raises(OSError) as info:
                await client.flush()
            assert info.value.errno == errno.EIO
            trigger.unlink()  # the server would now say yes …
            async with await NbdClient.connect(peer.uri) as fresh:
                await fresh.flush()
            with pytest.raises(OSError) as info:  # … but the data this client wrote may be gone
                await client.flush()
            assert info.value.errno == errno.EIO and "earlier flush failed" in str(info.value)


@pytest.mark.parametrize("policy", ["ignore", "stop"])
async def test_a_target_flush_failure_fails_the_job_whatever_the_policy(tmp_path: Path, policy: str) -> None:
    require("nbdkit")
    image = write_random_image(tmp_path / "disk.img", SIZE, seed=3)
    with flaky_flush_target(tmp_path) as (peer, trigger):
        trigger.touch()  # the final flush fails once …
        async with served_source(tmp_path, image) as source:
            target = await open_target(peer.uri, size=SIZE)
            backup = await start_backup(source, target, BackupOptions(on_target_error=policy, retry_delay=0.01))
            error = await backup.wait_event("BLOCK_JOB_ERROR")
            trigger.unlink()  # … and would succeed if retried: the job must not retry it into success
            if backup.job.status == "paused":  # not expected: a stop would only be resumed into a "success"
                backup.job.resume()
            await backup.finish(BOUND)
            assert error == {"device": "b0", "operation": "write", "action": "report"}
            assert backup.named("BLOCK_JOB_COMPLETED")[0]["error"] == "Input/output error"
            assert source.node.filters == []


def _qemu_img_json(*args: str) -> dict[str, object]:
    out = subprocess.run(["qemu-img", *args, "--output=json"], capture_output=True, text=True, check=True)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_drive_backup_files_appear_only_when_complete(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    disk = make_image(tmp_path / "disk.raw", SIZE)
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "existing.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(existing), str(SIZE)], check=True)
    daemon = start_daemon(tmp_path / "d")
    try:
        with daemon.connect() as q:
            q.ok("blockdev-add", driver="file", filename=str(disk), **{"node-name": "d0"})
            # A completed backup: in place, clean, equal to the source; nothing temporary is left.
            q.ok(
                "drive-backup",
                **{"job-id": "ok"},
                device="d0",
                target=str(out / "ok.qcow2"),
                sync="full",
                format="qcow2",
            )
            done = q.wait_event("BLOCK_JOB_COMPLETED", lambda d: d["device"] == "ok", timeout=BOUND)
            assert "error" not in done
            q.wait_job_status("ok", "null", timeout=BOUND)
            assert sorted(os.listdir(out)) == ["existing.qcow2", "ok.qcow2"]
            subprocess.run(["qemu-img", "check", "-q", str(out / "ok.qcow2")], check=True)
            subprocess.run(
                ["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(disk), str(out / "ok.qcow2")], check=True
            )
            # Cancelled ones: a new file never appears; an existing qcow2 image is marked corrupt.
            for job_id, target, extra in (
                ("new", out / "new.raw", {}),
                ("old", existing, {"mode": "existing", "format": "qcow2"}),
            ):
                q.ok(
                    "drive-backup",
                    **{"job-id": job_id},
                    device="d0",
                    target=str(target),
                    sync="full",
                    speed=MiB,
                    **extra,
                )
                q.wait_event("JOB_STATUS_CHANGE", lambda d, j=job_id: d["id"] == j and d["status"] == "running")
                partial = [name for name in os.listdir(out) if ".partial-" in name]
                assert [name.startswith(".new.raw.partial-") for name in partial] == ([True] if job_id == "new" else [])
                for _ in range(1000):  # let it copy something (throttled to 1 MiB/s)
                    if q.ok("query-block-jobs")[0]["offset"] > 0:
                        break
                    time.sleep(0.01)
                q.ok("block-job-cancel", device=job_id, force=True)
                q.wait_event("BLOCK_JOB_CANCELLED", lambda d, j=job_id: d["device"] == j, timeout=BOUND)
                q.wait_job_status(job_id, "null", timeout=BOUND)
            assert sorted(os.listdir(out)) == ["existing.qcow2", "ok.qcow2"]
            info = _qemu_img_json("info", str(existing))
            assert info["format-specific"]["data"]["corrupt"] is True  # type: ignore[index]
            refused = subprocess.run(["qemu-io", "-c", "read 0 4k", str(existing)], capture_output=True, text=True)
            assert refused.returncode != 0 and "corrupt" in refused.stderr
            reply = q.execute("drive-backup", device="d0", target=str(existing), sync="full", mode="existing")
            assert "corrupt" in reply["error"]["desc"]
    finally:
        assert daemon.stop() == 0, daemon.stderr()


def test_serve_exits_non_zero_when_an_image_cannot_be_flushed_at_shutdown(tmp_path: Path) -> None:
    with flaky_flush_target(tmp_path) as (peer, trigger):
        daemon = start_daemon(tmp_path / "d")
        try:
            with daemon.connect() as q:
                q.ok(
                    "blockdev-add",
                    driver="nbd",
                    server={"type": "unix", "path": str(peer.socket)},
                    **{"node-name": "remote"},
                )
            trigger.touch()
            daemon.proc.send_signal(signal.SIGTERM)
            status = daemon.proc.wait(BOUND)
        finally:
            daemon.stop()
        assert status == 1, daemon.stderr()
        assert "flushing node 'remote' failed" in daemon.stderr()
        assert not daemon.pid_path.exists()
