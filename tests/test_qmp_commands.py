"""The daemon's QMP commands in-process: the registry's checks (QEMU's texts and classes), node
trees, exports, backups, transactions and job verbs — without sockets or external programs."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from backup.dirty_bitmap import DirtyBitmap
from backup.events import Event
from server.addresses import parse_monitor_address
from server.daemon import build_commands
from server.errors import ConfigError, QmpError
from server.paths import PathPolicy
from server.qmp.dispatch import CommandRegistry
from server.registry import Registry, id_wellformed

MiB = 1 << 20


class Harness:
    def __init__(self, tmp_path: Path, allow: list[Path] | None = None) -> None:
        self.tmp = tmp_path
        self.reg = Registry(paths=PathPolicy(allow or []))
        self.commands: CommandRegistry = build_commands()
        self.events: list[Event] = []
        self.reg.events.subscribe(self.events.append)

    async def __call__(self, command: str, /, **args: Any) -> Any:
        return await self.commands.dispatch(self.reg, command, args)

    async def error(self, command: str, /, **args: Any) -> tuple[str, str]:
        with pytest.raises(QmpError) as info:
            await self(command, **args)
        return info.value.error_class, info.value.desc

    def image(self, name: str, size: int = MiB, fill: int = 0x5A) -> Path:
        path = self.tmp / name
        path.write_bytes(bytes([fill]) * size)
        return path

    def statuses(self, job_id: str) -> list[str]:
        return [e.data["status"] for e in self.events if e.name == "JOB_STATUS_CHANGE" and e.data["id"] == job_id]

    async def wait_gone(self, job_id: str) -> None:
        for _ in range(2000):
            if job_id not in self.reg.jobs:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"job {job_id} still exists: {self.statuses(job_id)}")


def exists(path: str | Path) -> bool:
    return Path(path).exists()


@pytest.fixture
async def h(tmp_path: Path) -> Any:
    harness = Harness(tmp_path)
    yield harness
    await harness.reg.close()


def test_ids_and_addresses() -> None:
    assert id_wellformed("disk0") and id_wellformed("a.b-c_d")
    assert not id_wellformed("0disk") and not id_wellformed("") and not id_wellformed("a b")
    assert parse_monitor_address("unix:/run/q.sock") == ("unix", "/run/q.sock")
    assert parse_monitor_address("tcp:127.0.0.1:4444") == ("tcp", ("127.0.0.1", 4444))
    assert parse_monitor_address("tcp:[::1]:4444") == ("tcp", ("::1", 4444))
    for bad in ("unix:", "udp:1:2", "tcp:host", "tcp::1", "tcp:h:99999", "nothing"):
        with pytest.raises(ConfigError):
            parse_monitor_address(bad)


async def test_blockdev_add_trees_and_errors(h: Harness) -> None:
    img = h.image("a.raw")
    await h("blockdev-add", driver="file", filename=str(img), **{"node-name": "f0"})
    await h("blockdev-add", driver="raw", file="f0", **{"node-name": "r0"})
    await h("blockdev-add", driver="null-co", size=MiB, **{"node-name": "n0"})
    await h("blockdev-add", driver="raw", file={"driver": "null-co", "size": 4096}, **{"node-name": "r1"})
    nodes = await h("query-named-block-nodes")
    assert [n["node-name"] for n in nodes] == ["r1", "n0", "r0", "f0"]  # newest first, as QEMU
    assert nodes[2]["drv"] == "raw" and nodes[2]["file"] == str(img.resolve())
    assert nodes[1]["image"]["virtual-size"] == MiB
    assert [b["inserted"]["node-name"] for b in await h("query-block")] == ["r0", "n0", "r1"]

    assert await h.error("blockdev-add", driver="file", filename=str(img), **{"node-name": "f0"}) == (
        "GenericError",
        "Duplicate nodes with node-name='f0'",
    )
    assert (await h.error("blockdev-add", driver="null-co", **{"node-name": "1x"}))[1] == "Invalid node-name: '1x'"
    desc = (await h.error("blockdev-add", driver="null-co"))[1]
    assert desc == "'node-name' must be specified for the root node"
    desc = (await h.error("blockdev-add", driver="file", filename=str(h.tmp / "no"), **{"node-name": "x"}))[1]
    assert desc.startswith("Could not open") and "No such file" in desc
    desc = (await h.error("blockdev-add", driver="raw", file="nope", **{"node-name": "x"}))[1]
    assert desc == "Cannot find device='nope' nor node-name='nope'"
    desc = (await h.error("blockdev-add", driver="file", filename=str(img), **{"node-name": "f9"}))[1]
    assert desc.startswith('Failed to get "write" lock')
    assert (await h.error("blockdev-add", driver="vmdk", **{"node-name": "x"}))[1].endswith("value 'vmdk'")

    assert await h.error("blockdev-del", **{"node-name": "f0"}) == ("GenericError", "Block device f0 is in use")
    assert (await h.error("blockdev-del", **{"node-name": "zz"}))[1] == "Failed to find node with node-name='zz'"
    await h("blockdev-del", **{"node-name": "r0"})
    await h("blockdev-del", **{"node-name": "f0"})  # free once its parent is gone
    assert "x" not in h.reg.nodes


async def test_allow_dir_confines_blockdev_add(tmp_path: Path) -> None:
    allowed = tmp_path / "ok"
    allowed.mkdir()
    h = Harness(tmp_path, allow=[allowed])
    try:
        outside = h.image("outside.raw")
        (allowed / "link.raw").symlink_to(outside)
        for path in (outside, allowed / "link.raw"):
            desc = (await h.error("blockdev-add", driver="file", filename=str(path), **{"node-name": "x"}))[1]
            assert "outside the allowed directories" in desc
        assert h.reg.nodes == {}
    finally:
        await h.reg.close()


async def _qcow2(path: Path, backing: str | None = None, size: int = MiB) -> Path:
    from backup.qcow2 import Qcow2Device

    device = await Qcow2Device.create(path, None if backing else size, backing_file=backing)
    await device.close()
    return path


async def test_allow_dir_confines_backing_chains(tmp_path: Path) -> None:
    """Every image of a backing chain passes --allow-dir, as the named file does (blockdev-add and
    drive-backup mode=existing), whether the backing name is relative, absolute, a symlink or deeper."""
    allowed, outside = tmp_path / "ok", tmp_path / "out"
    allowed.mkdir()
    outside.mkdir()
    h = Harness(tmp_path, allow=[allowed])
    try:
        secret = outside / "secret.raw"
        secret.write_bytes(b"S" * MiB)
        (allowed / "link.raw").symlink_to(secret)
        await _qcow2(allowed / "mid.qcow2", str(secret))
        escapes = {
            "rel.qcow2": "../out/secret.raw",
            "abs.qcow2": str(secret),
            "sym.qcow2": "link.raw",
            "deep.qcow2": "mid.qcow2",  # inside, but its own backing file is not
        }
        for name, backing in escapes.items():
            await _qcow2(allowed / name, backing)
        await h("blockdev-add", driver="raw", file={"driver": "null-co", "size": MiB}, **{"node-name": "src"})
        for name in escapes:
            image = str(allowed / name)
            file = {"driver": "file", "filename": image}
            kind, desc = await h.error("blockdev-add", driver="qcow2", file=file, **{"node-name": "x"})
            assert kind == "GenericError" and str(secret) in desc and "outside the allowed directories" in desc, desc
            await h("blockdev-add", driver="file", filename=image, **{"node-name": "f"}, **{"read-only": True})
            kind, desc = await h.error("blockdev-add", driver="qcow2", file="f", **{"node-name": "x"})
            assert str(secret) in desc, desc
            await h("blockdev-del", **{"node-name": "f"})
            args = {"device": "src", "target": image, "sync": "full", "mode": "existing"}
            kind, desc = await h.error("drive-backup", **args, format="qcow2")
            assert kind == "GenericError" and str(secret) in desc, desc
            kind, desc = await h.error("drive-backup", **args)  # probed: no backing file is followed at all
            assert kind == "GenericError" and (str(secret) in desc or "never followed" in desc), desc
        assert set(h.reg.nodes) == {"src"} and not h.reg.jobs
        (allowed / "base.raw").write_bytes(b"B" * MiB)
        await _qcow2(allowed / "top.qcow2", "base.raw")  # a chain inside the allowed directory opens
        file = {"driver": "file", "filename": str(allowed / "top.qcow2")}
        await h("blockdev-add", driver="qcow2", file=file, **{"node-name": "top"})
        assert await h.reg.node("top").pread(0, 4) == b"BBBB"
    finally:
        await h.reg.close()


def _listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    return sock


async def test_nbd_server_start_unix_socket_confined_and_never_taken_over(tmp_path: Path) -> None:
    """nbd-server-start's unix path goes through --allow-dir; a socket something answers on is never
    unlinked (inside or outside the allowed directories); a stale one is replaced."""
    allowed, outside = tmp_path / "ok", tmp_path / "out"
    allowed.mkdir()
    outside.mkdir()
    h = Harness(tmp_path, allow=[allowed])
    free = Harness(tmp_path)
    live_in, live_out = _listener(allowed / "live.sock"), _listener(outside / "live.sock")
    try:
        (allowed / "link.sock").symlink_to(outside / "new.sock")
        for path in (outside / "new.sock", allowed / "link.sock", "nbd.sock", outside / "live.sock"):
            kind, desc = await h.error("nbd-server-start", addr={"type": "unix", "data": {"path": str(path)}})
            assert kind == "GenericError" and ("allowed directories" in desc or "--allow-dir" in desc), desc
        for harness, live in ((h, allowed / "live.sock"), (free, outside / "live.sock")):
            kind, desc = await harness.error("nbd-server-start", addr={"type": "unix", "data": {"path": str(live)}})
            assert kind == "GenericError" and str(live) in desc and "listening" in desc, desc
            assert harness.reg.nbd is None
        for live in (live_in, live_out):  # still the other service's: it accepts a connection
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.connect(live.getsockname())
                live.accept()[0].close()
        assert not (outside / "new.sock").exists()

        _listener(allowed / "stale.sock").close()  # bound, then its owner went away: the file remains
        await h("nbd-server-start", addr={"type": "unix", "data": {"path": str(allowed / "stale.sock")}})
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(allowed / "stale.sock"))
        await h("nbd-server-stop")
        assert not (allowed / "stale.sock").exists()
    finally:
        live_in.close()
        live_out.close()
        await h.reg.close()
        await free.reg.close()


async def test_nbd_server_stop_leaves_a_socket_file_that_is_no_longer_its_own(tmp_path: Path) -> None:
    from nbd.server import NbdServer

    server = NbdServer()
    path = tmp_path / "nbd.sock"
    await server.listen_unix(path)
    path.unlink()
    other = _listener(path)  # another service took the path meanwhile
    try:
        await server.stop()
        assert path.exists()
    finally:
        other.close()


async def test_nbd_listen_unix_binds_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even past the liveness check (a listener that appeared just after it), the path is never
    unlinked: the server binds its own socket (asyncio, given a path, would unlink one first)."""
    import errno

    import nbd.server
    from nbd.server import NbdServer

    monkeypatch.setattr(nbd.server, "remove_stale_socket", lambda path: None)
    other = _listener(tmp_path / "nbd.sock")
    server = NbdServer()
    try:
        with pytest.raises(OSError) as info:
            await server.listen_unix(tmp_path / "nbd.sock")
        assert info.value.errno == errno.EADDRINUSE
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(tmp_path / "nbd.sock"))  # still the other listener's
    finally:
        await server.stop()
        other.close()


