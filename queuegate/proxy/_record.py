"""What one request did, logged as exactly one structured line when it ends (however it ends)."""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import trio

from queuegate.accounting import UsageRow
from queuegate.accounting.keys import ApiKey

log = logging.getLogger("queuegate.request")

# nginx's convention for "the client closed the connection before we answered".
CLIENT_CLOSED = 499


# A rough rule for English text with common tokenizers; used only where the backend reports no usage.
CHARS_PER_TOKEN = 4


def tokens_in(chars: int) -> int:
    """About how many tokens `chars` characters of text are (rounded up)."""
    return -(-chars // CHARS_PER_TOKEN)


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    estimated: bool = False  # counted by QueueGate: the backend reported none

    @classmethod
    def estimate(cls, prompt_chars: int, completion_tokens: int) -> Usage:
        prompt = tokens_in(prompt_chars)
        return cls(prompt, completion_tokens, prompt + completion_tokens, estimated=True)

    def __add__(self, other: Usage) -> Usage:
        """Two requests' usage together (a tool loop's rounds); estimated if either was."""
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
            estimated=self.estimated or other.estimated,
        )


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    endpoint: str
    client: str = ""
    key: ApiKey | None = None  # the caller's API key (its name is logged, never its secret)
    klass: str = "user"  # priority class
    flow: str = ""  # whose turn inside the class (key, session or client)
    session: str | None = None  # the session it belongs to (`X-Session-Id` or /v1/session/{id}/...), for usage
    batch: str | None = None  # the batch it is a line of: counted in usage as endpoint `batch`, session its id
    started_at: float = field(default_factory=trio.current_time)
    model: str | None = None
    upstream: str | None = None
    stream: bool = False
    wants_usage: bool = False  # the client asked for the stream's usage chunk (stream_options.include_usage)
    usage_injected: bool = False  # QueueGate asked the upstream for the stream's usage chunk (and hides it)
    queue_s: float = 0.0  # all time spent queued, retries included
    upstream_started_at: float | None = None  # when the (last) attempt was sent upstream
    first_token_at: float | None = None  # when its first event (stream) or its whole body arrived
    queued_before_s: float = 0.0  # queue time of earlier attempts (before a retry)
    retries: int = 0
    prompt_chars: int = 0  # length of the prompt's text, for an estimate when the backend reports no usage
    chunks: int = 0  # stream events relayed to the client (not counting `data: [DONE]`)
    usage: Usage | None = None
    error: str | None = None
    tool_step: str | None = None  # where its tool loop is now ("round 2: get_current_time"), for the status
    tool_rounds: int = 0  # model rounds of its tool loop (0: it had none)
    tool_calls: int = 0  # tool calls QueueGate ran for it
    tool_bound: str | None = None  # the bound that ended its tool loop (max_rounds, max_calls, ...)
    quiet: bool = False  # one round of a tool loop: the request's own record logs and counts it
    ended_with: int | None = None  # the status it finished with
    cancelled: bool = False  # by an operator (admin socket), whatever the exit path then says
    finished: bool = False
    on_finish: Callable[[RequestRecord, int], None] | None = field(default=None, repr=False)  # metrics, usage
    # Durable usage: waits until the request's usage row is committed (None: rows are committed in batches later).
    commit: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)

    @property
    def total_tokens(self) -> int | None:
        return self.usage.total_tokens if self.usage is not None else None

    async def finish_before_last_byte(self, status: int, *, error: str | None = None) -> None:
        """`finish`, called before the answer's last byte is sent: with durable usage, the request's row is
        committed when this returns (or the usage store has been told it is late: see `UsageStore.commit_within`),
        so an answer the client saw whole is never missing from usage."""
        self.finish(status, error=error)
        if self.commit is not None:
            await self.commit()

    def finish(self, status: int, *, error: str | None = None) -> None:
        """Log the request's line; later calls do nothing, so every exit path may call it."""
        if self.finished:
            return
        self.finished = True
        self.ended_with = status
        if self.cancelled:
            error = "cancelled by the operator"
        if error is not None:
            self.error = error
        if self.quiet:
            return
        usage = self.usage
        log.info(
            "request",
            extra={
                "fields": {
                    "rid": self.request_id,
                    "key": self.key.name if self.key else None,
                    "endpoint": self.endpoint,
                    "model": self.model,
                    "class": self.klass,
                    "flow": self.flow,
                    "upstream": self.upstream,
                    "status": status,
                    "stream": self.stream,
                    "queue_ms": round(self.queue_s * 1000, 1),
                    "duration_ms": round((trio.current_time() - self.started_at) * 1000, 1),
                    "retries": self.retries or None,
                    "prompt_tokens": usage.prompt_tokens if usage else None,
                    "completion_tokens": usage.completion_tokens if usage else None,
                    "tokens_estimated": True if usage and usage.estimated else None,
                    "tool_rounds": self.tool_rounds or None,
                    "tool_calls": self.tool_calls or None,
                    "tool_bound": self.tool_bound,
                    "client": self.client or None,
                    "error": self.error,
                }
            },
        )
        if self.on_finish is not None:
            self.on_finish(self, status)


def usage_row(record: RequestRecord, status: int, timezone: datetime.tzinfo = datetime.UTC) -> UsageRow | None:
    """The row for a finished request, its day counted in `timezone`; None for one refused before it had a key
    (401): not anyone's usage."""
    if status == 401:
        return None
    if record.cancelled or status == CLIENT_CLOSED:
        outcome = "cancelled"
    elif status >= 400 or record.error is not None:
        outcome = "error"
    else:
        outcome = "ok"
    usage = record.usage
    now = time.time()
    return UsageRow(
        request_id=record.request_id,
        at=round(now, 3),
        day=datetime.datetime.fromtimestamp(now, timezone).strftime("%Y-%m-%d"),
        key=record.key.name if record.key is not None else None,
        session=record.batch or record.session,
        model=record.model,
        klass=record.klass,
        endpoint="batch" if record.batch else record.endpoint,
        status=status,
        outcome=outcome,
        prompt_tokens=usage.prompt_tokens if usage is not None else 0,
        completion_tokens=usage.completion_tokens if usage is not None else 0,
        estimated=usage is not None and usage.estimated,
    )
