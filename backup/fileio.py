"""Reading a range of a file into a caller's buffer whole."""

from __future__ import annotations

import os


def read_full(fd: int, view: memoryview, offset: int, got: int = 0) -> None:
    """Fill ``view`` (bytes) from the file at ``offset``, ``got`` bytes of it read already; past the end
    of the file (a size rounded up to 512 bytes, a file shrunk meanwhile) with zeroes, as the file's
    block device reads it. Raises ``OSError``."""
    size = len(view)
    while got < size:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            view[got:] = bytes(size - got)
            return
        got += n
