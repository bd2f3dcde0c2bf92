"""`create_app(runtime, settings)`: the FastAPI app of `parrot-core serve`.

Routes: the OpenAI-compatible ones (`openai_api.py`), suspendable generations
(`generations_api.py`), chat sessions (`chat_api.py`), Parrot's
program API (`program_api.py`) plus operations: `GET /health` (503 until
a runtime is attached, and once it is closed), `GET /metrics` (Prometheus text),
`POST /flush_cache` (forget cached, unreferenced prefixes) and `GET /version`.

Every error is answered in OpenAI's shape. A request that fails validation is a 400 (never
FastAPI's 422); an unexpected exception in one request is a 500 and the server keeps serving.
A request body over `settings.max_request_body_bytes` is a 413. While the server drains for
shutdown (`ServeState.draining`), every route that needs the runtime answers 503.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parrot_core.errors import ParrotError, RuntimeClosedError
from parrot_core.frontend.runtime import Runtime
from parrot_core.server import chat_api, generations_api, openai_api, program_api
from parrot_core.server.metrics import CONTENT_TYPE, ServeMetrics, runtime_snapshot
from parrot_core.server.http_errors import ERROR_RESPONSES, APIError, api_error_from
from parrot_core.server.openai_api import check_api_key, get_state
from parrot_core.server.settings import ServeSettings

log = logging.getLogger(__name__)


class ServeState:
    """What the routes share: the runtime (None while loading), settings, metrics, the
    admission count and the shutdown state. Only touched from the server's event loop, except
    `snapshot()`."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.runtime: Runtime | None = None
        self.created = int(time.time())
        self.in_flight = 0  # admitted sequences not finished yet
        self.requests_started = 0  # generation requests ever admitted
        self.draining = False  # shutting down: no new work is admitted
        self._abort_hooks: set[Callable[[APIError], None]] = set()
        self.metrics = ServeMetrics(self.snapshot, lambda: self.served_model_name)

    def attach(self, runtime: Runtime) -> None:
        self.runtime = runtime
        runtime.switching.configure(
            max_suspended=self.settings.max_suspended_generations, max_age=self.settings.suspended_generation_ttl
        )

    @property
    def served_model_name(self) -> str:
        if self.settings.served_model_name:
            return self.settings.served_model_name
        return self.runtime.engine.model_name if self.runtime is not None else "unknown"

    def require_runtime(self) -> Runtime:
        rt = self.runtime
        if rt is None:
            raise APIError(503, "the model is still loading", headers={"Retry-After": "1"})
        if self.draining or rt.closed or all(getattr(e, "closed", False) for e in rt.core.engines.values()):
            raise APIError(503, "the server is shutting down")
        return rt

    def on_abort(self, hook: Callable[[APIError], None]) -> Callable[[], None]:
        """Register `hook`, which `abort_all` calls with the error that ends the request
        waiting on it; returns the unregister function (call it once the request is over)."""
        self._abort_hooks.add(hook)
        return lambda: self._abort_hooks.discard(hook)

    def abort_all(self, error: APIError) -> int:
        """End every request that registered with `on_abort` with `error`; how many."""
        hooks = list(self._abort_hooks)
        self._abort_hooks.clear()
        for hook in hooks:
            hook(error)
        return len(hooks)

    @property
    def busy(self) -> bool:
        """Whether any request is still admitted or waiting on the runtime."""
        return self.in_flight > 0 or bool(self._abort_hooks)

    def check_model(self, model: str | None) -> None:
        """A request may leave `model` out; if given it must be the served name."""
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def check_api_key(self, authorization: str | None) -> None:
        key = self.settings.api_key
        if not key:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key; send `Authorization: Bearer <key>`.", headers={"WWW-Authenticate": "Bearer"})

    def admit(self, sequences: int) -> Callable[[], None]:
        """Count `sequences` in flight, or raise: 400 if more than could ever be admitted at
        once, 429 (with Retry-After) if the bound is reached now. Returns an idempotent release."""
        rt = self.require_runtime()
        limit = rt.max_num_seqs + self.settings.max_waiting_requests
        if sequences > limit:
            raise APIError(400, f"this request has {sequences} sequences; the server admits at most {limit} at once", param="n")
        if self.in_flight + sequences > limit:
            raise APIError(429, f"the server is busy ({self.in_flight} sequences in flight); retry later", headers={"Retry-After": "1"})
        self.in_flight += sequences
        self.requests_started += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= sequences

        return release

    def snapshot(self) -> dict[str, float] | None:
        """`runtime_snapshot` of the runtime, or None without a live one. Blocking."""
        rt = self.runtime
        if rt is None or rt.closed:
            return None
        try:
            return runtime_snapshot(rt)
        except RuntimeClosedError:
            return None


