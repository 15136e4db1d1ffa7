"""Where the TUI's data comes from: the admin socket, behind a small interface so tests can drive the app.

Textual runs on asyncio, so this is the asyncio twin of `queuegate.admin.client` (same protocol module, same types).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import msgspec

from queuegate.admin.client import AdminUnavailable, check_hello, parse_reply, result
from queuegate.admin.protocol import (
    MAX_LINE_BYTES,
    DaemonStatus,
    Ok,
    Reply,
    Request,
    Snapshot,
    Subscribe,
    encode_line,
)


class StatusSource(Protocol):
    """What the app needs from the daemon."""

    def updates(self) -> AsyncIterator[DaemonStatus]:
        """Snapshots as they come; raises AdminUnavailable when the daemon is not (or no longer) there."""
        ...

    async def command(self, request: Request) -> str:
        """Send one request (preload, evict, drain, ...); its reply's message, or AdminError with the reason."""
        ...


class SocketSource:
    def __init__(self, path: Path, interval_ms: int = 250) -> None:
        self.path = path
        self.interval_ms = interval_ms
        self._ids = itertools.count(1)

    async def updates(self) -> AsyncIterator[DaemonStatus]:
        reader, writer = await self._connect()
        try:
            writer.write(encode_line(Subscribe(id=next(self._ids), interval_ms=self.interval_ms)))
            while True:
                reply = await self._receive(reader)
                if isinstance(reply, Snapshot):
                    yield reply.status
        finally:
            writer.close()

    async def command(self, request: Request) -> str:
        request = msgspec.structs.replace(request, id=next(self._ids))
        reader, writer = await self._connect()
        try:
            writer.write(encode_line(request))
            while True:
                reply = await self._receive(reader)
                if reply.id == request.id:
                    break
        finally:
            writer.close()
        done = result(reply)
        assert isinstance(done, Ok)
        return done.message

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.path), limit=MAX_LINE_BYTES * 64)
        except OSError as exc:
            raise AdminUnavailable(f"no QueueGate daemon at {self.path}: {exc.strerror or exc}") from None
        try:
            check_hello(await self._receive(reader), self.path)
        except AdminUnavailable:
            writer.close()
            raise
        return reader, writer

    async def _receive(self, reader: asyncio.StreamReader) -> Reply:
        try:
            line = await reader.readline()
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            raise AdminUnavailable(f"lost the daemon at {self.path}: {exc}") from None
        return parse_reply(line, self.path)
