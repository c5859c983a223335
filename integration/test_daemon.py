"""``nbd-backup serve`` as a process: --qmp (unix and TCP), --pid-file, --config, --allow-dir, the ready
line, and clean stops (SIGTERM with a job running, SIGINT, QMP ``quit``)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
from pathlib import Path

from peers import ready_nbd_port, start_ours, stop_ours
from qmp_daemon import READY, make_image, nbd_backup_argv, our_daemon, start_daemon
from qsd import QmpSync

ROOT = Path(__file__).resolve().parent.parent
SIZE = 4 << 20


def tcp_qmp(port: int) -> dict[str, object]:
    """Greeting + negotiation + query-version over TCP with a plain socket (no newline after requests)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        stream = sock.makefile("rwb")
        greeting = json.loads(stream.readline())
        sock.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-version", "id": 7}')
        assert json.loads(stream.readline()) == {"return": {}}
        reply: dict[str, object] = json.loads(stream.readline())
        assert reply["id"] == 7
        return greeting


def test_qmp_unix_and_tcp_pid_file_ready_line_sigterm(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "--qmp", "tcp:127.0.0.1:0")  # port 0: it reports the one it got
    try:
        assert daemon.pid_path.read_text().strip() == str(daemon.proc.pid)
        assert stat.S_IMODE(os.stat(daemon.qmp_path).st_mode) == 0o600
        ready = daemon.stderr()
        found = re.search(rf"{READY} .*qmp=unix:{re.escape(str(daemon.qmp_path))},tcp:127\.0\.0\.1:(\d+) ", ready)
        assert found is not None, ready
        port = int(found.group(1))
        greeting = tcp_qmp(port)
        assert set(greeting["QMP"]["version"]["qemu"]) == {"major", "minor", "micro"}  # type: ignore[index]
        with daemon.connect() as q:
            assert q.ok("query-block-jobs") == []
            # nothing listens on NBD until nbd-server-start
            assert q.ok("query-block-exports") == []
    finally:
        assert daemon.stop() == 0, daemon.stderr()
    assert not daemon.pid_path.exists()
    assert not daemon.qmp_path.exists()


def test_sigterm_cancels_running_job_with_events(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw", SIZE)
    daemon = start_daemon(tmp_path)
    try:
        q = daemon.connect()
        q.ok("blockdev-add", driver="file", filename=str(image), **{"node-name": "d0"})
        q.ok("drive-backup", **{"job-id": "j0"}, device="d0", target=str(tmp_path / "b.raw"), sync="full", speed=1)
        daemon.proc.send_signal(signal.SIGTERM)
        q.wait_event("BLOCK_JOB_CANCELLED", lambda d: d["device"] == "j0", timeout=30)
        q.wait_job_status("j0", "null", timeout=30)
        assert daemon.proc.wait(30) == 0, daemon.stderr()
        q.close()
    finally:
        daemon.stop()
    assert q.transcript.job_statuses("j0")[-3:] == ["aborting", "concluded", "null"]
    assert image.read_bytes()[:4096] == make_image(tmp_path / "again.raw", SIZE).read_bytes()[:4096]


def test_sigint_and_quit_stop_cleanly(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "a")
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(30) == 0, daemon.stderr()
    daemon = start_daemon(tmp_path / "b")
    with daemon.connect() as q:
        assert q.execute("quit") == {"return": {}, "id": 2}
    assert daemon.proc.wait(30) == 0, daemon.stderr()
    assert not daemon.pid_path.exists()


def test_config_file(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    make_image(tmp_path / "images" / "disk.raw", SIZE)
    config = tmp_path / "serve.toml"
    config.write_text(
        """
qmp = ["unix:run/qmp.sock"]
nbd = ["127.0.0.1:0"]
pid-file = "run/serve.pid"
allow-dir = ["images"]
max-connections = 4

[[export]]
name = "disk"
path = "images/disk.raw"
readonly = true
"""
    )
    (tmp_path / "run").mkdir()
    log = tmp_path / "serve.log"
    proc = start_ours(["serve", "--config", str(config)], log)
    try:
        assert (tmp_path / "run" / "serve.pid").read_text().strip() == str(proc.pid)
        assert ready_nbd_port(log) > 0 and "exports=disk" in log.read_text()
        with QmpSync(tmp_path / "run" / "qmp.sock") as q:
            assert [e["id"] for e in q.ok("query-block-exports")] == ["disk"]
            node = q.ok("query-named-block-nodes")[0]
            assert node["node-name"] == "disk" and node["ro"] is True
            refused = q.execute("blockdev-add", driver="file", filename=str(config), **{"node-name": "x"})
            assert "outside the allowed directories" in refused["error"]["desc"]
    finally:
        assert stop_ours(proc, log) == 0, log.read_text()


def test_bad_settings_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("bogus = 1\n")
    for argv in (
        ["serve", "--config", str(bad)],
        ["serve", "--qmp", "udp:1.2.3.4:5"],
        ["serve", "--qmp", f"unix:{tmp_path}/q.sock", "--allow-dir", str(tmp_path / "missing")],
    ):
        proc = subprocess.run(nbd_backup_argv(*argv), capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert proc.returncode == 1, proc.stderr
        assert "error" in proc.stderr


def test_allow_dir_confines_qmp_paths(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    image = make_image(allowed / "disk.raw", SIZE)
    secret = make_image(outside / "secret.raw", SIZE)
    (allowed / "escape.raw").symlink_to(secret)
    (allowed / "dangling.raw").symlink_to(outside / "new.raw")
    (allowed / "sub").symlink_to(outside)
    with our_daemon(tmp_path / "run", "--allow-dir", str(allowed)) as daemon, daemon.connect() as q:
        q.ok("blockdev-add", driver="file", filename=str(image), **{"node-name": "d0"})
        for path in (secret, allowed / "escape.raw", allowed / "sub" / "secret.raw", "disk.raw"):
            reply = q.execute("blockdev-add", driver="file", filename=str(path), **{"node-name": "x"})
            assert reply["error"]["class"] == "GenericError", reply
        for path in (outside / "b.raw", allowed / "dangling.raw", allowed / "sub" / "b.raw"):
            reply = q.execute("drive-backup", device="d0", target=str(path), sync="full")
            assert "outside the allowed directories" in reply["error"]["desc"], reply
        assert q.execute("query-jobs")["return"] == []
        reply = q.execute("drive-backup", device="d0", target=str(image), sync="full", mode="existing")
        assert reply["error"]["desc"] == "Source and target cannot be the same"
        q.ok("drive-backup", device="d0", target=str(allowed / "b.raw"), sync="full")
        q.wait_job_status("d0", "null", timeout=60)
    assert not (outside / "b.raw").exists() and not (outside / "new.raw").exists()
    assert (allowed / "b.raw").read_bytes() == image.read_bytes()
