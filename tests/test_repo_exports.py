"""``--repo-exports`` through the NBD server in-process: snapshots listed by ``NBD_OPT_LIST`` and served
read-only as ``DISK@ID`` / ``DISK@latest`` (resolved when asked: a later commit appears at once), an
export an added one shadows, and the reader of each connection closed when the connection ends."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from backup.memory import MemoryDevice
from backup.repo.repository import Repository
from nbd.client import NbdClient
from nbd.server import Export, NbdServer
from nbd.server_core import ExportEntry
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


class Slow(Tracking):
    """A repository in a slow object store: each lookup and listing blocks until ``gate`` opens."""

    def __init__(self, repos: dict[str, Repository]) -> None:
        super().__init__(repos)
        self.gate = threading.Event()
        self.order: list[str] = []

    def lookup(self, name: str) -> Export | None:
        self.gate.wait(5)  # bounded: without the fix the loop waits here, and the test sees the order
        self.order.append("lookup")
        return super().lookup(name)

    def entries(self) -> Iterator[ExportEntry]:
        self.gate.wait(5)
        self.order.append("list")
        return super().entries()


async def test_a_slow_repository_lookup_does_not_stall_other_clients(tmp_path: Path) -> None:
    """Lookups and listings of a resolver run off the event loop: a static export serves meanwhile.

    Each connection looks a name up once (SET_META_CONTEXT and GO share it), and the reader of every
    export it looked up is closed when it ends."""
    repo = Repository.init(tmp_path / "repo", CS)
    data = os.urandom(CS)
    m = write_snapshot(repo, "vm/d", [data])
    exports = Slow({"default": repo})
    server = NbdServer()
    server.resolver = exports
    server.add_export(Export("static", MemoryDevice(CS), writable=False))
    sock = str(tmp_path / "nbd.sock")
    await server.listen_unix(sock)

    async def slow_client() -> bytes:
        client = await NbdClient.connect(NbdUri(socket=sock, export=f"vm/d@{m.id}"), connections=1)
        try:
            return await client.pread(0, CS)
        finally:
            await client.close()

    try:
        slow = asyncio.create_task(slow_client())
        listing = asyncio.create_task(NbdClient.list_exports(NbdUri(socket=sock)))
        client = await NbdClient.connect(NbdUri(socket=sock, export="static"), connections=1)
        try:
            assert await client.pread(0, CS) == bytes(CS)
        finally:
            await client.close()
        exports.order.append("static served")
        exports.gate.set()
        assert await slow == data
        assert [e.name for e in await listing][:2] == ["static", f"vm/d@{m.id}"]
        assert exports.order[0] == "static served"
        assert len(exports.made) == 1
        for _ in range(200):  # the server sees a connection end a moment after the client
            if exports.made[0].device._closed:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
        assert exports.made[0].device._closed  # type: ignore[attr-defined]
    finally:
        exports.gate.set()
        await server.stop()


class Stuck(Tracking):
    """Lookups that hang until ``gate`` opens (an object store that stopped answering); counts them."""

    def __init__(self, repos: dict[str, Repository]) -> None:
        super().__init__(repos)
        self.gate = threading.Event()
        self.entered = 0

    def lookup(self, name: str) -> Export | None:
        self.entered += 1
        self.gate.wait(10)
        return super().lookup(name)


async def test_hanging_lookups_leave_the_event_loops_threads_to_file_io(tmp_path: Path) -> None:
    """More clients than the default executor has threads name exports of a repository whose store hangs:
    the lookups wait in the server's own few threads, and the default executor — where file reads and
    writes of every other export run — stays free."""
    repo = Repository.init(tmp_path / "repo", CS)
    m = write_snapshot(repo, "vm/d", [os.urandom(CS)])
    exports = Stuck({"default": repo})
    server = NbdServer()
    server.resolver = exports
    sock = str(tmp_path / "nbd.sock")
    await server.listen_unix(sock)
    clients = min(32, (os.cpu_count() or 1) + 4) + 2  # asyncio's default executor size, and more
    stuck = [
        asyncio.create_task(NbdClient.connect(NbdUri(socket=sock, export=f"vm/d@{m.id}"), connections=1))
        for _ in range(clients)
    ]
    try:
        for _ in range(500):
            if exports.entered:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # the others reach the server and queue behind the first lookups
        assert exports.entered >= 1
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 5) == "free"
    finally:
        exports.gate.set()
        for connecting in await asyncio.gather(*stuck, return_exceptions=True):
            if isinstance(connecting, NbdClient):
                await connecting.close()
        await server.stop()
