"""qcow2 images (v2 and v3) as block devices: backup targets, exports, backup sources."""

from backup.qcow2.device import Qcow2Device
from backup.qcow2.errors import Qcow2CorruptError
from backup.qcow2.header import ImageHeader

__all__ = ["ImageHeader", "Qcow2CorruptError", "Qcow2Device", "is_qcow2"]


def is_qcow2(path: str) -> bool:
    """Whether the file starts with the qcow2 magic (what format probing looks at)."""
    with open(path, "rb") as f:
        return f.read(4) == b"QFI\xfb"