async def test_nbd_server_and_exports(h: Harness) -> None:
    await h("blockdev-add", driver="null-co", size=MiB, **{"node-name": "n0"})
    await h("blockdev-add", driver="null-co", size=MiB, **{"node-name": "ro"}, **{"read-only": True})
    assert (await h.error("block-export-add", type="nbd", id="e0", **{"node-name": "n0"}))[1] == (
        "NBD server not running"
    )
    sock = str(h.tmp / "nbd.sock")
    await h("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    assert (await h.error("nbd-server-start", addr={"type": "unix", "data": {"path": sock}}))[1] == (
        "NBD server already running"
    )
    await h("block-export-add", type="nbd", id="e0", **{"node-name": "n0"}, writable=True, description="d")
    assert (await h.error("block-export-add", type="nbd", id="e0", **{"node-name": "n0"}))[1] == (
        "Block export id 'e0' is already in use"
    )
    desc = (await h.error("block-export-add", type="nbd", id="e1", **{"node-name": "ro"}, writable=True))[1]
    assert desc == "Cannot export read-only node as writable"
    desc = (await h.error("block-export-add", type="nbd", id="e1", **{"node-name": "ro"}, name="n0"))[1]
    assert desc == "NBD server already has export named 'n0'"
    desc = (await h.error("block-export-add", type="nbd", id="e1", **{"node-name": "zz"}))[1]
    assert desc == "Cannot find device='' nor node-name='zz'"
    await h("block-export-add", type="nbd", id="e1", **{"node-name": "ro"}, name="other")
    exports = await h("query-block-exports")
    assert exports == [
        {"node-name": "ro", "shutting-down": False, "type": "nbd", "id": "e1"},
        {"node-name": "n0", "shutting-down": False, "type": "nbd", "id": "e0"},
    ]
    assert (await h.error("blockdev-del", **{"node-name": "n0"}))[1] == "Node n0 is in use"
    await h("block-export-del", id="e0")
    assert (await h.error("block-export-del", id="e0"))[1] == "Export 'e0' is not found"
    await h("nbd-server-stop")
    deleted = [e.data["id"] for e in h.events if e.name == "BLOCK_EXPORT_DELETED"]
    assert deleted == ["e0", "e1"]
    assert await h("query-block-exports") == []
    assert (await h.error("nbd-server-stop"))[1] == "NBD server not running"
    await h("blockdev-del", **{"node-name": "n0"})


