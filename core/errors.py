"""Errors the gateway returns, and the one function that turns them into HTTP.

    GatewayError                      status  type
    ├── InvalidRequest                400     invalid_request_error
    ├── AuthenticationFailed          401     authentication_error
    ├── PermissionDenied              403     permission_error
    ├── NotFound                      404     not_found_error (model_not_found for models)
    ├── MethodNotAllowed              405     invalid_request_error
    ├── Conflict                      409     conflict_error
    ├── RequestTimeout                408     invalid_request_error
    ├── PayloadTooLarge               413     invalid_request_error
    ├── Unprocessable                 422     invalid_request_error
    ├── RateLimited                   429     rate_limit_exceeded (+ Retry-After)
    ├── InternalError                 500     server_error
    ├── UpstreamError                 502     upstream_error (or the upstream's own status)
    │   └── UpstreamRedirect          502     upstream_error (code upstream_redirect)
    ├── ServiceUnavailable            503     service_unavailable
    └── UpstreamTimeout               504     timeout

Library exceptions are translated where the library is called; everything that leaves a handler
is a GatewayError, and `error_body` renders OpenAI's shape:
`{"error": {"message", "type", "code", "param"}}`. A message quotes at most `clip()` of what a
client sent, so an error never grows with the request.
"""

from __future__ import annotations

import orjson

# What an error message may quote of a client's input (a model name, an id, a field name).
CLIENT_TEXT_MAX = 256
# What a client sees of an upstream's 4xx message (a 5xx message is never relayed).
UPSTREAM_MESSAGE_MAX = 1024


def clip(text: str, limit: int = CLIENT_TEXT_MAX) -> str:
    """`text` cut to `limit` characters (marked with an ellipsis), for quoting in a message."""
    return text if len(text) <= limit else text[:limit] + "…"


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    # Whether another attempt (a retry, or the next failover target) may succeed.
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        status: int | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.param = param
        if retryable is not None:
            self.retryable = retryable
        self.headers: dict[str, str] = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(GatewayError):
    status = 409
    type = "conflict_error"
    code = "conflict"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Unprocessable(GatewayError):
    status = 422
    type = "invalid_request_error"
    code = "invalid_body"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class InternalError(GatewayError):
    status = 500
    type = "server_error"
    code = "internal_error"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class UpstreamRedirect(UpstreamError):
    """The upstream answered 3xx. It is never followed: a redirect would re-send the prompt
    (and the target's credentials) to an origin the admin never configured."""

    code = "upstream_redirect"
    retryable = True


class ServiceUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "timeout"
    code = "upstream_timeout"


def error_body(
    message: str, type: str, code: str | None = None, param: str | None = None
) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "code": code, "param": param}})
