"""``drive-backup`` / ``blockdev-backup`` arguments are validated and resolved once, into a typed
``BackupRequest`` whose target is a path, an NBD URI or a node; preparing the job acts on that type
and never looks at the target string again."""

from __future__ import annotations

from pathlib import Path

import pytest

from backup.errors import InvalidArgument, different_sizes, same_source_and_target
from server.errors import QmpError
from server.paths import PathPolicy
from server.qmp.jobs import (
    FileTarget,
    NbdTarget,
    NodeTarget,
    prepare_backup,
    resolve_blockdev_backup,
    resolve_drive_backup,
)
from server.registry import Registry

MiB = 1 << 20


@pytest.fixture
async def reg(tmp_path: Path) -> Registry:
    from backup.images import open_image
    from backup.node import BlockNode

    registry = Registry(paths=PathPolicy([tmp_path]))
    for name in ("src", "other"):
        path = tmp_path / f"{name}.raw"
        path.write_bytes(b"\x5a" * MiB)
        registry.add_node(BlockNode(name, await open_image(path, format="raw"), driver="raw", filename=str(path)))
    yield registry
    await registry.close()


async def test_drive_backup_targets_resolve_to_a_path_or_a_uri(reg: Registry, tmp_path: Path) -> None:
    given = f"{tmp_path}/sub/../t.qcow2"
    (tmp_path / "sub").mkdir()
    request = resolve_drive_backup(reg, {"device": "src", "sync": "full", "target": given, "format": "qcow2"})
    assert request.job_id == "src" and request.source is reg.node("src")
    assert request.target == FileTarget(
        given=given, path=str(tmp_path / "t.qcow2"), format="qcow2", mode="absolute-paths", backing=None
    )
    uri = f"nbd+unix:///e?socket={tmp_path}/sub/../s.sock"
    request = resolve_drive_backup(reg, {"device": "src", "sync": "full", "target": uri, "job-id": "j"})
    assert request.job_id == "j"
    assert request.target == NbdTarget(given=uri, connect_to=f"nbd+unix:///e?socket={tmp_path}/s.sock")


async def test_blockdev_backup_target_is_a_node(reg: Registry) -> None:
    request = resolve_blockdev_backup(reg, {"device": "src", "sync": "full", "target": "other"})
    assert request.target == NodeTarget(reg.node("other"))
    with pytest.raises(InvalidArgument, match=r"^Source and target cannot be the same$"):
        resolve_blockdev_backup(reg, {"device": "src", "sync": "full", "target": "src"})


async def test_a_file_target_stays_a_file_whatever_its_name(reg: Registry, tmp_path: Path) -> None:
    """The target was classified once: a path that reads like a URI is not looked at again."""
    request = resolve_drive_backup(reg, {"device": "src", "sync": "full", "target": str(tmp_path / "t.raw")})
    assert isinstance(request.target, FileTarget)
    named = tmp_path / "nbd:lookalike"
    request.target = FileTarget(given=str(named), path=str(named), format="raw", mode="absolute-paths", backing=None)
    prepared = await prepare_backup(reg, request)
    try:
        assert prepared.target.path == named
    finally:
        await prepared.abort()


def test_one_helper_per_refusal() -> None:
    assert str(same_source_and_target()) == "Source and target cannot be the same"
    assert str(different_sizes("target", 3, 2)) == (
        "Source and target image have different sizes (target: 3 bytes, source: 2 bytes)"
    )


async def test_the_checks_keep_qemus_texts(reg: Registry, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"^Source and target cannot be the same$"):
        resolve_drive_backup(reg, {"device": "src", "sync": "full", "target": str(tmp_path / "src.raw")})
    with pytest.raises(QmpError, match=r"^Target '.*other.raw' is in use by block node 'other'$"):
        resolve_drive_backup(reg, {"device": "src", "sync": "full", "target": str(tmp_path / "other.raw")})
    with pytest.raises(QmpError, match=r"^an NBD target is written as raw; 'format' must be 'raw'$"):
        resolve_drive_backup(reg, {"device": "src", "sync": "full", "target": "nbd://h/e", "format": "qcow2"})