async def test_drive_backup_creates_target_and_reports_events(h: Harness) -> None:
    src = h.image("src.raw", 2 * MiB)
    await h("blockdev-add", driver="file", filename=str(src), **{"node-name": "src"})
    target = h.tmp / "b.raw"
    await h("drive-backup", device="src", target=str(target), sync="full")
    await h.wait_gone("src")  # the job id defaults to the device name
    # QEMU's sequence: the transaction's drain holds the new job paused until it ends
    assert h.statuses("src") == ["created", "running", "paused", "running", "waiting", "pending", "concluded", "null"]
    completed = [e.data for e in h.events if e.name == "BLOCK_JOB_COMPLETED"]
    assert completed == [{"type": "backup", "device": "src", "len": 2 * MiB, "offset": 2 * MiB, "speed": 0}]
    assert target.read_bytes() == src.read_bytes()
    assert await h("query-block-jobs") == [] and await h("query-jobs") == []
    assert h.reg.nodes["src"].users == set() and h.reg.nodes["src"].filters == []


async def test_backup_refusals_happen_before_side_effects(h: Harness) -> None:
    src = h.image("src.raw")
    await h("blockdev-add", driver="file", filename=str(src), **{"node-name": "src"})
    t = str(h.tmp / "t.raw")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"device": "nope", "sync": "full"}, "Cannot find device='nope' nor node-name='nope'"),
        ({"device": "src", "sync": "incremental"}, "must provide a valid bitmap name for 'incremental' sync mode"),
        ({"device": "src", "sync": "full", "bitmap": "b0"}, "Bitmap 'b0' could not be found"),
        ({"device": "src", "sync": "full", "speed": -1}, "Parameter 'speed' expects a non-negative value"),
        ({"device": "src", "sync": "full", "format": "vmdk"}, "Unknown file format 'vmdk'"),
        ({"device": "src", "sync": "full", "compress": True, "format": "raw"}, "Compression is not supported"),
        ({"device": "src", "sync": "full", "job-id": "9"}, "Invalid job ID '9'"),
        ({"device": "src", "sync": "full", "target": str(src)}, "Source and target cannot be the same"),
        ({"device": "src", "sync": "full", "mode": "existing"}, "Could not open"),
    ]
    for args, text in cases:
        desc = (await h.error("drive-backup", **{"target": t, **args}))[1]
        assert desc.startswith(text), (args, desc)
    assert not exists(t)
    assert [e for e in h.events if e.name == "JOB_STATUS_CHANGE"] == []
    await h("blockdev-add", driver="null-co", size=2 * MiB, **{"node-name": "big"})
    desc = (await h.error("blockdev-backup", device="src", target="big", sync="full"))[1]
    assert "different sizes" in desc
    desc = (await h.error("blockdev-backup", device="src", target="src", sync="full"))[1]
    assert desc == "Source and target cannot be the same"


