"""The qcow2 on-disk formats, defined once with ``construct`` (``docs/interop/qcow2.txt``).

Header, header extensions and the feature name table are parsed and built with these definitions
(once per open/create). L1/L2/refcount entries are touched per cluster on the I/O path, where
construct costs microseconds per call: for them this module offers plain bit masks and
precompiled ``struct.Struct`` layouts whose equivalence with the construct definitions is proven by
``tests/test_qcow2_layout.py``.
"""

from __future__ import annotations

import functools
import struct

from construct import (
    Array,
    BitsInteger,
    BitStruct,
    Bytes,
    BytesInteger,
    Const,
    Construct,
    Flag,
    If,
    Int8ub,
    Int32ub,
    Int64ub,
    Padding,
    Struct,
    this,
)

from nbd.align import SECTOR

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # QEMU's implementation limit (2 MiB)
MAX_BACKING_NAME = 1023
MAX_L1_BYTES = 32 * 1024 * 1024  # QEMU's limit
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # QEMU's limit

# incompatible_features
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
# compatible_features
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# L1 / L2 / refcount table entries
OFLAG_COPIED = 1 << 63  # refcount is exactly one: may be written in place
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0  # standard cluster reads as zeroes (v3)
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE

# --- construct definitions ------------------------------------------------------------------------

Header = Struct(
    "magic" / Const(MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
    "v3"
    / If(
        this.version >= 3,
        Struct(
            "incompatible_features" / Int64ub,
            "compatible_features" / Int64ub,
            "autoclear_features" / Int64ub,
            "refcount_order" / Int32ub,
            "header_length" / Int32ub,
        ),
    ),
)

# The optional additional field right after the v3 header (header_length >= 112 when present).
CompressionTypeField = Struct("compression_type" / Int8ub, Padding(7))

HeaderExtensionHeader = Struct("type" / Int32ub, "length" / Int32ub)

FeatureNameEntry = Struct(
    "type" / Int8ub,  # 0 incompatible, 1 compatible, 2 autoclear
    "bit" / Int8ub,
    "name" / Bytes(46),
)

L1Entry = BitStruct(
    "copied" / Flag,
    "reserved_high" / BitsInteger(7),
    "offset" / BitsInteger(47),  # bits 9-55 of the L2 table offset
    "reserved_low" / BitsInteger(9),
)

L2StandardEntry = BitStruct(
    "copied" / Flag,
    "compressed" / Flag,  # 0 for standard clusters
    "reserved_high" / BitsInteger(6),
    "offset" / BitsInteger(47),  # bits 9-55 of the host cluster offset
    "reserved_low" / BitsInteger(8),
    "zero" / Flag,
)


def l2_compressed_entry(cluster_bits: int) -> BitStruct:
    """The compressed cluster descriptor: its field widths depend on the cluster size."""
    offset_bits = 62 - (cluster_bits - 8)
    return BitStruct(
        "copied" / Flag,  # always 0 for compressed clusters
        "compressed" / Flag,  # 1
        "extra_sectors" / BitsInteger(cluster_bits - 8),
        "offset" / BitsInteger(offset_bits),
    )


RefcountTableEntry = BitStruct("offset" / BitsInteger(55), "reserved" / BitsInteger(9))


def refcount_block(order: int, cluster_size: int) -> Array:
    """A refcount block of byte-wide or wider entries (orders 3-6); sub-byte orders pack the first
    entry into the least significant bits of each byte, which ``refcount_get``/``refcount_set`` do."""
    width = 1 << (order - 3)
    return Array(cluster_size // width, BytesInteger(width))


# --- fast paths ------------------------------------------------------------------------------------

U64 = struct.Struct(">Q")
U32 = struct.Struct(">I")
FEATURE_FIELDS_FAST = struct.Struct(">QQQ")  # incompatible, compatible, autoclear at offset 72
REFTABLE_FIELDS_FAST = struct.Struct(">QI")  # refcount_table_offset, refcount_table_clusters at offset 48
INCOMPAT_OFFSET = 72
REFTABLE_FIELDS_OFFSET = 48


def compressed_fields(cluster_bits: int) -> tuple[int, int, int]:
    """(offset mask, sector-count shift, sector-count mask) of a compressed L2 entry."""
    shift = 62 - (cluster_bits - 8)
    return (1 << shift) - 1, shift, (1 << (cluster_bits - 8)) - 1


def encode_compressed(offset: int, size: int, cluster_bits: int) -> int:
    """The L2 entry of ``size`` compressed bytes stored at host ``offset``."""
    _, shift, _ = compressed_fields(cluster_bits)
    extra = ((offset + size - 1) >> 9) - (offset >> 9)
    return OFLAG_COMPRESSED | (extra << shift) | offset


def decode_compressed(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, bytes to read) of a compressed L2 entry, as QEMU computes them."""
    mask, shift, smask = compressed_fields(cluster_bits)
    offset = entry & mask
    sectors = ((entry >> shift) & smask) + 1
    return offset, sectors * SECTOR - (offset & (SECTOR - 1))


def refcount_accessors(order: int) -> tuple[struct.Struct | None, int]:
    """For refcount_order >= 3 the struct of one entry; for sub-byte widths None (bit packing)."""
    if order >= 3:
        return struct.Struct({3: ">B", 4: ">H", 5: ">I", 6: ">Q"}[order]), 1 << (order - 3)
    return None, 0


@functools.cache
def compiled(layout: Construct) -> Construct:
    """``layout`` compiled to Python source by construct (2 ms, once per process, on first use): the
    same parse, a quarter of the cost. Every open parses a header and its extensions, and a backup's
    target is an overlay whose backing is opened too."""
    return layout.compile()
