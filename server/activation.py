"""Socket activation: the listening sockets systemd (or any supervisor speaking its protocol) passes.

systemd binds the sockets of ``nbd-backup.socket`` itself and starts the daemon with them at fd 3, 4, …
and ``LISTEN_FDS`` (how many), ``LISTEN_PID`` (for whom: a child that inherits the environment must
not take them) and ``LISTEN_FDNAMES`` (``FileDescriptorName=``, colon-separated). The daemon knows two
names: ``nbd`` (NBD clients) and ``qmp`` (the monitor); a passed socket replaces what the daemon would
bind for that name. The rules are sd_listen_fds(3)'s: another pid means "not for us" (ignored, fds left
alone), the variables are removed once read, and the fds are made close-on-exec.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

from server.addresses import show_tcp
from server.errors import ConfigError

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
ENV_NAMES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
#: The FileDescriptorName= values the daemon understands.
KNOWN_NAMES = ("nbd", "qmp")


def listen_fds(
    environ: MutableMapping[str, str] | None = None, *, first_fd: int = SD_LISTEN_FDS_START
) -> dict[str, list[socket.socket]]:
    """The passed sockets by name (``{}`` when none are passed to this process). A name the daemon
    does not know, a missing name or an fd that is not a listening stream socket is a ``ConfigError``:
    a unit file that does not match the daemon should stop it at start, not leave a socket unserved."""
    environ = os.environ if environ is None else environ
    values = {name: environ.pop(name, None) for name in ENV_NAMES}
    count_text, pid_text, names_text = values["LISTEN_FDS"], values["LISTEN_PID"], values["LISTEN_FDNAMES"]
    if count_text is None:
        return {}
    if pid_text is None or not pid_text.isdigit() or int(pid_text) != os.getpid():
        log.info("socket activation: LISTEN_PID=%s is not this process (%d): ignored", pid_text, os.getpid())
        return {}
    if not count_text.isdigit():
        raise ConfigError(f"socket activation: LISTEN_FDS={count_text!r} is not a number")
    count = int(count_text)
    if count == 0:
        return {}
    if names_text is None:
        raise ConfigError(
            f"socket activation: {count} socket(s) passed without LISTEN_FDNAMES "
            f"(set FileDescriptorName= to one of {', '.join(KNOWN_NAMES)} in the .socket unit)"
        )
    names = names_text.split(":")
    if len(names) != count:
        raise ConfigError(f"socket activation: {count} sockets but {len(names)} name(s) in LISTEN_FDNAMES")
    found: dict[str, list[socket.socket]] = {}
    for offset, name in enumerate(names):
        fd = first_fd + offset
        if name not in KNOWN_NAMES:
            raise ConfigError(
                f"socket activation: fd {fd} is named {name!r}; FileDescriptorName= must be one of "
                f"{', '.join(KNOWN_NAMES)}"
            )
        found.setdefault(name, []).append(_adopt(fd, name))
    return found


def _adopt(fd: int, name: str) -> socket.socket:
    """The passed fd as a socket object (close-on-exec), once it is known to be a listening stream socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(f"socket activation: fd {fd} ({name}): {exc.strerror or exc}") from None
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise ConfigError(f"socket activation: fd {fd} ({name}) is not a listening stream socket")
    os.set_inheritable(fd, False)
    return sock


def describe(sock: socket.socket) -> str:
    """A passed socket's address as the ready line shows it: ``HOST:PORT`` or ``unix:PATH``."""
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        path = address.decode(errors="replace") if isinstance(address, bytes) else address
        return f"unix:{path or '(unnamed)'}"
    return show_tcp(address[0], address[1])
