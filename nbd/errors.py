"""Exception tree of the NBD layer.

Split by who is at fault and whether the connection survives:

* ``NbdRequestError`` — one request failed on the remote side; the connection goes on. It is an
  ``OSError`` carrying the errno, so code above the protocol (error policies, the CLI) treats a
  remote failure exactly like a local device failure.
* ``ProtocolError`` — the peer broke the protocol; the connection is unusable.
* ``HandshakeError`` — negotiation refused or failed (an option error reply, no such export).
* ``DisconnectedError`` — the connection is gone; every pending request fails with it
  (``RequestTimeoutError`` when it went silent for the request timeout).
"""

from __future__ import annotations

import errno as errno_mod

from nbd.constants import CmdFlag, Errno


class NbdError(Exception):
    """Base of every error raised by the NBD layer."""


class ProtocolError(NbdError):
    """The peer sent something the protocol does not allow; the connection cannot go on."""


class HandshakeError(NbdError):
    """Option negotiation failed; ``reply`` is the NBD_REP_ERR_* value when the server sent one."""

    def __init__(self, message: str, reply: int | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class DisconnectedError(NbdError, ConnectionError):
    """The connection closed (or was closed) while requests were pending or being sent."""


class RequestTimeoutError(DisconnectedError):
    """A connection with requests in flight received nothing for the request timeout: it is considered
    dead and dropped, and every request on it fails with this (``errno`` ``ETIMEDOUT``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno_mod.ETIMEDOUT  # only errno: str() stays the message


class NbdRequestError(NbdError, OSError):
    """A request failed with an NBD error value; the connection stays usable."""

    def __init__(self, err: int, message: str = "") -> None:
        OSError.__init__(self, err, message or errno_mod.errorcode.get(err, "error"))


class UriError(NbdError, ValueError):
    """An NBD URI that does not parse, or names a feature that is not configured (TLS)."""


_WIRE_ERRNOS = {e.value for e in Errno}


def errno_to_nbd(err: int | None, flags: int = 0) -> int:
    """Map a local errno to the NBD error value sent on the wire — the one place this happens.

    ``ENOTSUP`` travels as NBD_ENOTSUP only when the request asked for ``FAST_ZERO`` (the spec
    reserves it for that); elsewhere it becomes ``EINVAL``. Anything the protocol cannot carry
    becomes ``EIO``, except the few that have an obvious nearest value.
    """
    if err is None:
        return Errno.EIO
    if err in (errno_mod.ENOTSUP, errno_mod.EOPNOTSUPP):
        return Errno.ENOTSUP if flags & CmdFlag.FAST_ZERO else Errno.EINVAL
    if err in _WIRE_ERRNOS:
        return err
    if err in (errno_mod.EDQUOT, errno_mod.EFBIG):
        return Errno.ENOSPC
    if err in (errno_mod.EROFS, errno_mod.EACCES):
        return Errno.EPERM
    if err == errno_mod.ESHUTDOWN:
        return Errno.ESHUTDOWN
    return Errno.EIO


def nbd_to_errno(value: int) -> int:
    """Map an NBD error value received from a server to a local errno (unknown values → EIO)."""
    return value if value in _WIRE_ERRNOS else errno_mod.EIO
