"""The qcow2 construct definitions round-trip, and the fast paths (masks, structs) equal them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qcow2kit import small_header

from backup.errors import ImageFormatError
from backup.qcow2 import layout as q
from backup.qcow2.header import build_header, parse_header
from backup.qcow2.refcount import Refcounts

offsets = st.integers(0, (1 << 47) - 1).map(lambda v: v << 9)  # bits 9-55


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(offset=offsets, copied=st.booleans())
def test_l1_entry_masks_match_construct(offset: int, copied: bool) -> None:
    value = offset | (q.OFLAG_COPIED if copied else 0)
    built = q.L1Entry.build(dict(copied=copied, reserved_high=0, offset=offset >> 9, reserved_low=0))
    assert built == q.U64.pack(value)
    parsed = q.L1Entry.parse(q.U64.pack(value))
    assert parsed.offset << 9 == value & q.L1E_OFFSET_MASK
    assert parsed.copied == bool(value & q.OFLAG_COPIED)


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(offset=offsets, copied=st.booleans(), zero=st.booleans())
def test_l2_standard_entry_masks_match_construct(offset: int, copied: bool, zero: bool) -> None:
    value = offset | (q.OFLAG_COPIED if copied else 0) | (q.OFLAG_ZERO if zero else 0)
    built = q.L2StandardEntry.build(
        dict(copied=copied, compressed=False, reserved_high=0, offset=offset >> 9, reserved_low=0, zero=zero)
    )
    assert built == q.U64.pack(value)
    parsed = q.L2StandardEntry.parse(built)
    assert parsed.offset << 9 == value & q.L2E_OFFSET_MASK
    assert not value & q.L2E_STD_RESERVED_MASK


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(cluster_bits=st.integers(9, 21), data=st.data())
def test_compressed_descriptor_matches_construct(cluster_bits: int, data: st.DataObject) -> None:
    offset = data.draw(st.integers(0, min((1 << (62 - (cluster_bits - 8))) - 1, (1 << 56) - 1)))
    size = data.draw(st.integers(1, (1 << cluster_bits) - 1))
    extra = ((offset + size - 1) >> 9) - (offset >> 9)
    if extra >= 1 << (cluster_bits - 8):
        return  # would not fit the descriptor; the writer never produces it (size < cluster)
    value = q.encode_compressed(offset, size, cluster_bits)
    fmt = q.l2_compressed_entry(cluster_bits)
    assert fmt.build(dict(copied=False, compressed=True, extra_sectors=extra, offset=offset)) == q.U64.pack(value)
    got_offset, nbytes = q.decode_compressed(value, cluster_bits)
    assert got_offset == offset
    assert nbytes >= size and (offset + nbytes) % 512 == 0


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(offset=offsets)
def test_refcount_table_entry_matches_construct(offset: int) -> None:
    assert q.RefcountTableEntry.build(dict(offset=offset >> 9, reserved=0)) == q.U64.pack(offset)


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(order=st.integers(3, 6), values=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=64))
def test_refcount_block_struct_matches_construct(order: int, values: list[int]) -> None:
    bits = 1 << order
    values = [v & ((1 << bits) - 1) for v in values]
    fmt, width = q.refcount_accessors(order)
    assert fmt is not None and width == bits // 8
    block = bytearray(512)
    for i, v in enumerate(values):
        fmt.pack_into(block, i * width, v)
    assert list(q.refcount_block(order, 512).parse(bytes(block)))[: len(values)] == values


@settings(deadline=None)  # no per-example time limit: CI machines are loaded
@given(
    incompat=st.integers(0, 2**64 - 1),
    compat=st.integers(0, 2**64 - 1),
    autoclear=st.integers(0, 2**64 - 1),
    reftable=offsets,
    clusters=st.integers(0, 2**32 - 1),
)
def test_header_field_fast_paths_match_construct(
    incompat: int, compat: int, autoclear: int, reftable: int, clusters: int
) -> None:
    fields = dict(
        version=3,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=16,
        size=1 << 20,
        crypt_method=0,
        l1_size=1,
        l1_table_offset=0,
        refcount_table_offset=reftable,
        refcount_table_clusters=clusters,
        nb_snapshots=0,
        snapshots_offset=0,
        v3=dict(
            incompatible_features=incompat,
            compatible_features=compat,
            autoclear_features=autoclear,
            refcount_order=4,
            header_length=104,
        ),
    )
    built = q.Header.build(fields)
    assert len(built) == q.V3_HEADER_LENGTH
    assert q.compiled(q.Header).parse(built) == q.Header.parse(built)  # what opens parse with
    for version in (2, 3):  # a v2 header has no v3 part: the compiled ``If`` must agree
        raw = bytearray(built)
        raw[4:8] = version.to_bytes(4, "big")
        assert q.compiled(q.Header).parse(bytes(raw)) == q.Header.parse(bytes(raw))
    extension = built[:8]
    assert q.compiled(q.HeaderExtensionHeader).parse(extension) == q.HeaderExtensionHeader.parse(extension)
    at = q.INCOMPAT_OFFSET
    assert built[at : at + 24] == q.FEATURE_FIELDS_FAST.pack(incompat, compat, autoclear)
    at = q.REFTABLE_FIELDS_OFFSET
    assert built[at : at + 12] == q.REFTABLE_FIELDS_FAST.pack(reftable, clusters)


def test_header_round_trip_with_backing_file() -> None:
    h = small_header(backing_file="base.raw", backing_format="raw", incompatible=q.INCOMPAT_DIRTY)
    raw = build_header(h)
    parsed = parse_header(raw.ljust(1 << 16, b"\0"), 4 << 16, "x")
    assert (parsed.backing_file, parsed.backing_format, parsed.size) == ("base.raw", "raw", 10 << 20)
    assert parsed.incompatible == q.INCOMPAT_DIRTY and parsed.refcount_order == 4


def test_small_cluster_header_drops_the_optional_feature_table() -> None:
    h = small_header(
        cluster_bits=9,
        size=1 << 15,
        l1_table_offset=3 * 512,
        refcount_table_offset=512,
        backing_file="b" * 200,
        backing_format="qcow2",
    )
    raw = build_header(h)
    assert len(raw) <= 512
    assert parse_header(raw.ljust(512, b"\0"), 8192, "x").backing_file == "b" * 200


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(refcount_order=7), "refcount_order 7"),
        (dict(incompatible=1 << 40), "unknown incompatible"),
        (dict(incompatible=q.INCOMPAT_EXTL2, cluster_bits=12), "extended L2 entries need clusters"),
        (dict(l1_size=0), "L1 table has 0 entries"),
        (dict(l1_table_offset=100 << 16), "past the end"),
        (dict(refcount_table_offset=100 << 16), "past the end"),
        (dict(l1_table_offset=3 << 16 | 512), "not cluster aligned"),
    ],
)
def test_invalid_headers_are_refused(overrides: dict[str, object], message: str) -> None:
    raw = build_header(small_header(**overrides)).ljust(1 << 16, b"\0")
    with pytest.raises(ImageFormatError, match=message):
        parse_header(raw, 4 << 16, "x")


def test_bad_magic_and_truncation_are_refused() -> None:
    with pytest.raises(ImageFormatError, match="bad magic"):
        parse_header(b"QFI\xfa" + bytes(200), 1 << 20, "x")
    with pytest.raises(ImageFormatError, match="bad magic"):
        parse_header(b"", 0, "x")


def test_sub_byte_refcounts_overflow_is_refused(tmp_path: object) -> None:
    import os

    path = os.path.join(str(tmp_path), "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        refs = Refcounts(
            fd, path, cluster_bits=9, order=0, reftable=[0] * 64, reftable_offset=512, reftable_clusters=1, alloc_end=2
        )
        refs.add(0, 1)
        assert refs.get(0) == 1 and refs.get(2) == 1  # the refcount block counts itself
        with pytest.raises(ImageFormatError, match="overflows 1-bit"):
            refs.add(0, 1)
        refs.add(0, -1)
        with pytest.raises(OSError, match="below zero"):
            refs.add(0, -1)
    finally:
        os.close(fd)


@pytest.mark.parametrize("order", [0, 2, 3, 4, 6])
def test_last_used_cluster(tmp_path: object, order: int) -> None:
    import os

    path = os.path.join(str(tmp_path), "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        refs = Refcounts(
            fd, path, cluster_bits=9, order=order, reftable=[0] * 64, reftable_offset=512, reftable_clusters=1,
            alloc_end=2,
        )  # fmt: skip
        assert refs.last_used() == -1
        refs.add(0, 1)  # allocates the refcount block at cluster 2
        assert refs.last_used() == 2
        refs.add(37, 1)
        assert refs.last_used() == 37
        refs.add(37, -1)
        assert refs.last_used() == 2
    finally:
        os.close(fd)
