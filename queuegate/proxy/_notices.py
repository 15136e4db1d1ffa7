"""Queue notices: a streamed request that waits gets its answer's event stream at once, showing where it stands.

Chat streams get a `reasoning_content` delta ("⏳ Queued for coder: position 3; draining writer, about 20 s"), which
Open WebUI and similar clients show as the model's thinking, so the final answer stays clean. Its time is the
truth as QueueGate knows it: the queue ahead, plus, for a model that is not loaded, what its swap still takes (the
model in the way draining, the learned load time; a first load: "up to" its startup_timeout_s). It is sent again
when the position or the phase changes (queued, draining, loading, and "your turn" before the first token), not
every time the count moves. Every stream gets SSE comments while it waits, so proxies never see an idle
connection. Once the slot comes, the upstream's own events follow, with the id the notices had (a client that
folds the stream into one completion gets one id). The HTTP status (200) is sent before the upstream is asked, so a
failure from here on ends the stream with an error event the `openai` client raises on.

Clients that keep the thinking in their history (pydantic-ai) send the notices back with the next turn:
`strip_notices` takes them out of the assistant messages' reasoning before the request goes upstream.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import trio

from queuegate.errors import GatewayError, InternalError, UpstreamError
from queuegate.proxy._dialects import OPENAI_STREAMS
from queuegate.proxy._record import CLIENT_CLOSED, RequestRecord
from queuegate.proxy._relay import RelayStream
from queuegate.proxy._reply import Reply

if TYPE_CHECKING:
    from queuegate.fleet.catalog import ModelSpec
    from queuegate.scheduler import QueuePosition, Ticket
    from queuegate.statistics import LoadOutlook

log = logging.getLogger("queuegate.request")
POSITION_CHECK_S = 1.0  # how often a waiting request looks at its position
KEEPALIVE = b": queued\n\n"
MARK = "⏳ "  # every notice line starts with it (how QueueGate knows its own notices when a client sends them back)
_NOTICE_LINE = re.compile(r"(?m)^⏳ [^\n]*\n?")


@dataclass(frozen=True, slots=True)
class NoticePolicy:
    """When a streamed request that waits gets queue notices (see `QueuedStream`)."""

    mode: str = "auto"  # auto (the user class only) | always | never
    min_wait_s: float = 1.0
    keepalive_s: float = 10.0

    def applies(self, record: RequestRecord) -> bool:
        if not record.stream or record.endpoint not in OPENAI_STREAMS or self.mode == "never":
            return False
        return self.mode == "always" or record.klass == "user"


class Queue(Protocol):
    """What a queued stream needs of the proxy: its place in the queue, and the way on once its slot comes."""

    notices: NoticePolicy

    async def wait_for_slot(self, ticket: Ticket, record: RequestRecord, *, until: float | None = None) -> bool: ...

    def position(self, ticket: Ticket) -> QueuePosition | None: ...

    def load_outlook(self, model: str) -> LoadOutlook | None: ...

    def withdraw(self, ticket: Ticket) -> None: ...

    async def forward(self, spec: ModelSpec, record: RequestRecord, payload: bytes, ticket: Ticket) -> Reply: ...


class QueuedStream:
    """The client's response body while its request is queued, then the upstream's stream (iterate, then aclose)."""

    def __init__(self, queue: Queue, spec: ModelSpec, record: RequestRecord, payload: bytes, ticket: Ticket) -> None:
        self._queue = queue
        self._spec = spec
        self._record = record
        self._payload = payload
        self._ticket = ticket
        self._relay: RelayStream | None = None
        self._ended = False
        self._stop: GatewayError | None = None
        self._waiting: trio.CancelScope | None = None
        self._last_notice: tuple[int, str] | None = None  # (position, phase) the last notice told
        self._last_sent = -float("inf")
        self._granted = False  # its slot came: the upstream is asked at the next read
        self._id = "chatcmpl-" + secrets.token_hex(12)  # the notices', then the upstream's events' (see `_same_id`)
        self._upstream_id: re.Pattern[bytes] | None = None  # the id field the upstream's events carry

    def __aiter__(self) -> QueuedStream:
        return self

    async def __anext__(self) -> bytes:
        if self._relay is not None:
            return self._same_id(await self._relay.__anext__())
        if self._ended:
            raise StopAsyncIteration
        try:
            if self._granted:
                return await self._start_upstream()
            while True:
                if self._stop is not None:
                    self._queue.withdraw(self._ticket)
                    return await self._fail(self._stop.status, self._stop)
                notice = self._notice()
                now = trio.current_time()
                if notice is not None and notice[0] != self._last_notice:
                    self._last_notice, self._last_sent = notice[0], now
                    return self._notice_event(notice[1])
                if now - self._last_sent >= self._queue.notices.keepalive_s:
                    self._last_sent = now
                    return KEEPALIVE
                wake = min(now + POSITION_CHECK_S, self._last_sent + self._queue.notices.keepalive_s)
                with trio.CancelScope() as self._waiting:
                    if await self._queue.wait_for_slot(self._ticket, self._record, until=wake):
                        if self._last_notice is None or self._record.endpoint != "chat":
                            return await self._start_upstream()
                        self._granted = True  # (told first: its wait is over, the model is on it)
                        return self._notice_event(f"{MARK}Your turn: {self._spec.name} is on it.\n")
        except GatewayError as exc:
            return await self._fail(exc.status, exc)
        except Exception:
            log.exception("unexpected error in a queued stream", extra={"fields": {"rid": self._record.request_id}})
            return await self._fail(500, InternalError("QueueGate failed while the request was queued"))
        finally:
            self._waiting = None

    def stop(self, error: GatewayError) -> None:
        """End the stream now with `error` as its last event (leaving the queue, or ending the upstream's stream)."""
        if self._relay is not None:
            self._relay.stop(error)
        elif not self._ended and self._stop is None:
            self._stop = error
            if self._waiting is not None:
                self._waiting.cancel()

    async def _start_upstream(self) -> bytes:
        reply = await self._queue.forward(self._spec, self._record, self._payload, self._ticket)
        if isinstance(reply.body, RelayStream):
            self._relay = reply.body
            if self._stop is not None:
                self._relay.stop(self._stop)
            return self._same_id(await self._relay.__anext__())
        if reply.status == 200 and isinstance(reply.body, bytes):  # a whole answer, already made into events
            self._ended = True
            await self._record.finish_before_last_byte(200)
            return reply.body
        # The upstream refused (a 4xx); the status is already sent.
        return await self._fail(reply.status, UpstreamError(error_message(reply.body), status=reply.status))

    async def _fail(self, status: int, exc: GatewayError) -> bytes:
        self._ended = True
        await self._record.finish_before_last_byte(status, error=exc.message)
        return b"data: " + exc.body() + b"\n\n"

    def _same_id(self, block: bytes) -> bytes:
        """The upstream's events with the notices' id (a client folding the stream keeps the first id it saw)."""
        if self._last_notice is None:
            return block
        if self._upstream_id is None:
            found = _event_id(block)
            if found is None:
                return block
            self._upstream_id = re.compile(rb'"id"\s*:\s*' + re.escape(msgspec.json.encode(found)))
        return self._upstream_id.sub(b'"id":"' + self._id.encode() + b'"', block)

    def _notice(self) -> tuple[tuple[int, str], str] | None:
        """((position, phase), the text shown to the user), or None where notices cannot be shown (plain
        completions)."""
        if self._record.endpoint != "chat":
            return None
        where = self._queue.position(self._ticket)
        if where is None:
            return None
        outlook = self._queue.load_outlook(self._spec.name)
        queue_s = where.eta_s or 0.0
        text = f"{MARK}Queued for {self._spec.name}: position {where.position}"
        phase = outlook.phase if outlook is not None else ""
        if outlook is not None:
            text += f"; {outlook.phase}"
            if outlook.eta_s is not None:
                text += f", about {max(1, round(outlook.eta_s + queue_s))} s"
            elif outlook.bound_s is not None:
                text += f", up to {max(1, round(outlook.bound_s + queue_s))} s (its first load)"
        elif where.eta_s is not None:
            text += f", about {max(1, round(where.eta_s))} s"
        if where.rate_limited:
            text += " (held by a requests- or tokens-per-minute limit)"
        return (where.position, phase), text + ".\n"

    def _notice_event(self, text: str) -> bytes:
        chunk = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self._spec.name,
            "choices": [{"index": 0, "delta": {"role": "assistant", "reasoning_content": text}, "finish_reason": None}],
        }
        return b"data: " + msgspec.json.encode(chunk) + b"\n\n"

    async def aclose(self) -> None:
        """Leave the queue (or close the upstream stream); log the request if nothing else did."""
        if self._relay is not None:
            await self._relay.aclose()
            return
        self._queue.withdraw(self._ticket)
        if not self._ended and self._stop is not None:  # stopped, and cut off before its error event went out
            self._record.finish(self._stop.status, error=self._stop.message)
        elif not self._ended:
            self._record.finish(CLIENT_CLOSED, error="client closed the stream while queued")


