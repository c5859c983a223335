"""Errors of the qcow2 driver.

Opening refuses a malformed image with ``ImageFormatError`` (the caller's fault: wrong file). When
metadata turns out inconsistent in the middle of I/O, the request fails with ``Qcow2CorruptError``,
which is both an ``ImageFormatError`` (a clear diagnosis) and an ``OSError`` with ``EIO`` (so the NBD
server and error policies treat it as the device error it is).
"""

from __future__ import annotations

import errno

from backup.errors import ImageFormatError


class Qcow2CorruptError(ImageFormatError, OSError):
    """Metadata found inconsistent during I/O (an L2 entry past the end, a refcount overflow …)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(errno.EIO, f"qcow2 image {path!r} is corrupt: {message}")
