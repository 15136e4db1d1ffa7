"""Small pieces every route uses: request ids, JSON answers and errors in OpenAI's envelope."""

from __future__ import annotations

import re
import secrets
from typing import Any

import msgspec
from quart import Response

from queuegate.errors import GatewayError

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def request_id(supplied: str | None) -> str:
    """The client's X-Request-Id when it is a sane token, else a fresh one."""
    if supplied and _REQUEST_ID.match(supplied):
        return supplied
    return "qg-" + secrets.token_hex(8)


def error_headers(error: GatewayError, request_id: str) -> dict[str, str]:
    """The headers of an error answer (its envelope's type, the request id, Retry-After when waiting helps)."""
    return {"content-type": "application/json", "x-request-id": request_id, **error.headers()}


def error_response(error: GatewayError, request_id: str) -> Response:
    return Response(error.body(), status=error.status, headers=error_headers(error, request_id))


def json_response(doc: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(doc), status=status, headers={"content-type": "application/json"})
