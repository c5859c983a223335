"""The QMP command registry: named handlers with declarative argument schemas.

Every argument is validated against the schema before the handler runs, so a refused command never
has a side effect (QMP spec, "Compatibility Considerations"). Handler failures become QMP errors:
``QmpError`` as raised, ``BackupError`` by its ``qmp_class``, and anything unexpected a
``GenericError`` plus a logged traceback, so one buggy command never takes the monitor down.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from backup.errors import BackupError
from server.errors import QmpError
from server.qmp.schema import ObjectType, resolve_arguments, validate_arguments

log = logging.getLogger(__name__)

Handler = Callable[[Any, dict[str, Any]], Awaitable[Any]]
H = TypeVar("H", bound=Handler)


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    args: ObjectType
    #: One line for ``nbd-backup qmp --help``-style listings (the handler's docstring's first line).
    summary: str = ""


class CommandRegistry:
    """Commands by name. Use ``@registry.command("name", args={...})`` on ``async def handler(ctx, args)``."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def command(self, name: str, args: Any = None) -> Callable[[H], H]:
        """Decorator registering ``handler`` as command ``name``; ``args`` is a schema spec (see
        ``server.qmp.schema``): ``None`` for no arguments, ``{"member": spec, "*optional": spec}``,
        or an object type (a flat union for boxed commands like ``blockdev-add``)."""

        def decorate(handler: H) -> H:
            self.register(name, handler, args)
            return handler

        return decorate

    def register(self, name: str, handler: Handler, args: Any = None) -> Command:
        if name in self._commands:
            raise ValueError(f"QMP command {name!r} registered twice")
        doc = (handler.__doc__ or "").strip().splitlines()
        cmd = Command(name, handler, resolve_arguments(args), doc[0] if doc else "")
        self._commands[name] = cmd
        return cmd

    def update(self, other: CommandRegistry) -> None:
        """Add every command of ``other`` (names must not clash)."""
        for cmd in other:
            if cmd.name in self._commands:
                raise ValueError(f"QMP command {cmd.name!r} registered twice")
            self._commands[cmd.name] = cmd

    def wrap(self, wrapper: Callable[[Command], Handler]) -> None:
        """Replace every command's handler by ``wrapper(command)`` (how ``--state-file`` records the
        commands that succeeded); the names, schemas and summaries stay."""
        for name, cmd in self._commands.items():
            self._commands[name] = replace(cmd, handler=wrapper(cmd))

    def get(self, name: str) -> Command | None:
        return self._commands.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def __iter__(self) -> Iterator[Command]:
        return iter(self._commands.values())

    def __len__(self) -> int:
        return len(self._commands)

    def names(self) -> list[str]:
        return list(self._commands)

    def lookup(self, name: str) -> Command:
        cmd = self._commands.get(name)
        if cmd is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        return cmd

    async def dispatch(self, ctx: Any, name: str, arguments: dict[str, Any] | None) -> Any:
        """Validate and run one command; every failure comes out as ``QmpError``."""
        cmd = self.lookup(name)
        args = validate_arguments(cmd.args, {} if arguments is None else arguments)
        return await run_handler(cmd, ctx, args)


async def run_handler(cmd: Command, ctx: Any, args: dict[str, Any]) -> Any:
    """Run a validated command, translating its failures (never ``CancelledError``) into ``QmpError``."""
    try:
        return await cmd.handler(ctx, args)
    except QmpError:
        raise
    except BackupError as exc:
        raise QmpError.from_backup_error(exc) from exc
    except Exception as exc:
        log.exception("QMP command %s failed unexpectedly", cmd.name)
        raise QmpError(f"Internal error in '{cmd.name}': {type(exc).__name__}: {exc}", "GenericError") from exc
