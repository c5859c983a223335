"""Declared device capabilities (``nbd.device``): what each device offers, the one rule for reads
that may go straight to a file descriptor (the NBD server's ``sendfile`` included, through a
copy-before-write filter while a guest write races), node ownership, compression chosen at open."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import nbd.server
from backup.block_copy import BlockCopier
from backup.cbw import CopyBeforeWriteFilter
from backup.filter import BlockFilter
from backup.images import create_image, open_image
from backup.memory import MemoryDevice
from backup.node import BlockNode
from backup.probed_raw import ProbedRawGuard
from backup.qcow2 import Qcow2Device
from backup.rawfile import RawFileDevice
from nbd.client import NbdClient
from nbd.device import (
    backing_of,
    can_compress,
    cluster_size,
    direct_read_fd,
    direct_write_fd,
    file_path,
    format_name,
    hold,
    read_into,
    release,
    remote_uri,
    top_allocation,
    write_from_fd,
)
from nbd.server import Export, NbdServer
from server.errors import QmpError
from server.registry import Registry

MiB = 1 << 20
CS = 65536


async def test_what_each_device_offers(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    raw = await RawFileDevice.open(tmp_path / "base.raw")
    ro = await RawFileDevice.open(tmp_path / "base.raw", read_only=True)
    top = await create_image(tmp_path / "top.qcow2", MiB, format="qcow2", backing_file="base.raw", backing_format="raw")
    memory = MemoryDevice(MiB)
    try:
        assert direct_read_fd(raw) is not None and direct_write_fd(raw) == direct_read_fd(raw)
        assert direct_write_fd(ro) is None and direct_read_fd(ro) is not None
        assert read_into(raw) is not None and write_from_fd(raw) is None and top_allocation(raw) is None
        assert file_path(raw) == str(tmp_path / "base.raw") and format_name(raw) is None
        assert backing_of(raw) is None and cluster_size(raw) is None and not can_compress(raw)
        assert remote_uri(raw) is None

        assert direct_read_fd(top) is None and direct_write_fd(top) is None and read_into(top) is None
        assert top_allocation(top) is not None and format_name(top) == "qcow2" and cluster_size(top) == CS
        assert can_compress(top) and file_path(backing_of(top)) == str(tmp_path / "base.raw")

        for nothing in (memory, None, object()):
            assert direct_read_fd(nothing) is None and direct_write_fd(nothing) is None
            assert read_into(nothing) is None and write_from_fd(nothing) is None and top_allocation(nothing) is None
            assert backing_of(nothing) is None and file_path(nothing) is None and format_name(nothing) is None
            assert cluster_size(nothing) is None and not can_compress(nothing) and remote_uri(nothing) is None
    finally:
        for device in (raw, ro, top):
            await device.close()
    assert direct_read_fd(raw) is None and direct_write_fd(raw) is None  # closed


async def test_an_nbd_client_writes_from_files_and_reads_into_buffers(tmp_path: Path) -> None:
    server = NbdServer()
    server.add_export(Export("m", MemoryDevice(MiB), writable=True))
    await server.listen_unix(tmp_path / "m.sock")
    client = await NbdClient.connect(f"nbd+unix:///m?socket={tmp_path / 'm.sock'}")
    try:
        assert write_from_fd(client) is not None and read_into(client) is not None
        assert direct_read_fd(client) is None and top_allocation(client) is None and file_path(client) is None
        uri = remote_uri(client)
        assert uri is not None and uri.export == "m" and uri.is_local
    finally:
        await client.close()
        await server.stop()


async def test_nodes_and_filters_answer_for_reads_by_descriptor(tmp_path: Path) -> None:
    """Through a node to the top of its stack, through filters only while they pass reads."""
    (tmp_path / "a.raw").write_bytes(bytes(MiB))
    raw = await RawFileDevice.open(tmp_path / "a.raw")
    fd = raw.direct_read_fd()
    node = BlockNode("n", ProbedRawGuard(raw))
    assert direct_read_fd(node) == fd
    copier = BlockCopier(node, MemoryDevice(raw.size), size=raw.size, cluster_size=CS, target_zero_init=True)
    cbw = node.insert_filter(lambda below: CopyBeforeWriteFilter(below, copier))
    assert direct_read_fd(node) == fd and direct_read_fd(cbw) == fd
    changer = node.insert_filter(BlockFilter)  # may change what reads return
    assert direct_read_fd(node) is None and direct_read_fd(cbw) == fd
    node.remove_filter(changer)
    assert direct_read_fd(node) == fd
    assert direct_read_fd(BlockNode("m", MemoryDevice(MiB))) is None
    await node.close()
    assert direct_read_fd(node) is None


def test_nodes_are_held_and_released() -> None:
    node = BlockNode("n", MemoryDevice(MiB))
    export, job = object(), object()
    node.hold(export)
    hold(node, job)
    assert node.users == {export, job}
    snapshot = node.users
    node.release(export)
    node.release(export)  # twice: harmless
    release(node, object())  # never held: harmless
    assert node.users == {job} and snapshot == {export, job}  # users is a snapshot, not the set itself
    assert not hasattr(node.users, "add")
    release(node, job)
    assert node.users == set()
    memory = MemoryDevice(MiB)
    hold(memory, export)  # nobody deletes a bare device: nothing to hold
    release(memory, export)


async def test_a_held_node_cannot_be_deleted() -> None:
    reg = Registry()
    node = reg.add_node(BlockNode("n", MemoryDevice(MiB)))
    user = object()
    node.hold(user)
    with pytest.raises(QmpError, match="Block device n is in use"):
        await reg.remove_node("n")
    node.release(user)
    await reg.remove_node("n")
    assert "n" not in reg.nodes


# --- the NBD server's sendfile through copy-before-write --------------------------------------------


class GatedTarget(BlockFilter):
    """A backup target whose writes wait until the test opens the gate."""

    def __init__(self, device: MemoryDevice) -> None:
        super().__init__(device)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        self.entered.set()
        await self.gate.wait()
        await super().pwrite(offset, data, fua=fua)


@dataclass
class Served:
    node: BlockNode
    target: GatedTarget
    client: NbdClient
    old: bytes
    sendfiles: list[tuple[int, int, bool]]


@pytest.fixture
async def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    old = random.Random(12).randbytes(4 * MiB)
    (tmp_path / "src.raw").write_bytes(old)
    source = await RawFileDevice.open(tmp_path / "src.raw")
    node = BlockNode("src", source)
    target = GatedTarget(MemoryDevice(source.size))
    copier = BlockCopier(node, target, size=source.size, cluster_size=CS, target_zero_init=True)
    node.insert_filter(lambda below: CopyBeforeWriteFilter(below, copier))
    sendfiles: list[tuple[int, int, bool]] = []
    real = nbd.server._Connection._sendfile

    def spy(conn: Any, request: Any, fd: int) -> bool:
        sent = real(conn, request, fd)
        sendfiles.append((request.offset, request.length, sent))
        return sent

    monkeypatch.setattr(nbd.server._Connection, "_sendfile", spy)
    server = NbdServer()
    server.add_export(Export("src", node, writable=True))
    await server.listen_unix(tmp_path / "s.sock")
    client = await NbdClient.connect(f"nbd+unix:///src?socket={tmp_path / 's.sock'}")
    try:
        yield Served(node, target, client, old, sendfiles)
    finally:
        target.gate.set()
        await client.close()
        await server.stop()
        await node.close()
        os.unlink(tmp_path / "src.raw")


async def test_reads_through_copy_before_write_go_by_sendfile(served: Served) -> None:
    """A copy-before-write filter passes reads, so the export reads the source's file by sendfile."""
    assert await served.client.pread(MiB, MiB) == served.old[MiB : 2 * MiB]
    assert served.sendfiles == [(MiB, MiB, True)]


