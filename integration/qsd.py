"""A small harness around the real qemu-storage-daemon for differential tests.

``Qsd`` starts ``qemu-storage-daemon`` with a QMP monitor on a unix socket in a temporary directory
and stops it again (``quit``, then SIGTERM, then SIGKILL). ``QmpSync`` (blocking) and ``QmpAsync``
(asyncio) speak QMP to it — or to any QMP server, ours included — and keep a ``transcript`` of every
command, reply and event in arrival order, so a test can run one sequence against QEMU and against
us and compare what came back. Replies are returned raw (``{"return": …}`` or ``{"error": …}``).

Use the ``qsd_daemon`` fixture (``from qsd import qsd_daemon``) or::

    with Qsd.start(tmp_path) as qsd, qsd.connect() as qmp:
        qmp.execute("blockdev-add", driver="file", **{"node-name": "src"}, filename=str(img))
        qmp.wait_event("JOB_STATUS_CHANGE", lambda d: d["status"] == "null")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import require
from peers import log_text, pid_file_written, spawn, stop_process, wait_until

Json = dict[str, Any]
EventFilter = Callable[[Json], bool]

DEFAULT_TIMEOUT = 30.0


class QmpError(Exception):
    """A QMP conversation went wrong (closed connection, timeout, malformed greeting)."""


@dataclass
class Transcript:
    """Everything said on one QMP connection, in order: ("cmd", name, args), ("return", value),
    ("error", {class, desc}) or ("event", name, data)."""

    entries: list[tuple[Any, ...]] = field(default_factory=list)

    def events(self, name: str | None = None) -> list[tuple[str, Json]]:
        return [(e[1], e[2]) for e in self.entries if e[0] == "event" and (name is None or e[1] == name)]

    def job_statuses(self, job_id: str) -> list[str]:
        return [data["status"] for name, data in self.events("JOB_STATUS_CHANGE") if data["id"] == job_id]

    def job_events(self, job_id: str) -> list[tuple[str, Any]]:
        return job_events_of(self.events(), job_id)


def job_events_of(events: list[tuple[str, Json]], job_id: str, *, drop: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """The events about one job: status changes as ("status", S), others as (name, data without ``drop``)."""
    out: list[tuple[str, Any]] = []
    for name, data in events:
        if name == "JOB_STATUS_CHANGE":
            if data["id"] == job_id:
                out.append(("status", data["status"]))
        elif job_id in (data.get("device"), data.get("id")):
            out.append((name, {k: v for k, v in data.items() if k not in drop} if drop else data))
    return out


class _Matcher:
    """Shared event bookkeeping of both clients: the next unconsumed event matching a filter."""

    def __init__(self) -> None:
        self.transcript = Transcript()
        self.pending_events: list[Json] = []

    def _record_message(self, msg: Json) -> Json | None:
        """Record one incoming message; returns it when it is a reply (not an event)."""
        if "event" in msg:
            self.transcript.entries.append(("event", msg["event"], msg.get("data", {})))
            self.pending_events.append(msg)
            return None
        if "return" in msg:
            self.transcript.entries.append(("return", msg["return"]))
        elif "error" in msg:
            self.transcript.entries.append(("error", msg["error"]))
        return msg

    def _take_event(self, name: str, match: EventFilter | None) -> Json | None:
        """Remove and return the oldest queued event that matches (others stay queued)."""
        for index, msg in enumerate(self.pending_events):
            if msg["event"] == name and (match is None or match(msg.get("data", {}))):
                del self.pending_events[index]
                return msg
        return None

    @staticmethod
    def _command(name: str, args: Json, msg_id: int) -> bytes:
        obj: Json = {"execute": name, "id": msg_id}
        if args:
            obj["arguments"] = args
        return json.dumps(obj).encode()


class QmpSync(_Matcher):
    """Blocking QMP client over a unix socket."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__()
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        self._buf = b""
        self._next_id = 1
        self.greeting = self._read()
        if "QMP" not in self.greeting:
            raise QmpError(f"not a QMP greeting: {self.greeting}")
        reply = self.execute("qmp_capabilities")
        if "return" not in reply:
            raise QmpError(f"qmp_capabilities refused: {reply}")

    def _read(self, deadline: float | None = None) -> Json:
        while b"\n" not in self._buf:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QmpError("QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: Json = json.loads(line)
        return msg

    def execute(self, name: str, args: Json | None = None, /, **kwargs: Any) -> Json:
        """Send a command and return its raw reply; events meanwhile are recorded and queued."""
        arguments = {**(args or {}), **kwargs}
        msg_id = self._next_id
        self._next_id += 1
        self.transcript.entries.append(("cmd", name, arguments))
        self.sock.sendall(self._command(name, arguments, msg_id))
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._record_message(self._read(deadline))
            if msg is not None:
                return msg

    def ok(self, name: str, args: Json | None = None, /, **kwargs: Any) -> Any:
        """``execute`` that insists on success and returns the ``return`` value."""
        reply = self.execute(name, args, **kwargs)
        if "return" not in reply:
            raise QmpError(f"{name} failed: {reply}")
        return reply["return"]

    def wait_event(self, name: str, match: EventFilter | None = None, *, timeout: float | None = None) -> Json:
        """The oldest not yet consumed event ``name`` whose data satisfies ``match`` (consumes it)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            found = self._take_event(name, match)
            if found is not None:
                return found
            try:
                self._record_message(self._read(deadline))
            except TimeoutError:
                raise TimeoutError(f"no {name} event within the timeout; got {self.transcript.events()}") from None

    def wait_job_status(self, job_id: str, status: str, *, timeout: float | None = None) -> Json:
        return self.wait_event(
            "JOB_STATUS_CHANGE", lambda d: d["id"] == job_id and d["status"] == status, timeout=timeout
        )

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> QmpSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class QmpAsync(_Matcher):
    """asyncio QMP client over a unix socket (same transcript as ``QmpSync``)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        super().__init__()
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self._next_id = 1
        self.greeting: Json = {}
        self._arrived = asyncio.Event()
        self._replies: dict[Any, asyncio.Future[Json]] = {}
        self._reader_task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> QmpAsync:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(os.fspath(path), limit=1 << 24), timeout)
        self = cls(reader, writer, timeout)
        self.greeting = json.loads(await asyncio.wait_for(reader.readline(), timeout))
        if "QMP" not in self.greeting:
            raise QmpError(f"not a QMP greeting: {self.greeting}")
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())
        reply = await self.execute("qmp_capabilities")
        if "return" not in reply:
            raise QmpError(f"qmp_capabilities refused: {reply}")
        return self

    async def _read_loop(self) -> None:
        try:
            while line := await self.reader.readline():
                msg = self._record_message(json.loads(line))
                if msg is not None:
                    future = self._replies.pop(msg.get("id"), None)
                    if future is not None and not future.done():
                        future.set_result(msg)
                self._arrived.set()
                self._arrived = asyncio.Event()
        finally:
            for future in self._replies.values():
                if not future.done():
                    future.set_exception(QmpError("QMP connection closed"))
            self._arrived.set()

    async def execute(self, name: str, args: Json | None = None, /, **kwargs: Any) -> Json:
        arguments = {**(args or {}), **kwargs}
        msg_id = self._next_id
        self._next_id += 1
        future: asyncio.Future[Json] = asyncio.get_running_loop().create_future()
        self._replies[msg_id] = future
        self.transcript.entries.append(("cmd", name, arguments))
        self.writer.write(self._command(name, arguments, msg_id))
        await self.writer.drain()
        return await asyncio.wait_for(future, self.timeout)

    async def ok(self, name: str, args: Json | None = None, /, **kwargs: Any) -> Any:
        reply = await self.execute(name, args, **kwargs)
        if "return" not in reply:
            raise QmpError(f"{name} failed: {reply}")
        return reply["return"]

    async def wait_event(self, name: str, match: EventFilter | None = None, *, timeout: float | None = None) -> Json:
        async with asyncio.timeout(self.timeout if timeout is None else timeout):
            while True:
                found = self._take_event(name, match)
                if found is not None:
                    return found
                if self._reader_task is not None and self._reader_task.done():
                    raise QmpError("QMP connection closed")
                await self._arrived.wait()

    async def wait_job_status(self, job_id: str, status: str, *, timeout: float | None = None) -> Json:
        return await self.wait_event(
            "JOB_STATUS_CHANGE", lambda d: d["id"] == job_id and d["status"] == status, timeout=timeout
        )

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task


