"""Confinement of the image paths that QMP clients may open or create (``--allow-dir``).

A QMP client is trusted with the daemon's block layer but, in the container or a shared host, not
with its whole filesystem: with ``--allow-dir DIR`` (repeatable) ``blockdev-add`` and
``drive-backup`` only open or create files whose *resolved* path lies inside one of the directories.
Resolution follows every symlink (including a dangling final one, which ``open(O_CREAT)`` would
follow), so a link inside an allowed directory that points outside is refused. Callers open the
resolved path, not the one the client sent. A symlink planted between the check and the open remains
a window, as in any path-based check: the allowed directories must not be writable by untrusted users.
Without any ``--allow-dir`` every path is allowed, as in QEMU. The files an image names itself (a
qcow2 backing chain) are checked one by one as the chain opens (``check_backing``), so an image
inside an allowed directory cannot reach outside it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from server.errors import PathNotAllowed


class PathPolicy:
    """Decides whether a path may be opened or created; ``allow_dirs`` empty means anything goes."""

    def __init__(self, allow_dirs: Iterable[str | os.PathLike[str]] = ()) -> None:
        dirs: list[Path] = []
        for entry in allow_dirs:
            real = Path(os.path.realpath(os.path.expanduser(os.fspath(entry))))
            if real not in dirs:
                dirs.append(real)
        self.allow_dirs: tuple[Path, ...] = tuple(dirs)

    @property
    def confined(self) -> bool:
        return bool(self.allow_dirs)

    def resolve(self, path: str | os.PathLike[str], *, directory: bool = False) -> Path:
        """Return the absolute, fully resolved path, or raise ``PathNotAllowed``.

        ``directory``: the path names a directory (a repository), which may be an allowed directory itself.

        Relative paths are refused when confined (they would depend on the daemon's cwd, which the
        client cannot see); otherwise they resolve against the cwd as QEMU does.
        """
        text = os.fspath(path)
        if not text:
            raise PathNotAllowed("Empty path")
        if "\0" in text:
            raise PathNotAllowed("Path contains a NUL byte")
        if self.confined and not os.path.isabs(text):
            raise PathNotAllowed(f"Path '{text}' must be absolute (the daemon confines paths to --allow-dir)")
        real = Path(os.path.realpath(text))
        if not self.confined:
            return real
        for allowed in self.allow_dirs:
            if real == allowed or real.is_relative_to(allowed):
                if real == allowed and not directory:
                    break  # a directory itself is never an image
                return real
        raise PathNotAllowed(f"Path '{text}' is outside the allowed directories ({self.describe()})")

    def check_backing(self, path: str, image: str) -> str:
        """The ``BackingCheck`` of the policy: ``path`` (the backing file of ``image``, resolved next
        to it as QEMU does) must be allowed like any named file; returns the path to open."""
        if not self.confined:
            return path
        try:
            return str(self.resolve(path))
        except PathNotAllowed:
            shown = os.path.normpath(path)
            real = os.path.realpath(path)
            via = "" if real == shown else f" (resolved: '{real}')"
            raise PathNotAllowed(
                f"Backing file '{shown}'{via} of '{image}' is outside the allowed directories ({self.describe()})"
            ) from None

    def describe(self) -> str:
        return ", ".join(str(d) for d in self.allow_dirs) if self.allow_dirs else "any"
