"""Settings and live statistics of a simulated upstream."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import msgspec

FAULTS = frozenset(
    {
        "hang",  # accept the request, never answer
        "hang_after_first",  # (stream) send the first event, then stall
        "die_mid_stream",  # send three events (or half a body), then drop the connection
        "garbage",  # 200 with a body that is neither JSON nor SSE
        "status_500",
        "status_503",
        "status_429",
        "close_before_response",  # drop the connection without a byte
        "slow_first_token",  # 30 s before the first token
        "linger_after_done",  # (stream) wait 0.5 s after `data: [DONE]` before ending the body
        "no_done",  # (stream) end the body after three events: no finish_reason, no [DONE]
        "finish_without_done",  # (stream) end the body after the finish_reason chunk, without [DONE]
        "whole_answer",  # answer a streamed request with one JSON body
        "stream_answer",  # answer a non-streamed request with an event stream
        "drip",  # (non-stream) send the answer's headers, then its body a byte every 0.2 s
    }
)


class SimConfig(msgspec.Struct, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    model: str = "sim-model"  # reported by /v1/models
    tokens_per_s: float = 50.0  # generation speed; <= 0 = no delay at all
    load_time_s: float = 0.0  # /health and requests answer 503 "Loading model" this long after start, like llama-server
    health_ok_while_loading: bool = False  # /health answers 200 at once (a health path that passes too early)
    default_max_tokens: int = 13  # when the request sets neither max_tokens nor max_completion_tokens: one sentence
    embedding_dim: int = 8
    first_token_delay_s: float = 0.0  # "prompt processing" before the first token
    report_usage: bool = True  # False: answers and streams carry no `usage`, as some backends do
    tool_server: bool = False  # also serve the demo tool server (GET /openapi.json, POST /<tool>)
    test_tools: bool = False  # and its tools for tests (sleep, fail, garbage, big)


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any


@dataclass
class SimStats:
    """Counters that tests read directly (in process) or via GET /sim/stats."""

    requests: int = 0  # well-formed JSON requests received on POST /v1/*
    active: int = 0  # of those, being answered now
    completed: int = 0
    disconnects: int = 0  # clients that went away before their answer was complete
    disconnect_times: list[float] = field(default_factory=list)  # time.monotonic(): comparable across processes
    first_request_at: float | None = None  # time.monotonic() when the first request arrived
    received: collections.deque[ReceivedRequest] = field(default_factory=lambda: collections.deque(maxlen=1000))

    def counters(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "active": self.active,
            "completed": self.completed,
            "disconnects": self.disconnects,
        }
