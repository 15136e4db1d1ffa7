"""HTTP routes: the OpenAI-compatible `/v1/*` API, usage (`/v1/usage`, `/sessions/status`), `/healthz`, `/readyz`
and `/metrics` (Prometheus).

Routes only translate between HTTP and the proxy; every error leaves as OpenAI's envelope. Quart's own 60 s
response timeout is disabled (it would cut long streams); QueueGate's upstream timeouts apply instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from queuegate.accounting import UsageQuery, UsageStore, sessions_status, usage_report
from queuegate.accounting.keys import KeyRing, NodeKeyRing
from queuegate.api._http import error_response as _error_response
from queuegate.api._http import json_response as _json
from queuegate.api._http import request_id as _request_id
from queuegate.api.batches import add_batch_routes, upload_request_class
from queuegate.api.cors import add_cors
from queuegate.api.server import CONNECTION_KEY
from queuegate.batches.service import BatchService
from queuegate.config import ServerConfig
from queuegate.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    InternalError,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
)
from queuegate.fleet.catalog import Catalog, ModelSpec
from queuegate.fleet.manager import Fleet
from queuegate.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from queuegate.metrics import Metrics
from queuegate.nodes.registry import NodeRegistry, Registration
from queuegate.proxy import (
    CLIENT_CLOSED,
    ActiveRequests,
    Proxy,
    Reply,
    RequestCancelled,
    RequestRecord,
    echo,
    end_user,
    request_class,
    request_flow,
)
from queuegate.scheduler import Admission
from queuegate.statistics import ModelView, model_views

log = logging.getLogger("queuegate.api")
_SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CLEANUP_KEY = "queuegate.cleanup"
TASKS_KEY = "queuegate.tasks"  # the request's own nursery: a streamed tool loop runs there, and ends with it
USAGE_FLUSH_WAIT_S = 2.0  # a usage read first waits this long at most for rows not yet committed

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class InFlight:
    """Counts HTTP requests being served, so a graceful shutdown knows when the last one has finished."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = trio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        if self.count == 1:
            self._idle = trio.Event()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


@dataclass(frozen=True, slots=True)
class Routes:
    """What the routes need from the daemon, built by the composition root. `on_finish` takes note of every
    finished request (metrics, usage); `commit` is durable usage's wait for a request's row (None: batched)."""

    server: ServerConfig
    catalog: Catalog
    admission: Admission
    fleet: Fleet
    proxy: Proxy
    active: ActiveRequests
    keyring: KeyRing
    node_keys: NodeKeyRing
    nodes: NodeRegistry
    metrics: Metrics
    in_flight: InFlight
    classes: Sequence[str]
    usage: UsageStore | None
    on_finish: Callable[[RequestRecord, int], None]
    commit: Callable[[], Awaitable[None]] | None
    batches: BatchService | None = None  # the Files and Batches APIs ([batches].enabled)
    user_header: str = ""  # [queue].user_header: the end user behind a shared client, a flow of its own


