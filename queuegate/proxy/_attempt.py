"""One attempt at one upstream: send the request, read what it answers, and say what that was.

What happens next is decided by the outcome table (`outcome_of`), in one place, before any byte reached the client:

    status        outcome    what the retry loop (`_pipeline.Proxy.forward`) does
    200           ANSWER     the client gets it: relayed as it streams, or whole (in the shape it asked for)
    503           NOT_READY  wait it out (its Retry-After, else a backoff), on it or another upstream, bounded
    other 5xx     FAILED     another upstream of the model (also: other 1xx-3xx, garbled, cut or dropped answers)
    429           BUSY       wait its Retry-After, a few times, then the client gets the 429
    other         REFUSED    the client gets it (as OpenAI's envelope)

Connection failures are classified where they happen, at the transport (`_forwarder.py`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import trio

from queuegate.errors import GatewayError, UpstreamError, UpstreamTimeout
from queuegate.fleet.catalog import Upstream
from queuegate.proxy._convert import AnswerFromEvents, answer_as_events
from queuegate.proxy._dialects import DIALECTS, OPENAI_STREAMS, WireUsage
from queuegate.proxy._forwarder import ChunkReader, Forwarder, RetryableFailure, UpstreamResponse, close_response
from queuegate.proxy._record import RequestRecord, Usage, tokens_in
from queuegate.proxy._relay import EventReader, RelayStream, looks_like_sse
from queuegate.proxy._reply import SSE_HEADERS, Reply
from queuegate.scheduler import Ticket
from queuegate.vocabulary import ENDPOINTS

ERROR_BODY_LIMIT = 64 * 1024
# An upstream's own rate limit (429) is waited out when its Retry-After is at most this long.
UPSTREAM_BUSY_MAX_WAIT_S = 30.0


class Outcome(enum.Enum):
    ANSWER = "answer"
    NOT_READY = "not ready"
    FAILED = "failed"
    BUSY = "busy"
    REFUSED = "refused"


def outcome_of(status: int) -> Outcome:
    """The outcome table (see the module)."""
    if status == 200:
        return Outcome.ANSWER
    if status == 503:
        return Outcome.NOT_READY
    if status >= 500 or status < 400:  # (a 204 or a redirect is no answer to an API call either)
        return Outcome.FAILED
    if status == 429:
        return Outcome.BUSY
    return Outcome.REFUSED


class UpstreamNotReady(Exception):
    """The upstream answered 503 before any byte reached the client: wait `delay_s` (its Retry-After; None: it
    gave none) and try again."""

    def __init__(self, delay_s: float | None, message: str) -> None:
        super().__init__(message)
        self.delay_s = delay_s
        self.message = message


class UpstreamBusy(Exception):
    """The upstream answered 429: try again after `delay_s`, or give the client `reply`."""

    def __init__(self, delay_s: float | None, reply: Reply) -> None:
        super().__init__(f"upstream rate limit, retry after {delay_s} s")
        self.delay_s = delay_s
        self.reply = reply


class _Answer(msgspec.Struct):
    """The parts of a non-streamed answer QueueGate reads: its usage, else its text for an estimate."""

    usage: WireUsage | None = None
    choices: Any = None


class AnswerTooLarge(UpstreamError):
    """A non-streamed answer larger than QueueGate buffers (`[upstream].max_answer_mb`): a 502, not retried (the
    same request would get the same answer elsewhere)."""

    def __init__(self, upstream: Upstream, limit: int) -> None:
        super().__init__(f"upstream {upstream.id} answered more than {limit / 2**20:g} MB ([upstream].max_answer_mb)")


class Attempts:
    """Attempts at upstreams through one forwarder; `release` gives a ticket's slot back (with the tokens used)."""

    def __init__(
        self, forwarder: Forwarder, release: Callable[[Ticket, int | None], None], max_answer_bytes: int
    ) -> None:
        self.forwarder = forwarder
        self._release = release
        self.max_answer_bytes = max_answer_bytes  # the largest non-streamed answer it holds in memory

    async def once(self, upstream: Upstream, ticket: Ticket, record: RequestRecord, payload: bytes) -> Reply:
        """Send to `upstream` on the ticket's slot and read its answer. Returns the client's reply, or raises what
        the outcome table says (UpstreamNotReady, RetryableFailure, UpstreamBusy). Owns the slot and the response
        until it hands both to a RelayStream (else gives both back, whatever happens)."""
        handed_over = False
        response: UpstreamResponse | None = None
        try:
            timeouts = self.forwarder.timeouts
            # Anything but a relayed stream is a whole answer, bounded in all (whatever the client asked for).
            deadline = timeouts.deadline(stream=False)
            path = ENDPOINTS[record.endpoint].upstream_path
            record.upstream_started_at = trio.current_time()
            response = await self.forwarder.send(upstream, path, payload, record.request_id, deadline)
            content_type = response.header(b"content-type") or "application/json"
            streamed = content_type.startswith("text/event-stream")
            dialect = DIALECTS[record.endpoint]
            # (a passed-through API's stream is relayed as it is, even unasked: QueueGate does not fold it)
            relayed = response.status == 200 and streamed and (record.stream or not dialect.openai)
            reader = ChunkReader(response, timeouts.idle_s, timeouts.deadline(stream=True) if relayed else deadline)
            outcome = outcome_of(response.status)
            if outcome is Outcome.NOT_READY:
                detail = await _error_detail(reader)
                raise UpstreamNotReady(_retry_after(response), f"upstream {upstream.id} answered 503: {detail}")
            if outcome is Outcome.FAILED:
                detail = await _error_detail(reader)
                raise RetryableFailure(f"upstream {upstream.id} answered {response.status}: {detail}")
            if relayed:
                relay = await self._relay(upstream, ticket, record, reader, response)
                handed_over = True
                return Reply(200, {**SSE_HEADERS, "content-type": content_type}, relay)
            if response.status == 200 and streamed:
                answer = await _fold_events(upstream, reader, record.endpoint, self.max_answer_bytes)
                body = msgspec.json.encode(answer)  # it did not ask for a stream: it gets one answer
            else:
                body = await _read_whole(upstream, reader, self.max_answer_bytes)
            record.first_token_at = trio.current_time()
            if outcome is Outcome.BUSY:
                raise UpstreamBusy(_busy_delay(response), _client_error_reply(response, body, content_type))
            if outcome is Outcome.REFUSED:
                return _client_error_reply(response, body, content_type)
            try:
                parsed = msgspec.json.decode(body, type=_Answer)
            except msgspec.DecodeError:
                raise RetryableFailure(f"upstream {upstream.id} sent invalid JSON") from None
            estimate = Usage.estimate(record.prompt_chars, tokens_in(_answer_chars(parsed)))
            record.usage = parsed.usage.usage() if parsed.usage is not None else estimate
            if record.stream and record.endpoint in OPENAI_STREAMS:  # it asked for a stream: it gets one
                events = answer_as_events(
                    msgspec.json.decode(body), chat=record.endpoint == "chat", include_usage=record.wants_usage
                )
                return Reply(200, dict(SSE_HEADERS), events)
            return Reply(200, {"content-type": "application/json"}, body)
        finally:
            if not handed_over:
                if response is not None:
                    await close_response(response)
                self._release(ticket, record.total_tokens)

    async def _relay(
        self, upstream: Upstream, ticket: Ticket, record: RequestRecord, reader: ChunkReader, response: UpstreamResponse
    ) -> RelayStream:
        """The stream to hand to the client, once its first events arrived whole (until then it may be retried)."""
        events = EventReader(reader)
        try:
            first = await events.next_events()
        except UpstreamTimeout as exc:
            raise RetryableFailure(exc.message) from None
        except UpstreamError as exc:
            raise RetryableFailure(exc.message, dropped=True) from None
        if first is None or not looks_like_sse(first):
            raise RetryableFailure(f"upstream {upstream.id} sent a malformed event stream")
        record.first_token_at = trio.current_time()
        return RelayStream(
            first,
            events,
            response,
            record,
            lambda: self._release(ticket, record.total_tokens),
            strip_usage=record.usage_injected,
            dialect=DIALECTS[record.endpoint],
        )


