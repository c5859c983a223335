"""Names of the repository contract: disks, snapshot refs, ids, sizes, chunk sizes."""

from datetime import UTC, datetime

import pytest

from backup.repo.errors import RepoError
from backup.repo.names import (
    new_snapshot_id,
    parse_size,
    parse_snapshot_ref,
    snapshot_time,
    validate_chunk_size,
    validate_disk,
)


@pytest.mark.parametrize("name", ["vm1", "vm1/disk0", "a/b/c/d/e/f/g/h", "_x", "-y.z", "a" * 64, "A.b-c_d"])
def test_valid_disk_names(name: str) -> None:
    assert validate_disk(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "/", "a/", "/a", "a//b", "..", "a/../b", ".hidden", "a@b", "a b", "a" * 65, "a/b/c/d/e/f/g/h/i", "é", "a\\b"],
)
def test_invalid_disk_names(name: str) -> None:
    with pytest.raises(RepoError, match="invalid disk name"):
        validate_disk(name)


def test_snapshot_refs() -> None:
    assert parse_snapshot_ref("vm1/d0") == ("vm1/d0", "latest")
    assert parse_snapshot_ref("vm1/d0@latest") == ("vm1/d0", "latest")
    assert parse_snapshot_ref("d@20261207T101112.000001Z") == ("d", "20261207T101112.000001Z")
    for bad in ("d@", "d@yesterday", "@latest", "d@20261207T101112Z"):
        with pytest.raises(RepoError):
            parse_snapshot_ref(bad)


def test_sizes() -> None:
    assert parse_size("4M") == 4 << 20
    assert parse_size("64K") == 64 << 10
    assert parse_size("1G") == 1 << 30
    assert parse_size("4m") == 4 << 20
    assert parse_size("12345") == 12345
    for bad in ("", "M", "4T", "-1", "4.5M", "4 M"):
        with pytest.raises(RepoError):
            parse_size(bad)


def test_chunk_sizes() -> None:
    for ok in (64 << 10, 128 << 10, 4 << 20, 16 << 20):
        assert validate_chunk_size(ok) == ok
    for bad in (32 << 10, 32 << 20, 3 << 20, 0, 65537):
        with pytest.raises(RepoError, match="chunk size"):
            validate_chunk_size(bad)


def test_ids_are_utc_microseconds_and_strictly_increasing() -> None:
    now = datetime(2026, 12, 7, 10, 11, 12, 345678, tzinfo=UTC)
    first = new_snapshot_id(None, now)
    assert first == "20261207T101112.345678Z"
    assert snapshot_time(first) == now
    # the clock went backwards or stood still: 1 µs after the previous one
    assert new_snapshot_id(first, now) == "20261207T101112.345679Z"
    earlier = datetime(2020, 1, 1, tzinfo=UTC)
    assert new_snapshot_id("20261207T235959.999999Z", earlier) == "20261208T000000.000000Z"
    later = new_snapshot_id(first, datetime(2027, 1, 1, tzinfo=UTC))
    assert later == "20270101T000000.000000Z" > first
    ids = [first]
    for _ in range(50):
        ids.append(new_snapshot_id(ids[-1], now))
    assert ids == sorted(set(ids))
