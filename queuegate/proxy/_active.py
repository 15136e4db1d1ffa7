"""The requests being served right now: what `queuegate top` lists and what an operator may cancel.

The HTTP layer registers each request with the cancel scope that currently holds it: first the scope around
queueing and forwarding (cancelling it answers the client with a clean error), then, once a streamed body is being
sent, the scope of the whole HTTP request (cancelling it ends the stream).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import trio

from queuegate.errors import ServiceUnavailable
from queuegate.proxy._record import RequestRecord

REQUEST_LIST_LIMIT = 200  # a status lists at most this many (the oldest first); the total is always given


class RequestCancelled(ServiceUnavailable):
    code = "cancelled"


class RequestStatistics(msgspec.Struct, frozen=True):
    id: str
    model: str | None
    klass: str
    flow: str
    upstream: str | None  # None while queued
    elapsed_s: float
    chunks: int  # stream events relayed so far (about one token each)


@dataclass(slots=True, eq=False)
class ActiveRequest:
    record: RequestRecord
    scope: trio.CancelScope


class ActiveRequests:
    def __init__(self) -> None:
        self._requests: dict[int, ActiveRequest] = {}
        self.finished = 0  # requests that ended, however they ended
        self.tokens = 0  # completion tokens they produced (usage when known, else relayed chunks)

    def add(self, record: RequestRecord, scope: trio.CancelScope) -> ActiveRequest:
        entry = ActiveRequest(record, scope)
        self._requests[id(entry)] = entry
        return entry

    def remove(self, entry: ActiveRequest) -> None:
        """The request ended: forget it, and count it and its tokens (for throughput)."""
        if self._requests.pop(id(entry), None) is None:
            return
        self.finished += 1
        usage = entry.record.usage
        self.tokens += usage.completion_tokens if usage is not None else entry.record.chunks

    def cancel(self, request_id: str) -> int:
        """Cancel every request with this id (clients may reuse ids); how many. KeyError when there is none."""
        found = [e for e in self._requests.values() if e.record.request_id == request_id]
        if not found:
            raise KeyError(f"no request {request_id!r} in progress")
        for entry in found:
            entry.record.cancelled = True
            entry.scope.cancel()
        return len(found)

    def __len__(self) -> int:
        return len(self._requests)

    def statistics(self, now: float) -> list[RequestStatistics]:
        entries = sorted(self._requests.values(), key=lambda e: e.record.started_at)[:REQUEST_LIST_LIMIT]
        return [
            RequestStatistics(
                e.record.request_id,
                e.record.model,
                e.record.klass,
                e.record.flow,
                e.record.upstream,
                round(now - e.record.started_at, 3),
                e.record.chunks,
            )
            for e in entries
        ]