def create_app(routes: Routes) -> ASGIApp:
    """Build the ASGI application for one daemon (no module-level app: each daemon gets its own). Routes only
    translate between HTTP and the daemon's components."""
    app = QuartTrio("queuegate")
    app.config.update(
        RESPONSE_TIMEOUT=None,
        BODY_TIMEOUT=routes.server.body_timeout_s,
        MAX_CONTENT_LENGTH=int(routes.server.max_body_mb * 1024 * 1024),
        PROVIDE_AUTOMATIC_OPTIONS=False,
    )
    created = int(time.time())
    add_cors(app, routes.server.cors_origins)
    if routes.batches is not None:
        app.request_class = upload_request_class(int(routes.batches.config.max_file_mb * 2**20))
        add_batch_routes(app, routes.keyring, routes.batches, _read_body)

    def _with_limits(response: Response, record: RequestRecord) -> Response:
        """The answer, with its key's rate-limit headers when the key has limits."""
        if record.key is not None:
            response.headers.update(routes.admission.key_limit_headers(record.key.name))
        return response

    async def relay(
        endpoint: str, route_class: str = "user", session: str | None = None, tool_mode: str | None = None
    ) -> Response:
        request_id = _request_id(request.headers.get("x-request-id"))
        client = request.remote_addr or ""
        record = RequestRecord(request_id, endpoint, client=client, on_finish=routes.on_finish, commit=routes.commit)
        # An operator's cancel (or the end of a shutdown) ends the queueing and forwarding, then the stream.
        entry = routes.active.add(record, trio.CancelScope(), request.scope.get(CONNECTION_KEY))

        async def forget() -> None:
            routes.active.remove(entry)

        request.scope[CLEANUP_KEY].append(forget)
        handling = entry.scope
        error: GatewayError | None = None  # what the client is answered instead of a reply
        logged = ""  # and what the log line says of it
        with handling:
            try:
                try:
                    key = record.key = routes.keyring.authenticate(request.headers)
                    key_class = key.klass if key else None
                    record.klass = request_class(
                        route_class, request.headers.get("x-priority"), routes.classes, key_class
                    )
                except GatewayError:
                    # Refused on its headers: the body is read and dropped (never held in memory for a caller
                    # without a key), so the connection can carry the next request.
                    await _discard_body(routes.server.body_timeout_s)
                    raise
                record.session = session or _session_id(request.headers.get("x-session-id"))
                user = end_user(request.headers, routes.user_header)
                record.flow = request_flow(
                    key_name=key.name if key else None, user=user, session=record.session, client=client
                )
                reply = await routes.proxy.handle(
                    record, await _read_body(), request.headers, tool_mode=tool_mode, tasks=request.scope[TASKS_KEY]
                )
            except GatewayError as exc:
                error, logged = exc, exc.message
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
        if error is not None:
            await record.finish_before_last_byte(error.status, error=logged)
            return _with_limits(_error_response(error, request_id), record)
        if isinstance(reply.body, bytes):
            await record.finish_before_last_byte(reply.status)
        else:
            request.scope[CLEANUP_KEY].append(reply.body.aclose)
            entry.body = reply.body  # from now on a stop ends the stream with an error event
            if entry.stopped_with is not None:  # stopped just as it was answered
                reply.body.stop(entry.stopped_with)
        return _with_limits(_response(reply, request_id), record)

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        return await relay("chat")

    @app.post("/v1/chat/completions_passthrough")
    async def chat_completions_passthrough() -> Response:
        # Same scheduling; tool calls always go back to the client (QueueGate runs no tools on this route).
        return await relay("chat", tool_mode="passthrough")

    @app.post("/v1/agent/chat/completions")
    async def agent_chat_completions() -> Response:
        return await relay("chat", "agent", tool_mode="execute")

    @app.post("/v1/session/<session_id>/chat/completions")
    async def session_chat_completions(session_id: str) -> Response:
        # The session named in the path (as `X-Session-Id` on the other routes) is the request's flow.
        if not _SESSION_ID.match(session_id):
            error = BadRequest("a session id may use letters, digits and . _ : - (at most 128)", param="session_id")
            return _error_response(error, _request_id(request.headers.get("x-request-id")))
        return await relay("chat", session=session_id)

    @app.post("/v1/completions")
    async def completions() -> Response:
        return await relay("completions")

    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        return await relay("embeddings")

    @app.post("/v1/responses")
    async def responses() -> Response:
        """OpenAI's Responses API, passed through to models whose servers serve it (scheduled, counted)."""
        return await relay("responses")

    @app.post("/v1/messages")
    async def messages() -> Response:
        """Anthropic's Messages API, passed through the same way."""
        return await relay("messages")

    def models_now() -> dict[str, ModelView]:
        return {
            view.name: view
            for view in model_views(routes.admission.statistics(), routes.fleet.statistics(), routes.nodes.statistics())
        }

    def model_entry(name: str, spec: ModelSpec, view: ModelView | None) -> dict[str, Any]:
        """A model (or alias) as /v1/models lists it; `state` "unavailable" (with the `reason`) when it is neither
        usable now nor loadable on demand."""
        if view is None or view.state in ("down", "failed"):
            reason = view.reason if view is not None else "no upstream now"
            return {"id": name, "object": "model", "state": "unavailable", "reason": reason}
        entry: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": routes.server.owned_by,
            "loaded": view.loaded,
            "state": view.state,
        }
        if name != spec.name:
            entry["alias_for"] = spec.name
        return entry

    @app.get("/v1/models")
    async def list_models() -> Response:
        try:
            key = routes.keyring.authenticate(request.headers)
        except GatewayError as exc:
            return _error_response(exc, _request_id(request.headers.get("x-request-id")))
        views = models_now()
        data = []
        unavailable = []
        for name in routes.catalog.public_names():
            spec = routes.catalog.resolve(name)
            assert spec is not None
            if key is not None and not key.may_use(spec.name):
                continue
            entry = model_entry(name, spec, views.get(spec.name))
            (unavailable if entry["state"] == "unavailable" else data).append(entry)
        return _json({"object": "list", "data": data, "unavailable": unavailable})

    @app.get("/v1/models/<path:model_id>")
    async def retrieve_model(model_id: str) -> Response:
        """One model or alias (`client.models.retrieve`); one the key may not use is as unknown as a missing one."""
        request_id = _request_id(request.headers.get("x-request-id"))
        try:
            key = routes.keyring.authenticate(request.headers)
            spec = routes.catalog.resolve(model_id)
            if spec is None or (key is not None and not key.may_use(spec.name)):
                raise ModelNotFound(f"The model {echo(model_id)!r} does not exist or you do not have access to it.",
                                    param="model")  # fmt: skip
        except GatewayError as exc:
            return _error_response(exc, request_id)
        return _json(model_entry(model_id, spec, models_now().get(spec.name)))

    async def usage_view(report: Callable[[Path, UsageQuery], dict[str, Any]]) -> Response:
        """Run a usage report for the caller: a key sees its own usage only, unless it is a usage admin."""
        request_id = _request_id(request.headers.get("x-request-id"))
        try:
            key = routes.keyring.authenticate(request.headers)
            if routes.usage is None:
                raise NotFound("usage accounting is off in this gateway's config ([usage] enabled = false)")
            query = UsageQuery.from_params(request.args, routes.usage.timezone)
            if key is not None and not key.usage_admin:
                if query.key not in (None, key.name):
                    raise Forbidden(f"key {key.name!r} may only read its own usage", param="key")
                query = dataclasses.replace(query, key=key.name)
            with trio.move_on_after(USAGE_FLUSH_WAIT_S):
                await routes.usage.flush()  # requests that just ended are counted
            try:
                doc = await trio.to_thread.run_sync(report, routes.usage.path, query)
            except sqlite3.Error as exc:
                raise ServiceUnavailable(f"the usage database cannot be read: {exc}") from None
        except GatewayError as exc:
            return _error_response(exc, request_id)
        return _json(doc)

    @app.get("/v1/usage")
    async def usage_totals() -> Response:
        return await usage_view(usage_report)

    @app.get("/sessions/status")
    async def usage_by_session() -> Response:
        return await usage_view(sessions_status)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(routes.metrics.render(), headers={"content-type": METRICS_CONTENT_TYPE})

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.post("/v1/nodes/register")
    async def register_node() -> Response:
        """A node registers the models it serves, or sends its heartbeat (the same request again)."""
        request_id = _request_id(request.headers.get("x-request-id"))
        try:
            key = routes.node_keys.authenticate(request.headers)
            try:
                registration = msgspec.json.decode(await _read_body(), type=Registration)
            except msgspec.DecodeError as exc:
                raise BadRequest(f"not a node registration: {exc}") from None
            answer = await routes.nodes.register(key, request.remote_addr or "", registration)
        except GatewayError as exc:
            fields = {"rid": request_id, "client": request.remote_addr, "status": exc.status, "error": exc.message}
            log.warning("node registration refused", extra={"fields": fields})
            return _error_response(exc, request_id)
        return _json(answer)

    @app.delete("/v1/nodes/<name>")
    async def deregister_node(name: str) -> Response:
        """A node leaves (it is shutting down): its upstreams go now, not when it turns stale."""
        request_id = _request_id(request.headers.get("x-request-id"))
        try:
            key = routes.node_keys.authenticate(request.headers)
            try:
                routes.nodes.deregister(key, name)
            except KeyError:
                raise NotFound(f"no node {echo(name)!r} is registered", param="name") from None
        except GatewayError as exc:
            return _error_response(exc, request_id)
        return _json({"node": name, "deleted": True})

    @app.get("/readyz")
    async def readyz() -> Response:
        """Ready when some model can take requests: loaded, or managed and loadable on demand. Each model's state
        and why it cannot serve (which names upstreams and their errors) is for callers with a key, or anybody on
        an open gateway; an anonymous probe of a gateway with keys gets the verdict and the counts."""
        try:
            key = routes.keyring.authenticate(request.headers)
            detailed = True
        except GatewayError:
            key, detailed = None, False
        models = []
        for view in models_now().values():
            entry: dict[str, Any] = {"name": view.name, "ready": view.available, "loaded": view.loaded}
            if not view.loaded:
                entry["reason"] = view.reason
            models.append(entry)
        ok = any(m["ready"] for m in models)
        status = 200 if ok else 503
        if not detailed:
            ready = sum(m["ready"] for m in models)
            return _json({"ready": ok, "models_ready": ready, "models": len(models)}, status=status)
        visible = [m for m in models if key is None or key.may_use(m["name"])]
        doc: dict[str, Any] = {"ready": ok, "models": visible}
        if routes.proxy.tools is not None and routes.proxy.tools.servers.configured:
            # Tool servers do not decide readiness (a model answers without them), but a caller should see them.
            servers = routes.proxy.tools.servers.statistics()
            doc["tool_servers"] = [
                {"name": s.name, "up": s.up, "tools": len(s.tools), "error": s.error} for s in servers
            ]
        return _json(doc, status=status)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        return _error_response(_from_http_exception(exc), _request_id(request.headers.get("x-request-id")))

    return _with_request_lifetime(app, routes.in_flight)


