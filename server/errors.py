"""Exception tree of the daemon and the command line, under one root like ``nbd.errors`` and
``backup.errors``:

* ``QmpError`` — a QMP command failed; what the monitor reports to clients, with QEMU's error classes
  (``PathNotAllowed``: a path outside ``--allow-dir``).
* ``ConfigError`` — the command line or the configuration file is wrong; nothing starts
  (``AddressError``: a malformed monitor or NBD address, ``ArgumentError``: ``nbd-backup qmp``'s
  ``key=value`` arguments; both also ``ValueError``).
* ``QmpClientError`` / ``QmpCommandError`` — our QMP client could not talk to a monitor, or a
  command it sent was refused; ``BackupFailed`` — ``nbd-backup backup`` did not complete.
* ``ShutdownError`` — the daemon stopped, but not cleanly (it exits non-zero).
"""

from __future__ import annotations

from typing import Any

from backup.errors import BackupError


class ServerError(Exception):
    """Base of every error raised by the daemon and the command line (not for device I/O: OSError)."""


class QmpError(ServerError):
    """A command failed; ``error_class`` is one of QEMU's (GenericError, CommandNotFound,
    DeviceNotFound, DeviceNotActive, KVMMissingCap)."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    @classmethod
    def from_backup_error(cls, exc: BackupError) -> QmpError:
        return cls(str(exc), exc.qmp_class)


class PathNotAllowed(QmpError):
    """A path outside the ``--allow-dir`` directories (symlinks resolved), or otherwise unusable."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc, "GenericError")


class ShutdownError(ServerError):
    """Shutting down hit errors (an image that could not be flushed or closed, a job that would not
    stop): each was logged; together they make ``nbd-backup serve`` exit non-zero."""


class ConfigError(ServerError):
    """The command line or configuration file is wrong; the command does not start."""


class AddressError(ConfigError, ValueError):
    """A monitor (``unix:PATH``, ``tcp:HOST:PORT``) or NBD listening (``HOST:PORT``) address is malformed."""


class ArgumentError(ConfigError, ValueError):
    """``nbd-backup qmp``'s command arguments are malformed."""


class QmpClientError(ServerError):
    """The connection failed or the peer is not a QMP server."""


class QmpCommandError(ServerError):
    """The server answered a command with an error."""

    def __init__(self, error_class: str, desc: str, reply: dict[str, Any]) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc
        self.reply = reply


class BackupFailed(ServerError):
    """``nbd-backup backup``: the backup could not be started or did not complete; the message says why."""
