"""``serve --state-file PATH``: what QMP clients set up survives a restart.

Kept: TLS/authz objects (``object-add``), block nodes (``blockdev-add``, with the arguments as the
client gave them), read-only repository snapshot nodes (``repo-snapshot-open``; a writable
``repo-snapshot-begin`` is never kept: what it was being written with is gone), the NBD server
(``nbd-server-start``) and exports (``block-export-add``, ``nbd-server-add``). Each is kept as the
command that made it, and only while what it made still exists, so every removal (``blockdev-del``,
``block-export-del``, ``nbd-server-stop``, ``object-del``, a repository commit) drops it. The file is
rewritten atomically (temp file, fsync, rename, directory fsync) after every command that changed it.

At the next start the commands run again, objects first, then nodes, the NBD server and exports, each
kind in the order it was first made (so a node is added after the nodes it refers to), through the
same handlers as over QMP: every check applies again. A node whose path left ``--allow-dir``, an
image gone missing, fails with a log line naming the command, and whatever does not depend on it
still comes up; the file as it was is then kept beside it (``PATH.unrestored``) before the state
without the failed parts is written, so nothing is lost without a trace.

Dirty bitmaps: a persistent bitmap lives in its qcow2 image and comes back when the image is opened.
A non-persistent one is not recreated: its bits died with the process, and an empty bitmap of the
same name would claim that nothing changed since the last backup, so an incremental backup from it
would silently miss every write made before the restart. Its loss is logged instead.

Jobs are never kept: QEMU keeps none, and a backup cut short is not a backup (its target is discarded
or incomplete); the client starts a new one.

A state file that cannot be read, is not JSON, or is not this format is an error at start: the
daemon refuses to start rather than come up without what it served (move the file aside to start empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backup.images import fsync_parent_dir
from server.errors import ConfigError, QmpError
from server.qmp.dispatch import Command, CommandRegistry, Handler
from server.registry import Registry

log = logging.getLogger(__name__)

FORMAT = "nbd-backup-state"
VERSION = 1
#: The commands that set something up: what they make (restored in this order) and its key argument.
RECORDED: dict[str, tuple[str, str | None]] = {
    "object-add": ("object", "id"),
    "blockdev-add": ("node", "node-name"),
    "repo-snapshot-open": ("node", "node-name"),
    "nbd-server-start": ("nbd-server", None),
    "block-export-add": ("export", "id"),
    "nbd-server-add": ("export", "name"),
}
KINDS = ("object", "node", "nbd-server", "export")


@dataclass
class Record:
    """One command that set something up, kept while what it made exists."""

    kind: str
    key: str
    execute: str
    arguments: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"execute": self.execute, "arguments": self.arguments}

    def describe(self) -> str:
        return f"{self.execute} {json.dumps(self.arguments, sort_keys=True)}"


def record_of(execute: str, arguments: dict[str, Any]) -> Record:
    kind, member = RECORDED[execute]
    if member is None:
        key = kind
    elif execute == "nbd-server-add":
        key = arguments.get("name", arguments["device"])
    else:
        key = arguments[member]
    return Record(kind, key, execute, arguments)


def exists(reg: Registry, record: Record) -> bool:
    if record.kind == "object":
        return record.key in reg.objects.objects
    if record.kind == "node":
        return record.key in reg.nodes
    if record.kind == "nbd-server":
        return reg.nbd is not None
    return record.key in reg.exports


def named_children(options: dict[str, Any], read_only: bool) -> Iterator[dict[str, Any]]:
    """The inline ``BlockdevOptions`` below ``options`` that have a node-name of their own (they stay
    open as nodes when the node above them is deleted), with the read-only they inherited."""
    read_only = bool(options.get("read-only", read_only))
    for key in ("file", "backing"):
        child = options.get(key)
        if isinstance(child, dict):
            if "node-name" in child:
                yield {**child, "read-only": bool(child.get("read-only", read_only))}
            else:
                yield from named_children(child, read_only)


def bitmaps_of(reg: Registry) -> list[dict[str, Any]]:
    return [
        {"node": node.name, "name": b.name, "persistent": b.persistent, "granularity": b.granularity}
        for node in reg.nodes.values()
        for b in node.bitmaps.values()
    ]


def parse(path: Path, text: str) -> tuple[list[Record], list[dict[str, Any]]]:
    """The records and bitmaps of a state file's text; ``ConfigError`` when it is not a state file."""

    def bad(why: str) -> ConfigError:
        return ConfigError(
            f"state file {path}: {why}; refusing to start without the nodes and exports it keeps "
            "(repair it, or move it aside to start with none)"
        )

    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f'not an nbd-backup state file (no "format": "{FORMAT}")')
    if doc.get("version") != VERSION:
        raise bad(f"version {doc.get('version')!r} is not the version this nbd-backup reads ({VERSION})")
    setup, bitmaps = doc.get("setup"), doc.get("bitmaps", [])
    if not isinstance(setup, list) or not isinstance(bitmaps, list):
        raise bad("'setup' and 'bitmaps' must be lists")
    records = []
    for index, entry in enumerate(setup):
        ok = isinstance(entry, dict) and entry.get("execute") in RECORDED and isinstance(entry.get("arguments"), dict)
        if not ok:
            raise bad(f"setup entry {index} is not a command this file keeps: {json.dumps(entry)[:200]}")
        try:
            records.append(record_of(entry["execute"], entry["arguments"]))
        except KeyError as exc:
            raise bad(f"setup entry {index} lacks {exc}") from None
    for index, entry in enumerate(bitmaps):
        if not (isinstance(entry, dict) and isinstance(entry.get("node"), str) and isinstance(entry.get("name"), str)):
            raise bad(f"bitmaps entry {index} needs 'node' and 'name'")
    return records, bitmaps


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a crash at any point leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_parent_dir(path)


