"""Serving the ASGI app: the listening socket, bound before anything else starts, and hypercorn's HTTP/1.1 protocol
on connections QueueGate can see and end.

hypercorn writes to a client inside a shielded scope with no deadline, so a client that stops reading with its
socket open (a suspended laptop) would hold its request, and the GPU slot behind it, for as long as it stays
connected, and not even an operator's cancel or a second SIGTERM could end it. Here each connection bounds every
write (`write_timeout_s` without progress ends the connection) and can be aborted: an operator's cancel or the end
of a shutdown closes it, which fails the stuck write, so the request unwinds (upstream closed, slot freed).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
from functools import partial
from typing import Any

import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, LifespanState
from hypercorn.utils import repr_socket_addr, wrap_app

from queuegate.config import parse_listen
from queuegate.errors import BadHttp, BadRequest, GatewayError, HttpVersionNotSupported

log = logging.getLogger("queuegate.http")

CONNECTION_KEY = "queuegate.connection"  # the ASGI scope entry holding the request's `ClientConnection`
WRITE_SLICE = 64 * 1024  # a write's progress is checked at least this often


class ListenError(Exception):
    """The listen address cannot be used; the message says which one, why, and what to do."""


def bind_listener(listen: str, backlog: int) -> socket.socket:
    """A listening TCP socket on `listen` (host:port; port 0 picks a free one), queueing up to `backlog` connections
    not accepted yet (hypercorn's default of 100 overflows under a burst of new clients). Raises ListenError."""
    host, port = parse_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {listen}: unknown host {host!r} ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            why = "the address is already in use (another QueueGate or server?)"
        else:
            why = exc.strerror or str(exc)
        raise ListenError(
            f"cannot listen on {listen}: {why}; choose another address with --listen HOST:PORT "
            "or [server].listen in the config"
        ) from None
    return sock


class HttpServer:
    """hypercorn on a socket QueueGate bound, with connections it can end (see the module)."""

    def __init__(
        self,
        app: Any,
        *,
        graceful_timeout_s: float,
        write_timeout_s: float,
        keepalive_s: float,
        http2: bool,
    ) -> None:
        self._config = HypercornConfig()
        self._config.graceful_timeout = graceful_timeout_s
        self._config.keep_alive_timeout = keepalive_s
        self._config.accesslog = None
        self._config.errorlog = logging.getLogger("queuegate.http")
        self._app = wrap_app(app, self._config.wsgi_max_body_size, None)
        self.write_timeout_s = write_timeout_s
        self.http2 = http2  # else HTTP/2 requests (h2c upgrade, prior knowledge) are answered 505
        self.connections: set[ClientConnection] = set()
        self.stalled = 0  # connections ended because the client stopped reading

    async def run(
        self,
        listener: socket.socket,
        *,
        shutdown_trigger: trio.Event,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on the bound `listener` until `shutdown_trigger` is set: then stop accepting and give running
        connections the graceful timeout (the daemon ends them sooner once its requests are done). Reports the base
        URL once accepting."""
        lifespan_state: LifespanState = {}
        lifespan = Lifespan(self._app, self._config, lifespan_state)
        context = WorkerContext(None)
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            async with trio.open_nursery() as connections:
                accepting_on = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
                handler = partial(self._serve_connection, context, lifespan_state)
                try:
                    async with trio.open_nursery() as accepting:
                        accepting.start_soon(
                            partial(trio.serve_listeners, handler, [accepting_on], handler_nursery=connections)
                        )
                        bound = repr_socket_addr(listener.family, listener.getsockname())
                        task_status.started(f"http://{bound}")
                        await shutdown_trigger.wait()
                        accepting.cancel_scope.cancel()
                finally:
                    await context.terminated.set()  # hypercorn then closes idle keep-alive connections
                    connections.cancel_scope.deadline = trio.current_time() + self._config.graceful_timeout
            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()

    def abort_all(self, reason: str) -> None:
        """End every connection now (the end of a shutdown): stuck writes fail, so every request unwinds."""
        for connection in list(self.connections):
            connection.abort(reason)

    def limit_writes(self, until: float) -> None:
        """No connection may spend past `until` (trio time) on a write: a client reading nothing is cut off then."""
        for connection in self.connections:
            connection.limit_writes(until)

    async def _serve_connection(
        self, context: WorkerContext, lifespan_state: LifespanState, stream: trio.SocketStream
    ) -> None:
        connection = ClientConnection(self, self._app, self._config, context, lifespan_state, stream)
        self.connections.add(connection)
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)


class _ConnectionApp:
    """The ASGI app as hypercorn calls it for one connection: the request's connection goes in its scope
    (CONNECTION_KEY), and a request whose framing is ambiguous never reaches it."""

    def __init__(self, app: AppWrapper, connection: ClientConnection) -> None:
        self._app = app
        self._connection = connection

    async def __call__(self, scope: Any, receive: Any, send: Any, sync_spawn: Any, call_soon: Any) -> None:
        if scope["type"] == "websocket":
            await _refuse_websocket(receive, send)
            return
        if scope["type"] == "http" and scope.get("http_version", "").startswith("2") and not self._connection.http2:
            await _refuse(
                send, HttpVersionNotSupported("HTTP/2 is off in this QueueGate ([server].http2): use HTTP/1.1")
            )
            return
        if scope["type"] == "http" and _ambiguous_framing(scope["headers"]):
            refusal = BadRequest("a request may not have both Content-Length and Transfer-Encoding")
            await _refuse(send, refusal, close=True)
            return
        self._connection.start_request()
        scope[CONNECTION_KEY] = self._connection
        await self._app(scope, receive, send, sync_spawn, call_soon)


def _ambiguous_framing(headers: list[tuple[bytes, bytes]]) -> bool:
    """Both Content-Length and Transfer-Encoding: what a request smuggler sends, hoping two parsers disagree on
    where the body ends (RFC 9112 6.1: the server must close the connection after answering it)."""
    names = {name.lower() for name, _ in headers}
    return b"content-length" in names and b"transfer-encoding" in names


async def _refuse(send: Any, error: GatewayError, *, close: bool = False) -> None:
    """Answer `error` in OpenAI's envelope; `close`: and close the connection (nothing after it is read)."""
    headers, body = _error_answer(error)
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _refuse_websocket(receive: Any, send: Any) -> None:
    """QueueGate serves no websockets: the handshake gets a 400 in OpenAI's envelope."""
    await receive()  # websocket.connect
    error = BadRequest("QueueGate serves HTTP requests, not websocket connections")
    headers, body = _error_answer(error)
    await send({"type": "websocket.http.response.start", "status": error.status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


_PROTOCOL_ERRORS = {
    400: "the request is not valid HTTP/1.1",
    413: "the request is too large",
    414: "the request's URL is too long",
    431: "the request's headers are too large",
}


def _empty_answer_then_close(data: bytes) -> bool:
    """Whether `data` is a whole answer without a body that says `Connection: close` (hypercorn's error answers)."""
    if not data.startswith(b"HTTP/1.1 "):
        return False
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    return b"\r\nconnection: close" in head and b"\r\ncontent-length: 0" in head


def _protocol_error_answer(status: int) -> bytes:
    """A whole HTTP answer, in OpenAI's envelope, for a request the HTTP layer could not read (then closed)."""
    headers, body = _error_answer(BadHttp(_PROTOCOL_ERRORS.get(status, "the request could not be read"), status=status))
    head = f"HTTP/1.1 {status} \r\n".encode() + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    return head + b"connection: close\r\n\r\n" + body


async def _stay_on_http11(event: object) -> None:
    """A stand-in for hypercorn's protocol-switch check: with HTTP/2 off there is nothing to switch to."""


def _error_answer(error: GatewayError) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = error.body()
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body


class ClientConnection(TCPServer):
    """One client connection: hypercorn's, with a deadline on every write and an `abort`."""

    def __init__(
        self,
        server: HttpServer,
        app: AppWrapper,
        config: HypercornConfig,
        context: WorkerContext,
        lifespan_state: LifespanState,
        stream: trio.SocketStream,
    ) -> None:
        self._server = server
        self.http2 = server.http2
        super().__init__(_ConnectionApp(app, self), config, context, lifespan_state, stream)  # type: ignore[arg-type]
        self._writing: trio.CancelScope | None = None
        self._cancel_when_gone: set[trio.CancelScope] = set()  # the requests on it that end if the client leaves
        self._client_gone = False  # the client closed the connection (nothing more is read from it)
        self._write_limit = math.inf  # no write may go on past this (trio time): set for a stopped request
        self._head_waits_for_body = False  # `send_head_with_body`: the next answer's head is held for its body
        self._held_head = b""
        self.aborted: str | None = None  # why it was ended by QueueGate

    @property
    def protocol(self) -> ProtocolWrapper:
        return self._protocol

    @protocol.setter
    def protocol(self, wrapper: ProtocolWrapper) -> None:
        """hypercorn sets this once per connection. With HTTP/2 off, its HTTP/1.1 protocol never switches: an
        `Upgrade: h2c` is ignored (the request is answered in HTTP/1.1) and the HTTP/2 preface reaches the app as a
        request, which refuses it (505) and closes. Left to hypercorn, both switch to an HTTP/2 connection without a
        keep-alive timeout, which a client may hold open for ever."""
        self._protocol = wrapper
        inner = getattr(wrapper, "protocol", None)
        if not self.http2 and isinstance(inner, H11Protocol):
            inner._check_protocol = _stay_on_http11  # type: ignore[method-assign]

    async def _read_data(self) -> None:
        """hypercorn's read loop, then: the connection is over, so its keep-alive timer is moot. hypercorn leaves
        that timer running, and the connection's task (this object, in `HttpServer.connections`) waits for it, up
        to `keepalive_s` after the client has gone."""
        try:
            await super()._read_data()
        finally:
            self._client_gone = True
            for scope in self._cancel_when_gone:
                scope.cancel()
            await self.idle_task.stop()

    def cancel_when_gone(self, scope: trio.CancelScope) -> None:
        """Cancel `scope` when the client closes the connection (`forget` it when its request is over). A request
        waiting in the queue needs no task of its own to notice that its client left."""
        if self._client_gone:
            scope.cancel()  # it left before its request got this far
        self._cancel_when_gone.add(scope)

    def forget(self, scope: trio.CancelScope) -> None:
        self._cancel_when_gone.discard(scope)

    def limit_writes(self, until: float) -> None:
        """Writes (the one in progress too) must be done by `until`, else the connection is closed. A stopped
        request's last event reaches a reading client in time; a client reading nothing cannot hold it longer."""
        self._write_limit = min(self._write_limit, until)
        if self._writing is not None:
            self._writing.deadline = min(self._writing.deadline, until)

    def abort(self, reason: str) -> None:
        """End the connection now: a write in progress fails, and the request on it sees the client gone."""
        if self.aborted is not None:
            return
        self.aborted = reason
        if self._writing is not None:
            self._writing.cancel()
        self._close_now()

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Closed):
            if self._client_erred_mid_response():
                return  # the response's own end closes the connection (its state is MUST_CLOSE by then)
            # hypercorn half-closes the socket (send_eof) without its send lock; with another task writing at that
            # moment (an error answered while a response goes out) trio raises BusyResourceError. Take turns.
            async with self.send_lock:
                await self._close()
            await self.protocol.handle(Closed())
            return
        if not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        data = event.data
        if not data and not self._held_head:
            return  # (the end of a body of known length: nothing to write)
        if self._head_waits_for_body:
            self._head_waits_for_body = False
            if data.startswith(b"HTTP/1.1 "):
                self._held_head = data
                return
        if self._held_head:  # (with its body, or alone when the answer has none: hypercorn drops a 204's)
            data, self._held_head = self._held_head + data, b""
        empty_and_closing = _empty_answer_then_close(data)
        if empty_and_closing and self._client_erred():
            data = _protocol_error_answer(int(data[9:12]))  # hypercorn's own answer to bad HTTP, with a body
        async with self.send_lock:
            if self.aborted is None:
                # Shielded as hypercorn does (a cancelled request must not cut a write half-way), but bounded.
                with trio.CancelScope(shield=True) as writing:
                    self._writing = writing
                    try:
                        await self._write(writing, memoryview(data))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the client is gone: handled below like any end of the connection
                    else:
                        if not empty_and_closing:
                            return
                    finally:
                        self._writing = None
                if empty_and_closing and not writing.cancelled_caught:
                    # hypercorn's own answers (a websocket handshake it rejects, say) promise a close it does not
                    # always make: make it (half-close first, so the answer is read before the connection ends),
                    # or such a connection stays open with no timeout.
                    await self._close()
                    await self.protocol.handle(Closed())
                    return
                if writing.cancelled_caught and self.aborted is None:
                    if trio.current_time() >= self._write_limit:
                        self.aborted = "its request was stopped and the client read nothing"
                    else:
                        self._server.stalled += 1
                        self.aborted = f"the client read nothing for {self._server.write_timeout_s:g} s"
                    log.warning("client connection closed", extra={"fields": {"why": self.aborted}})
            self._close_now()
        await self.protocol.handle(Closed())

    def _client_erred_mid_response(self) -> bool:
        """Whether the client broke the protocol while a response is half-way out: hypercorn's read side then
        closes the connection at once, cutting the response (e.g. a `Connection: close` answer, such as a refusal
        of an ambiguous request, to a client that sent more after it). That response must go out whole first."""
        connection = self._h11()
        return connection is not None and connection.our_state is h11.SEND_BODY and self._client_erred()

    def _client_erred(self) -> bool:
        """Whether the client broke HTTP/1.1 (bad framing, headers too large): hypercorn answers that itself."""
        connection = self._h11()
        return connection is not None and connection.their_state is h11.ERROR

    def _h11(self) -> h11.Connection | None:
        h11_protocol = getattr(self.protocol, "protocol", None)  # hypercorn's ProtocolWrapper -> H11Protocol
        connection = getattr(h11_protocol, "connection", None)
        return connection if isinstance(connection, h11.Connection) else None

    async def _write(self, writing: trio.CancelScope, data: memoryview) -> None:
        """Send `data` in slices, each with the deadline renewed: it is progress that counts, so a client reading a
        large answer slowly is not cut off, and one reading nothing is."""
        for start in range(0, len(data), WRITE_SLICE):
            writing.deadline = min(trio.current_time() + self._server.write_timeout_s, self._write_limit)
            await self.stream.send_all(data[start : start + WRITE_SLICE])

    async def send_chunk(self, data: bytes) -> None:
        """A piece of a streamed (chunked) HTTP/1.1 answer whose head went out through ASGI: framed as a chunk and
        written here, with the same bounded write as everything else. hypercorn's ASGI, stream and h11 layers add
        nothing to a chunk but cost as much as the write itself; its end still goes through them (h11 writes the
        last chunk and moves on to the next request)."""
        await self.protocol_send(RawData(data=b"%x\r\n%b\r\n" % (len(data), data)))

    def send_head_with_body(self) -> None:
        """The next answer's body follows its head at once (a whole answer): both go out in one write."""
        self._head_waits_for_body = True

    def start_request(self) -> None:
        """A new request on this connection: a limit set for the one before no longer applies."""
        self._write_limit = math.inf
        self._head_waits_for_body = False

    def _close_now(self) -> None:
        """Close the socket without waiting for anything (the peer may be reading nothing at all)."""
        with contextlib.suppress(OSError):
            self.stream.socket.close()
