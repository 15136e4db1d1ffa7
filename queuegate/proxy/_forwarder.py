"""The one boundary where bytes go to an upstream: httpcore (the lean engine under httpx) and its errors.

Transport and trio errors become domain errors here and nowhere else. Every wait is under a deadline; every
response is closed with `close_response`, shielded, so a cancelled request still closes its upstream connection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import httpcore
import trio

from queuegate.errors import UpstreamError, UpstreamTimeout
from queuegate.fleet.catalog import Upstream


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float
    first_byte_s: float  # from sending the request to the response headers (and the first stream event)
    idle_s: float  # longest gap between two body chunks
    total_s: float  # longest an upstream may take for one request, first to last byte; 0 = no limit

    def deadline(self) -> float:
        return trio.current_time() + self.total_s if self.total_s else math.inf


class RetryableFailure(UpstreamError):
    """The upstream failed before any byte reached the client: another upstream may take the request.

    `unreachable` means the upstream itself looks gone (connect refused, connection dropped): the health monitor
    should take it out. Otherwise (a 5xx, a garbled answer) only this request failed there.
    """

    def __init__(self, message: str, *, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


_DROPPED = (httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError)


class Forwarder:
    def __init__(self, pool: httpcore.AsyncConnectionPool, timeouts: Timeouts) -> None:
        self._pool = pool
        self.timeouts = timeouts
        # httpcore applies these per socket operation; our trio deadlines bound the waits that matter.
        self._extensions = {
            "timeout": {"connect": timeouts.connect_s, "pool": timeouts.connect_s, "write": timeouts.idle_s}
        }

    async def send(
        self, upstream: Upstream, path: str, body: bytes, request_id: str, deadline: float
    ) -> httpcore.Response:
        """POST `body` to the upstream; returns once the response headers arrived. Caller closes the response."""
        request = httpcore.Request(
            b"POST",
            upstream.base_url + path,
            headers=[
                *upstream.headers,
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", request_id.encode()),
            ],
            content=body,
            extensions=self._extensions,
        )
        try:
            with trio.fail_at(min(trio.current_time() + self.timeouts.first_byte_s, deadline)):
                return await self._pool.handle_async_request(request)
        except trio.TooSlowError:
            raise UpstreamTimeout(
                f"upstream {upstream.id} sent no response within {self.timeouts.first_byte_s:g} s"
            ) from None
        except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
            raise RetryableFailure(f"cannot connect to upstream {upstream.id}: {_why(exc)}", unreachable=True) from None
        except httpcore.PoolTimeout:
            raise UpstreamTimeout(f"no connection to upstream {upstream.id} became free in time") from None
        except _DROPPED as exc:
            raise RetryableFailure(
                f"upstream {upstream.id} closed the connection before responding: {_why(exc)}",
                unreachable=True,
            ) from None

    async def read_body(self, response: httpcore.Response, upstream: Upstream, deadline: float) -> bytes:
        """Read a whole (non-streamed) body, each chunk within the idle timeout."""
        reader = ChunkReader(response, upstream, self.timeouts.idle_s, deadline)
        chunks = []
        while (chunk := await reader.next()) is not None:
            chunks.append(chunk)
        return b"".join(chunks)


class ChunkReader:
    """Reads body chunks one by one under the idle and total deadlines (no async generator to finalize)."""

    def __init__(self, response: httpcore.Response, upstream: Upstream, idle_s: float, deadline: float) -> None:
        self._iterator = response.stream.__aiter__()  # type: ignore[union-attr]
        self._upstream = upstream
        self._idle_s = idle_s
        self._deadline = deadline

    async def next(self) -> bytes | None:
        """The next chunk, or None at the end. Raises UpstreamTimeout / UpstreamError if the upstream fails."""
        try:
            with trio.fail_at(min(trio.current_time() + self._idle_s, self._deadline)):
                return await self._iterator.__anext__()
        except StopAsyncIteration:
            return None
        except trio.TooSlowError:
            raise UpstreamTimeout(f"upstream {self._upstream.id} stalled: nothing for {self._idle_s:g} s") from None
        except _DROPPED as exc:
            raise UpstreamError(
                f"upstream {self._upstream.id} dropped the connection mid-response: {_why(exc)}"
            ) from None


async def close_response(response: httpcore.Response) -> None:
    """Close the upstream response even inside a cancelled scope (a client disconnect must reach the upstream)."""
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        await response.aclose()


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