async def test_a_read_racing_a_guest_write_through_copy_before_write(served: Served) -> None:
    """The guest write waits for its old data to reach the target; a read of the same range by
    sendfile meanwhile returns the source as it still is, and once the write is done, the new data."""
    node, target, client = served.node, served.target, served.client
    new = bytes([0xA5]) * (2 * CS)
    offset = 2 * MiB + CS
    write = asyncio.ensure_future(node.pwrite(offset, new))
    await asyncio.wait_for(target.entered.wait(), 10)  # the old data is on its way to the target
    window = slice(2 * MiB, 2 * MiB + 512 * 1024)
    assert await client.pread(window.start, window.stop - window.start) == served.old[window]
    assert not write.done()
    target.gate.set()
    await write
    expected = bytearray(served.old[window])
    expected[offset - window.start : offset - window.start + len(new)] = new
    assert await client.pread(window.start, window.stop - window.start) == expected
    assert [sent for _, _, sent in served.sendfiles] == [True, True]
    # The point in time is intact: the target holds the old data of the overwritten clusters.
    assert await target.pread(offset, len(new)) == served.old[offset : offset + len(new)]


async def test_no_sendfile_under_a_filter_that_changes_reads(served: Served) -> None:
    served.node.insert_filter(BlockFilter)  # passes_reads False: its reads may differ from the file's
    assert await served.client.pread(0, MiB) == served.old[:MiB]
    assert served.sendfiles == []


# --- compression chosen when the target is opened ---------------------------------------------------


async def test_drive_backup_compresses_an_existing_qcow2_target(tmp_path: Path) -> None:
    from server.daemon import build_commands

    reg, commands = Registry(), build_commands()
    source = tmp_path / "src.raw"
    source.write_bytes(b"".join(b"compressible line %08d\n" % i for i in range(2 * MiB // 28)).ljust(2 * MiB, b"\0"))
    target = tmp_path / "t.qcow2"
    await (await create_image(target, 2 * MiB, format="qcow2")).close()
    try:
        await commands.dispatch(reg, "blockdev-add", {"driver": "file", "filename": str(source), "node-name": "src"})
        args = {"device": "src", "target": str(target), "sync": "full", "format": "qcow2", "mode": "existing"}
        await commands.dispatch(reg, "drive-backup", {**args, "compress": True})
        for _ in range(2000):
            if "src" not in reg.jobs:
                break
            await asyncio.sleep(0.005)
        assert "src" not in reg.jobs
    finally:
        await reg.close()
    assert target.stat().st_size < MiB  # stored compressed
    device = await open_image(target, format="qcow2", read_only=True)
    try:
        assert isinstance(device, Qcow2Device) and not device.compress
        assert await device.pread(0, 2 * MiB) == source.read_bytes()
    finally:
        await device.close()