class FlushCacheResponse(BaseModel):
    flushed_blocks: int


class HealthResponse(BaseModel):
    status: str


class VersionResponse(BaseModel):
    version: str


ops = APIRouter(responses=ERROR_RESPONSES)


@ops.get("/health", response_model=HealthResponse)
async def health(request: Request) -> HealthResponse:
    get_state(request).require_runtime()
    return HealthResponse(status="ok")


@ops.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(request: Request) -> Response:  # sync: scraping blocks on the runtime's loop
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE)


@ops.post("/flush_cache", response_model=FlushCacheResponse, dependencies=[Depends(check_api_key)])
def flush_cache(request: Request) -> FlushCacheResponse:
    """Forget the prefixes held by free KV blocks; in-use KV is untouched."""
    rt = get_state(request).require_runtime()
    return FlushCacheResponse(flushed_blocks=rt.flush_cache())


@ops.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    from parrot_core import __version__

    return VersionResponse(version=__version__)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = list(exc.errors())
    for err in errors:
        if tuple(err.get("loc", ())) == ("body",) and err.get("type") in ("missing", "model_attributes_type", "dict_type"):
            return "the request body must be a JSON object", None
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', 'parse error')}", None
    parts, param = [], None
    for err in errors[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        param = param or where or None
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    if len(errors) > 3:
        parts.append(f"... {len(errors) - 3} more")
    return "; ".join(parts) or "invalid request", param


async def _on_api_error(_: Request, exc: Exception) -> JSONResponse:
    return _error_response(api_error_from(exc))


async def _on_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = _validation_message(exc)
    return _error_response(APIError(400, message, param=param))


async def _on_http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return _error_response(APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})))


class _InternalErrors:
    """Turns an exception no handler took into a 500 in OpenAI's shape, without re-raising
    (Starlette's own handler re-raises, which kills in-process clients and logs twice)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await _error_response(APIError(500, "internal server error (see the server log)"))(scope, receive, send)


class _BodyLimit:
    """413 for a request body over `limit` bytes. A Content-Length over it is refused before
    any of the body is read; a body without one (chunked) is read up to the limit, then
    handed on whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit():  # the ASGI server holds the client to it
            if int(declared) > self.limit:
                await self._refuse(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        body, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            body.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # only the disconnect is left
            replayed = True
            return {"type": "http.request", "body": b"".join(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is larger than this server's limit of {self.limit} bytes (--max-request-body-bytes)"
        await _error_response(APIError(413, message))(scope, receive, send)


def create_app(runtime: Runtime | None = None, settings: ServeSettings | None = None) -> FastAPI:
    """The app over `runtime`; without one, `/health` and the API answer 503 until
    `app.state.serve.attach(runtime)`. The app never closes the runtime."""
    from parrot_core import __version__

    state = ServeState(settings or ServeSettings())
    if runtime is not None:
        state.attach(runtime)
    app = FastAPI(
        title="parrot-core",
        version=__version__,
        description="OpenAI-compatible serving over a prefix-sharing LLM core.",
    )
    app.state.serve = state
    app.state.program_sessions = program_api.ProgramSessions()
    app.state.chat_sessions = chat_api.ChatSessions(state.settings.max_prompt_cache_keys, state.settings.max_chat_sessions)
    handlers: dict[Any, Any] = {
        APIError: _on_api_error,
        ParrotError: _on_api_error,
        RequestValidationError: _on_validation_error,
        StarletteHTTPException: _on_http_error,
    }
    for exc_type, handler in handlers.items():
        app.add_exception_handler(exc_type, handler)
    app.include_router(openai_api.router)
    app.include_router(chat_api.router)
    app.include_router(generations_api.router)
    app.include_router(program_api.router)
    app.include_router(ops)
    app.add_middleware(_InternalErrors)
    app.add_middleware(_BodyLimit, limit=state.settings.max_request_body_bytes)
    return app
