"""Streaming passthrough of an upstream's server-sent events to the client.

Bytes go out as they arrive, cut only at event boundaries: a partial event is held until its end arrives, so a
failure mid-stream can be reported with a clean `data: {"error": ...}` event that the `openai` client raises on,
instead of leaving half a JSON object on the wire. The relay owns the upstream response and the scheduler slot
until `aclose()`, which is idempotent and safe inside a cancelled scope.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from queuegate.errors import GatewayError, UpstreamError
from queuegate.proxy._forwarder import ChunkReader, UpstreamResponse, close_response
from queuegate.proxy._record import CLIENT_CLOSED, RequestRecord, Usage

_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")
_SSE_STARTS = (b"data:", b":", b"event:", b"id:", b"retry:")
MAX_PENDING_EVENT = 1 << 20  # an "event" larger than this without an end is garbage, not a token
TAIL_BYTES = 8192


class _UsageCarrier(msgspec.Struct):
    usage: Usage | None = None


def split_complete_events(buffer: bytes) -> tuple[bytes, bytes]:
    """(complete events, remainder): everything up to the last event boundary, and what follows it."""
    cut = max(buffer.rfind(end) + len(end) if buffer.rfind(end) >= 0 else 0 for end in _EVENT_ENDS)
    return buffer[:cut], buffer[cut:]


def looks_like_sse(block: bytes) -> bool:
    return block.lstrip(b"\xef\xbb\xbf\r\n ").startswith(_SSE_STARTS)


def usage_from_events(block: bytes) -> Usage | None:
    """The `usage` of the last event in `block` that carries one (the final usage chunk of a stream)."""
    for event in reversed(block.replace(b"\r\n", b"\n").split(b"\n\n")):
        if b'"usage"' not in event:
            continue
        payload = event.strip().removeprefix(b"data:").strip()
        try:
            usage = msgspec.json.decode(payload, type=_UsageCarrier).usage
        except msgspec.DecodeError:
            continue
        if usage is not None:
            return usage
    return None


class EventReader:
    """Reads whole SSE events from an upstream body."""

    def __init__(self, reader: ChunkReader) -> None:
        self._reader = reader
        self._pending = b""

    async def next_events(self) -> bytes | None:
        """One or more complete events, or None at the end of the stream. Raises on failure or garbage."""
        while True:
            chunk = await self._reader.next()
            if chunk is None:
                # The upstream ended; a trailing partial event is flushed as is (some servers omit the last \n\n).
                rest, self._pending = self._pending, b""
                return rest or None
            complete, self._pending = split_complete_events(self._pending + chunk)
            if complete:
                return complete
            if len(self._pending) > MAX_PENDING_EVENT:
                raise UpstreamError(f"upstream sent {len(self._pending)} bytes without an event boundary")


class RelayStream:
    """The client's response body for a streamed request (an async iterator of bytes with `aclose`)."""

    def __init__(
        self,
        first: bytes,
        events: EventReader,
        response: UpstreamResponse,
        record: RequestRecord,
        release: Callable[[], None],
    ) -> None:
        self._next: bytes | None = first
        self._events = events
        self._response = response
        self._record = record
        self._release = release
        self._tail = first
        self._ended = False
        self._closed = False

    def __aiter__(self) -> RelayStream:
        return self

    async def __anext__(self) -> bytes:
        if self._next is not None:
            first, self._next = self._next, None
            return first
        if self._ended:
            raise StopAsyncIteration
        try:
            block = await self._events.next_events()
        except GatewayError as exc:
            # Bytes already reached the client, so the status is sent: end with an error event instead.
            self._ended = True
            self._record.error = exc.message
            return b"data: " + exc.body() + b"\n\n"
        if block is None:
            self._ended = True
            raise StopAsyncIteration
        # Keep the last few events: the usage chunk may come in the block before `data: [DONE]`.
        self._tail = (self._tail + block)[-TAIL_BYTES:]
        self._record.chunks += block.count(b"data: ")
        return block

    async def aclose(self) -> None:
        """Close the upstream, give back the slot, log the request. Called on every exit, cancelled or not."""
        if self._closed:
            return
        self._closed = True
        try:
            await close_response(self._response)
        finally:
            self._release()
            if not self._ended:
                self._record.finish(CLIENT_CLOSED, error="client closed the stream")
            else:
                if self._record.error is None:
                    self._record.usage = usage_from_events(self._tail)
                self._record.finish(200)
