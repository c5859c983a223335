"""A small asyncio QMP client for our own command line tools (``nbd-backup qmp``).

It speaks to any QMP server (ours or QEMU's): reads the greeting, negotiates, runs commands one at a
time matching replies by ``id``, and queues the events that arrive in between. Input goes through
the same stream parser as the server, so it does not depend on line framing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from server.addresses import parse_monitor_address
from server.errors import QmpClientError, QmpCommandError
from server.qmp.framing import JsonError, JsonStreamParser

__all__ = ["QmpClient", "QmpClientError", "QmpCommandError"]

CONNECT_TIMEOUT = 10.0


class QmpClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, greeting: dict[str, Any]) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting = greeting
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._parser = JsonStreamParser()
        self._pending: list[dict[str, Any]] = []
        self._next_id = 0

    @classmethod
    async def connect(cls, address: str, *, negotiate: bool = True, timeout: float = CONNECT_TIMEOUT) -> QmpClient:
        kind, where = parse_monitor_address(address)
        try:
            if kind == "unix":
                assert isinstance(where, str)
                opening = asyncio.open_unix_connection(where)
            else:
                assert isinstance(where, tuple)
                opening = asyncio.open_connection(*where)
            async with asyncio.timeout(timeout):
                reader, writer = await opening
        except (OSError, TimeoutError) as exc:
            raise QmpClientError(f"cannot connect to {address}: {exc or 'timed out'}") from exc
        client = cls(reader, writer, {})
        try:
            async with asyncio.timeout(timeout):
                greeting = await client._receive()
        except TimeoutError:
            await client.close()
            raise QmpClientError(f"{address}: no QMP greeting") from None
        if "QMP" not in greeting:
            await client.close()
            raise QmpClientError(f"{address} is not a QMP monitor (first message: {json.dumps(greeting)[:200]})")
        client.greeting = greeting
        if negotiate:
            await client.execute("qmp_capabilities")
        return client

    async def _receive(self) -> dict[str, Any]:
        """The next message from the server (events included)."""
        while not self._pending:
            data = await self.reader.read(1 << 16)
            if not data:
                raise QmpClientError("the server closed the connection")
            for message in self._parser.feed(data):
                if isinstance(message, JsonError) or not isinstance(message.value, dict):
                    raise QmpClientError(f"the server sent something that is not a QMP message: {message}")
                self._pending.append(message.value)
        return self._pending.pop(0)

    async def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a command; its ``return`` value, or ``QmpCommandError``."""
        reply = await self.execute_raw(name, arguments)
        if "error" in reply:
            err = reply["error"]
            raise QmpCommandError(str(err.get("class", "")), str(err.get("desc", "")), reply)
        return reply.get("return")

    async def execute_raw(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run a command; the whole reply message (``return`` or ``error``, and ``id``)."""
        self._next_id += 1
        request_id = f"nbd-backup-{self._next_id}"
        request: dict[str, Any] = {"execute": name, "id": request_id}
        if arguments is not None:
            request["arguments"] = arguments
        self.writer.write(json.dumps(request).encode())
        await self.writer.drain()
        while True:
            message = await self._receive()
            if "event" in message:
                self.events.put_nowait(message)
            elif message.get("id") == request_id:
                return message

    async def next_event(self) -> dict[str, Any]:
        if not self.events.empty():
            return self.events.get_nowait()
        while True:
            message = await self._receive()
            if "event" in message:
                return message

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()
