"""Exception tree of the block layer and the backup engine.

Device I/O failures stay ``OSError`` (with an errno), whether local or remote (``NbdRequestError``
is an ``OSError``): error policies decide on the errno. The classes here are for everything else —
a refused request of the *caller* (bad arguments, a verb the job's state does not allow, a busy
node), which the QMP layer reports as ``GenericError`` unless a class says otherwise.
"""

from __future__ import annotations


class BackupError(Exception):
    """Base of the errors that the block layer raises for reasons other than device I/O."""

    #: The QMP error class this maps to (see ``server.errors``).
    qmp_class = "GenericError"


class InvalidArgument(BackupError):
    """The caller asked for something that cannot be done as asked (sizes, modes, same source and target)."""


class JobStateError(BackupError):
    """A verb the job's current status does not accept (QEMU's "cannot accept command verb")."""


class ImageFormatError(BackupError):
    """An image is corrupt, truncated, or not of the format it was opened as."""


def same_source_and_target() -> InvalidArgument:
    """QEMU's refusal of a backup onto its own source, in its words, wherever that is found out."""
    return InvalidArgument("Source and target cannot be the same")


def different_sizes(what: str, target_size: int, source_size: int) -> InvalidArgument:
    """QEMU's refusal of a target whose size is not the source's; ``what`` names the target."""
    return InvalidArgument(
        f"Source and target image have different sizes ({what}: {target_size} bytes, source: {source_size} bytes)"
    )
