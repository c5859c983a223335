"""Images opened without a format (probed), as QEMU guards them: a probed raw image refuses writes
that would make its first sector probe as another format; a probed qcow2's backing file is never
followed; the daemon warns when an export's format was probed."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path

import pytest
from qcow2kit import small_header

from backup.errors import ImageFormatError
from backup.images import open_image
from backup.probed_raw import image_format_of
from backup.qcow2 import Qcow2Device
from backup.qcow2.header import build_header
from nbd.device import BlockDevice
from server.daemon import Daemon

MiB = 1 << 20


def qcow2_header(backing: str = "/etc/shadow") -> bytes:
    """What a hostile client writes: a qcow2 header naming a host file as its backing file."""
    header = small_header(size=MiB, header_length=112, backing_file=backing, backing_format="raw")
    return build_header(header)[:512]


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xeb\x63\x90" + bytes(509) + b"D" * (MiB - 512))  # a boot sector, then data
    return path


def content(path: Path) -> bytes:
    return path.read_bytes()


async def refused(coro: object) -> None:
    with pytest.raises(OSError) as info:
        await coro  # type: ignore[misc]
    assert info.value.errno == errno.EPERM


def test_first_sector_formats() -> None:
    assert image_format_of(bytes(512)) is None and image_format_of(b"\xeb\x63\x90" + bytes(509)) is None
    assert image_format_of(qcow2_header()) == "qcow2"
    assert image_format_of(b"QED\x00" + bytes(508)) == "qed"
    assert image_format_of(b"conectix" + bytes(504)) == "vpc"
    assert image_format_of(bytes(64) + (0xBEDA107F).to_bytes(4, "little") + bytes(444)) == "vdi"
    assert image_format_of(b"# Disk DescriptorFile\n  \nversion=1\n" + bytes(476)) == "vmdk"
    assert image_format_of(b"# Disk DescriptorFile\n  version=1\n" + bytes(478)) is None  # as QEMU
    assert image_format_of(b"# just a comment\nhello\n" + bytes(489)) is None


async def test_probed_raw_refuses_first_sector_writes_that_change_the_probe(disk: Path) -> None:
    before = content(disk)
    device = await open_image(disk)
    try:
        await refused(device.pwrite(0, qcow2_header()))
        await refused(device.pwrite(0, qcow2_header() + b"x" * MiB))  # larger than the sector
        await device.pwrite(0, b"QF")  # harmless alone ...
        await refused(device.pwrite(2, b"I\xfb"))  # ... but not with the rest of the magic
        await device.flush()
        assert content(disk) == b"QF" + before[2:]
        await device.pwrite(0, b"QED\x07")
        await refused(device.zero(3, 1))  # zeroing can complete a magic too
        await refused(device.trim(3, 1))  # trimmed bytes may read as zeroes: "QED\0" again
        await device.pwrite(0, b"\xeb\x63\x90\x00")
        await device.pwrite(512, qcow2_header())  # elsewhere: anything goes
        await device.zero(0, 4096)
        await device.flush()
        after = content(disk)
        assert after[:4096] == bytes(4096) and after[4096:] == before[4096:]
    finally:
        await device.close()


async def test_concurrent_first_sector_writes_are_checked_one_after_the_other(disk: Path) -> None:
    device = await open_image(disk)
    try:
        results = await asyncio.gather(device.pwrite(0, b"QF"), device.pwrite(2, b"I\xfb"), return_exceptions=True)
        assert sum(isinstance(r, OSError) and r.errno == errno.EPERM for r in results) == 1, results
        assert image_format_of(await device.pread(0, 512)) is None
    finally:
        await device.close()


async def test_explicit_raw_and_read_only_are_not_guarded(disk: Path) -> None:
    reader = await open_image(disk, read_only=True)
    try:
        assert not hasattr(reader, "next")  # nothing to guard: no writes
    finally:
        await reader.close()
    device = await open_image(disk, format="raw")
    try:
        await device.pwrite(0, qcow2_header())  # the user said raw: as QEMU, the guest may do this
    finally:
        await device.close()
    assert content(disk)[:4] == b"QFI\xfb"


async def test_probed_qcow2_backing_file_never_followed(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"B" * MiB)
    top = await Qcow2Device.create(tmp_path / "top.qcow2", None, backing_file="base.raw")
    await top.close()
    with pytest.raises(ImageFormatError, match="format=qcow2") as info:
        await open_image(tmp_path / "top.qcow2")
    assert "base.raw" in str(info.value)
    device: BlockDevice = await open_image(tmp_path / "top.qcow2", format="qcow2")  # explicit: followed
    try:
        assert await device.pread(0, 2) == b"BB"
    finally:
        await device.close()
    plain = await Qcow2Device.create(tmp_path / "plain.qcow2", MiB)
    await plain.close()
    device = await open_image(tmp_path / "plain.qcow2")  # probed, without a backing file: fine
    await device.close()


async def test_daemon_warns_when_an_export_format_was_probed(
    disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = Daemon()
    try:
        with caplog.at_level(logging.WARNING):
            node = await daemon.open_node("g", disk)
            await daemon.open_node("h", disk, format="raw", read_only=True)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "probing guessed raw" in warnings[0] and str(disk) in warnings[0], warnings
        await refused(node.pwrite(0, qcow2_header()))
    finally:
        await daemon.registry.close()