async def _discard_body(timeout_s: float) -> None:
    """Read the request body to its end and drop it, a chunk at a time; give up on a body too large or too slow
    (the connection then closes instead)."""
    with trio.move_on_after(timeout_s), contextlib.suppress(HTTPException):
        async for _ in request.body:
            pass


async def _read_body() -> bytes:
    try:
        return await request.get_data(cache=False)
    except HTTPException as exc:
        raise _from_http_exception(exc) from None


def _from_http_exception(exc: HTTPException) -> GatewayError:
    """Werkzeug's errors (unknown route, wrong method, body too large or too slow) in OpenAI's terms."""
    code = exc.code or 500
    if code == 404:
        return NotFound(f"no route for {echo(request.method)} {echo(request.path)}")
    if code == 405:
        return MethodNotAllowed(f"method {echo(request.method)} is not allowed on {echo(request.path)}")
    if code == 413:
        limit = request.max_content_length or 0
        return PayloadTooLarge(f"the request body is larger than the limit of {limit} bytes")
    if code == 408:
        return RequestTimeout("the request body did not arrive in time")
    return GatewayError(exc.description or exc.name, status=code)


def _session_id(supplied: str | None) -> str | None:
    """The client's X-Session-Id when it is a sane token (else none: the flow falls back to the client address)."""
    return supplied if supplied and _SESSION_ID.match(supplied) else None