async def test_transaction_all_or_nothing(h: Harness) -> None:
    await h("blockdev-add", driver="file", filename=str(h.image("a.raw")), **{"node-name": "a"})
    await h("blockdev-add", driver="file", filename=str(h.image("b.raw", fill=1)), **{"node-name": "b"})
    ta, tb = h.tmp / "ta.raw", h.tmp / "tb.raw"

    def action(kind: str, **data: Any) -> dict[str, Any]:
        return {"type": kind, "data": data}

    good = action("drive-backup", **{"job-id": "ja"}, device="a", target=str(ta), sync="full")
    for last in (action("abort"), action("drive-backup", device="zz", target=str(tb), sync="full")):
        with pytest.raises(QmpError):
            await h("transaction", actions=[good, last])
        assert h.reg.jobs == {} and not exists(ta)
        assert h.statuses("ja")[-4:] == ["created", "aborting", "concluded", "null"]
    assert h.reg.nodes["a"].filters == [] and h.reg.nodes["a"].users == set()

    second = action("drive-backup", **{"job-id": "jb"}, device="b", target=str(tb), sync="full")
    await h("transaction", actions=[good, second], properties={"completion-mode": "grouped"})
    await h.wait_gone("ja")
    await h.wait_gone("jb")
    assert ta.read_bytes() == (h.tmp / "a.raw").read_bytes() and tb.read_bytes() == (h.tmp / "b.raw").read_bytes()


