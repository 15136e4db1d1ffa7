"""The requests being served right now: what `queuegate top` lists and what an operator may cancel.

The HTTP layer registers each request with the cancel scope around its queueing and forwarding (cancelling it
answers the client with a clean error), then, once a streamed body is being sent, with that body (stopping it ends
the stream with an error event), and with its client connection, whose writes `stop` bounds: a client that reads
nothing cannot keep a stopped request alive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import trio

from queuegate.errors import GatewayError, ServiceUnavailable
from queuegate.proxy._record import RequestRecord
from queuegate.proxy._reply import StreamBody
from queuegate.statistics import RequestStatistics

REQUEST_LIST_LIMIT = 200  # a status lists at most this many (the oldest first); the total is always given
STOP_WRITE_GRACE_S = 1.0  # a stopped request's last event must reach its client within this, else it is cut off


class ClientLink(Protocol):
    """The request's client connection (api.server.ClientConnection)."""

    def limit_writes(self, until: float) -> None: ...


class RequestCancelled(ServiceUnavailable):
    code = "cancelled"


@dataclass(slots=True, eq=False)
class ActiveRequest:
    record: RequestRecord
    scope: trio.CancelScope  # around queueing and forwarding
    connection: ClientLink | None = None
    body: StreamBody | None = None  # once a streamed body is being sent
    stopped_with: GatewayError | None = None  # the error a stopped request answers with

    def stop(self, error: GatewayError) -> None:
        """End the request now with `error`: as its answer, or as the last event of its stream."""
        if self.stopped_with is not None:
            return
        self.stopped_with = error
        if self.body is not None:
            self.body.stop(error)
        else:
            self.scope.cancel()
        if self.connection is not None:
            self.connection.limit_writes(trio.current_time() + STOP_WRITE_GRACE_S)


class ActiveRequests:
    def __init__(self) -> None:
        self._requests: dict[int, ActiveRequest] = {}
        self.finished = 0  # requests that ended, however they ended
        self.tokens = 0  # completion tokens they produced (usage when known, else relayed chunks)

    def add(self, record: RequestRecord, scope: trio.CancelScope, connection: ClientLink | None) -> ActiveRequest:
        entry = ActiveRequest(record, scope, connection)
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
            entry.stop(RequestCancelled("the request was cancelled by the operator"))
        return len(found)

    def stop_all(self, error: GatewayError) -> int:
        """Stop every request with `error` (the end of a shutdown's grace period); how many."""
        entries = list(self._requests.values())
        for entry in entries:
            entry.stop(error)
        return len(entries)

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
                e.record.tool_step,
            )
            for e in entries
        ]
