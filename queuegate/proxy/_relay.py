"""Streaming passthrough of an upstream's server-sent events to the client.

Bytes go out as they arrive, cut only at event boundaries: a partial event is held until its end arrives, so a
failure mid-stream can be reported with a clean `data: {"error": ...}` event that the `openai` client raises on,
instead of leaving half a JSON object on the wire. The relay owns the upstream response and the scheduler slot
until `aclose()`, which is idempotent and safe inside a cancelled scope.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec

from queuegate.errors import GatewayError, UpstreamError
from queuegate.proxy._forwarder import ChunkReader, UpstreamResponse, close_response
from queuegate.proxy._record import CLIENT_CLOSED, RequestRecord, Usage

_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")
_SSE_STARTS = (b"data:", b":", b"event:", b"id:", b"retry:")
MAX_PENDING_EVENT = 1 << 20  # an "event" larger than this without an end is garbage, not a token
TAIL_BYTES = 8192


class _UsageChunk(msgspec.Struct):
    choices: list[Any] | None = None
    usage: Usage | None = None


_EVENT_SPLIT = re.compile(rb"(\r?\n\r?\n)")


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
            usage = msgspec.json.decode(payload, type=_UsageChunk).usage
        except msgspec.DecodeError:
            continue
        if usage is not None:
            return usage
    return None


def without_usage_chunk(block: bytes) -> bytes:
    """`block` without the stream's usage-only event (`"choices": []` with `usage`): the one QueueGate asked the
    upstream for on the client's behalf (`stream_options.include_usage`) when the client did not."""
    if b'"usage"' not in block:
        return block
    parts = _EVENT_SPLIT.split(block)  # event, separator, event, separator, ..., rest
    kept = []
    for i in range(0, len(parts), 2):
        event, separator = parts[i], parts[i + 1] if i + 1 < len(parts) else b""
        if b'"usage"' in event:
            try:
                chunk = msgspec.json.decode(event.strip().removeprefix(b"data:").strip(), type=_UsageChunk)
            except msgspec.DecodeError:
                chunk = None
            if chunk is not None and chunk.choices == [] and chunk.usage is not None:
                continue
        kept.append(event + separator)
    return b"".join(kept)


def _count_events(block: bytes) -> int:
    return block.count(b"data: ") - block.count(b"data: [DONE]")


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
        *,
        strip_usage: bool = False,
    ) -> None:
        self._strip_usage = strip_usage  # QueueGate asked for the usage chunk; the client did not
        self._next: bytes | None = without_usage_chunk(first) if strip_usage else first
        record.chunks += _count_events(self._next)
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
            if first:
                return first
        while not self._ended:
            try:
                block = await self._events.next_events()
            except GatewayError as exc:
                # Bytes already reached the client, so the status is sent: end with an error event instead.
                self._ended = True
                self._record.error = exc.message
                return b"data: " + exc.body() + b"\n\n"
            if block is None:
                self._ended = True
                break
            # Keep the last few events: the usage chunk may come in the block before `data: [DONE]`.
            self._tail = (self._tail + block)[-TAIL_BYTES:]
            if self._strip_usage:
                block = without_usage_chunk(block)
            self._record.chunks += _count_events(block)
            if block:  # (a block that was only the usage chunk is not sent at all)
                return block
        raise StopAsyncIteration

    def _estimated_usage(self) -> Usage:
        """The backend reported no usage (or the stream was cut): about one token per content event."""
        return Usage.estimate(self._record.prompt_chars, max(0, self._record.chunks - 1))  # last: finish reason

    async def aclose(self) -> None:
        """Close the upstream, give back the slot (with the tokens used), log the request. Called on every exit,
        cancelled or not."""
        if self._closed:
            return
        self._closed = True
        complete = self._ended and self._record.error is None
        self._record.usage = (usage_from_events(self._tail) if complete else None) or self._estimated_usage()
        try:
            await close_response(self._response)
        finally:
            self._release()
            if not self._ended:
                self._record.finish(CLIENT_CLOSED, error="client closed the stream")
            else:
                self._record.finish(200)
