"""``--repo-exports`` through the NBD server in-process: snapshots listed by ``NBD_OPT_LIST`` and served
read-only as ``DISK@ID`` / ``DISK@latest`` (resolved when asked: a later commit appears at once), an
export an added one shadows, and the reader of each connection closed when the connection ends."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from backup.memory import MemoryDevice
from backup.repo.repository import Repository
from nbd.client import NbdClient
from nbd.server import Export, NbdServer
from nbd.uri import NbdUri
from server.repos import RepoExports
from tests.repokit import CS, write_snapshot


class Tracking(RepoExports):
    """Remembers the exports it made (to see their readers closed)."""

    def __init__(self, repos: dict[str, Repository]) -> None:
        super().__init__(repos)
        self.made: list[Export] = []

    def lookup(self, name: str) -> Export | None:
        export = super().lookup(name)
        if export is not None:
            self.made.append(export)
        return export


async def test_snapshots_served_listed_and_closed(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo", CS)
    first = os.urandom(CS) + bytes(CS)
    m1 = write_snapshot(repo, "vm/d", [first[:CS], first[CS:]])
    exports = Tracking({"default": repo})
    server = NbdServer()
    server.resolver = exports
    server.add_export(Export("static", MemoryDevice(CS), writable=False))
    sock = str(tmp_path / "nbd.sock")
    await server.listen_unix(sock)
    try:
        listed = [e.name for e in await NbdClient.list_exports(NbdUri(socket=sock))]
        assert listed == ["static", f"vm/d@{m1.id}", "vm/d@latest"]
        client = await NbdClient.connect(NbdUri(socket=sock, export="vm/d@latest"), connections=1)
        try:
            assert client.read_only and client.size == 2 * CS
            assert await client.pread(0, 2 * CS) == first
        finally:
            await client.close()
        second = os.urandom(CS)
        m2 = write_snapshot(repo, "vm/d", [second], parent="latest")
        client = await NbdClient.connect(NbdUri(socket=sock, export="vm/d@latest"), connections=1)
        try:
            assert client.size == CS and await client.pread(0, CS) == second
        finally:
            await client.close()
        listed = [e.name for e in await NbdClient.list_exports(NbdUri(socket=sock))]
        assert listed == ["static", f"vm/d@{m1.id}", f"vm/d@{m2.id}", "vm/d@latest"]
        # every reader that served reads has stopped its threads (the others never started any)
        readers = [e.device for e in exports.made]

        def idle() -> bool:
            return all(r._workers._pool is None for r in readers)  # type: ignore[attr-defined]

        for _ in range(200):  # the server sees a connection end a moment after the client
            if idle():
                break
            await asyncio.sleep(0.01)
        assert idle() and any(r._closed for r in readers)  # type: ignore[attr-defined]
    finally:
        await server.stop()
