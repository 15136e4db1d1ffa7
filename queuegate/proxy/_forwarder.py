"""The one boundary where bytes go to an upstream: its HTTP/1.1 connections (`_http11`) and their errors.

Transport and trio errors become domain errors here and nowhere else. Every wait is under a deadline; every
response is closed with `close_response`, shielded, so a cancelled request still closes its upstream connection.
"""

from __future__ import annotations

import math
import ssl
from dataclasses import dataclass

import trio

from queuegate.errors import UpstreamError, UpstreamTimeout
from queuegate.fleet.catalog import Upstream
from queuegate.proxy._http11 import ConnectFailed, ConnectionDropped, Http11Connection, Target


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


END_WAIT_S = 0.5  # how long the end of a complete answer's body is waited for (it follows its last event at once)


class UpstreamConnections:
    """Idle keep-alive connections per upstream server (scheme, host and port: an upstream a node registers again
    at another address gets new ones), reused newest first.

    The scheduler already bounds how many requests run on an upstream, so this pool only keeps idle connections
    and checks the one it hands out (a general pool polling every idle socket on every request costs more than the
    forwarding itself at a few hundred connections).
    """

    def __init__(self, keepalive_expiry_s: float, max_idle_per_upstream: int) -> None:
        self._expiry = keepalive_expiry_s
        self._max_idle = max_idle_per_upstream
        self._idle: dict[tuple[bool, str, int], list[Http11Connection]] = {}
        self._tls: ssl.SSLContext | None = None  # made on the first https upstream (making one is slow)
        self._swept_at = trio.current_time()

    async def checkout(self, server: tuple[bool, str, int]) -> tuple[Http11Connection, bool]:
        """A connection to `server` and whether it is a reused one (a fresh one connects on first use)."""
        if trio.current_time() - self._swept_at > self._expiry:
            await self._sweep()
        idle = self._idle.get(server)
        while idle:
            connection = idle.pop()
            if not connection.expired():
                return connection, True
            await connection.aclose()
        tls = server[0]
        if tls and self._tls is None:
            self._tls = ssl.create_default_context()
        return Http11Connection(server, self._expiry, self._tls if tls else None), False

    async def checkin(self, server: tuple[bool, str, int], connection: Http11Connection) -> None:
        """Keep a connection whose exchange completed cleanly; close anything else."""
        idle = self._idle.setdefault(server, [])
        if connection.finish_exchange() and len(idle) < self._max_idle:
            idle.append(connection)
        else:
            await connection.aclose()

    async def _sweep(self) -> None:
        """Close the idle connections of every server that expired: past their keep-alive, or closed by a server
        that stopped (a swapped-out model's), which would otherwise wait for their server's next request."""
        self._swept_at = trio.current_time()
        expired: list[Http11Connection] = []
        for server, idle in list(self._idle.items()):  # (taken out at once: other tasks use the lists meanwhile)
            kept: list[Http11Connection] = []
            for connection in idle:
                (expired if connection.expired() else kept).append(connection)
            idle[:] = kept
            if not idle:
                del self._idle[server]
        for connection in expired:
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
    """An upstream's answer: status, headers and a body read with `receive_body`; `aclose` gives the connection
    back to the pool."""

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        upstream: Upstream,
        connection: Http11Connection,
        pool: UpstreamConnections,
        server: tuple[bool, str, int],
    ) -> None:
        self.status = status
        self.upstream = upstream
        self._headers = headers
        self._connection: Http11Connection | None = connection
        self._pool = pool
        self._server = server

    def header(self, name: bytes) -> str | None:
        for key, value in self._headers:
            if key == name:
                return value.decode("latin-1")
        return None

    async def receive_body(self) -> bytes | None:
        """All the body that has arrived (see `Http11Connection.receive_body`), or None after its end."""
        if self._connection is None:
            raise ConnectionDropped("the response was closed")
        return await self._connection.receive_body()

    async def aclose(self, *, ended: bool = False) -> None:
        """Give the connection back. `ended`: the answer is complete (a stream's end event was read), so the rest
        of its body (the end of its framing, which may trail the event) is read first, briefly, for the connection
        to be reused rather than dropped mid-answer."""
        connection, self._connection = self._connection, None  # (given back once: never twice to the pool)
        if connection is None:
            return
        if ended:
            await connection.read_to_end(END_WAIT_S)
        await self._pool.checkin(self._server, connection)