async def test_job_verbs(h: Harness) -> None:
    await h("blockdev-add", driver="file", filename=str(h.image("s.raw", 4 * MiB)), **{"node-name": "s"})
    await h("drive-backup", **{"job-id": "j"}, device="s", target=str(h.tmp / "t.raw"), sync="full", speed=1)
    assert await h.error("block-job-pause", device="nope") == ("DeviceNotActive", "Block job 'nope' not found")
    assert await h.error("job-pause", id="nope") == ("GenericError", "Job not found")
    await h("block-job-pause", device="j")
    assert (await h.error("job-pause", id="j"))[1] == "Job is already paused"
    [info] = await h("query-block-jobs")
    assert info["status"] == "paused" and info["paused"] is True and info["speed"] == 1
    await h("job-resume", id="j")
    assert (await h.error("block-job-resume", device="j"))[1] == "Can't resume a job that was not paused"
    assert (await h.error("block-job-set-speed", device="j", speed=-1))[1] == (
        "Parameter 'speed' expects a non-negative value"
    )
    assert (await h.error("job-dismiss", id="j"))[
        1
    ] == "Job 'j' in state 'running' cannot accept command verb 'dismiss'"
    await h("block-job-cancel", device="j")
    await h.wait_gone("j")
    assert [e.name for e in h.events if e.name.startswith("BLOCK_JOB")] == ["BLOCK_JOB_CANCELLED"]
    assert h.reg.nodes["s"].filters == []


async def test_block_job_cancel_of_a_paused_job_needs_force(h: Harness) -> None:
    """QEMU 7.2's qmp_block_job_cancel: a user-paused job (also one stopped by an error) is only
    cancelled with force=true; without it the job stays, paused. job-cancel always forces."""
    await h("blockdev-add", driver="file", filename=str(h.image("s.raw", 4 * MiB)), **{"node-name": "s"})
    for job_id in ("j", "k"):
        await h(
            "drive-backup", **{"job-id": job_id}, device="s", target=str(h.tmp / f"{job_id}.raw"), speed=1, sync="full"
        )
        await h("block-job-pause", device=job_id)
    paused = ("GenericError", "The block job for device 'j' is currently paused")
    assert await h.error("block-job-cancel", device="j") == paused
    assert await h.error("block-job-cancel", device="j", force=False) == paused
    assert [(i["device"], i["status"], i["paused"]) for i in await h("query-block-jobs")] == [
        ("k", "paused", True),
        ("j", "paused", True),
    ]
    assert [e.name for e in h.events if e.name.startswith("BLOCK_JOB")] == []
    await h("block-job-resume", device="j")
    await h("block-job-cancel", device="j")  # no longer paused: no force needed
    await h("job-cancel", id="k")  # job-cancel is always a forced cancel
    await h.wait_gone("j")
    await h.wait_gone("k")
    assert [e.name for e in h.events if e.name.startswith("BLOCK_JOB")] == ["BLOCK_JOB_CANCELLED"] * 2
    await h("drive-backup", **{"job-id": "m"}, device="s", target=str(h.tmp / "m.raw"), speed=1, sync="full")
    await h("job-pause", id="m")
    await h("block-job-cancel", device="m", force=True)
    await h.wait_gone("m")


