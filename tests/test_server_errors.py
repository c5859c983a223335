"""The daemon's and the command line's errors sit under one root, like ``nbd.errors`` and ``backup.errors``:
a caller can tell ours from a device's ``OSError`` or a bug's ``Exception`` by one class."""

from __future__ import annotations

import inspect

from server import errors
from server.commands import backup as backup_command
from server.commands import qmp as qmp_command
from server.qmp import client


def test_every_error_class_is_a_server_error() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) >= 10
    assert all(issubclass(c, errors.ServerError) for c in classes)


def test_the_commands_raise_the_tree_s_classes() -> None:
    assert client.QmpClientError is errors.QmpClientError and client.QmpCommandError is errors.QmpCommandError
    assert issubclass(backup_command.BackupFailed, errors.ServerError)
    assert issubclass(qmp_command.ArgumentError, errors.ConfigError)
    assert issubclass(qmp_command.ArgumentError, ValueError)  # `nbd-backup qmp` reports it as a usage error