class Forwarder:
    def __init__(self, pool: UpstreamConnections, timeouts: Timeouts) -> None:
        self._pool = pool
        self.timeouts = timeouts
        self._targets: dict[tuple[str, str], Target] = {}  # parsed once per upstream and path

    async def send(
        self, upstream: Upstream, path: str, body: bytes, request_id: str, deadline: float
    ) -> UpstreamResponse:
        """POST `body` to the upstream; returns once the response headers arrived. Caller closes the response."""
        target = self._targets.get((upstream.base_url, path))
        if target is None:
            target = self._targets[upstream.base_url, path] = Target.of(upstream.base_url + path)
        headers = [
            *upstream.headers,
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
        ]
        try:
            with trio.fail_at(min(trio.current_time() + self.timeouts.first_byte_s, deadline)):
                return await self._exchange(upstream, target, headers, body)
        except trio.TooSlowError:
            if trio.current_time() >= deadline:
                raise UpstreamTimeout(f"upstream {upstream.id} took too long to answer in all") from None
            raise UpstreamTimeout(
                f"upstream {upstream.id} sent no response within {self.timeouts.first_byte_s:g} s"
            ) from None
        except ConnectFailed as exc:
            raise RetryableFailure(f"cannot connect to upstream {upstream.id}: {exc}", unreachable=True) from None
        except ConnectionDropped as exc:
            raise RetryableFailure(
                f"upstream {upstream.id} closed the connection before responding: {exc}", dropped=True
            ) from None

    async def _exchange(
        self, upstream: Upstream, target: Target, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> UpstreamResponse:
        """Send on a pooled connection. A reused one the server closed while idle is retried once on a fresh one:
        the server dropped it before reading the request, so nothing was processed twice."""
        while True:
            connection, reused = await self._pool.checkout(target.server)
            try:
                status, response_headers = await connection.request(target, headers, body, self.timeouts.connect_s)
            except ConnectionDropped:
                await _close_shielded(connection)
                if reused:
                    continue
                raise
            except BaseException:
                await _close_shielded(connection)
                raise
            return UpstreamResponse(status, response_headers, upstream, connection, self._pool, target.server)


async def _close_shielded(connection: Http11Connection) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        await connection.aclose()


class ChunkReader:
    """Reads a body as it arrives, under the idle and total deadlines (no async generator to finalize)."""

    def __init__(self, response: UpstreamResponse, idle_s: float, deadline: float) -> None:
        self._response = response
        self._upstream = response.upstream
        self._idle_s = idle_s
        self._deadline = deadline

    async def next(self) -> bytes | None:
        """All the body that arrived since the last read (waiting for some), or None at the end. Raises
        UpstreamTimeout / UpstreamError if the upstream fails."""
        try:
            with trio.fail_at(min(trio.current_time() + self._idle_s, self._deadline)):
                return await self._response.receive_body()
        except trio.TooSlowError:
            if trio.current_time() >= self._deadline:
                raise UpstreamTimeout(f"upstream {self._upstream.id} took too long to answer in all") from None
            raise UpstreamTimeout(f"upstream {self._upstream.id} stalled: nothing for {self._idle_s:g} s") from None
        except ConnectionDropped as exc:
            raise UpstreamError(f"upstream {self._upstream.id} dropped the connection mid-response: {exc}") from None


async def close_response(response: UpstreamResponse, *, ended: bool = False) -> None:
    """Close the upstream response even inside a cancelled scope (a client disconnect must reach the upstream).
    `ended`: the answer was complete (see `UpstreamResponse.aclose`)."""
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        await response.aclose(ended=ended)