async def _at_most(
    limit: int, upstream: Upstream, next_piece: Callable[[], Awaitable[bytes | None]]
) -> AsyncIterator[bytes]:
    """The pieces `next_piece` returns until None, raising AnswerTooLarge once they add up to more than `limit`."""
    size = 0
    while (piece := await next_piece()) is not None:
        size += len(piece)
        if size > limit:
            raise AnswerTooLarge(upstream, limit)
        yield piece


async def _read_whole(upstream: Upstream, reader: ChunkReader, limit: int) -> bytes:
    """A whole (non-streamed) body of at most `limit` bytes (UpstreamError past it). A connection dropped
    half-way is a failure another upstream may retry: no byte of it reached the client."""
    chunks = []
    try:
        async for chunk in _at_most(limit, upstream, reader.next):
            chunks.append(chunk)
    except AnswerTooLarge:
        raise
    except UpstreamError as exc:
        raise RetryableFailure(exc.message, dropped=True) from None
    return b"".join(chunks)


async def _fold_events(upstream: Upstream, reader: ChunkReader, endpoint: str, limit: int) -> dict[str, Any]:
    """An event stream read to its end and folded into one answer (the request did not ask for a stream), of at
    most `limit` bytes of events."""
    answer = AnswerFromEvents(chat=endpoint == "chat")
    try:
        async for block in _at_most(limit, upstream, EventReader(reader).next_events):
            answer.feed(block)
    except AnswerTooLarge:
        raise
    except msgspec.DecodeError:
        raise RetryableFailure(f"upstream {upstream.id} sent a malformed event stream") from None
    except UpstreamError as exc:
        raise RetryableFailure(exc.message, dropped=True) from None
    if not (answer.done or answer.finished):
        message = f"upstream {upstream.id} ended its event stream before it was complete"
        raise RetryableFailure(message)
    return answer.answer()


