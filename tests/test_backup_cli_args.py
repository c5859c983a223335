"""``nbd-backup backup`` argument handling: sizes, and the QMP command it builds."""

from __future__ import annotations

import argparse

import pytest

from server.cli import build_parser
from server.commands.backup import backup_arguments, parse_size


def test_parse_size() -> None:
    assert parse_size("1048576") == 1 << 20
    assert parse_size("512K") == 512 << 10
    assert parse_size("50M") == 50 << 20
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("2MiB") == 2 << 20
    for bad in ("", "fast", "-1M", "1X"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_drive_backup_arguments() -> None:
    argv = ["backup", "--qmp", "unix:/q", "d0", "/b/d0.qcow2", "--format", "qcow2", "--speed", "1M"]
    args = build_parser().parse_args([*argv, "--on-target-error", "stop", "--mode", "existing", "--sync", "top"])
    assert backup_arguments(args, "j") == (
        "drive-backup",
        {
            "job-id": "j",
            "device": "d0",
            "target": "/b/d0.qcow2",
            "sync": "top",
            "speed": 1 << 20,
            "on-target-error": "stop",
            "format": "qcow2",
            "mode": "existing",
        },
    )


def test_blockdev_backup_arguments() -> None:
    args = build_parser().parse_args(["backup", "--qmp", "tcp:127.0.0.1:4444", "d0", "t0", "--to-node", "--compress"])
    assert backup_arguments(args, "d0") == (
        "blockdev-backup",
        {"job-id": "d0", "device": "d0", "target": "t0", "sync": "full", "compress": True},
    )


def test_cbw_arguments() -> None:
    """``--cbw-timeout``/``--on-cbw-error`` become our QMP extension ``x-cbw-timeout``/``x-on-cbw-error``
    (sent only when given, so the command still works against QEMU without them)."""
    parser = build_parser()
    argv = ["backup", "--qmp", "unix:/q", "d0", "t0", "--to-node", "--cbw-timeout", "5", "--on-cbw-error"]
    _, arguments = backup_arguments(parser.parse_args([*argv, "break-snapshot"]), "j")
    assert arguments["x-cbw-timeout"] == 5 and arguments["x-on-cbw-error"] == "break-snapshot"
    _, arguments = backup_arguments(parser.parse_args(["backup", "--qmp", "unix:/q", "d0", "/b.raw"]), "j")
    assert not any(key.startswith("x-") for key in arguments)
    _, arguments = backup_arguments(
        parser.parse_args(["backup", "--qmp", "unix:/q", "d0", "/b", "--cbw-timeout=0"]), "j"
    )
    assert arguments["x-cbw-timeout"] == 0
    for bad in (["--cbw-timeout", "-1"], ["--cbw-timeout", "1.5"], ["--cbw-timeout", "x"], ["--on-cbw-error", "oops"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["backup", "--qmp", "unix:/q", "d0", "/b.raw", *bad])


async def test_ctrl_c_that_lands_as_an_event_arrives_is_not_lost() -> None:
    """The command follows its job by waiting for events with a timeout; a cancellation (Ctrl-C) that
    lands in the same loop iteration as an event must still cancel. (``asyncio.wait_for`` on Python
    3.11 returns the event and drops the cancellation: the command then kept following a job it was
    told to cancel.)"""
    import asyncio

    from server.job_follow import next_event

    class Conn:
        def __init__(self) -> None:
            self.arrived: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()

        async def next_event(self) -> dict[str, str]:
            return await self.arrived

    conn = Conn()
    waiting = asyncio.ensure_future(next_event(conn, 5.0))  # type: ignore[arg-type]
    for _ in range(3):
        await asyncio.sleep(0)  # the follower is waiting for the event
    conn.arrived.set_result({"event": "JOB_STATUS_CHANGE"})
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