def _response(reply: Reply, request_id: str) -> Response:
    headers = {**reply.headers, "x-request-id": request_id}
    if not isinstance(reply.body, bytes):
        headers["x-accel-buffering"] = "no"  # tell nginx-style proxies not to buffer the stream
    return Response(reply.body, status=reply.status, headers=headers)


def _with_request_lifetime(app: ASGIApp, in_flight: InFlight) -> ASGIApp:
    """Count each HTTP request while it runs, give it a nursery of its own (a streamed tool loop runs there, and
    is cancelled when the request ends, however it ends), and run its cleanups (close upstream, free slot) then.

    Quart closes a streamed body only if it started sending it; a client that vanishes between the handler's
    return and the first byte would otherwise leak the upstream connection and the scheduler slot.
    """

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        cleanups: list[Callable[[], Awaitable[None]]] = []
        scope[CLEANUP_KEY] = cleanups

        async def send_the_end_whole(message: dict[str, Any]) -> None:
            # hypercorn finishes the exchange inside the last send (closing a `Connection: close` or HTTP/1.0
            # connection, or arming the keep-alive timeout) and tells the app `http.disconnect` on the way, which
            # makes quart-trio cancel the very task doing it. Shielded, the last send completes (it is bounded by
            # the connection's write timeout).
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        in_flight.enter()
        try:
            async with trio.open_nursery() as tasks:
                scope[TASKS_KEY] = tasks
                try:
                    await app(scope, receive, send_the_end_whole)
                finally:
                    tasks.cancel_scope.cancel()
        finally:
            if cleanups:
                with trio.CancelScope(shield=True):
                    for cleanup in cleanups:
                        await cleanup()
            in_flight.leave()

    return asgi
