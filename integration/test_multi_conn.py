"""Multi-conn consistency as the NBD spec defines it, for every way the daemon serves an export.

An export that advertises ``NBD_FLAG_CAN_MULTI_CONN`` promises that a flush on one connection covers
the writes every connection has completed, and that a read on any connection sees them. libnbd (the
client nbdcopy and nbdkit's nbd plugin are built on) opens three connections to each export: a write on
the first, a flush on the second, a read on the third — then the roles turn, with write-zeroes and trims
among the writes. Modes: a raw file and a qcow2 image over TCP and a unix socket, and a raw file while a
backup job runs on it (its copy-before-write filter sits between every connection and the file).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import require
from peers import serve
from qmp_daemon import our_daemon

MiB = 1 << 20
SIZE = 16 * MiB
LIBNBD_PYTHON = "/usr/bin/python3"  # the interpreter libnbd's bindings (nbdsh's) are installed for

#: Run by libnbd's Python in a directory of its own (our package is also called ``nbd``).
CLIENT = r"""
import random, sys
import nbd

uri, size = sys.argv[1], int(sys.argv[2])
handles = []
for _ in range(3):
    h = nbd.NBD()
    h.connect_uri(uri)
    handles.append(h)
assert all(h.can_multi_conn() for h in handles), "CAN_MULTI_CONN not advertised"
assert all(h.get_size() == size for h in handles)
rng = random.Random(7)
expected = bytearray(handles[0].pread(size, 0))
for turn in range(6):
    writer, flusher, reader = handles[turn % 3], handles[(turn + 1) % 3], handles[(turn + 2) % 3]
    for _ in range(24):
        length = rng.choice([512, 4096, 65536, 65536 + 512, 300 * 1024])
        offset = rng.randrange(0, size - length) // 512 * 512
        kind = rng.random()
        if kind < 0.7:
            data = bytes([rng.randrange(1, 256)]) * length
            writer.pwrite(data, offset)
            expected[offset : offset + length] = data
        elif kind < 0.85:
            writer.zero(length, offset)
            expected[offset : offset + length] = bytes(length)
        elif writer.can_trim():
            writer.trim(length, offset)  # trimmed ranges may read as anything: read back what is there now
            expected[offset : offset + length] = reader.pread(length, offset)
    flusher.flush()
    got = reader.pread(size, 0)
    assert got == bytes(expected), f"turn {turn}: a read on the third connection misses writes of the first"
for h in handles:
    h.shutdown()
print("consistent")
"""


def check_multi_conn(uri: str, tmp_path: Path) -> None:
    require("nbdsh")
    script = tmp_path / "client" / "multi_conn_client.py"
    script.parent.mkdir(exist_ok=True)
    script.write_text(CLIENT)
    proc = subprocess.run(
        [LIBNBD_PYTHON, str(script), uri, str(SIZE)], capture_output=True, text=True, timeout=120, cwd=script.parent
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "consistent", proc.stderr[-2000:]


def make_raw(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.seek(MiB)
        f.write(bytes(range(256)) * (MiB // 256))
    return path


def make_qcow2(path: Path) -> Path:
    require("qemu-img", "qemu-io")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(path)], check=True, capture_output=True)
    return path


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("image_format", ["raw", "qcow2"])
def test_a_flush_on_one_connection_covers_writes_of_another_for_a_reader_on_a_third(
    tmp_path: Path, image_format: str, transport: str
) -> None:
    image = make_raw(tmp_path / "disk.raw") if image_format == "raw" else make_qcow2(tmp_path / "disk.qcow2")
    with serve(tmp_path, [f"disk={image},format={image_format}"]) as served:
        check_multi_conn(served.uri("disk", transport), tmp_path)


def test_multi_conn_holds_while_a_backup_job_runs_on_the_export(tmp_path: Path) -> None:
    """The three connections go through the job's copy-before-write filter; the job is slowed so that
    it runs the whole time, and its target is checked to hold the disk as it was when it began."""
    image = make_raw(tmp_path / "disk.raw")
    before = image.read_bytes()
    sock = tmp_path / "nbd.sock"
    target = tmp_path / "backup.raw"
    with (
        our_daemon(tmp_path / "d", "--nbd-socket", str(sock), "--export", f"disk={image}") as daemon,
        daemon.connect() as q,
    ):
        q.ok("drive-backup", device="disk", target=str(target), sync="full", format="raw", speed=MiB)
        check_multi_conn(f"nbd+unix:///disk?socket={sock}", tmp_path)
        jobs = q.ok("query-block-jobs")
        assert [j["device"] for j in jobs] == ["disk"] and jobs[0]["status"] == "running"
        q.ok("block-job-set-speed", device="disk", speed=0)
        q.wait_event("BLOCK_JOB_COMPLETED", lambda data: data.get("device") == "disk", timeout=120)
    assert target.read_bytes() == before
