"""The guard QEMU puts on a raw image whose format was probed, not given.

An image opened without a format is raw only because its first sector matches no image format. A
writer (an NBD client, a guest being backed up) who could put a qcow2 header there would have the
file probed as qcow2 at the next open — naming any host file as its backing file. So, as QEMU's raw
driver does for probed images, a write, write-zeroes or trim reaching the first 512 bytes is
refused with ``EPERM`` when the sector would afterwards probe as an image format; every other write
passes. Sector-0 requests are checked and applied one at a time, so two writes that are harmless
alone cannot assemble a header together. Explicitly raw images (``format=raw``) are not guarded.
"""

from __future__ import annotations

import asyncio
import errno

from backup.filter import BlockFilter
from nbd.align import SECTOR
from nbd.device import BlockDevice

#: First-sector signatures of the formats QEMU probes (``block/*.c`` ``*_probe``), by offset.
_MAGICS: tuple[tuple[str, int, bytes], ...] = (
    ("qcow2", 0, b"QFI\xfb"),  # qcow2 and qcow (v1)
    ("qed", 0, b"QED\x00"),
    ("vmdk", 0, b"KDMV"),
    ("vmdk", 0, b"COWD"),
    ("vpc", 0, b"conectix"),
    ("vhdx", 0, b"vhdxfile"),
    ("luks", 0, b"LUKS\xba\xbe"),
    ("parallels", 0, b"WithoutFreeSpace"),
    ("parallels", 0, b"WithouFreSpacExt"),
    ("bochs", 0, b"Bochs Virtual HD Image"),
    ("cloop", 0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"),
    ("vdi", 64, (0xBEDA107F).to_bytes(4, "little")),
)
_VMDK_VERSIONS = tuple(f"version={v}{end}".encode() for v in (1, 2, 3) for end in ("\n", "\r\n"))


def image_format_of(sector: bytes | bytearray | memoryview) -> str | None:
    """The image format a first sector would probe as, or None when it probes as raw."""
    head = bytes(sector[:SECTOR])
    for name, offset, magic in _MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return name
    return "vmdk" if _is_vmdk_descriptor(head) else None


def _is_vmdk_descriptor(head: bytes) -> bool:
    """QEMU's text VMDK probe: after comment (``#``) and blank lines, a line ``version=1|2|3``."""
    lines = head.split(b"\n")
    for index, line in enumerate(lines):
        if line.startswith(b"#"):
            continue
        if line.startswith(b" ") and line.strip(b" ") in (b"", b"\r") and index < len(lines) - 1:
            continue
        return index < len(lines) - 1 and (line + b"\n").startswith(_VMDK_VERSIONS)
    return False


class ProbedRawGuard(BlockFilter):
    """A probed raw image: refuses first-sector changes that would make it probe as another format."""

    passes_reads = True

    def __init__(self, device: BlockDevice) -> None:
        super().__init__(device)
        self._sector_lock = asyncio.Lock()

    async def _checked(self, offset: int, length: int, data: bytes | bytearray | memoryview | None) -> None:
        """Raise EPERM if writing ``data`` (None: zeroes) at ``offset`` would change the probe result."""
        end = min(offset + length, SECTOR, self.next.size)
        if offset >= end:
            return
        sector = bytearray(await self.next.pread(0, min(SECTOR, self.next.size)))
        sector[offset:end] = bytes(end - offset) if data is None else bytes(memoryview(data)[: end - offset])
        found = image_format_of(sector)
        if found is not None:
            raise OSError(
                errno.EPERM,
                f"write to the first sector refused: the image's format was probed as raw and it would "
                f"then probe as {found} (open it with format=raw to allow this)",
            )

    async def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        if offset >= SECTOR:
            return await self.next.pwrite(offset, data, fua=fua)
        async with self._sector_lock:
            await self._checked(offset, len(data), data)
            await self.next.pwrite(offset, data, fua=fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = False, fast: bool = False, fua: bool = False
    ) -> None:
        if offset >= SECTOR:
            return await self.next.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)
        async with self._sector_lock:
            await self._checked(offset, length, None)
            await self.next.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Trimmed bytes may read back as zeroes (or unchanged, which is raw already): check zeroes."""
        if offset >= SECTOR:
            return await self.next.trim(offset, length, fua=fua)
        async with self._sector_lock:
            await self._checked(offset, length, None)
            await self.next.trim(offset, length, fua=fua)

    async def close(self) -> None:
        """The guard owns the image it guards."""
        await self.next.close()
