"""Qcow2Device safety nets: freed clusters wait for a flush, guest data never lands on metadata, and a
failed sync is never forgotten (the crash-order replay with qemu-img is integration/test_qcow2_crash.py)."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from backup.errors import ImageFormatError
from backup.qcow2 import Qcow2Device
from backup.qcow2 import layout as q
from backup.qcow2.check import check_image
from backup.qcow2.mapping import RunKind

MiB = 1024 * 1024
CS = 65536


def host_of(dev: Qcow2Device, offset: int) -> int:
    """The host offset a guest cluster is stored at (0: none, or compressed)."""
    _, _, kind, host = dev.mapping.runs(offset, CS)[0]
    return host if kind == RunKind.DATA else 0


def compressed_host_of(dev: Qcow2Device, offset: int) -> int:
    _, _, kind, entry = dev.mapping.runs(offset, CS)[0]
    assert kind == RunKind.COMPRESSED
    return q.decode_compressed(entry, dev._cb)[0] & ~(CS - 1)


@pytest.mark.parametrize("how", ["trim", "zero", "rewrite-compressed"])
async def test_freed_cluster_is_not_reused_before_a_flush(tmp_path: Path, how: str) -> None:
    """Reused at once, the cluster would take new data while the durable L2 entry still points to
    it: a crash before the flush would show that data in the freed guest cluster."""
    path = tmp_path / "img.qcow2"
    dev = await Qcow2Device.create(path, 4 * MiB, compress=how == "rewrite-compressed")
    await dev.pwrite(CS, b"\x11" * CS)
    await dev.flush()
    if how == "rewrite-compressed":
        freed = compressed_host_of(dev, CS)
        dev.compress = False
        await dev.pwrite(CS, b"\x22" * 512)  # a partial write: the cluster moves to a fresh one
    else:
        freed = host_of(dev, CS)
        if how == "trim":
            await dev.trim(CS, CS)
        else:
            await dev.zero(CS, CS, may_trim=True)
    dev.compress = False
    await dev.pwrite(10 * CS, b"\x33" * CS)
    assert host_of(dev, 10 * CS) != freed
    await dev.flush()  # the freeing is durable now: the cluster may be reused
    await dev.pwrite(11 * CS, b"\x44" * CS)
    assert host_of(dev, 11 * CS) == freed
    assert await dev.pread(11 * CS, 4) == b"\x44" * 4
    await dev.close()
    result = check_image(str(path))
    assert result.clean, (result.corruptions, result.leaks)


def _point_l2_entry_at_l1_table(path: Path) -> tuple[int, bytes]:
    """Make guest cluster 0's L2 entry name the L1 table's cluster (a corrupt image); returns the
    L1 table's offset and contents."""
    with path.open("r+b") as f:
        head = f.read(104)
        l1_size, l1_offset = struct.unpack_from(">IQ", head, 36)
        f.seek(l1_offset)
        l1 = f.read(l1_size * 8)
        l2_offset = struct.unpack_from(">Q", l1)[0] & q.L1E_OFFSET_MASK
        f.seek(l2_offset)
        f.write(struct.pack(">Q", l1_offset | q.OFLAG_COPIED))
    return l1_offset, l1


@pytest.mark.parametrize("path_taken", ["in place", "reallocated"])
async def test_a_data_write_onto_metadata_is_refused(tmp_path: Path, path_taken: str) -> None:
    path = tmp_path / "img.qcow2"
    dev = await Qcow2Device.create(path, 4 * MiB)
    await dev.pwrite(0, b"a" * CS)
    await dev.close()
    l1_offset, l1 = _point_l2_entry_at_l1_table(path)
    dev = await Qcow2Device.open(path)
    if path_taken == "in place":  # the entry says the guest cluster may be written where it is
        target = 0
    else:  # its cluster is freed, then handed out again by the allocator
        await dev.trim(0, CS)
        await dev.flush()
        target = 5 * CS
    with pytest.raises(OSError) as info:
        await dev.pwrite(target, b"x" * 4096)
    assert info.value.errno == errno.EIO and "overlaps metadata" in str(info.value)
    with pytest.raises(OSError) as again:  # the image is marked corrupt: no more writes
        await dev.pwrite(2 * MiB, b"y" * 4096)
    assert again.value.errno == errno.EIO
    await dev.close()
    with path.open("rb") as f:
        f.seek(l1_offset)
        assert f.read(len(l1)) == l1
        f.seek(q.INCOMPAT_OFFSET)
        assert struct.unpack(">Q", f.read(8))[0] & q.INCOMPAT_CORRUPT
    with pytest.raises(ImageFormatError, match="marked corrupt"):
        await Qcow2Device.open(path)
    ro = await Qcow2Device.open(path, read_only=True)  # still readable, as QEMU allows
    await ro.close()


async def test_a_failed_flush_fails_every_later_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux reports a writeback error once; the next fdatasync succeeds over the lost data."""
    path = tmp_path / "img.qcow2"
    dev = await Qcow2Device.create(path, 4 * MiB)
    await dev.pwrite(0, b"a" * CS)
    ino = os.stat(path).st_ino
    real = os.fdatasync
    failures = []

    def fails_once(fd: int) -> None:
        if os.fstat(fd).st_ino == ino and not failures:
            failures.append(fd)
            raise OSError(errno.EIO, "injected writeback error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fails_once)
    with pytest.raises(OSError, match="injected"):
        await dev.flush()
    attempts = (
        lambda: dev.flush(),
        lambda: dev.pwrite(CS, b"b" * CS, fua=True),
        lambda: dev.zero(0, CS, fua=True),
        lambda: dev.trim(0, CS, fua=True),
    )
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            await attempt()
        assert info.value.errno == errno.EIO and "earlier flush failed" in str(info.value)
    await dev.pwrite(2 * CS, b"c" * CS)  # plain writes go on, as in QEMU; only their flush fails
    with pytest.raises(OSError) as closing:
        await dev.close()
    assert closing.value.errno == errno.EIO
    assert check_image(str(path)).dirty  # never marked clean: detectably incomplete
    assert len(failures) == 1


async def test_check_reports_a_wild_refcount_table_entry(tmp_path: Path) -> None:
    """What a refcount table made durable before its blocks can hold: a finding, not a crash."""
    path = tmp_path / "img.qcow2"
    dev = await Qcow2Device.create(path, 4 * MiB)
    await dev.close()
    with path.open("r+b") as f:
        reftable_offset = struct.unpack_from(">Q", f.read(104), 48)[0]
        f.seek(reftable_offset + 8)
        f.write(struct.pack(">Q", 0x8000_0000_0080_8000))
    result = check_image(str(path))
    assert any("refcount table entry 1" in c for c in result.corruptions)
