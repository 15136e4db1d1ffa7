"""CORS for browser-side clients (Open WebUI's direct connections, LobeChat's client mode): off unless
`[server].cors_origins` names the origins that may call QueueGate from a page ("*": any).

A preflight (OPTIONS with Access-Control-Request-Method) from an allowed origin is answered 204 at once, before any
key check (browsers send no credentials with it); every answer to an allowed origin carries its
Access-Control-Allow-Origin and exposes the headers clients read (request id, Retry-After, rate limits).
"""

from __future__ import annotations

from quart import Response, request
from quart_trio import QuartTrio

ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
EXPOSED_HEADERS = ", ".join(
    (
        "x-request-id",
        "retry-after",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    )
)
PREFLIGHT_MAX_AGE_S = 600


def add_cors(app: QuartTrio, origins: list[str]) -> None:
    """Answer preflights and mark answers for `origins` (nothing at all when empty)."""
    if not origins:
        return
    allow_any = "*" in origins
    allowed = frozenset(origins)

    def allowed_origin() -> str | None:
        origin = request.headers.get("origin")
        if origin is None:
            return None
        return "*" if allow_any else origin if origin in allowed else None

    @app.before_request
    async def preflight() -> Response | None:
        if request.method != "OPTIONS" or "access-control-request-method" not in request.headers:
            return None
        origin = allowed_origin()
        if origin is None:
            return Response(b"", status=403)
        asked = request.headers.get("access-control-request-headers", "")
        headers = {
            "access-control-allow-origin": origin,
            "access-control-allow-methods": ALLOWED_METHODS,
            "access-control-allow-headers": asked or "authorization, content-type",
            "access-control-max-age": str(PREFLIGHT_MAX_AGE_S),
            "vary": "Origin",
        }
        return Response(b"", status=204, headers=headers)

    @app.after_request
    async def mark(response: Response) -> Response:
        origin = allowed_origin()
        if origin is not None:
            response.headers["access-control-allow-origin"] = origin
            response.headers["access-control-expose-headers"] = EXPOSED_HEADERS
            response.headers["vary"] = "Origin"
        return response
