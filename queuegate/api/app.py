"""The HTTP application: the relay routes (`relay.py`: chat, completions, embeddings, responses, messages, served
as plain ASGI) and, in Quart, every other route: models, usage (`/v1/usage`, `/sessions/status`), nodes, files and
batches, `/healthz`, `/readyz` and `/metrics` (Prometheus).

Routes only translate between HTTP and the daemon's components; every error leaves as OpenAI's envelope. Quart's own
60 s response timeout is disabled; QueueGate's upstream timeouts apply instead.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from queuegate.accounting import UsageQuery, sessions_status, usage_report
from queuegate.api._http import error_response as _error_response
from queuegate.api._http import json_response as _json
from queuegate.api._http import request_id as _request_id
from queuegate.api._lifetime import ASGIApp, with_request_lifetime
from queuegate.api._routes import Routes
from queuegate.api.batches import add_batch_routes, upload_request_class
from queuegate.api.cors import with_cors
from queuegate.api.relay import relay_routes
from queuegate.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
)
from queuegate.fleet.catalog import ModelSpec
from queuegate.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from queuegate.nodes.registry import Registration
from queuegate.proxy import (
    echo,
)
from queuegate.statistics import ModelView, model_views

log = logging.getLogger("queuegate.api")
USAGE_FLUSH_WAIT_S = 2.0  # a usage read first waits this long at most for rows not yet committed


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
    if routes.batches is not None:
        app.request_class = upload_request_class(int(routes.batches.config.max_file_mb * 2**20))
        add_batch_routes(app, routes.keyring, routes.batches, _read_body)

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

    served = with_request_lifetime(relay_routes(routes, app), routes.in_flight)
    return with_cors(served, routes.server.cors_origins)


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