class StateFile:
    """The daemon's kept setup: records the successful set-up commands, writes the file after every
    command that changed it, and runs the commands again at start (``restore``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.records: list[Record] = []
        self._bitmaps: list[dict[str, Any]] = []
        self._written: str | None = None
        self._restoring = False
        self._lock = asyncio.Lock()

    def load(self) -> None:
        """Read the file (none yet: nothing to restore); ``ConfigError`` when it is unreadable or corrupt."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if not self.path.parent.is_dir():
                raise ConfigError(f"--state-file {self.path}: directory {self.path.parent} does not exist") from None
            return
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read state file {self.path}: {exc}") from exc
        self.records, self._bitmaps = parse(self.path, text)
        self._written = text

    # --- recording ---------------------------------------------------------------------------------

    def install(self, commands: CommandRegistry) -> None:
        """Wrap every command that may change the setup: record it when it made something, then save."""
        commands.wrap(lambda cmd: cmd.handler if cmd.name.startswith("query-") else self._wrap(cmd))

    def _wrap(self, cmd: Command) -> Handler:
        inner = cmd.handler

        async def handler(reg: Registry, args: dict[str, Any]) -> Any:
            result = await inner(reg, args)
            if cmd.name in RECORDED:
                self.records.append(record_of(cmd.name, args))
            if not self._restoring:
                await self.save(reg)
            return result

        handler.__doc__ = inner.__doc__
        return handler

    def live(self, reg: Registry) -> list[Record]:
        """The records whose result still exists; a deleted node's named inline children, still open,
        take its place (as ``blockdev-add`` of their own options)."""
        kept: list[Record] = []
        for record in self.records:
            if exists(reg, record):
                kept.append(record)
            elif record.execute == "blockdev-add":
                read_only = bool(record.arguments.get("read-only", False))
                for child in named_children(record.arguments, read_only):
                    if child["node-name"] in reg.nodes:
                        kept.append(record_of("blockdev-add", child))
        return kept

    def document(self, reg: Registry) -> str:
        self.records = self.live(reg)
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "setup": [r.to_json() for r in self.records],
            "bitmaps": bitmaps_of(reg),
        }
        return json.dumps(doc, indent=1) + "\n"

    async def save(self, reg: Registry) -> None:
        """Write the state if it changed (never while the daemon shuts down: nodes close then)."""
        if reg.closing:
            return
        async with self._lock:
            text = self.document(reg)
            if text == self._written:
                return
            try:
                await asyncio.to_thread(write_atomically, self.path, text)
            except OSError as exc:
                log.error("state file %s: could not write it (%s): the last change is not kept", self.path, exc)
                return
            self._written = text

    # --- restoring ---------------------------------------------------------------------------------

    async def restore(self, reg: Registry, commands: CommandRegistry) -> list[str]:
        """Run the kept commands again (objects, nodes, NBD server, exports); returns what failed."""
        loaded, self.records = self.records, []
        failed: list[str] = []
        self._restoring = True
        try:
            for record in sorted(loaded, key=lambda r: KINDS.index(r.kind)):
                try:
                    await commands.dispatch(reg, record.execute, record.arguments)
                except QmpError as exc:
                    failed.append(record.describe())
                    log.error("state: not restored: %s: %s", record.describe(), exc.desc)
        finally:
            self._restoring = False
        self._check_bitmaps(reg)
        if failed and self._written is not None:
            aside = self.path.with_name(self.path.name + ".unrestored")
            await asyncio.to_thread(write_atomically, aside, self._written)
            log.warning("state: the state file as it was before this start is kept in %s", aside)
        if loaded:
            log.info("state: restored %d of %d kept item(s) from %s", len(loaded) - len(failed), len(loaded), self.path)
        await self.save(reg)
        return failed

    def _check_bitmaps(self, reg: Registry) -> None:
        for entry in self._bitmaps:
            node = reg.nodes.get(entry["node"])
            name = entry["name"]
            if not entry.get("persistent"):
                log.warning(
                    "state: dirty bitmap '%s' of node '%s' was not persistent: what it recorded was lost when "
                    "the daemon stopped, and it is not recreated (an empty bitmap would claim nothing changed); "
                    "the next backup of the node must be a full one",
                    name,
                    entry["node"],
                )
            elif node is None or name not in node.bitmaps:
                log.warning("state: persistent dirty bitmap '%s' of node '%s' did not come back", name, entry["node"])
        self._bitmaps = []
