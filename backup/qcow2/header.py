"""Parse, validate and build the qcow2 header, its extensions and the backing file name.

Validation happens here, once, before any table is trusted: a malformed header (bad magic, a
table past the end of the file, an unknown incompatible feature, a refcount width beyond 64 bits)
is refused with an ``ImageFormatError`` that says what is wrong, never a crash later.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from construct import ConstructError

from backup.errors import ImageFormatError
from backup.qcow2 import layout as q
from backup.qcow2.codec import codec_for
from nbd.align import div_up

_INCOMPAT_NAMES = {
    0: "dirty bit",
    1: "corrupt bit",
    2: "external data file",
    3: "compression type",
    4: "extended L2 entries",
}
_FEATURE_TABLE = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
]


@dataclass
class ImageHeader:
    """The header fields the driver uses, with v2 defaults filled in."""

    version: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = q.V2_HEADER_LENGTH
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    bitmaps_ext: bytes | None = None  # the bitmaps extension's data, trusted only with autoclear bit 0

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8


def _refuse(path: str, message: str) -> ImageFormatError:
    return ImageFormatError(f"{path}: {message}")


def l1_entries_for(size: int, cluster_bits: int, *, extended_l2: bool = False) -> int:
    """How many L1 entries a virtual size needs (extended L2 entries are 16 bytes, not 8)."""
    per_l2 = 1 << (2 * cluster_bits - (4 if extended_l2 else 3))
    return div_up(size, per_l2)


def read_header(fd: int, file_size: int, path: str) -> ImageHeader:
    """Read and parse the header of an open image: its fixed part first, then (for the extensions
    and the backing file name) the whole first cluster, once its size is known."""
    first = os.pread(fd, q.V3_HEADER_LENGTH, 0)
    if len(first) >= 24 and first[:4] == q.MAGIC:
        bits = q.U32.unpack_from(first, 20)[0]
        if q.MIN_CLUSTER_BITS <= bits <= q.MAX_CLUSTER_BITS:
            first = os.pread(fd, 1 << bits, 0)
    return parse_header(first, file_size, path)


def parse_header(first: bytes, file_size: int, path: str) -> ImageHeader:
    """Parse and validate the header from the start of the file (``first``: up to one cluster)."""
    if len(first) < q.V2_HEADER_LENGTH or first[:4] != q.MAGIC:
        raise _refuse(path, "not a qcow2 image (bad magic or file too short)")
    try:
        raw = q.compiled(q.Header).parse(first)
    except ConstructError as exc:
        raise _refuse(path, f"truncated qcow2 header ({exc})") from None
    if raw.version not in (2, 3):
        raise _refuse(path, f"unsupported qcow2 version {raw.version}")
    if not q.MIN_CLUSTER_BITS <= raw.cluster_bits <= q.MAX_CLUSTER_BITS:
        raise _refuse(path, f"unsupported cluster size 2**{raw.cluster_bits} (must be 512 B to 2 MiB)")
    h = ImageHeader(
        version=raw.version,
        cluster_bits=raw.cluster_bits,
        size=raw.size,
        crypt_method=raw.crypt_method,
        l1_size=raw.l1_size,
        l1_table_offset=raw.l1_table_offset,
        refcount_table_offset=raw.refcount_table_offset,
        refcount_table_clusters=raw.refcount_table_clusters,
        nb_snapshots=raw.nb_snapshots,
        snapshots_offset=raw.snapshots_offset,
    )
    cs = h.cluster_size
    if raw.version >= 3:
        v3 = raw.v3
        h.incompatible, h.compatible, h.autoclear = (
            v3.incompatible_features,
            v3.compatible_features,
            v3.autoclear_features,
        )
        h.refcount_order, h.header_length = v3.refcount_order, v3.header_length
        if h.header_length < q.V3_HEADER_LENGTH or h.header_length % 8 or h.header_length > cs:
            raise _refuse(path, f"invalid header_length {h.header_length}")
        if len(first) < h.header_length:
            raise _refuse(path, "truncated qcow2 header")
        if h.header_length > q.V3_HEADER_LENGTH:
            h.compression_type = first[q.V3_HEADER_LENGTH]
    _check_features(h, path)
    if h.refcount_order > 6:
        raise _refuse(path, f"refcount_order {h.refcount_order} overflows the 64-bit refcount limit")
    if h.crypt_method:
        raise _refuse(path, f"encrypted qcow2 images are not supported (crypt_method {h.crypt_method})")
    if h.size >= 1 << 63:
        raise _refuse(path, f"virtual size {h.size} is too large")
    _check_tables(h, file_size, path)
    _parse_extensions(h, first, path)
    _parse_backing_name(h, raw.backing_file_offset, raw.backing_file_size, first, path)
    return h


def _check_features(h: ImageHeader, path: str) -> None:
    unknown = h.incompatible & ~q.INCOMPAT_KNOWN
    if unknown:
        raise _refuse(path, f"unknown incompatible feature bits {unknown:#x}")
    if h.incompatible & q.INCOMPAT_DATA_FILE:
        raise _refuse(path, "images with an external data file are not supported")
    if h.incompatible & q.INCOMPAT_EXTL2 and h.cluster_bits < 14:
        raise _refuse(path, "extended L2 entries need clusters of at least 16 KiB")
    if h.incompatible & q.INCOMPAT_COMPRESSION:
        if h.compression_type == 0:
            raise _refuse(path, "compression type bit set but compression_type is 0")
        codec_for(h.compression_type, path)  # refuses types (or a zstd module) we do not have
    elif h.compression_type != 0:
        raise _refuse(path, "compression_type set without the compression type feature bit")


def _check_tables(h: ImageHeader, file_size: int, path: str) -> None:
    cs = h.cluster_size
    needed = l1_entries_for(h.size, h.cluster_bits, extended_l2=bool(h.incompatible & q.INCOMPAT_EXTL2))
    if h.l1_size < needed:
        raise _refuse(path, f"L1 table has {h.l1_size} entries, the virtual size needs {needed}")
    if h.l1_size * 8 > q.MAX_L1_BYTES:
        raise _refuse(path, f"L1 table of {h.l1_size} entries is too large")
    if h.l1_size:
        if h.l1_table_offset % cs or h.l1_table_offset == 0:
            raise _refuse(path, f"L1 table offset {h.l1_table_offset:#x} is not cluster aligned")
        if h.l1_table_offset + h.l1_size * 8 > file_size:
            raise _refuse(
                path,
                f"L1 table at {h.l1_table_offset:#x} ({h.l1_size} entries) lies past the end of the file "
                f"({file_size} bytes): truncated or corrupt image",
            )
    if h.refcount_table_offset % cs or h.refcount_table_offset == 0:
        raise _refuse(path, f"refcount table offset {h.refcount_table_offset:#x} is not cluster aligned")
    if h.refcount_table_clusters == 0 or h.refcount_table_clusters * cs > q.MAX_REFTABLE_BYTES:
        raise _refuse(path, f"invalid refcount table size ({h.refcount_table_clusters} clusters)")
    if h.refcount_table_offset >= file_size:
        raise _refuse(
            path, f"refcount table at {h.refcount_table_offset:#x} lies past the end of the file ({file_size} bytes)"
        )
    if h.nb_snapshots and (h.snapshots_offset % cs or h.snapshots_offset >= file_size):
        raise _refuse(path, f"snapshot table offset {h.snapshots_offset:#x} is invalid")


def _parse_extensions(h: ImageHeader, first: bytes, path: str) -> None:
    pos = q.V2_HEADER_LENGTH if h.version < 3 else h.header_length
    end = min(len(first), h.cluster_size)
    seen: set[int] = set()
    while pos + 8 <= end:
        ext = q.compiled(q.HeaderExtensionHeader).parse(first[pos : pos + 8])
        if ext.type == q.EXT_END:
            return
        data_end = pos + 8 + ext.length
        if data_end > end:
            raise _refuse(path, f"header extension {ext.type:#x} runs past the first cluster")
        data = first[pos + 8 : data_end]
        if ext.type in seen and ext.type != q.EXT_FEATURE_TABLE:
            raise _refuse(path, f"duplicate header extension {ext.type:#x}")
        seen.add(ext.type)
        if ext.type == q.EXT_BACKING_FORMAT:
            h.backing_format = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif ext.type == q.EXT_BITMAPS:
            h.bitmaps_ext = data
        elif ext.type == q.EXT_DATA_FILE:
            raise _refuse(path, "images with an external data file are not supported")
        elif ext.type == q.EXT_CRYPTO:
            raise _refuse(path, "encrypted qcow2 images are not supported")
        pos = data_end + (-ext.length % 8)
    if h.version >= 3:
        raise _refuse(path, "header extension area is not terminated within the first cluster")


def _parse_backing_name(h: ImageHeader, offset: int, size: int, first: bytes, path: str) -> None:
    if offset == 0:
        return
    if size > q.MAX_BACKING_NAME or size == 0:
        raise _refuse(path, f"invalid backing file name length {size}")
    if offset + size > min(len(first), h.cluster_size):
        raise _refuse(path, "backing file name lies outside the first cluster")
    name = first[offset : offset + size]
    if b"\0" in name:
        raise _refuse(path, "backing file name contains a NUL byte")
    h.backing_file = name.decode("utf-8", "surrogateescape")


def build_header(h: ImageHeader) -> bytes:
    """The first cluster's header bytes of a new v3 image: header, extensions, backing file name.

    The feature name table is informative only: it is left out when it would not fit (512 B clusters).
    """
    try:
        return _build_header(h, feature_table=True)
    except ImageFormatError:
        return _build_header(h, feature_table=False)


def _build_header(h: ImageHeader, *, feature_table: bool) -> bytes:
    ext = bytearray()

    def add(type_: int, data: bytes) -> None:
        ext.extend(q.HeaderExtensionHeader.build(dict(type=type_, length=len(data))))
        ext.extend(data)
        ext.extend(bytes(-len(data) % 8))

    if h.backing_format:
        add(q.EXT_BACKING_FORMAT, h.backing_format.encode())
    if feature_table:
        table = b"".join(
            q.FeatureNameEntry.build(dict(type=t, bit=b, name=n.encode().ljust(46, b"\0")))
            for t, b, n in _FEATURE_TABLE
        )
        add(q.EXT_FEATURE_TABLE, table)
    ext.extend(q.HeaderExtensionHeader.build(dict(type=q.EXT_END, length=0)))
    backing = h.backing_file.encode() if h.backing_file else b""
    if len(backing) > q.MAX_BACKING_NAME:
        raise ImageFormatError(f"backing file name is longer than {q.MAX_BACKING_NAME} bytes")
    extra = q.CompressionTypeField.build(dict(compression_type=h.compression_type)) if h.compression_type else b""
    header_length = q.V3_HEADER_LENGTH + len(extra)
    incompatible = h.incompatible | (q.INCOMPAT_COMPRESSION if h.compression_type else 0)
    backing_offset = header_length + len(ext) if backing else 0
    fixed = q.Header.build(
        dict(
            version=3,
            backing_file_offset=backing_offset,
            backing_file_size=len(backing),
            cluster_bits=h.cluster_bits,
            size=h.size,
            crypt_method=0,
            l1_size=h.l1_size,
            l1_table_offset=h.l1_table_offset,
            refcount_table_offset=h.refcount_table_offset,
            refcount_table_clusters=h.refcount_table_clusters,
            nb_snapshots=0,
            snapshots_offset=0,
            v3=dict(
                incompatible_features=incompatible,
                compatible_features=h.compatible,
                autoclear_features=0,
                refcount_order=h.refcount_order,
                header_length=header_length,
            ),
        )
    )
    out = fixed + extra + bytes(ext) + backing
    if len(out) > h.cluster_size:
        raise ImageFormatError(f"header and backing file name do not fit in a {h.cluster_size}-byte cluster")
    return out


def rewrite_header(first: bytes, h: ImageHeader, bitmaps_ext: bytes | None) -> bytes:
    """The whole first cluster of an existing v3 image with its bitmaps extension replaced (or
    removed: None) and ``h.autoclear`` in place; every other extension is kept as it is (unknown
    ones too), the backing file name follows them."""
    cs = h.cluster_size
    exts: list[tuple[int, bytes]] = []
    pos = h.header_length
    while pos + 8 <= cs:
        ext = q.compiled(q.HeaderExtensionHeader).parse(first[pos : pos + 8])
        if ext.type == q.EXT_END:
            break
        if ext.type != q.EXT_BITMAPS:
            exts.append((ext.type, first[pos + 8 : pos + 8 + ext.length]))
        pos += 8 + ext.length + (-ext.length % 8)
    if bitmaps_ext is not None:
        exts.insert(0, (q.EXT_BITMAPS, bitmaps_ext))
    out = bytearray(first[: h.header_length])
    for type_, data in exts:
        out += q.HeaderExtensionHeader.build(dict(type=type_, length=len(data))) + data + bytes(-len(data) % 8)
    out += q.HeaderExtensionHeader.build(dict(type=q.EXT_END, length=0))
    backing = h.backing_file.encode("utf-8", "surrogateescape") if h.backing_file else b""
    struct.pack_into(">QI", out, 8, len(out) if backing else 0, len(backing))
    out += backing
    struct.pack_into(">Q", out, q.INCOMPAT_OFFSET + 16, h.autoclear)
    if len(out) > cs:
        raise ImageFormatError(f"header extensions and backing file name do not fit in a {cs}-byte cluster")
    return bytes(out.ljust(cs, b"\0"))


def incompatible_names(bits: int) -> str:
    return ", ".join(_INCOMPAT_NAMES.get(i, f"bit {i}") for i in range(64) if bits >> i & 1)
