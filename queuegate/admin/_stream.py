"""Newline framing over a trio stream, with a bound on line length (the socket is local, but still input)."""

from __future__ import annotations

import trio

from queuegate.admin.protocol import MAX_LINE_BYTES


class LineTooLong(Exception):
    pass


class LineStream:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._send_lock = trio.Lock()  # replies and subscription updates never interleave mid-line

    async def receive_line(self) -> bytes | None:
        """The next line without its newline; None at end of stream. LineTooLong drops the rest of that line."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if len(line) > MAX_LINE_BYTES:
                    raise LineTooLong(f"a message may be at most {MAX_LINE_BYTES} bytes")
                return line
            if len(self._buffer) > MAX_LINE_BYTES:
                self._buffer.clear()
                await self._skip_to_newline()
                raise LineTooLong(f"a message may be at most {MAX_LINE_BYTES} bytes")
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self._buffer += chunk

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(data)

    async def _skip_to_newline(self) -> None:
        while chunk := await self.stream.receive_some(65536):
            end = chunk.find(b"\n")
            if end >= 0:
                self._buffer += chunk[end + 1 :]
                return
