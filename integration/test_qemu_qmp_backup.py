"""QEMU's own QMP tooling against our daemon, unchanged: ``qemu.qmp``'s asyncio ``QMPClient`` and its
synchronous ``legacy.QEMUMonitorProtocol`` drive a full live backup (blockdev-add, nbd-server-start,
block-export-add, drive-backup, events, query-block-jobs), and ``qmp-shell`` runs commands.

The backup oracle: while a throttled backup runs, a guest (qemu-io through our NBD export) overwrites
the disk; the target must equal the disk as it was when the backup started.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

from conftest import require
from qmp_daemon import make_image, our_daemon, qmp_shell

SIZE = 8 << 20


def qemu_io_write(sock: Path, export: str, pattern: int, offset: int, length: int) -> None:
    uri = f"nbd+unix:///{export}?socket={sock}"
    proc = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}", uri],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_qmpclient_drives_live_backup(tmp_path: Path) -> None:
    require("qemu-io")
    from qemu.qmp import EventListener, QMPClient

    image = make_image(tmp_path / "disk.raw", SIZE)
    snapshot = (tmp_path / "disk.raw").read_bytes()
    target = tmp_path / "backup.raw"
    nbd_sock = tmp_path / "nbd.sock"

    async def scenario(qmp_path: Path) -> list[dict[str, Any]]:
        qmp = QMPClient("nbd-backup-test")
        await asyncio.wait_for(qmp.connect(str(qmp_path)), 30)
        events: list[dict[str, Any]] = []
        try:
            version: Any = await qmp.execute("query-version")
            assert set(version["qemu"]) == {"major", "minor", "micro"}
            await qmp.execute("blockdev-add", {"driver": "file", "filename": str(image), "node-name": "disk0-file"})
            await qmp.execute("blockdev-add", {"driver": "raw", "file": "disk0-file", "node-name": "disk0"})
            await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd_sock)}}})
            await qmp.execute("block-export-add", {"type": "nbd", "id": "exp0", "node-name": "disk0", "writable": True})
            listener = EventListener()
            with qmp.listen(listener):
                await qmp.execute(
                    "drive-backup",
                    {
                        "job-id": "bk0",
                        "device": "disk0",
                        "target": str(target),
                        "sync": "full",
                        "speed": 1 << 20,
                        "x-perf": {"max-workers": 1, "max-chunk": 65536},
                    },
                )
                jobs: Any = await qmp.execute("query-block-jobs")
                assert [j["device"] for j in jobs] == ["bk0"] and jobs[0]["type"] == "backup"
                assert jobs[0]["offset"] < SIZE // 2, "throttled: most of the disk is not copied yet"
                # the guest writes while the backup runs: the backup must keep the old data
                await asyncio.to_thread(qemu_io_write, nbd_sock, "disk0", 0xEE, 0, SIZE // 2)
                await qmp.execute("block-job-set-speed", {"device": "bk0", "speed": 0})
                async for event in listener:
                    events.append(dict(event))
                    data = event.get("data", {})
                    if event["event"] == "JOB_STATUS_CHANGE" and data == {"id": "bk0", "status": "null"}:
                        break
            await qmp.execute("block-export-del", {"id": "exp0"})
            await qmp.execute("nbd-server-stop")
            await qmp.execute("blockdev-del", {"node-name": "disk0"})
            await qmp.execute("blockdev-del", {"node-name": "disk0-file"})
            assert await qmp.execute("query-named-block-nodes") == []
        finally:
            await qmp.disconnect()
        return events

    with our_daemon(tmp_path) as daemon:
        events = asyncio.run(asyncio.wait_for(scenario(daemon.qmp_path), 120))

    names = [(e["event"], e["data"].get("status")) for e in events]
    assert ("BLOCK_JOB_COMPLETED", None) in names
    completed = next(e for e in events if e["event"] == "BLOCK_JOB_COMPLETED")
    assert "error" not in completed["data"] and completed["data"]["offset"] == SIZE
    statuses = [s for n, s in names if n == "JOB_STATUS_CHANGE"]
    assert statuses[-4:] == ["waiting", "pending", "concluded", "null"]
    assert target.read_bytes() == snapshot, "the backup must equal the disk at the moment it started"
    assert image.read_bytes() == bytes([0xEE]) * (SIZE // 2) + snapshot[SIZE // 2 :]


def test_legacy_monitor_protocol_backup(tmp_path: Path) -> None:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    image = make_image(tmp_path / "disk.raw", SIZE)
    target = tmp_path / "backup.qcow2"
    with our_daemon(tmp_path) as daemon:
        mon = QEMUMonitorProtocol(str(daemon.qmp_path))
        greeting = mon.connect(negotiate=True)
        assert greeting is not None and "QMP" in greeting
        try:
            mon.cmd("blockdev-add", driver="file", filename=str(image), **{"node-name": "d0"})
            reply = mon.cmd_raw("drive-backup", {"device": "nope", "target": str(target), "sync": "full"})
            assert reply["error"]["class"] == "GenericError"
            mon.cmd("drive-backup", device="d0", target=str(target), sync="full", format="qcow2")
            while True:
                event = mon.pull_event(wait=30.0)
                assert event is not None
                if event["event"] == "BLOCK_JOB_COMPLETED":
                    assert event["data"]["device"] == "d0"  # the job id defaults to the device name
                    assert "error" not in event["data"]
                    break
            while True:
                event = mon.pull_event(wait=30.0)
                assert event is not None
                if event["event"] == "JOB_STATUS_CHANGE" and event["data"]["status"] == "null":
                    break
            assert mon.cmd("query-jobs") == []
        finally:
            mon.close()
    if shutil.which("qemu-img"):
        proc = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(image), str(target)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_qmp_shell_runs_commands(tmp_path: Path) -> None:
    script = "query-version\nblockdev-add driver=null-co node-name=n0 size=1048576\nquery-named-block-nodes\n"
    with our_daemon(tmp_path) as daemon:
        proc = qmp_shell(daemon, script, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert '"package": "nbd-backup' in proc.stdout
    assert '"node-name": "n0"' in proc.stdout
