"""The backup repositories a daemon has open (``serve --repo [ID=]DIR``) and their snapshots as NBD
exports (``--repo-exports``).

A repository is opened once at start, under the daemon's ``--allow-dir`` policy like every path, and
named by its id (``default`` without ``ID=``); QMP commands name it with ``repo``, which may be left
out while only one is open. The exports are not added one by one: ``RepoExports`` resolves
``DISK@ID`` and ``DISK@latest`` when a client asks, so a snapshot committed later (by QMP, by
``nbd-backup repo backup`` beside the daemon) is there at once and ``@latest`` follows the newest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from backup.repo.crypt import load_key_file
from backup.repo.errors import RepoError
from backup.repo.location import is_s3
from backup.repo.names import parse_snapshot_ref
from backup.repo.repository import Repository
from nbd.constants import MAX_STRING, TransmissionFlag
from nbd.server import Export
from nbd.server_core import ExportEntry
from server.errors import ConfigError, QmpError
from server.paths import PathPolicy
from server.registry import id_wellformed

log = logging.getLogger(__name__)

DEFAULT_ID = "default"
#: Chunks each snapshot export keeps decoded, read-ahead included (per connection: memory stays bounded by
#: the connection limit).
EXPORT_CACHE_CHUNKS = 4


@dataclass(frozen=True)
class RepoSpec:
    id: str
    path: str


def parse_repo(text: str) -> RepoSpec:
    """``[ID=]DIR``: ``ID`` is a QMP identifier (a letter, then letters, digits, ``-._``); a
    directory whose name has a ``=`` is written with a ``./`` or ``/`` before it."""
    head, sep, rest = text.partition("=")
    if sep and id_wellformed(head):
        repo_id, path = head, rest
    else:
        repo_id, path = DEFAULT_ID, text
    if not path:
        raise ConfigError(f"bad --repo '{text}' (expected [ID=]DIR)")
    return RepoSpec(repo_id, path)


def open_repos(
    specs: list[RepoSpec], paths: PathPolicy, key_files: list[RepoSpec] | None = None
) -> dict[str, Repository]:
    """Open every repository (each path through ``paths``); a duplicate id or a bad directory stops the start.

    ``key_files`` (``--repo-key-file [ID=]FILE``) are the keys of encrypted repositories, by id.
    """
    keys: dict[str, str] = {}
    for k in key_files or []:
        if k.id in keys:
            raise ConfigError(f"--repo-key-file: repository id '{k.id}' given twice")
        if k.id not in {s.id for s in specs}:
            raise ConfigError(f"--repo-key-file: no --repo with id '{k.id}'")
        keys[k.id] = k.path
    repos: dict[str, Repository] = {}
    for spec in specs:
        if spec.id in repos:
            raise ConfigError(f"--repo: repository id '{spec.id}' given twice")
        where: str | Path = spec.path
        if not is_s3(spec.path):  # a bucket is not a path: --allow-dir confines files, not URLs
            try:
                where = paths.resolve(spec.path, directory=True)
            except QmpError as exc:
                raise ConfigError(f"--repo {spec.path}: {exc.desc}") from None
        try:
            key = load_key_file(keys[spec.id]) if spec.id in keys else None
            repos[spec.id] = Repository.open(where, key=key)
        except RepoError as exc:
            raise ConfigError(f"--repo {spec.path}: {exc}") from None
    return repos


def pick_repo(repos: dict[str, Repository], repo_id: str | None) -> tuple[str, Repository]:
    """The repository a QMP command names (``repo`` may be left out while exactly one is open)."""
    if repo_id is None:
        if not repos:
            raise QmpError("No repository is open (start the daemon with --repo DIR)")
        if len(repos) > 1:
            raise QmpError(f"Parameter 'repo' is missing (open repositories: {', '.join(repos)})")
        return next(iter(repos.items()))
    repo = repos.get(repo_id)
    if repo is None:
        raise QmpError(f"Repository '{repo_id}' not found")
    return repo_id, repo


class RepoExports:
    """Every published snapshot of the open repositories as a read-only NBD export (an ``ExportResolver``).

    Names: ``DISK@ID`` and ``DISK@latest`` in the ``default`` repository (or the only one open), and
    ``REPO:DISK@ID`` in any (the form ``nbd-backup backup``'s ``repo:[ID:]DISK`` uses). Each lookup
    opens a fresh reader over the manifest it finds: a connection keeps the snapshot it opened even
    if ``@latest`` moves on or the snapshot is pruned (its chunks stay until the next ``gc``), and the
    reader is closed when the connection ends.
    """

    def __init__(self, repos: dict[str, Repository]) -> None:
        self.repos = repos

    def _unprefixed(self) -> str | None:
        if DEFAULT_ID in self.repos:
            return DEFAULT_ID
        return next(iter(self.repos)) if len(self.repos) == 1 else None

    def _split(self, name: str) -> tuple[str, str, str] | None:
        prefix, colon, ref = name.rpartition(":")
        repo_id = prefix if colon else self._unprefixed()
        if repo_id is None or repo_id not in self.repos or "@" not in ref:
            return None
        try:
            disk, snap = parse_snapshot_ref(ref)
        except RepoError:
            return None
        return repo_id, disk, snap

    def lookup(self, name: str) -> Export | None:
        from backup.repo.device import SnapshotReader

        found = self._split(name)
        if found is None:
            return None
        repo_id, disk, snap = found
        repo = self.repos[repo_id]
        try:
            manifest = repo.resolve(disk, snap)
            reader = SnapshotReader(repo, manifest, cache_chunks=EXPORT_CACHE_CHUNKS)
        except RepoError as exc:
            log.debug("export '%s': %s", name, exc)
            return None
        description = _description(repo_id, manifest.ref, manifest.created)
        return Export(name, reader, writable=False, description=description, owns_device=True)

    def entries(self) -> Iterator[ExportEntry]:
        unprefixed = self._unprefixed()
        flags = int(TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY)
        for repo_id, repo in self.repos.items():
            prefix = "" if repo_id == unprefixed else f"{repo_id}:"
            try:
                disks = repo.disks()
            except OSError as exc:
                log.warning("repository '%s': cannot list disks: %s", repo_id, exc)
                continue
            for disk in disks:
                try:
                    ids = repo.snapshot_ids(disk)
                except OSError:
                    continue
                names = [f"{prefix}{disk}@{snap}" for snap in ids]
                if ids:
                    names.append(f"{prefix}{disk}@latest")
                for name in names:
                    if len(name.encode()) <= MAX_STRING:
                        yield ExportEntry(name=name, size=0, flags=flags, description=f"repository {repo_id}")


def _description(repo_id: str, ref: str, created: str) -> str:
    return f"repository {repo_id}: {ref} ({created})"
