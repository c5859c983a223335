"""open_target: created raw files, existing images, devices; sizes, zero-init, cleanup on discard."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backup.errors import InvalidArgument
from backup.memory import MemoryDevice
from backup.targets import open_target, reads_as_zeroes

SIZE = 1024 * 1024 + 100  # not a multiple of 512


async def test_creates_a_sparse_raw_file_rounded_up(tmp_path: Path) -> None:
    path = tmp_path / "new.img"
    target = await open_target(str(path), size=SIZE)
    try:
        assert target.zero_init and target.owned
        assert target.created == path and target.partial is not None
        assert target.partial.parent == tmp_path and target.partial.name.startswith(".new.img.partial-")
        assert not path.exists()  # written under the temporary name until the backup completes
        assert target.partial.stat().st_size == 1024 * 1024 + 512
        assert os.stat(target.partial).st_blocks == 0
    finally:
        await target.discard()
    assert os.listdir(tmp_path) == []  # discard removes what open_target created


async def test_a_completed_target_is_renamed_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "done.img"
    target = await open_target(str(path), size=SIZE)
    assert synced == [str(tmp_path)]  # the new name is durable
    await target.device.pwrite(0, b"data")
    await target.device.flush()
    await target.close()
    target.complete()
    assert synced == [str(tmp_path)] * 2  # and so is the rename
    assert os.listdir(tmp_path) == ["done.img"] and path.read_bytes()[:4] == b"data"
    await target.discard()  # after completion: nothing to undo
    assert path.exists()


async def test_existing_file_of_the_right_size_is_used_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "old.img"
    path.write_bytes(b"\x01" * SIZE)
    target = await open_target(path, size=SIZE)
    assert not target.zero_init  # holds data: zeroes must be written
    assert target.created is None
    await target.discard()
    assert path.read_bytes()[:1] == b"\x01"


async def test_existing_file_of_another_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "small.img"
    path.write_bytes(bytes(4096))
    with pytest.raises(InvalidArgument, match="different sizes"):
        await open_target(path, size=SIZE)
    assert path.exists()


async def test_modes(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="No such file"):
        await open_target(tmp_path / "missing.img", size=SIZE, mode="existing")
    path = tmp_path / "recreate.img"
    path.write_bytes(b"\x02" * 8192)
    target = await open_target(path, size=SIZE, mode="absolute-paths")
    assert target.zero_init and target.created is None  # recreated, but it was not ours to delete
    await target.discard()
    assert path.read_bytes() == b"\x02" * 8192  # an abandoned recreation leaves the old file as it was
    assert os.listdir(tmp_path) == ["recreate.img"]
    target = await open_target(path, size=SIZE, mode="absolute-paths")
    await target.close()
    target.complete()
    assert path.stat().st_size == 1024 * 1024 + 512 and os.stat(path).st_blocks == 0


async def test_same_file_as_the_source_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(SIZE))
    with pytest.raises(InvalidArgument, match="cannot be the same"):
        await open_target(str(tmp_path / "." / "disk.img"), size=SIZE, source_filename=str(path))


async def test_a_device_is_used_as_is() -> None:
    device = MemoryDevice(SIZE)
    target = await open_target(device, size=SIZE)
    assert target.device is device and not target.owned and target.zero_init
    await target.discard()
    await device.pread(0, 1)  # not closed: the caller owns it
    await device.pwrite(5, b"x")
    assert not await reads_as_zeroes(device)
    with pytest.raises(InvalidArgument, match="cannot be the same"):
        await open_target(device, size=SIZE, source_device=device)


async def test_an_nbd_target_gets_a_request_timeout(tmp_path: Path) -> None:
    """A stalled NBD target must not hold a backup forever: the client drops a connection that stays
    silent with requests in flight (``TARGET_REQUEST_TIMEOUT`` unless the caller says otherwise)."""
    from backup.targets import TARGET_REQUEST_TIMEOUT
    from nbd.client import NbdClient
    from nbd.server import Export, NbdServer

    server = NbdServer()
    server.add_export(Export("t", MemoryDevice(1 << 20)))
    await server.listen_unix(tmp_path / "t.sock")
    uri = f"nbd+unix:///t?socket={tmp_path / 't.sock'}"
    try:
        for kwargs, expected in (
            ({}, TARGET_REQUEST_TIMEOUT),
            ({"nbd_request_timeout": 5}, 5),
            ({"nbd_request_timeout": 0}, None),
        ):
            target = await open_target(uri, size=1 << 20, **kwargs)  # type: ignore[arg-type]
            assert isinstance(target.device, NbdClient)
            assert target.device.request_timeout == expected
            await target.close()
    finally:
        await server.stop()
    assert 30 <= TARGET_REQUEST_TIMEOUT <= 300
