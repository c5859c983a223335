"""The qcow2 branch of ``backup.images`` and backup targets created as qcow2."""

from __future__ import annotations

from pathlib import Path

import pytest

from backup.errors import ImageFormatError
from backup.images import create_image, open_image, probe_format
from backup.qcow2 import Qcow2Device
from backup.qcow2.check import check_image
from backup.targets import open_target

MiB = 1024 * 1024


async def test_create_and_open_qcow2_through_images(tmp_path: Path) -> None:
    path = tmp_path / "img.qcow2"
    dev = await create_image(path, 3 * MiB, format="qcow2", cluster_size=4096)
    assert isinstance(dev, Qcow2Device) and dev.cluster_size == 4096
    await dev.pwrite(0, b"hello")
    await dev.close()
    assert probe_format(path) == "qcow2"
    for fmt in (None, "qcow2"):
        again = await open_image(path, format=fmt, read_only=True)
        assert isinstance(again, Qcow2Device) and await again.pread(0, 5) == b"hello"
        await again.close()
    with pytest.raises(ImageFormatError, match="is a qcow2 image"):
        await open_image(path, format="raw")


async def test_raw_cannot_take_qcow2_options(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    with pytest.raises(ImageFormatError, match="backing file"):
        await create_image(tmp_path / "x.raw", MiB, format="raw", backing_file=str(base))
    with pytest.raises(ImageFormatError, match="Compression"):
        await create_image(tmp_path / "x.raw", MiB, format="raw", compress=True)
    with pytest.raises(ImageFormatError, match="not a qcow2 image"):
        await open_image(base, format="qcow2")


async def test_backing_file_schemes(tmp_path: Path) -> None:
    """sync=none: the source is the target's backing file; size defaults to the backing's."""
    source = tmp_path / "disk.raw"
    source.write_bytes(b"S" * (2 * MiB))
    target = await create_image(tmp_path / "fleece.qcow2", None, format="qcow2", backing_file=str(source))
    assert isinstance(target, Qcow2Device)
    assert target.size == 2 * MiB and await target.pread(MiB, 3) == b"SSS"
    assert await target.top_allocation(0, 2 * MiB) == [(2 * MiB, False)]
    await target.close()
    reopened = await Qcow2Device.open(tmp_path / "fleece.qcow2", read_only=True)
    assert reopened.header.backing_file == str(source) and reopened.header.backing_format == "raw"
    await reopened.close()


async def test_backup_target_created_as_qcow2(tmp_path: Path) -> None:
    path = tmp_path / "backup.qcow2"
    target = await open_target(str(path), size=MiB, format="qcow2", mode="absolute-paths")
    assert isinstance(target.device, Qcow2Device) and target.zero_init and target.created == path
    await target.device.pwrite(0, b"x" * 65536)
    await target.close()
    target.complete()
    assert check_image(str(path)).clean
    reopened = await open_target(str(path), size=MiB, mode="existing")
    assert isinstance(reopened.device, Qcow2Device) and not reopened.zero_init
    await reopened.close()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_created_image_is_durable_in_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """A new image's directory entry is fsynced too (else a crash can lose the whole file)."""
    import os
    import stat

    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            synced.append((st.st_dev, st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    dev = await create_image(tmp_path / f"new.{fmt}", MiB, format=fmt)
    await dev.close()
    st = os.stat(tmp_path)
    assert (st.st_dev, st.st_ino) in synced


async def test_backing_device_serves_an_image_whose_header_names_no_backing_file(tmp_path: Path) -> None:
    """QEMU's ``backing`` option: a fleecing overlay created without a backing file reads its
    unallocated clusters from the live source node it is given; the source stays open after."""
    from backup.rawfile import RawFileDevice

    source = tmp_path / "src.raw"
    source.write_bytes(b"s" * (1 << 20))
    overlay = await create_image(tmp_path / "fleece.qcow2", 1 << 20, format="qcow2")
    await overlay.close()
    live = await RawFileDevice.open(source)
    device = await open_image(tmp_path / "fleece.qcow2", format="qcow2", backing_device=live)
    try:
        await device.pwrite(65536, b"o" * 65536)
        assert await device.pread(0, 4) == b"ssss" and await device.pread(65536, 4) == b"oooo"
    finally:
        await device.close()
    assert await live.pread(65536, 4) == b"ssss"  # still open, untouched
    await live.close()
    with pytest.raises(ImageFormatError, match="raw image cannot have a backing file"):
        await open_image(source, format="raw", backing_device=live)
