"""HTTP errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, shared by
every route of the server, and the mapping from parrot-core's typed errors to statuses."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel

from parrot_core.errors import EngineUnavailableError, InvalidRequestError, NotFoundError, OutOfBlocksError, RuntimeClosedError

log = logging.getLogger(__name__)


_ERROR_KIND = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "too_many_requests"),
    500: ("server_error", None),
    503: ("service_unavailable", None),
}


class APIError(Exception):
    """An HTTP error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        kind, default_code = _ERROR_KIND.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
        self.status = status
        self.message = message
        self.type = kind
        self.param = param
        self.code = code or default_code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error_from(exc: BaseException) -> APIError:
    """The HTTP error for an exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc))
    if isinstance(exc, NotFoundError):
        return APIError(404, str(exc))
    if isinstance(exc, RuntimeClosedError):
        return APIError(503, "the server is shutting down")
    if isinstance(exc, (OutOfBlocksError, EngineUnavailableError)):
        return APIError(503, f"{exc}; retry later", headers={"Retry-After": "1"})
    log.error("request failed", exc_info=exc)
    return APIError(500, "internal server error (see the server log)")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": kind} for status, (kind, _) in _ERROR_KIND.items() if status != 405
}
# Before OpenAPI 3.2 an event stream's `schema` describes one event (what tools such as
# schemathesis check each event against): `data:` holds a JSON chunk, an error, or `[DONE]`.
_SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}}, "description": "JSON, or SSE when stream=true"}
}


