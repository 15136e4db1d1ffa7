"""CORS for browser-side clients (Open WebUI's direct connections, LobeChat's client mode): off unless
`[server].cors_origins` names the origins that may call QueueGate from a page ("*": any).

A preflight (OPTIONS with Access-Control-Request-Method) from an allowed origin is answered 204 at once, before any
key check (browsers send no credentials with it); every answer to an allowed origin carries its
Access-Control-Allow-Origin and exposes the headers clients read (request id, Retry-After, rate limits). It wraps
every route (the relay routes and Quart's alike) as ASGI middleware.
"""

from __future__ import annotations

from typing import Any

from queuegate.api._lifetime import ASGIApp

ALLOWED_METHODS = b"GET, POST, DELETE, OPTIONS"
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
).encode()
PREFLIGHT_MAX_AGE_S = 600


def with_cors(app: ASGIApp, origins: list[str]) -> ASGIApp:
    """`app`, answering preflights and marking answers for `origins` (`app` itself when there are none)."""
    if not origins:
        return app
    allow_any = "*" in origins
    allowed = frozenset(origin.encode("latin-1") for origin in origins)

    async def cors(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # (names are lowercase in ASGI)
        origin = headers.get(b"origin")
        allowed_origin = None if origin is None else b"*" if allow_any else origin if origin in allowed else None
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            if allowed_origin is None:
                await _answer(send, 403, [])
                return
            asked = headers.get(b"access-control-request-headers") or b"authorization, content-type"
            preflight = [
                (b"access-control-allow-origin", allowed_origin),
                (b"access-control-allow-methods", ALLOWED_METHODS),
                (b"access-control-allow-headers", asked),
                (b"access-control-max-age", str(PREFLIGHT_MAX_AGE_S).encode()),
                (b"vary", b"Origin"),
            ]
            await _answer(send, 204, preflight)
            return
        if allowed_origin is None:
            await app(scope, receive, send)
            return
        marks = [
            (b"access-control-allow-origin", allowed_origin),
            (b"access-control-expose-headers", EXPOSED_HEADERS),
            (b"vary", b"Origin"),
        ]

        async def marked(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                kept = [(name, value) for name, value in message["headers"] if name.lower() != b"vary"]
                message = {**message, "headers": [*kept, *marks]}
            await send(message)

        await app(scope, receive, marked)

    return cors


async def _answer(send: Any, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [*headers, (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
