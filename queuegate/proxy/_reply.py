"""What the HTTP layer sends back for one request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from queuegate.errors import GatewayError

SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache"}


class StreamBody(Protocol):
    """A streamed answer: the HTTP layer iterates it, then always calls `aclose` (RelayStream, QueuedStream);
    `stop` ends it early with an error event."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...

    def stop(self, error: GatewayError) -> None: ...


@dataclass(slots=True)
class Reply:
    """A status, headers, and a whole body or a stream."""

    status: int
    headers: dict[str, str]
    body: bytes | StreamBody
