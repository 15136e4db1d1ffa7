"""The trio client of the admin socket, used by `queuegate admin` (and tests); `aio_client.py` is its asyncio twin.
Both raise the protocol module's AdminUnavailable (no daemon) and AdminError (a refused request)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

import msgspec
import trio

from queuegate.admin._stream import LineStream
from queuegate.admin.protocol import (
    AdminUnavailable,
    DaemonStatus,
    Reply,
    Request,
    Snapshot,
    Status,
    Subscribe,
    check_hello,
    encode_line,
    no_daemon,
    parse_reply,
    result,
)


class AdminClient:
    """One connection. Use as `async with AdminClient(path) as client:`; requests go one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lines: LineStream | None = None
        self._ids = itertools.count(1)
        self.daemon_pid = 0

    async def __aenter__(self) -> AdminClient:
        try:
            stream = await trio.open_unix_socket(str(self.path))
        except OSError as exc:
            raise AdminUnavailable(no_daemon(self.path, exc)) from None
        self._lines = LineStream(stream)
        try:
            self.daemon_pid = check_hello(await self._receive(), self.path).pid
        except AdminUnavailable:
            await stream.aclose()
            raise
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._lines is not None:
            await self._lines.stream.aclose()

    async def request(self, message: Request) -> Reply:
        """Send one request and return its reply; AdminError if the daemon refused it."""
        message = msgspec.structs.replace(message, id=next(self._ids))
        assert self._lines is not None
        try:
            await self._lines.send(encode_line(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise AdminUnavailable(f"lost the daemon at {self.path}: {exc}") from None
        while True:
            reply = await self._receive()
            if reply.id == message.id:
                return result(reply)

    async def status(self) -> DaemonStatus:
        reply = await self.request(Status())
        assert isinstance(reply, Snapshot)
        return reply.status

    async def subscribe(self, interval_ms: int = 250) -> AsyncIterator[DaemonStatus]:
        """The status now, then each update the daemon sends, until the connection ends."""
        first = await self.request(Subscribe(interval_ms=interval_ms))
        assert isinstance(first, Snapshot)
        yield first.status
        while True:
            update = await self._receive()
            if isinstance(update, Snapshot) and update.id == 0:
                yield update.status

    async def _receive(self) -> Reply:
        assert self._lines is not None
        try:
            line = await self._lines.receive_line()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise AdminUnavailable(f"lost the daemon at {self.path}: {exc}") from None
        return parse_reply(line, self.path)
