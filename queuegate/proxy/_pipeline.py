"""One request's way through QueueGate: parse → resolve model → queue for a slot → forward → reply.

All of it runs in the request's own task and cancel scope: if the client leaves, the queue entry is withdrawn and
the upstream response closed on the way out. Before any byte reached the client, failures are retried: an upstream
that cannot be reached, answers a 5xx or drops its answer half-way goes to another upstream of the model; one that
answers 503 (still loading, overloaded) or 429 is waited out, bounded. After the first byte, never.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import trio

from queuegate.errors import GatewayError, ModelNotFound, NotSupported, UpstreamError, UpstreamTimeout
from queuegate.fleet.catalog import Catalog, ModelSpec, Upstream
from queuegate.proxy._convert import AnswerFromEvents, answer_as_events
from queuegate.proxy._forwarder import ChunkReader, Forwarder, RetryableFailure, UpstreamResponse, close_response
from queuegate.proxy._notices import SSE_HEADERS, QueuedStream
from queuegate.proxy._record import RequestRecord, Usage, tokens_in
from queuegate.proxy._relay import EventReader, RelayStream, looks_like_sse
from queuegate.proxy._request import asks_usage, echo, parse_body, prompt_chars, request_tokens
from queuegate.proxy._routing import chat_key
from queuegate.scheduler import Admission, ModelUnavailable, NoUpstreamLeft, QueuePosition, Ticket
from queuegate.vocabulary import ENDPOINTS

ERROR_BODY_LIMIT = 64 * 1024
# An upstream's own rate limit (429) is waited out, before any byte reached the client: at most this many times,
# and only when its Retry-After is this short; otherwise its 429 goes to the client.
UPSTREAM_BUSY_RETRIES = 3
UPSTREAM_BUSY_MAX_WAIT_S = 30.0
# An upstream's 503 is waited out: after its Retry-After, else after a backoff doubling from the first to the last.
NOT_READY_BACKOFF_S = (0.25, 2.0)
LAST_CHECK_S = 0.5


class UpstreamReports(Protocol):
    """Who watches an upstream's health (the fleet for launched models, else the health monitor) hears from
    requests what they saw."""

    def report_failure(self, upstream: Upstream, reason: str) -> None:
        """It could not be reached, or dropped a connection: take it out and check it now."""

    def report_not_ready(self, upstream: Upstream, reason: str, retry_in_s: float) -> None:
        """It answered 503: send it nothing new until it is checked again, `retry_in_s` from now."""


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

    usage: Usage | None = None
    choices: Any = None


@dataclass(slots=True)
class Reply:
    """What the HTTP layer sends back: a whole body, or a stream it must iterate and `aclose()`."""

    status: int
    headers: dict[str, str]
    body: bytes | RelayStream | QueuedStream


@dataclass(frozen=True, slots=True)
class NoticePolicy:
    """When a streamed request that waits gets queue notices (see `QueuedStream`)."""

    mode: str = "auto"  # auto (the user class only) | always | never
    min_wait_s: float = 1.0
    keepalive_s: float = 10.0

    def applies(self, record: RequestRecord) -> bool:
        if not record.stream or record.endpoint == "embeddings" or self.mode == "never":
            return False
        return self.mode == "always" or record.klass == "user"


class Proxy:
    def __init__(
        self,
        catalog: Catalog,
        admission: Admission,
        forwarder: Forwarder,
        reports: UpstreamReports,
        notices: NoticePolicy | None = None,
        chat_header: str = "X-Chat-Id",
        max_answer_bytes: int = 64 * 2**20,
    ) -> None:
        self._catalog = catalog
        self._admission = admission
        self._forwarder = forwarder
        self._reports = reports
        self.notices = notices or NoticePolicy()
        self._chat_header = chat_header  # names the sticky chat (see `chat_key`)
        self.max_answer_bytes = max_answer_bytes  # the largest non-streamed answer it buffers

    async def handle(self, record: RequestRecord, raw_body: bytes, headers: Mapping[str, str]) -> Reply:
        """Serve one OpenAI request. Raises GatewayError for anything the client should see as an error."""
        body = parse_body(raw_body, record.endpoint)
        spec = self._resolve(body["model"], record)
        record.model = spec.name
        record.stream = body.get("stream") is True
        record.wants_usage = asks_usage(body)
        record.prompt_chars = prompt_chars(body)
        tokens = request_tokens(body, record.prompt_chars)
        upstream_body = {**spec.defaults, **body, "model": spec.upstream_model}
        if record.stream and spec.kind.stream_usage and record.endpoint != "embeddings" and not record.wants_usage:
            # Count the tokens of every stream: ask for the usage chunk, and keep it from the client who did not.
            options = body.get("stream_options")
            upstream_body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            record.usage_injected = True
        payload = msgspec.json.encode(upstream_body)
        sticky = chat_key(headers, self._chat_header, body) if len(spec.upstreams) > 1 else None
        key = record.key.name if record.key else None
        ticket = self._admission.enqueue(
            spec.name, klass=record.klass, flow=record.flow, affinity=sticky, key=key, tokens=tokens
        )
        if self.notices.applies(record):
            deadline = ticket.enqueued_at + self.notices.min_wait_s
            if not await self.wait_for_slot(ticket, record, until=deadline):
                # Still queued: answer now with an event stream that carries notices until the slot comes.
                return Reply(200, dict(SSE_HEADERS), QueuedStream(self, spec, record, payload, ticket))
        return await self.forward(spec, record, payload, ticket)

    async def wait_for_slot(self, ticket: Ticket, record: RequestRecord, *, until: float | None = None) -> bool:
        """Wait in the queue (see `Admission.wait`), counting the time in the request's record."""
        try:
            return await self._admission.wait(ticket, until=until)
        finally:
            end = ticket.granted_at if ticket.upstream_id is not None else trio.current_time()
            record.queue_s = record.queued_before_s + (end - ticket.enqueued_at)

    def position(self, ticket: Ticket) -> QueuePosition | None:
        return self._admission.position(ticket)

    def withdraw(self, ticket: Ticket) -> None:
        self._admission.withdraw(ticket)

    def _resolve(self, name: str, record: RequestRecord) -> ModelSpec:
        """The model asked for. A model that does not exist and one the caller's key may not use get the same
        answer, as OpenAI's (so a key cannot learn other models' names by guessing), listing what it may use."""
        key = record.key
        spec = self._catalog.resolve(name)
        if spec is None or (key is not None and not key.may_use(spec.name)):
            names = [n for n in self._catalog.public_names() if key is None or key.may_use(self._catalog.canonical(n))]
            message = (
                f"The model {echo(name)!r} does not exist or you do not have access to it. "
                f"Available models: {', '.join(names) or 'none'}"
            )
            raise ModelNotFound(message, param="model")
        if record.endpoint not in spec.endpoints:
            raise NotSupported(
                f"model {spec.name!r} (kind {spec.kind.name}) does not support the {record.endpoint} endpoint",
                param="model",
            )
        return spec

    async def forward(self, spec: ModelSpec, record: RequestRecord, payload: bytes, ticket: Ticket) -> Reply:
        """Wait for the ticket's slot and send; on a failure before any byte, queue again (see the module)."""
        tried: set[str] = set()
        last_failure: GatewayError | None = None
        busy_retries = 0
        not_ready = _NotReadyWait(spec.launch.startup_timeout_s if spec.launch else self._admission.max_wait_s)
        while True:
            try:
                if not await self.wait_for_slot(ticket, record, until=not_ready.wait_until):
                    self.withdraw(ticket)  # still waiting for an upstream to be ready when the bound ran out
                    raise not_ready.gave_up()
            except NoUpstreamLeft:
                assert last_failure is not None
                raise last_failure from None
            upstream = self._catalog.upstreams[ticket.upstream_id]  # type: ignore[index]
            record.upstream = upstream.id
            try:
                return await self._attempt(upstream, ticket, record, payload)
            except UpstreamBusy as busy:
                if busy.delay_s is None or busy_retries >= UPSTREAM_BUSY_RETRIES:
                    return busy.reply
                busy_retries += 1
                await trio.sleep(busy.delay_s)  # the slot is free meanwhile; a client leaving cancels this
            except UpstreamNotReady as answer:
                # Taken out until re-checked; this request queues again for it (or another upstream) meanwhile.
                self._reports.report_not_ready(upstream, answer.message, not_ready.next_delay(answer))
            except RetryableFailure as failure:
                if failure.unreachable:
                    self._reports.report_failure(upstream, failure.message)
                elif failure.dropped:
                    self._reports.report_not_ready(upstream, failure.message, 0.0)  # held until a check passes
                tried.add(upstream.id)
                last_failure = failure
            # Queue again (the key's limits were charged once, for the client's request; the upstream's are not).
            record.retries += 1
            record.queued_before_s = record.queue_s
            ticket = self._admission.enqueue(
                spec.name,
                klass=record.klass,
                flow=record.flow,
                affinity=ticket.affinity,
                exclude=frozenset(tried),
                tokens=ticket.tokens,
            )

    async def _attempt(self, upstream: Upstream, ticket: Ticket, record: RequestRecord, payload: bytes) -> Reply:
        """Send to one upstream. Owns the slot and the response until it hands both to a RelayStream."""
        handed_over = False
        response: UpstreamResponse | None = None
        try:
            timeouts = self._forwarder.timeouts
            # Anything but a relayed stream is a whole answer, bounded in all (whatever the client asked for).
            deadline = timeouts.deadline(stream=False)
            path = ENDPOINTS[record.endpoint].upstream_path
            record.upstream_started_at = trio.current_time()
            response = await self._forwarder.send(upstream, path, payload, record.request_id, deadline)
            content_type = response.header(b"content-type") or "application/json"
            streamed = content_type.startswith("text/event-stream")
            relayed = response.status == 200 and streamed and record.stream
            reader = ChunkReader(response, timeouts.idle_s, timeouts.deadline(stream=True) if relayed else deadline)
            if response.status == 503:
                detail = await _error_detail(reader)
                raise UpstreamNotReady(_retry_after(response), f"upstream {upstream.id} answered 503: {detail}")
            if response.status >= 500:
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
            if response.status == 429:
                raise UpstreamBusy(_busy_delay(response), _client_error_reply(response, body, content_type))
            if response.status != 200:
                return _client_error_reply(response, body, content_type)
            try:
                parsed = msgspec.json.decode(body, type=_Answer)
            except msgspec.DecodeError:
                raise RetryableFailure(f"upstream {upstream.id} sent invalid JSON") from None
            record.usage = parsed.usage or Usage.estimate(record.prompt_chars, tokens_in(_answer_chars(parsed)))
            if record.stream and record.endpoint != "embeddings":  # it asked for a stream: it gets one
                events = answer_as_events(
                    msgspec.json.decode(body), chat=record.endpoint == "chat", include_usage=record.wants_usage
                )
                return Reply(200, dict(SSE_HEADERS), events)
            return Reply(200, {"content-type": "application/json"}, body)
        finally:
            if not handed_over:
                if response is not None:
                    await close_response(response)
                self._admission.release(ticket, record.total_tokens)

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
            lambda: self._admission.release(ticket, record.total_tokens),
            strip_usage=record.usage_injected,
        )


