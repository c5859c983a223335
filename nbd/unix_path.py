"""Claiming and releasing the path of a listening unix socket without harming another service.

A socket file left behind by a server that died must be removed before ``bind`` can reuse the path,
but a socket file some live service listens on must not be: unlinking it would silently take its
clients over. So a socket file is removed only when a connect to it is refused (nothing listens),
and on stop a server removes its path only if the file there is still the socket it bound.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

#: What identifies the socket file a server bound: (st_dev, st_ino).
SocketFileId = tuple[int, int]

_LISTENING = (0, errno.EAGAIN, errno.EINPROGRESS)  # accepted, or queued on a full backlog


def remove_stale_socket(path: str) -> None:
    """Make ``path`` free for ``bind``: unlink a socket file nothing answers on; raise
    ``OSError(EADDRINUSE)`` when something listens there or the file is not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EADDRINUSE, f"'{path}' exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        result = probe.connect_ex(path)
    if result == errno.ECONNREFUSED:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    if result in _LISTENING:
        raise OSError(errno.EADDRINUSE, f"a server is listening on '{path}'; not taking its socket over")
    raise OSError(result, f"cannot tell whether a server listens on '{path}': {os.strerror(result)}")


def socket_file_id(path: str) -> SocketFileId | None:
    """The identity of the socket file at ``path`` right after ``bind`` (None if it is gone)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def remove_own_socket(path: str, own: SocketFileId | None) -> None:
    """Unlink ``path`` on stop, unless the file there is no longer the socket this server bound."""
    if own is not None and socket_file_id(path) == own:
        with contextlib.suppress(OSError):
            os.unlink(path)
