"""The relay routes (`/v1/chat/completions` and its variants, `/v1/completions`, `/v1/embeddings`, `/v1/responses`,
`/v1/messages`): the hot path, served as plain ASGI beside the Quart app that serves every other route.

Every request and every streamed event of the gateway crosses these routes, and Quart's per-request machinery
(request and response objects, contexts, hooks, a task reading the connection) cost about as much as relaying
itself. Here a request is its ASGI scope, its body is read under the same limits (`[server].max_body_mb`,
`body_timeout_s`) and answered with the same errors, and a client that leaves cancels the request wherever it is
(queued, forwarding, streaming), as it does on every route.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import trio

from queuegate.api._http import error_headers
from queuegate.api._http import request_id as new_request_id
from queuegate.api._lifetime import CLEANUP_KEY, TASKS_KEY, ASGIApp
from queuegate.api._routes import Routes
from queuegate.api.server import CONNECTION_KEY, ClientConnection
from queuegate.errors import (
    BadRequest,
    GatewayError,
    InternalError,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
)
from queuegate.proxy import (
    CLIENT_CLOSED,
    Reply,
    RequestCancelled,
    RequestRecord,
    echo,
    end_user,
    request_class,
    request_flow,
)

log = logging.getLogger("queuegate.api")
SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SESSION_ROUTE = re.compile(r"^/v1/session/([^/]*)/chat/completions$")


@dataclass(frozen=True, slots=True)
class Route:
    endpoint: str
    route_class: str = "user"
    tool_mode: str | None = None  # None: the model's or [tools].mode


ROUTES = {
    "/v1/chat/completions": Route("chat"),
    # Same scheduling; tool calls always go back to the client (QueueGate runs no tools on this route).
    "/v1/chat/completions_passthrough": Route("chat", tool_mode="passthrough"),
    "/v1/agent/chat/completions": Route("chat", "agent", tool_mode="execute"),
    "/v1/completions": Route("completions"),
    "/v1/embeddings": Route("embeddings"),
    "/v1/responses": Route("responses"),  # OpenAI's Responses API, passed through to servers that serve it
    "/v1/messages": Route("messages"),  # Anthropic's Messages API, the same way
}
SESSION_ROUTE = Route("chat")  # /v1/session/<id>/chat/completions: the session named in the path is the flow


class ClientGone(Exception):
    """The client disconnected before its request's body had arrived."""


class Incoming:
    """One relayed request as the routes read it: its headers (names in lowercase, the first of each), its client
    address, and its body, read from the connection under the server's limits."""

    def __init__(self, scope: dict[str, Any], receive: Any, max_body: int, body_timeout_s: float) -> None:
        self.scope = scope
        self._receive = receive
        self._max_body = max_body
        self._body_timeout_s = body_timeout_s
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        self.headers = headers
        client = scope.get("client")
        self.client = client[0] if client else ""

    async def body(self) -> bytes:
        """The whole body. PayloadTooLarge past `[server].max_body_mb` (at once when Content-Length says so),
        RequestTimeout when it takes longer than `body_timeout_s`, ClientGone when the client left."""
        declared = self.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_body:
            raise self._too_large()
        parts: list[bytes] = []
        size = 0
        with trio.move_on_after(self._body_timeout_s) as waiting:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                part = message.get("body", b"")
                size += len(part)
                if size > self._max_body:
                    raise self._too_large()
                parts.append(part)
                if not message.get("more_body", False):
                    break
        if waiting.cancelled_caught:
            raise RequestTimeout("the request body did not arrive in time")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def discard_body(self) -> None:
        """Read the body to its end and drop it (a refused request's), giving up on one too large or too slow (the
        connection then closes instead)."""
        with trio.move_on_after(self._body_timeout_s):
            size = 0
            while True:
                message = await self._receive()
                size += len(message.get("body", b""))
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return
                if size > self._max_body:
                    return

    async def disconnected(self) -> None:
        """Returns when the client has gone (after the body was read: nothing else arrives on the connection)."""
        while (await self._receive())["type"] != "http.disconnect":
            pass

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"the request body is larger than the limit of {self._max_body} bytes")


def relay_routes(routes: Routes, other_routes: ASGIApp) -> ASGIApp:
    """The ASGI app: the relay routes served here, any other request passed to `other_routes`."""
    max_body, body_timeout_s = int(routes.server.max_body_mb * 1024 * 1024), routes.server.body_timeout_s

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        route = ROUTES.get(path)
        session = None
        if route is None and path.startswith("/v1/session/") and (match := _SESSION_ROUTE.match(path)):
            route, session = SESSION_ROUTE, match.group(1)
        if route is None:
            await other_routes(scope, receive, send)
            return
        incoming = Incoming(scope, receive, max_body, body_timeout_s)
        request_id = new_request_id(incoming.headers.get("x-request-id"))
        connection = scope.get(CONNECTION_KEY)
        if scope["method"] != "POST":
            error = MethodNotAllowed(f"method {echo(scope['method'])} is not allowed on {echo(path)}")
            await _send_whole(send, error.status, error_headers(error, request_id), error.body(), connection)
        elif session is not None and not SESSION_ID.fullmatch(session):
            error = BadRequest("a session id may use letters, digits and . _ : - (at most 128)", param="session_id")
            await _send_whole(send, error.status, error_headers(error, request_id), error.body(), connection)
        else:
            with trio.CancelScope() as serving:  # cancelled when the client leaves (once its body is read)
                try:
                    await _relay(routes, incoming, send, request_id, route, session, serving)
                finally:
                    if connection is not None:
                        connection.forget(serving)

    return app


