"""A consistency check of a qcow2 image's metadata, like ``qemu-img check`` (without repair).

Recomputes every host cluster's reference count from the header, L1/L2 tables and the refcount
structures, and compares it with the stored refcounts and the COPIED flags. The unit tests use it
as the oracle that needs no QEMU; operators can use it to inspect a backup without QEMU installed.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import dataclass, field

from backup.errors import ImageFormatError
from backup.qcow2 import layout as q
from backup.qcow2.header import parse_header
from backup.qcow2.refcount import Refcounts


@dataclass
class CheckResult:
    """Problems found: ``corruptions`` make an image unsafe, ``leaks`` only waste space."""

    corruptions: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    dirty: bool = False
    allocated_clusters: int = 0
    compressed_clusters: int = 0

    @property
    def clean(self) -> bool:
        return not self.corruptions and not self.leaks


def check_image(path: str) -> CheckResult:
    """Check the image at ``path`` (read-only)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _check(fd, path)
    finally:
        os.close(fd)


def _check(fd: int, path: str) -> CheckResult:
    file_size = os.fstat(fd).st_size
    head = os.pread(fd, q.V3_HEADER_LENGTH, 0)
    if len(head) >= 24 and head[:4] == q.MAGIC:
        bits = q.U32.unpack_from(head, 20)[0]
        if q.MIN_CLUSTER_BITS <= bits <= q.MAX_CLUSTER_BITS:
            head = os.pread(fd, 1 << bits, 0)
    h = parse_header(head, file_size, path)
    if h.nb_snapshots:
        raise ImageFormatError(f"{path}: checking images with internal snapshots is not supported")
    result = CheckResult(dirty=bool(h.incompatible & q.INCOMPAT_DIRTY))
    cb, cs = h.cluster_bits, h.cluster_size
    expected: Counter[int] = Counter()

    def ref(offset: int, length: int) -> None:
        for c in range(offset >> cb, ((offset + length - 1) >> cb) + 1):
            expected[c] += 1

    ref(0, cs)
    if h.l1_size:
        ref(h.l1_table_offset, h.l1_size * 8)
    ref(h.refcount_table_offset, h.refcount_table_clusters * cs)
    n = h.refcount_table_clusters * cs // 8
    reftable = list(struct.unpack(f">{n}Q", os.pread(fd, n * 8, h.refcount_table_offset).ljust(n * 8, b"\0")))
    for entry in reftable:
        if entry & q.REFT_OFFSET_MASK:
            ref(entry & q.REFT_OFFSET_MASK, cs)
    l1 = list(struct.unpack(f">{h.l1_size}Q", os.pread(fd, h.l1_size * 8, h.l1_table_offset))) if h.l1_size else []
    zero_flag = q.OFLAG_ZERO if h.version >= 3 else 0
    copied_checks: list[tuple[str, int, bool]] = []  # (what, cluster, has COPIED)
    for index, l1e in enumerate(l1):
        l2off = l1e & q.L1E_OFFSET_MASK
        if not l2off:
            continue
        ref(l2off, cs)
        copied_checks.append((f"L2 table of L1 entry {index}", l2off >> cb, bool(l1e & q.OFLAG_COPIED)))
        table = os.pread(fd, cs, l2off).ljust(cs, b"\0")
        for i, entry in enumerate(struct.unpack(f">{cs // 8}Q", table)):
            if entry & q.OFLAG_COMPRESSED:
                offset, _ = q.decode_compressed(entry, cb)
                start = offset & ~(q.SECTOR - 1)
                _, shift, smask = q.compressed_fields(cb)
                ref(start, (((entry >> shift) & smask) + 1) * q.SECTOR)
                result.compressed_clusters += 1
                result.allocated_clusters += 1
                if entry & q.OFLAG_COPIED:
                    result.corruptions.append(f"compressed cluster entry {index}/{i} has the COPIED flag")
                continue
            host = entry & q.L2E_OFFSET_MASK
            if host:
                if host & (cs - 1):
                    result.corruptions.append(f"L2 entry {index}/{i}: {host:#x} is not cluster aligned")
                    continue
                ref(host, cs)
                what = f"data cluster of L2 entry {index}/{i}"
                copied_checks.append((what, host >> cb, bool(entry & q.OFLAG_COPIED)))
            if host or entry & zero_flag:
                result.allocated_clusters += 1
    refs = Refcounts(
        fd,
        path,
        cluster_bits=cb,
        order=h.refcount_order,
        reftable=reftable,
        reftable_offset=h.refcount_table_offset,
        reftable_clusters=h.refcount_table_clusters,
        alloc_end=-(-file_size // cs),
    )
    last = max([*expected, -(-file_size // cs) - 1, 0])
    for c in range(last + 1):
        stored, want = refs.get(c), expected.get(c, 0)
        if stored == want:
            continue
        message = f"cluster {c} ({c << cb:#x}): refcount {stored}, referenced {want} times"
        (result.leaks if stored > want else result.corruptions).append(message)
    for what, c, copied in copied_checks:
        if copied != (refs.get(c) == 1):
            result.corruptions.append(f"{what}: COPIED flag {copied} but refcount {refs.get(c)}")
    return result