async def test_close_cancels_jobs(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    await h("blockdev-add", driver="file", filename=str(h.image("s.raw")), **{"node-name": "s"})
    await h("drive-backup", **{"job-id": "j"}, device="s", target=str(h.tmp / "t.raw"), sync="full", speed=1)
    await h.reg.close()
    assert h.statuses("j")[-3:] == ["aborting", "concluded", "null"]
    assert h.reg.nodes == {} and h.reg.jobs == {}


async def test_backup_to_own_export_of_the_source_refused(h: Harness) -> None:
    await h("blockdev-add", driver="file", filename=str(h.image("s.raw")), **{"node-name": "f"})
    await h("blockdev-add", driver="raw", file="f", **{"node-name": "s"})
    sock = h.tmp / "nbd.sock"
    await h("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    await h("block-export-add", type="nbd", id="e", **{"node-name": "s"}, writable=True)
    for device in ("s", "f"):
        for uri in (f"nbd+unix:///s?socket={sock}", f"nbd+unix://?socket={sock}"):
            desc = (await h.error("drive-backup", device=device, target=uri, sync="full", mode="existing"))[1]
            assert desc == "Source and target cannot be the same"


async def test_cbw_options_are_validated_before_side_effects(h: Harness) -> None:
    """``x-cbw-timeout`` / ``x-on-cbw-error``: our extension (QEMU's copy-before-write filter options),
    checked with QEMU's texts like every argument, before any target or job exists."""
    await h("blockdev-add", driver="file", filename=str(h.image("src.raw")), **{"node-name": "src"})
    await h("blockdev-add", driver="null-co", size=MiB, **{"node-name": "t0"})
    t = str(h.tmp / "t.raw")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"x-cbw-timeout": "1"}, "Parameter 'x-cbw-timeout' expects uint64"),  # QEMU's unsigned visitor
        ({"x-cbw-timeout": 1.5}, "Parameter 'x-cbw-timeout' expects uint64"),
        ({"x-cbw-timeout": -1}, "Parameter 'x-cbw-timeout' expects uint32_t"),
        ({"x-cbw-timeout": 1 << 32}, "Parameter 'x-cbw-timeout' expects uint32_t"),
        ({"x-on-cbw-error": "break-both"}, "Parameter 'x-on-cbw-error' does not accept value 'break-both'"),
        ({"x-on-cbw-error": 1}, "Invalid parameter type for 'x-on-cbw-error', expected: string"),
        ({"on-cbw-error": "break-snapshot"}, "Parameter 'on-cbw-error' is unexpected"),  # as QEMU 7.2
        ({"cbw-timeout": 1}, "Parameter 'cbw-timeout' is unexpected"),
    ]
    for extra, text in cases:
        assert await h.error("drive-backup", device="src", target=t, sync="full", **extra) == ("GenericError", text)
        assert (await h.error("blockdev-backup", device="src", target="t0", sync="full", **extra))[1] == text
        action = {"type": "drive-backup", "data": {"device": "src", "target": t, "sync": "full", **extra}}
        desc = (await h.error("transaction", actions=[action]))[1]
        name = next(iter(extra))  # QEMU names the full path in some texts, the bare member in others
        assert desc in (text, text.replace(f"'{name}'", f"'actions[0].data.{name}'")), desc
    assert not exists(t)
    assert h.events == [] and h.reg.jobs == {}
    assert h.reg.nodes["src"].filters == []


async def test_cbw_options_reach_the_filter(h: Harness) -> None:
    await h("blockdev-add", driver="file", filename=str(h.image("s.raw", 4 * MiB)), **{"node-name": "s"})
    await h("blockdev-add", driver="null-co", size=4 * MiB, **{"node-name": "n"})

    def action(kind: str, **data: Any) -> dict[str, Any]:
        return {"type": kind, "data": data}

    await h(
        "transaction",
        actions=[
            action("drive-backup", **{"job-id": "a", "x-cbw-timeout": 7}, device="s", target=str(h.tmp / "t.raw"),
                   sync="full", speed=1),
            action("blockdev-backup", **{"job-id": "b", "x-on-cbw-error": "break-snapshot"}, device="s", target="n",
                   sync="none"),
        ],
    )  # fmt: skip
    await h("drive-backup", **{"job-id": "c", "x-cbw-timeout": 0}, device="s", target=str(h.tmp / "c.raw"), sync="full")
    seen = {}
    for job_id in ("a", "b"):
        job = h.reg.jobs[job_id]
        assert job.filter is not None  # type: ignore[attr-defined]
        seen[job_id] = (job.filter.cbw_timeout, str(job.filter.on_cbw_error))  # type: ignore[attr-defined]
    assert seen == {"a": (7.0, "break-guest-write"), "b": (0.0, "break-snapshot")}
    for job_id in ("a", "b"):
        await h("block-job-cancel", device=job_id, force=True)
        await h.wait_gone(job_id)
    await h.wait_gone("c")
    assert h.reg.nodes["s"].filters == []


