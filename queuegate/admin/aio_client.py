"""The asyncio client of the admin socket, for `queuegate top` (Textual runs on asyncio): the twin of `client.py`,
with the same protocol module and types."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec

from queuegate.admin.protocol import (
    MAX_LINE_BYTES,
    AdminUnavailable,
    DaemonStatus,
    Ok,
    Reply,
    Request,
    Snapshot,
    Subscribe,
    check_hello,
    encode_line,
    no_daemon,
    parse_reply,
    result,
)


class AsyncioAdminClient:
    """Snapshots as they come (`updates`) and one request at a time (`command`), each on a connection of its own."""

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
            raise AdminUnavailable(no_daemon(self.path, exc)) from None
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
