"""What QueueGate reads of each endpoint's answers: how its event stream ends, and where its usage is.

OpenAI's chat and completions streams end with `data: [DONE]` (or, from some servers, just a `finish_reason`), carry
their usage in a chunk asked for with `stream_options.include_usage`, and may get QueueGate's own queue notices and
synthesized events. The other APIs QueueGate passes through have streams of their own, relayed untouched:

- the Responses API (`/v1/responses`) ends with a `response.completed` (or `.incomplete`, `.failed`) event whose
  `response.usage` has `input_tokens` and `output_tokens`;
- Anthropic's Messages API (`/v1/messages`) ends with `message_stop`; its `message_start` has the input tokens and
  its `message_delta` the output tokens.

A stream that ends without its end event was cut: the client gets an error event in the stream's own shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec

from queuegate.errors import GatewayError
from queuegate.proxy._record import Usage


class WireUsage(msgspec.Struct):
    """A `usage` object as upstreams send it: OpenAI's names, or the Responses and Messages APIs'."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def usage(self) -> Usage:
        prompt = self.prompt_tokens or self.input_tokens
        completion = self.completion_tokens or self.output_tokens
        return Usage(prompt, completion, self.total_tokens or prompt + completion)


@dataclass(frozen=True, slots=True)
class Dialect:
    openai: bool  # chat and completions: [DONE], finish_reason, the usage chunk, queue notices
    end: re.Pattern[bytes]  # an event that says the stream is complete

    def stream_usage(self, head: bytes, tail: bytes) -> Usage | None:
        """The usage a complete passthrough stream reported: its first and last bytes (None: none found)."""
        if self is RESPONSES:
            found = _event_value(tail, b"response.completed", ("response", "usage"))
            return msgspec.convert(found, WireUsage).usage() if isinstance(found, dict) else None
        if self is MESSAGES:
            started = _event_value(head, b"message_start", ("message", "usage"))
            delta = _event_value(tail, b"message_delta", ("usage",))
            if not isinstance(started, dict) and not isinstance(delta, dict):
                return None
            merged = {**(started if isinstance(started, dict) else {}), **(delta if isinstance(delta, dict) else {})}
            return msgspec.convert(merged, WireUsage).usage()
        return None

    def error_event(self, error: GatewayError) -> bytes:
        """The event that ends a stream with `error`, in the shape its clients read."""
        if self is MESSAGES:
            body = {"type": "error", "error": {"type": error.type, "message": error.message}}
            return b"event: error\ndata: " + msgspec.json.encode(body) + b"\n\n"
        if self is RESPONSES:
            body = {"type": "error", "code": error.code, "message": error.message, "param": error.param}
            return b"event: error\ndata: " + msgspec.json.encode(body) + b"\n\n"
        return b"data: " + error.body() + b"\n\n"


OPENAI = Dialect(openai=True, end=re.compile(rb"(?m)^data:[ \t]*\[DONE\]"))
RESPONSES = Dialect(openai=False, end=re.compile(rb'"type"\s*:\s*"response\.(?:completed|incomplete|failed)"'))
MESSAGES = Dialect(openai=False, end=re.compile(rb'"type"\s*:\s*"message_stop"'))
DIALECTS = {"chat": OPENAI, "completions": OPENAI, "embeddings": OPENAI, "responses": RESPONSES, "messages": MESSAGES}
OPENAI_STREAMS = frozenset({"chat", "completions"})  # the endpoints whose streams QueueGate reads and makes (OPENAI)


def _event_value(block: bytes, kind: bytes, path: tuple[str, ...]) -> Any:
    """In the last event of type `kind` in `block`, the value at `path` (None: no such event or value)."""
    marker = b'"' + kind + b'"'
    for event in reversed(block.replace(b"\r\n", b"\n").split(b"\n\n")):
        if marker not in event:
            continue
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            try:
                value: Any = msgspec.json.decode(line[5:].strip())
            except msgspec.DecodeError:
                continue
            for name in path:
                value = value.get(name) if isinstance(value, dict) else None
            return value
    return None
