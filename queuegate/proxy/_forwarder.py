"""The one boundary where bytes go to an upstream: httpcore (the lean engine under httpx) and its errors.

Transport and trio errors become domain errors here and nowhere else. Every wait is under a deadline; every
response is closed with `close_response`, shielded, so a cancelled request still closes its upstream connection.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
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
    answer_s: float  # the same for a non-streamed answer (a server dripping bytes must not hold a slot for ever)

    def deadline(self, *, stream: bool) -> float:
        limits = [s for s in (self.total_s, 0.0 if stream else self.answer_s) if s]
        return trio.current_time() + min(limits) if limits else math.inf


class RetryableFailure(UpstreamError):
    """The upstream failed before any byte reached the client: another upstream may take the request.

    `unreachable`: it cannot be connected to; its health watcher takes it out until it recovers. `dropped`: it
    dropped a connection (crashed, restarted, or just this connection): it takes no request until a check now says
    it is fine, so one broken connection does not fail every request waiting for it. Otherwise (a 5xx, a garbled
    answer) only this request failed there.
    """

    def __init__(self, message: str, *, unreachable: bool = False, dropped: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable
        self.dropped = dropped


_DROPPED = (httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError)


class UpstreamConnections:
    """Idle keep-alive connections per upstream server (its base URL: an upstream a node registers again at another
    address gets new ones), reused newest first.

    httpcore's own pool polls every pooled socket for expiry on every request (one syscall each), which at a few
    hundred connections costs more than the forwarding itself. The scheduler already bounds how many requests run
    on an upstream, so this pool only keeps idle connections and checks the one it hands out.
    """

    def __init__(self, keepalive_expiry_s: float, max_idle_per_upstream: int) -> None:
        self._expiry = keepalive_expiry_s
        self._max_idle = max_idle_per_upstream
        self._idle: dict[str, list[httpcore.AsyncHTTPConnection]] = {}
        self._origins: dict[str, httpcore.Origin] = {}

    async def checkout(self, upstream: Upstream) -> tuple[httpcore.AsyncHTTPConnection, bool]:
        """A connection to `upstream` and whether it is a reused one (a fresh one connects on first use)."""
        idle = self._idle.get(upstream.base_url)
        while idle:
            connection = idle.pop()
            if not connection.has_expired():
                return connection, True
            await connection.aclose()
        origin = self._origins.get(upstream.base_url)
        if origin is None:
            origin = self._origins[upstream.base_url] = httpcore.URL(upstream.base_url).origin
        return httpcore.AsyncHTTPConnection(origin, keepalive_expiry=self._expiry), False

    async def checkin(self, upstream: Upstream, connection: httpcore.AsyncHTTPConnection) -> None:
        """Keep a connection whose exchange completed cleanly; close anything else."""
        idle = self._idle.setdefault(upstream.base_url, [])
        if connection.is_idle() and len(idle) < self._max_idle:
            idle.append(connection)
        elif not connection.is_closed():
            await connection.aclose()

    async def __aenter__(self) -> UpstreamConnections:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the idle connections (busy ones close with their requests)."""
        with trio.CancelScope(shield=True):
            for idle in self._idle.values():
                for connection in idle:
                    await connection.aclose()
            self._idle.clear()


class UpstreamResponse:
    """An upstream's answer: status, headers and a body stream; `aclose` gives the connection back to the pool."""

    def __init__(
        self,
        response: httpcore.Response,
        upstream: Upstream,
        connection: httpcore.AsyncHTTPConnection,
        pool: UpstreamConnections,
    ) -> None:
        self.status = response.status
        self.upstream = upstream
        self._response = response
        self._connection = connection
        self._pool = pool

    def header(self, name: bytes) -> str | None:
        for key, value in self._response.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return None

    def chunks(self) -> AsyncIterator[bytes]:
        return self._response.stream.__aiter__()  # type: ignore[union-attr]

    async def aclose(self) -> None:
        await self._response.aclose()
        await self._pool.checkin(self.upstream, self._connection)


class Forwarder:
    def __init__(self, pool: UpstreamConnections, timeouts: Timeouts) -> None:
        self._pool = pool
        self.timeouts = timeouts
        # httpcore applies these per socket operation; our trio deadlines bound the waits that matter.
        self._extensions = {"timeout": {"connect": timeouts.connect_s, "write": timeouts.idle_s}}
        self._urls: dict[tuple[str, str], httpcore.URL] = {}  # parsed once per upstream and path

    async def send(
        self, upstream: Upstream, path: str, body: bytes, request_id: str, deadline: float
    ) -> UpstreamResponse:
        """POST `body` to the upstream; returns once the response headers arrived. Caller closes the response."""
        url = self._urls.get((upstream.base_url, path))
        if url is None:
            url = self._urls[upstream.base_url, path] = httpcore.URL(upstream.base_url + path)
        request = httpcore.Request(
            b"POST",
            url,
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
                return await self._exchange(upstream, request)
        except trio.TooSlowError:
            if trio.current_time() >= deadline:
                raise UpstreamTimeout(f"upstream {upstream.id} took too long to answer in all") from None
            raise UpstreamTimeout(
                f"upstream {upstream.id} sent no response within {self.timeouts.first_byte_s:g} s"
            ) from None
        except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
            raise RetryableFailure(f"cannot connect to upstream {upstream.id}: {_why(exc)}", unreachable=True) from None
        except _DROPPED as exc:
            raise RetryableFailure(
                f"upstream {upstream.id} closed the connection before responding: {_why(exc)}", dropped=True
            ) from None

    async def _exchange(self, upstream: Upstream, request: httpcore.Request) -> UpstreamResponse:
        """Send on a pooled connection. A reused one the server closed while idle is retried once on a fresh one:
        the server dropped it before reading the request, so nothing was processed twice."""
        while True:
            connection, reused = await self._pool.checkout(upstream)
            try:
                response = await connection.handle_async_request(request)
            except (*_DROPPED, httpcore.ConnectionNotAvailable):
                await _close_shielded(connection)
                if reused:
                    continue
                raise
            except BaseException:
                await _close_shielded(connection)
                raise
            return UpstreamResponse(response, upstream, connection, self._pool)


async def _close_shielded(connection: httpcore.AsyncHTTPConnection) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        await connection.aclose()


class ChunkReader:
    """Reads body chunks one by one under the idle and total deadlines (no async generator to finalize)."""

    def __init__(self, response: UpstreamResponse, idle_s: float, deadline: float) -> None:
        self._iterator = response.chunks()
        self._upstream = response.upstream
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
            if trio.current_time() >= self._deadline:
                raise UpstreamTimeout(f"upstream {self._upstream.id} took too long to answer in all") from None
            raise UpstreamTimeout(f"upstream {self._upstream.id} stalled: nothing for {self._idle_s:g} s") from None
        except _DROPPED as exc:
            raise UpstreamError(
                f"upstream {self._upstream.id} dropped the connection mid-response: {_why(exc)}"
            ) from None


async def close_response(response: UpstreamResponse) -> None:
    """Close the upstream response even inside a cancelled scope (a client disconnect must reach the upstream)."""
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        await response.aclose()


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