class AnswerTooLarge(UpstreamError):
    """A non-streamed answer larger than QueueGate buffers (`[upstream].max_answer_mb`): a 502, not retried (the
    same request would get the same answer elsewhere)."""

    def __init__(self, upstream: Upstream, limit: int) -> None:
        super().__init__(f"upstream {upstream.id} answered more than {limit / 2**20:g} MB ([upstream].max_answer_mb)")


class _NotReadyWait:
    """How long one request keeps waiting for upstreams that answer 503: from the first 503, `bound_s` at most
    (a launched model's startup timeout, else the queue's max wait)."""

    def __init__(self, bound_s: float) -> None:
        self.bound_s = bound_s
        self.deadline: float | None = None
        self.since = 0.0
        self.answers = 0
        self.last = ""

    @property
    def wait_until(self) -> float | None:
        """How long a request may wait in the queue for a not-ready upstream: the bound, and a moment for the
        last check (due at the bound) to let it in."""
        return None if self.deadline is None else self.deadline + LAST_CHECK_S

    def next_delay(self, answer: UpstreamNotReady) -> float:
        """How long until the upstream is tried again. Raises ModelUnavailable when that passes the bound."""
        now = trio.current_time()
        if self.deadline is None:
            self.since, self.deadline = now, now + self.bound_s
        self.answers += 1
        self.last = answer.message
        left = self.deadline - now
        if answer.delay_s is not None and answer.delay_s > left:
            raise self.gave_up(retry_after_s=answer.delay_s)  # it says it needs longer than we may wait
        first, most = NOT_READY_BACKOFF_S
        if left <= 0:
            raise self.gave_up()
        if answer.delay_s is not None:
            return max(first, answer.delay_s)  # `Retry-After: 0` is no reason for a hot loop
        return min(most, first * 2 ** (self.answers - 1), left)

    def gave_up(self, retry_after_s: float = 5.0) -> ModelUnavailable:
        waited = trio.current_time() - self.since
        return ModelUnavailable(
            f"not ready after {waited:.0f} s (bound {self.bound_s:g} s): {self.last}", retry_after_s=retry_after_s
        )


async def _read_whole(upstream: Upstream, reader: ChunkReader, limit: int) -> bytes:
    """A whole (non-streamed) body of at most `limit` bytes (UpstreamError past it). A connection dropped
    half-way is a failure another upstream may retry: no byte of it reached the client."""
    chunks = []
    size = 0
    try:
        while (chunk := await reader.next()) is not None:
            size += len(chunk)
            if size > limit:
                raise AnswerTooLarge(upstream, limit)
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
    events = EventReader(reader)
    size = 0
    try:
        while (block := await events.next_events()) is not None:
            size += len(block)
            if size > limit:
                raise AnswerTooLarge(upstream, limit)
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