async def test_nbd_node_request_timeout(h: Harness) -> None:
    """``x-request-timeout`` (our extension; QEMU's nbd driver has none): a node whose server stays silent
    with requests in flight fails them with ETIMEDOUT. Default none, as QEMU."""
    from nbd.client import NbdClient

    await h("blockdev-add", driver="null-co", size=MiB, **{"node-name": "n0"})
    sock = str(h.tmp / "nbd.sock")
    await h("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    await h("block-export-add", type="nbd", id="e0", **{"node-name": "n0"}, writable=True)
    server = {"type": "unix", "path": sock}
    desc = (await h.error("blockdev-add", driver="nbd", server=server, **{"node-name": "r", "x-request-timeout": -1}))[
        1
    ]
    assert desc == "Parameter 'x-request-timeout' expects uint32_t"
    await h("blockdev-add", driver="nbd", server=server, export="n0", **{"node-name": "r5", "x-request-timeout": 5})
    await h("blockdev-add", driver="nbd", server=server, export="n0", **{"node-name": "r0"})
    timeouts = {}
    for name in ("r5", "r0"):
        device = h.reg.nodes[name].device
        assert isinstance(device, NbdClient)
        timeouts[name] = device.request_timeout
    assert timeouts == {"r5": 5.0, "r0": None}
    for name in ("r5", "r0"):
        await h("blockdev-del", **{"node-name": name})


async def test_allow_dir_confines_the_unix_sockets_the_daemon_connects_to(tmp_path: Path) -> None:
    """blockdev-add driver=nbd and drive-backup nbd+unix targets name a socket the daemon connects
    to: with --allow-dir it must resolve inside an allowed directory (a symlink does not help), and a
    refused one is never connected to."""
    from backup.memory import MemoryDevice
    from nbd.server import Export, NbdServer

    allowed, outside = tmp_path / "ok", tmp_path / "out"
    allowed.mkdir()
    outside.mkdir()
    h = Harness(tmp_path, allow=[allowed])
    spy = _listener(outside / "spy.sock")  # another service's socket: nothing may connect to it
    spy.setblocking(False)
    (allowed / "link.sock").symlink_to(outside / "spy.sock")
    server = NbdServer()
    server.add_export(Export("disk", MemoryDevice(MiB)))
    await server.listen_unix(allowed / "nbd.sock")
    try:
        await h("blockdev-add", driver="null-co", size=MiB, **{"node-name": "src"})
        for path in (outside / "spy.sock", allowed / "link.sock"):
            server_arg = {"type": "unix", "path": str(path)}
            kind, desc = await h.error("blockdev-add", driver="nbd", server=server_arg, **{"node-name": "t"})
            assert kind == "GenericError" and "allowed directories" in desc, desc
            target = f"nbd+unix:///disk?socket={path}"
            kind, desc = await h.error("drive-backup", device="src", target=target, sync="full")
            assert kind == "GenericError" and "allowed directories" in desc, desc
        with pytest.raises(BlockingIOError):
            spy.accept()  # nobody connected
        assert not h.reg.jobs

        inside = {"type": "unix", "path": str(allowed / "nbd.sock")}
        await h("blockdev-add", driver="nbd", server=inside, export="disk", **{"node-name": "t"})
        assert server.connections >= 1  # connected where the socket resolved
        await h("blockdev-del", **{"node-name": "t"})
    finally:
        spy.close()
        await h.reg.close()
        await server.stop()


def _bitmap(name: str, *, recording: bool = True, busy: bool = False, inconsistent: bool = False) -> DirtyBitmap:
    """A node's dirty bitmap in the state a test needs (busy: held by a job or export)."""
    bitmap = DirtyBitmap(name, MiB, recording=recording, inconsistent=inconsistent)
    bitmap.busy = busy
    return bitmap


async def test_block_export_add_publishes_bitmaps_and_allocation_depth(h: Harness) -> None:
    await h("blockdev-add", driver="null-co", size=MiB, **{"node-name": "n0"})
    bitmaps = {
        "on": _bitmap("on"),
        "off": _bitmap("off", recording=False),
        "used": _bitmap("used", busy=True),
        "bad": _bitmap("bad", inconsistent=True),
    }
    h.reg.node("n0").bitmaps.update(bitmaps)
    await h("nbd-server-start", addr={"type": "unix", "data": {"path": str(h.tmp / "nbd.sock")}})

    async def refused(**args: Any) -> str:
        error_class, desc = await h.error("block-export-add", type="nbd", id="e", **{"node-name": "n0"}, **args)
        assert error_class == "GenericError"
        return desc

    assert await refused(bitmaps=["off", "nope"]) == "Bitmap 'nope' is not found"
    assert await refused(bitmaps=["used"]) == (
        "Bitmap 'used' is currently in use by another operation and cannot be used"
    )
    assert await refused(bitmaps=["bad"]) == "Bitmap 'bad' is inconsistent and cannot be used"
    assert await refused(bitmaps=["on"]) == "Enabled bitmap 'on' incompatible with readonly export"
    assert not any(b.busy for name, b in bitmaps.items() if name != "used")  # refusals claim nothing

    await h(
        "block-export-add", type="nbd", id="e", **{"node-name": "n0"}, bitmaps=["off"], **{"allocation-depth": True}
    )
    assert h.reg.exports["e"].export.contexts == ("qemu:allocation-depth", "qemu:dirty-bitmap:off")
    assert bitmaps["off"].busy  # as QEMU: an exported bitmap is busy until the export goes
    desc = (await h.error("block-export-add", type="nbd", id="e2", **{"node-name": "n0"}, name="x", bitmaps=["off"]))[1]
    assert desc == "Bitmap 'off' is currently in use by another operation and cannot be used"
    # a writable export may publish a recording bitmap; the old nbd-server-add takes one bitmap
    await h("block-export-add", type="nbd", id="w", **{"node-name": "n0"}, name="w", writable=True, bitmaps=["on"])
    assert h.reg.exports["w"].export.contexts == ("qemu:dirty-bitmap:on",)
    await h("block-export-del", id="e")
    await h("block-export-del", id="w")
    assert not bitmaps["off"].busy and not bitmaps["on"].busy
    await h("nbd-server-add", device="n0", name="old", bitmap="off")
    assert h.reg.exports["old"].export.contexts == ("qemu:dirty-bitmap:off",)
    await h("nbd-server-stop")
    assert not bitmaps["off"].busy


async def test_block_export_add_bitmaps_of_other_nodes_and_twice(h: Harness) -> None:
    """Answers as qemu-storage-daemon 7.2 gave them: ``{node, name}`` names another node's bitmap,
    whose recording is not checked against a read-only export; a bitmap may be named twice."""
    for name in ("n0", "n1"):
        await h("blockdev-add", driver="null-co", size=MiB, **{"node-name": name})
    h.reg.node("n0").add_bitmap(_bitmap("b0"))
    h.reg.node("n1").add_bitmap(_bitmap("x"))
    await h("nbd-server-start", addr={"type": "unix", "data": {"path": str(h.tmp / "nbd.sock")}})
    args: dict[str, Any] = {"type": "nbd", "node-name": "n0"}
    assert (await h.error("block-export-add", id="e", **args, bitmaps=[{"node": "nz", "name": "x"}])) == (
        "GenericError",
        "Node 'nz' not found",
    )
    assert (await h.error("block-export-add", id="e", **args, bitmaps=[{"node": "n1", "name": "zz"}]))[1] == (
        "Dirty bitmap 'zz' not found"
    )
    await h("block-export-add", id="e", **args, bitmaps=[{"node": "n1", "name": "x"}])
    assert h.reg.exports["e"].export.contexts == ("qemu:dirty-bitmap:x",)
    await h("block-export-add", id="e5", **args, name="e5", writable=True, bitmaps=["b0", "b0"])
    assert h.reg.exports["e5"].export.contexts == ("qemu:dirty-bitmap:b0",) * 2
