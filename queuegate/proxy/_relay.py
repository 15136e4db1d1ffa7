"""Streaming passthrough of an upstream's server-sent events to the client.

Bytes go out as they arrive, cut only at event boundaries: a partial event is held until its end arrives, so a
failure mid-stream can be reported with a clean `data: {"error": ...}` event that the `openai` client raises on,
instead of leaving half a JSON object on the wire. The relay owns the upstream response and the scheduler slot
until `aclose()`, which is idempotent and safe inside a cancelled scope.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import trio

from queuegate.errors import GatewayError, InternalError, UpstreamError
from queuegate.proxy._convert import DONE_EVENT
from queuegate.proxy._dialects import OPENAI, Dialect, WireUsage
from queuegate.proxy._forwarder import ChunkReader, UpstreamResponse, close_response
from queuegate.proxy._record import CLIENT_CLOSED, RequestRecord, Usage

log = logging.getLogger("queuegate.request")
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")
FINISH_REASON = re.compile(rb'"finish_reason"\s*:\s*"')
_SSE_STARTS = (b"data:", b":", b"event:", b"id:", b"retry:")
MAX_PENDING_EVENT = 1 << 20  # an "event" larger than this without an end is garbage, not a token
TAIL_BYTES = 8192
TAIL_BLOCKS = 4  # the stream's last blocks kept (at most TAIL_BYTES of them are read)


class _UsageChunk(msgspec.Struct):
    choices: list[Any] | None = None
    usage: WireUsage | None = None


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
            return usage.usage()
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
    """The client's response body for a streamed request (an async iterator of bytes with `aclose`).

    A stream is complete when the upstream sent `data: [DONE]`: the client's stream ends right there (a client that
    closes after [DONE] got everything). An upstream that ends its body without [DONE] is complete if it sent a
    finish reason (QueueGate adds the [DONE]); without either it was cut, and the client gets an error event. `stop`
    ends the stream early with an error event (operator cancel, shutdown). A passed-through API's stream (Responses,
    Messages) is complete at its own end event (see `_dialects`), and its error events have its own shape.
    """

    def __init__(
        self,
        first: bytes,
        events: EventReader,
        response: UpstreamResponse,
        record: RequestRecord,
        release: Callable[[], None],
        *,
        strip_usage: bool = False,
        dialect: Dialect = OPENAI,
    ) -> None:
        self._strip_usage = strip_usage  # QueueGate asked for the usage chunk; the client did not
        self._dialect = dialect
        self._head = first[:TAIL_BYTES]  # (a Messages stream's input tokens are in its first event)
        self._events = events
        self._response = response
        self._record = record
        self._release = release
        self._last_blocks: deque[bytes] = deque(maxlen=TAIL_BLOCKS)  # the stream's end: its usage is there
        self._finish_seen = False  # some event carried a finish_reason
        self._done = False  # the upstream sent data: [DONE]: the stream is complete
        self._failure: GatewayError | None = None  # how the stream ended early (upstream, stop)
        self._stop: GatewayError | None = None
        self._reading: trio.CancelScope | None = None
        self._closed = False  # the upstream response is closed
        self._given_back = False  # the slot is given back
        self._next: bytes | None = self._take(first)

    @property
    def _ended(self) -> bool:
        return self._done or self._failure is not None

    def __aiter__(self) -> RelayStream:
        return self

    async def __anext__(self) -> bytes:
        if self._next is not None:
            first, self._next = self._next, None
            if first:
                return await self._last(first) if self._done else first
        while not self._ended:
            if self._stop is not None:
                return await self._fail(self._stop)
            try:
                with trio.CancelScope() as reading:
                    self._reading = reading
                    block = await self._events.next_events()
            except GatewayError as exc:
                return await self._fail(exc)  # bytes reached the client: the status is sent, so an error event
            except Exception:
                log.exception("unexpected error in a stream", extra={"fields": {"rid": self._record.request_id}})
                return await self._fail(InternalError("QueueGate failed while relaying the stream"))
            finally:
                self._reading = None
            if reading.cancelled_caught:
                continue  # `stop` was called: its error event goes out next
            if block is None:
                if self._finish_seen and self._dialect.openai:  # ended without [DONE] but whole: end it as OpenAI does
                    self._done = True
                    return await self._last(DONE_EVENT)
                missing = "no finish_reason, no [DONE]" if self._dialect.openai else "no end event"
                return await self._fail(
                    UpstreamError(
                        f"upstream {self._response.upstream.id} ended the stream before it was complete ({missing})"
                    )
                )
            if out := self._take(block):  # (a block that was only the usage chunk is not sent at all)
                return await self._last(out) if self._done else out
        raise StopAsyncIteration

    def stop(self, error: GatewayError) -> None:
        """End the stream now with `error` as its last event (the next read returns it)."""
        if self._ended or self._stop is not None:
            return
        self._stop = error
        if self._reading is not None:
            self._reading.cancel()

    def _take(self, block: bytes) -> bytes:
        """Note what a block of events says about the stream's end; what of it goes to the client."""
        self._last_blocks.append(block)  # the usage chunk may come in a block before [DONE]
        if not self._finish_seen and FINISH_REASON.search(block):
            self._finish_seen = True
        if self._dialect.end.search(block):
            self._done = True  # anything the upstream sends after its end is not read
        if self._strip_usage:
            block = without_usage_chunk(block)
        self._record.chunks += _count_events(block)
        return block

    async def _fail(self, error: GatewayError) -> bytes:
        self._failure = error
        self._record.error = error.message
        return await self._last(self._dialect.error_event(error))

    async def _last(self, block: bytes) -> bytes:
        """The stream's last block. Before it is sent the slot is given back (a client that reads the end and asks
        again finds it free); with durable usage the request is also logged and its row committed. The upstream is
        closed after it (`aclose`): the end of its framing may trail its last event."""
        self._give_back()
        if self._record.commit is not None:
            status, error = self._outcome()
            await self._record.finish_before_last_byte(status, error=error)
        return block

    def _outcome(self) -> tuple[int, str | None]:
        """How the stream ended, as (status, error) for its log line and usage row."""
        if self._done:
            return 200, None
        if self._failure is not None:
            return self._failure.status, self._failure.message
        if self._stop is not None:  # stopped (operator, shutdown), and cut off before its error event went out
            return self._stop.status, self._stop.message
        return CLIENT_CLOSED, "client closed the stream"

    def _tail(self) -> bytes:
        return b"".join(self._last_blocks)[-TAIL_BYTES:]

    def _settle_usage(self) -> None:
        """The tokens used: the upstream's count of a complete stream, else about one token per content event."""
        if self._record.usage is None:
            if not self._done:
                complete = None
            elif self._dialect.openai:
                complete = usage_from_events(self._tail())
            else:
                complete = self._dialect.stream_usage(self._head, self._tail())
            estimate = Usage.estimate(self._record.prompt_chars, max(0, self._record.chunks - 1))  # last: finish
            self._record.usage = complete or estimate

    async def aclose(self) -> None:
        """Close the upstream, give back the slot (with the tokens used), log the request. Called on every exit,
        cancelled or not (idempotent, and a no-op for what `_last` already did)."""
        try:
            if not self._closed:
                self._closed = True
                await close_response(self._response, ended=self._done)
        finally:
            self._give_back()
            status, error = self._outcome()
            self._record.finish(status, error=error)

    def _give_back(self) -> None:
        """Give back the slot, with the tokens used (once)."""
        if self._given_back:
            return
        self._given_back = True
        self._settle_usage()
        self._release()
