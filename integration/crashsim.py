"""A recording file layer for crash tests: what could a power cut leave of a file?

``FileJournal`` wraps ``os.pwrite``/``pwritev``/``ftruncate``/``fdatasync``/``fsync`` (the calls the
qcow2 driver makes) for one file, recording every change in order. A crash keeps every change made
before the last sync and *any subset* of the changes made after it (the page cache writes back in
its own order), so ``crash_images`` yields, for every sync epoch, the synced prefix plus subsets of
that epoch's changes: all of them for small epochs, else the prefixes, each change alone and all
but one. A driver that makes a pointer durable before what it points to fails on the subset that
keeps the pointer only.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

Change = tuple[int, bytes] | tuple[int, None]  # (offset, data) a write; (size, None) a truncate
EXHAUSTIVE = 4  # epochs with at most this many changes: every subset


class FileJournal:
    """Records the changes to one file (by inode) from now on, grouped into sync epochs."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        st = os.stat(path)
        self._id = (st.st_dev, st.st_ino)
        self.base = path.read_bytes()
        self.epochs: list[list[Change]] = [[]]
        self.syncs = 0
        real_pwrite, real_pwritev = os.pwrite, os.pwritev
        real_truncate, real_fdatasync, real_fsync = os.ftruncate, os.fdatasync, os.fsync

        def ours(fd: int) -> bool:
            st = os.fstat(fd)
            return (st.st_dev, st.st_ino) == self._id

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            n = real_pwrite(fd, data, offset)
            if ours(fd):
                self.epochs[-1].append((offset, bytes(memoryview(data)[:n])))
            return n

        def pwritev(fd: int, bufs: list[bytes], offset: int) -> int:
            n = real_pwritev(fd, bufs, offset)
            if ours(fd):
                self.epochs[-1].append((offset, b"".join(bytes(b) for b in bufs)[:n]))
            return n

        def ftruncate(fd: int, size: int) -> None:
            real_truncate(fd, size)
            if ours(fd):
                self.epochs[-1].append((size, None))

        def sync(real: object) -> object:
            def call(fd: int) -> None:
                real(fd)  # type: ignore[operator]
                if ours(fd):
                    self.syncs += 1
                    self.epochs.append([])

            return call

        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "ftruncate", ftruncate)
        monkeypatch.setattr(os, "fdatasync", sync(real_fdatasync))
        monkeypatch.setattr(os, "fsync", sync(real_fsync))

    def crash_images(self) -> Iterator[tuple[str, bytes]]:
        """(label, file contents) of every crash state considered, the final state last."""
        synced = bytearray(self.base)
        for k, epoch in enumerate(self.epochs):
            for keep in _subsets(len(epoch)):
                image = bytearray(synced)
                for i in keep:
                    _apply(image, epoch[i])
                yield f"epoch {k}/{len(self.epochs) - 1}, kept changes {sorted(keep)} of {len(epoch)}", bytes(image)
            for change in epoch:
                _apply(synced, change)


def _subsets(n: int) -> Iterator[tuple[int, ...]]:
    if n <= EXHAUSTIVE:
        for size in range(n + 1):
            yield from itertools.combinations(range(n), size)
        return
    seen: set[tuple[int, ...]] = set()
    for keep in itertools.chain(
        (tuple(range(k)) for k in range(n + 1)),
        ((i,) for i in range(n)),
        (tuple(j for j in range(n) if j != i) for i in range(n)),
    ):
        if keep not in seen:
            seen.add(keep)
            yield keep


def _apply(image: bytearray, change: Change) -> None:
    where, data = change
    if data is None:
        del image[where:]
        image.extend(bytes(where - len(image)))
        return
    if len(image) < where + len(data):
        image.extend(bytes(where + len(data) - len(image)))
    image[where : where + len(data)] = data