def _event_id(block: bytes) -> str | None:
    """The `id` of the first event in `block` that has one (a chunk's own, not a tool call's inside it)."""
    for line in block.split(b"\n"):
        if line.startswith(b"data:") and b'"id"' in line:
            try:
                event = msgspec.json.decode(line[5:].strip())
            except msgspec.DecodeError:
                continue
            if isinstance(event, dict) and isinstance(event.get("id"), str):
                return str(event["id"])
    return None


def strip_notices(body: dict[str, Any]) -> dict[str, Any]:
    """The chat request without QueueGate's own notices in its assistant messages' reasoning (a client that kept
    them as the model's thinking sends them back); `body` itself when it has none."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not any(_has_notice(m) for m in messages):
        return body
    cleaned = []
    for message in messages:
        if _has_notice(message):
            message = dict(message)
            for field in _REASONING_FIELDS:
                if isinstance(message.get(field), str):
                    rest = _NOTICE_LINE.sub("", message[field])
                    if rest.strip():
                        message[field] = rest
                    else:
                        del message[field]
        cleaned.append(message)
    return {**body, "messages": cleaned}


_REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")


def _has_notice(message: Any) -> bool:
    return (
        isinstance(message, dict)
        and message.get("role") == "assistant"
        and any(isinstance(message.get(f), str) and MARK in message[f] for f in _REASONING_FIELDS)
    )


def error_message(body: object) -> str:
    if isinstance(body, bytes):
        try:
            error = msgspec.json.decode(body).get("error", {})
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                return str(error["message"])
        except (msgspec.DecodeError, AttributeError):
            pass
        return body[:200].decode("utf-8", "replace")
    return "upstream answered without a stream"