def _answer_chars(answer: _Answer) -> int:
    """Characters of generated text in a non-streamed answer (chat `message.content` or completion `text`)."""
    if not isinstance(answer.choices, list):
        return 0
    total = 0
    for choice in answer.choices:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        total += len(text) if isinstance(text, str) else 0
    return total


async def _error_detail(reader: ChunkReader) -> str:
    """A short, printable description of an upstream error body (its error.message when it is OpenAI-shaped)."""
    data = b""
    try:
        while len(data) < ERROR_BODY_LIMIT and (chunk := await reader.next()) is not None:
            data += chunk
    except GatewayError:
        pass
    try:
        message = msgspec.json.decode(data)["error"]["message"]
        if isinstance(message, str):
            return message[:500]
    except (msgspec.DecodeError, KeyError, TypeError):
        pass
    return data[:200].decode("utf-8", "replace") or "(empty body)"


def _retry_after(response: UpstreamResponse) -> float | None:
    """The upstream's Retry-After in seconds; None when it gives none or gives an HTTP date."""
    raw = response.header(b"retry-after")
    try:
        seconds = None if raw is None else float(raw)
    except ValueError:
        return None
    return max(0.0, seconds) if seconds is not None and math.isfinite(seconds) else None


def _busy_delay(response: UpstreamResponse) -> float | None:
    """How long to wait out an upstream's 429 (1 s when it does not say), or None when it is too long to wait."""
    delay = _retry_after(response)
    if delay is None:
        return None if response.header(b"retry-after") is not None else 1.0  # an HTTP date: a long wait
    return delay if delay <= UPSTREAM_BUSY_MAX_WAIT_S else None


def _client_error_reply(response: UpstreamResponse, body: bytes, content_type: str) -> Reply:
    """An upstream 4xx goes to the client as is when it is an OpenAI envelope, else wrapped in one."""
    try:
        decoded = msgspec.json.decode(body)
        is_envelope = isinstance(decoded, dict) and isinstance(decoded.get("error"), dict)
    except msgspec.DecodeError:
        is_envelope = False
    headers = {"content-type": "application/json"}
    retry_after = response.header(b"retry-after")
    if retry_after is not None:
        headers["retry-after"] = retry_after
    if is_envelope:
        return Reply(response.status, headers, body)
    message = f"upstream answered {response.status}: {body[:200].decode('utf-8', 'replace')}"
    return Reply(response.status, headers, UpstreamError(message, status=response.status).body())