class Qsd:
    """One qemu-storage-daemon process with a QMP monitor socket in ``workdir``."""

    def __init__(self, workdir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = Path(workdir)
        self.qmp_path = self.workdir / "qsd-qmp.sock"
        self.log_path = self.workdir / "qsd.log"
        self.pid_path = self.workdir / "qsd.pid"
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    @contextlib.contextmanager
    def start(cls, workdir: Path, *extra_args: str, timeout: float = 60.0) -> Iterator[Qsd]:
        """Run the daemon for the duration of the ``with`` block; it is stopped whatever happens."""
        qsd = cls(workdir, extra_args)
        qsd.launch(timeout=timeout)
        try:
            yield qsd
        finally:
            qsd.stop()

    def launch(self, *, timeout: float = 60.0) -> None:
        """Start the daemon; it is ready once it has written its pid file (after setting up every option)."""
        binary = shutil.which("qemu-storage-daemon")
        if binary is None:
            raise FileNotFoundError("qemu-storage-daemon is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "--chardev",
            f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
            "--monitor",
            "chardev=qmp0",
            "--pidfile",
            str(self.pid_path),
            *self.extra_args,
        ]
        self.proc = spawn(argv, self.log_path)
        wait_until(lambda: pid_file_written(self.pid_path), self.proc, self.log_path, "qemu-storage-daemon", timeout)

    def log(self) -> str:
        return log_text(self.log_path)

    def connect(self, *, timeout: float = DEFAULT_TIMEOUT) -> QmpSync:
        return QmpSync(self.qmp_path, timeout=timeout)

    async def connect_async(self, *, timeout: float = DEFAULT_TIMEOUT) -> QmpAsync:
        return await QmpAsync.connect(self.qmp_path, timeout=timeout)

    def stop(self) -> None:
        """``quit`` over QMP, then SIGTERM, then SIGKILL; always reaps the process."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(Exception), QmpSync(self.qmp_path, timeout=5) as qmp:
            qmp.execute("quit")
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            stop_process(proc, 5)


@pytest.fixture
def qsd_daemon(tmp_path: Path) -> Iterator[Qsd]:
    """A running qemu-storage-daemon (fails in CI, skips locally, when it is not installed)."""
    require("qemu-storage-daemon")
    with Qsd.start(tmp_path / "qsd") as daemon:
        yield daemon
