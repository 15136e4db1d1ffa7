"""Domain errors and their OpenAI error envelope.

Every failure a client can see is a `GatewayError`: one place decides its HTTP status, OpenAI `type`/`code`,
and headers such as `Retry-After`, so routes, the scheduler and the forwarder never build responses themselves.
"""

from __future__ import annotations

import math

import msgspec


class GatewayError(Exception):
    """An error answered to the client in OpenAI's envelope `{"error": {message, type, param, code}}`."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s

    def envelope(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return msgspec.json.encode(self.envelope())

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None or not math.isfinite(self.retry_after_s):
            return {}
        # Retry-After takes whole seconds; never advertise 0, which invites a hot retry loop.
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


class InternalError(GatewayError):
    """A failure inside QueueGate itself (a bug): logged with its traceback, answered 500, counted as an error."""

    status = 500
    type = "server_error"
    code = "internal_error"


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class QueueFull(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class NotSupported(GatewayError):
    status = 501
    type = "invalid_request_error"
    code = "unsupported_endpoint"


class BadHttp(GatewayError):
    """A request the HTTP layer could not read (bad framing, headers too large); the status says which."""

    type = "invalid_request_error"
    code = "bad_http"


class HttpVersionNotSupported(GatewayError):
    status = 505
    type = "invalid_request_error"
    code = "http_version_not_supported"


class UpstreamError(GatewayError):
    """The upstream failed (connect error, 5xx, garbage) and no other upstream could take the request."""

    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"


def leaf_exceptions(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, as trio's nurseries wrap them; others as themselves."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaf_exceptions(inner)]
    return [error]