async def _relay(
    routes: Routes,
    incoming: Incoming,
    send: Any,
    request_id: str,
    route: Route,
    session: str | None,
    serving: trio.CancelScope,
) -> None:
    """Serve one relayed request: authenticate, classify, hand it to the proxy, send its answer."""
    record = RequestRecord(
        request_id, route.endpoint, client=incoming.client, on_finish=routes.on_finish, commit=routes.commit
    )
    scope = incoming.scope
    # An operator's cancel (or the end of a shutdown) ends the queueing and forwarding, then the stream.
    connection: ClientConnection | None = scope.get(CONNECTION_KEY)
    entry = routes.active.add(record, trio.CancelScope(), connection)

    async def forget() -> None:
        routes.active.remove(entry)

    scope[CLEANUP_KEY].append(forget)
    tasks: trio.Nursery = scope[TASKS_KEY]
    headers = incoming.headers
    handling = entry.scope
    error: GatewayError | None = None  # what the client is answered instead of a reply
    logged = ""  # and what the log line says of it
    with handling:
        try:
            try:
                key = record.key = routes.keyring.authenticate(headers)
                key_class = key.klass if key else None
                record.klass = request_class(route.route_class, headers.get("x-priority"), routes.classes, key_class)
            except GatewayError:
                # Refused on its headers: the body is read and dropped (never held in memory for a caller
                # without a key), so the connection can carry the next request.
                await incoming.discard_body()
                raise
            record.session = session or _session_id(headers.get("x-session-id"))
            user = end_user(headers, routes.user_header)
            record.flow = request_flow(
                key_name=key.name if key else None, user=user, session=record.session, client=incoming.client
            )
            body = await incoming.body()
            _cancel_when_gone(incoming, serving, tasks)  # from now on a client leaving ends it
            reply = await routes.proxy.handle(record, body, headers, tool_mode=route.tool_mode, tasks=tasks)
        except GatewayError as exc:
            error, logged = exc, exc.message
        except ClientGone:
            record.finish(CLIENT_CLOSED, error="client disconnected")
            return
        except Exception:
            # A bug, not the client's doing: a 500 in the log and in usage, with the traceback to find it.
            log.exception("unexpected error", extra={"fields": {"rid": request_id}})
            error = InternalError(f"QueueGate failed to handle the request (request id {request_id})")
            logged = "unexpected error (see the traceback logged before)"
        except BaseException:
            if entry.stopped_with is None:  # else it is logged below with the error it was stopped with
                record.finish(CLIENT_CLOSED, error="client disconnected")
            raise
    if handling.cancelled_caught:
        error = entry.stopped_with or RequestCancelled("the request was cancelled by the operator")
        logged = error.message
    limits = routes.admission.key_limit_headers(record.key.name) if record.key is not None else {}
    if error is not None:
        await record.finish_before_last_byte(error.status, error=logged)
        headers = {**error_headers(error, request_id), **limits}
        await _send_whole(send, error.status, headers, error.body(), connection)
        return
    if isinstance(reply.body, bytes):
        await record.finish_before_last_byte(reply.status)
    else:
        scope[CLEANUP_KEY].append(reply.body.aclose)
        entry.body = reply.body  # from now on a stop ends the stream with an error event
        if entry.stopped_with is not None:  # stopped just as it was answered
            reply.body.stop(entry.stopped_with)
    await _send_reply(send, reply, request_id, limits, connection, scope.get("http_version", ""))


def _cancel_when_gone(incoming: Incoming, serving: trio.CancelScope, tasks: trio.Nursery) -> None:
    """Cancel `serving` when the client leaves: its HTTP/1.1 connection closing, or (HTTP/2) its stream ending,
    which a task waiting for the ASGI disconnect notices."""
    connection = incoming.scope.get(CONNECTION_KEY)
    if connection is not None and not incoming.scope.get("http_version", "1.1").startswith("2"):
        connection.cancel_when_gone(serving)
        return

    async def watch() -> None:
        await incoming.disconnected()
        serving.cancel()

    tasks.start_soon(watch)


def _session_id(supplied: str | None) -> str | None:
    """The client's X-Session-Id when it is a sane token (else none: the flow falls back to the client address)."""
    return supplied if supplied and SESSION_ID.fullmatch(supplied) else None


def _encoded(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


async def _send_reply(
    send: Any,
    reply: Reply,
    request_id: str,
    limits: dict[str, str],
    connection: ClientConnection | None,
    http_version: str,
) -> None:
    """The answer: whole, or streamed block by block as the relay hands them over."""
    headers = {**reply.headers, "x-request-id": request_id, **limits}
    if isinstance(reply.body, bytes):
        await _send_whole(send, reply.status, headers, reply.body, connection)
        return
    headers["x-accel-buffering"] = "no"  # tell nginx-style proxies not to buffer the stream
    await send({"type": "http.response.start", "status": reply.status, "headers": _encoded(headers)})
    if connection is not None and http_version == "1.1":  # (no Content-Length: the answer is chunked)
        async for block in reply.body:
            if block:
                await connection.send_chunk(block)
    else:
        async for block in reply.body:
            await send({"type": "http.response.body", "body": block, "more_body": True})
    await reply.body.aclose()  # (the upstream closed and the request logged before the answer's end goes out)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_whole(
    send: Any, status: int, headers: dict[str, str], body: bytes, connection: ClientConnection | None
) -> None:
    """A whole answer (a reply, or an error in OpenAI's envelope): its head and body in one write."""
    headers["content-length"] = str(len(body))
    if connection is not None:
        connection.send_head_with_body()
    await send({"type": "http.response.start", "status": status, "headers": _encoded(headers)})
    await send({"type": "http.response.body", "body": body, "more_body": False})
