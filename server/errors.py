"""Exception tree of the daemon: what the QMP monitor reports to clients, with QEMU's error classes."""

from __future__ import annotations

from backup.errors import BackupError


class QmpError(Exception):
    """A command failed; ``error_class`` is one of QEMU's (GenericError, CommandNotFound,
    DeviceNotFound, DeviceNotActive, KVMMissingCap)."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    @classmethod
    def from_backup_error(cls, exc: BackupError) -> QmpError:
        return cls(str(exc), exc.qmp_class)


class ShutdownError(Exception):
    """Shutting down hit errors (an image that could not be flushed or closed, a job that would not
    stop): each was logged; together they make ``nbd-backup serve`` exit non-zero."""


class ConfigError(Exception):
    """The command line or configuration file is wrong; the daemon does not start."""


class PathNotAllowed(QmpError):
    """A path outside the ``--allow-dir`` directories (symlinks resolved), or otherwise unusable."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc, "GenericError")
