"""Parrot's program API: sessions, semantic calls and semantic variables over HTTP.

    POST   /v1/session                   -> {session_id, session_auth}
    DELETE /v1/session/{id}
    POST   /v1/semantic_call             -> {request_id, outputs: {name: var_id}}
    POST   /v1/semantic_var              -> {var_id}          (declare, optionally set)
    POST   /v1/semantic_var/{id}                              (set, or fail with an error)
    GET    /v1/semantic_var/{id}?session_id=...&criteria=latency&timeout=...  -> {var_id, content}

Every session call carries the session's token in the `X-Session-Token` header (401
otherwise). Variable ids are namespaced by session, so a session can never name another
session's variables: they are 404 there. A variable whose producer failed answers 424 with
the failure's message. The core lives on the runtime's loop; handlers hop onto it.

A GET whose client goes away stops waiting (so its session can expire); a session the core
expires loses its token with it (`forget_removed_sessions`, run periodically by the server).
An output whose `max_tokens` can never fit the model's context is a 400 at submission.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from parrot_core.errors import InvalidRequestError, ParrotError, UnknownSessionError
from parrot_core.graph import Parameter, PerfCriteria, RequestMetadata
from parrot_core.serve.executor import output_sampling
from parrot_core.server.http_errors import ERROR_RESPONSES, APIError
from parrot_core.server.openai_api import check_api_key, get_state, unless_disconnected

if TYPE_CHECKING:
    from parrot_core.frontend.runtime import Runtime

T = TypeVar("T")
SESSION_HEADER = "x-session-token"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionResponse(_Strict):
    session_id: str
    session_auth: str


class ParameterSpec(_Strict):
    name: str = Field(min_length=1)
    is_output: bool = False
    var_id: str | None = None
    value: str | None = None
    sampling_config: dict[str, Any] | None = None


class CallMetadata(_Strict):
    cache_prefix: bool = True
    fuse_fill: bool = False
    criteria: Literal["latency", "throughput"] | None = None
    models: list[str] = Field(default_factory=list)


class SemanticCallRequest(_Strict):
    session_id: str
    template: str
    parameters: list[ParameterSpec]
    literals: dict[str, str] = Field(default_factory=dict)
    metadata: CallMetadata = Field(default_factory=CallMetadata)


class SemanticCallResponse(_Strict):
    request_id: str
    outputs: dict[str, str]


class NewVariableRequest(_Strict):
    session_id: str
    name: str = ""
    content: str | None = None


class SetVariableRequest(_Strict):
    """Exactly one of `content` (the value) or `error` (the producer failed: fails the
    variable and everything downstream, e.g. a client-side native function that raised)."""

    session_id: str
    content: str | None = None
    error: str | None = None


class VariableResponse(_Strict):
    var_id: str
    content: str | None = None


class OkResponse(_Strict):
    ok: bool = True


class ProgramSessions:
    """Session tokens of the server; the sessions themselves live in the runtime's core. Only
    touched from the server's event loop."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}

    def check(self, session_id: str, token: str | None) -> None:
        expected = self.tokens.get(session_id)
        if expected is None:
            raise APIError(404, f"unknown session {session_id!r}", param="session_id")
        if not token or not hmac.compare_digest(token.encode(), expected.encode()):
            raise APIError(401, f"missing or wrong session token; send the `{SESSION_HEADER}` header")


router = APIRouter(dependencies=[Depends(check_api_key)], responses=ERROR_RESPONSES)


def _sessions(request: Request) -> ProgramSessions:
    return request.app.state.program_sessions


async def _on_core(request: Request, coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on the runtime's loop (where the core lives) and translate its errors."""
    rt = get_state(request).require_runtime()
    try:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, rt._loop))
    except UnknownSessionError as e:
        raise APIError(404, str(e), param="session_id") from None


@router.post("/v1/session", response_model=SessionResponse)
async def create_session(request: Request) -> SessionResponse:
    rt = get_state(request).require_runtime()

    async def create() -> str:
        return rt.core.create_session().session_id

    session_id = await _on_core(request, create())
    token = secrets.token_urlsafe(24)
    _sessions(request).tokens[session_id] = token
    return SessionResponse(session_id=session_id, session_auth=token)


@router.delete("/v1/session/{session_id}", response_model=OkResponse)
async def remove_session(request: Request, session_id: str) -> OkResponse:
    sessions = _sessions(request)
    sessions.check(session_id, request.headers.get(SESSION_HEADER))
    rt = get_state(request).require_runtime()
    await _on_core(request, rt.core.remove_session(session_id))
    sessions.tokens.pop(session_id, None)
    return OkResponse()


@router.post("/v1/semantic_call", response_model=SemanticCallResponse)
async def semantic_call(request: Request, body: SemanticCallRequest) -> SemanticCallResponse:
    _sessions(request).check(body.session_id, request.headers.get(SESSION_HEADER))
    rt = get_state(request).require_runtime()
    parameters = [Parameter(p.name, p.is_output, p.var_id, p.value, p.sampling_config) for p in body.parameters]
    metadata = RequestMetadata(
        cache_prefix=body.metadata.cache_prefix,
        fuse_fill=body.metadata.fuse_fill,
        criteria=PerfCriteria.parse(body.metadata.criteria),
        models=tuple(body.metadata.models),
    )

    async def submit() -> SemanticCallResponse:
        for p in body.parameters:  # validate outputs now: a 400 beats a failed variable later
            if p.is_output:
                _check_output(rt, p, body.metadata.models)
        session = rt.core.session(body.session_id)
        req = session.submit_call(body.template, parameters, metadata, body.literals)
        return SemanticCallResponse(request_id=req.request_id, outputs={k: v.id for k, v in req.outputs.items()})

    return await _on_core(request, submit())


@router.post("/v1/semantic_var", response_model=VariableResponse)
async def new_variable(request: Request, body: NewVariableRequest) -> VariableResponse:
    _sessions(request).check(body.session_id, request.headers.get(SESSION_HEADER))
    rt = get_state(request).require_runtime()

    async def make() -> VariableResponse:
        sv = rt.core.session(body.session_id).new_variable(body.name, body.content)
        return VariableResponse(var_id=sv.id, content=body.content)

    return await _on_core(request, make())


@router.post("/v1/semantic_var/{var_id}", response_model=OkResponse)
async def set_variable(request: Request, var_id: str, body: SetVariableRequest) -> OkResponse:
    _sessions(request).check(body.session_id, request.headers.get(SESSION_HEADER))
    if (body.content is None) == (body.error is None):
        raise APIError(400, "give exactly one of content or error")
    rt = get_state(request).require_runtime()

    async def put() -> None:
        sv = rt.core.session(body.session_id).variable(var_id)
        if sv.done or sv.producer is not None:
            raise APIError(409, f"variable {var_id!r} is already set or is produced by a call", param="var_id")
        if body.error is not None:
            sv.fail(ParrotError(body.error))
        else:
            sv.set(body.content)

    await _on_core(request, put())
    return OkResponse()


@router.get("/v1/semantic_var/{var_id}", response_model=VariableResponse)
async def get_variable(
    request: Request,
    var_id: str,
    session_id: str = Query(...),
    criteria: Literal["latency", "throughput"] | None = Query(None),
    timeout: float | None = Query(None, gt=0, le=3600),
) -> VariableResponse:
    """Block until the variable is ready (activating what produces it). 424 if it failed,
    408 if `timeout` passed first. A client that goes away stops waiting, nothing else."""
    _sessions(request).check(session_id, request.headers.get(SESSION_HEADER))
    rt = get_state(request).require_runtime()

    async def fetch() -> str:
        session = rt.core.session(session_id)
        sv = session.variable(var_id)
        session.pending_gets += 1
        try:
            session.activate(sv, PerfCriteria.parse(criteria))
            return await asyncio.wait_for(sv.wait(), timeout)
        finally:  # also when the client left: cancelling the hop cancels this coroutine
            session.pending_gets -= 1
            session.touch()

    try:
        done, content = await unless_disconnected(request, _on_core(request, fetch()))
    except (TimeoutError, asyncio.TimeoutError):
        raise APIError(408, f"variable {var_id!r} was not ready within {timeout} s") from None
    except APIError:
        raise
    except ParrotError as e:
        if isinstance(e, KeyError):  # an unknown variable (NotFoundError)
            raise APIError(404, str(e), param="var_id") from None
        raise APIError(424, f"variable {var_id!r} failed: {e}", code="variable_failed") from None
    except Exception as e:  # noqa: BLE001 - a producer's own error (e.g. a native function)
        raise APIError(424, f"variable {var_id!r} failed: {type(e).__name__}: {e}", code="variable_failed") from None
    if not done:
        return Response(status_code=499)  # nobody is listening
    return VariableResponse(var_id=var_id, content=content)


def _check_output(rt: Runtime, p: ParameterSpec, models: list[str]) -> None:
    """400 for bad sampling options, or a `max_tokens` that no engine able to run the call
    could ever fit (the prompt takes at least one token). Runs on the core's loop."""
    try:
        params = output_sampling(p.sampling_config or {})
    except InvalidRequestError as e:
        raise APIError(400, f"output {p.name!r}: {e}", param="sampling_config") from None
    lengths = [
        getattr(engine, "max_model_len", None)
        for engine in rt.core.engines.values()
        if not models or engine.model_name in models
    ]
    limit = max((n for n in lengths if n is not None), default=None)
    if limit is not None and params.max_tokens >= limit:
        raise APIError(
            400,
            f"output {p.name!r}: This model's maximum context length is {limit} tokens. However, max_tokens is"
            f" {params.max_tokens}, which leaves no room for the prompt. Please reduce max_tokens.",
            param="sampling_config",
        )


async def forget_removed_sessions(app: FastAPI) -> list[str]:
    """Drop the tokens of sessions the core no longer has (it expired them while idle);
    returns their ids. Run on the server's loop."""
    sessions: ProgramSessions = app.state.program_sessions
    rt = app.state.serve.runtime
    if rt is None or rt.closed or not sessions.tokens:
        return []
    # A token is added only once its session exists, so one known now whose session is
    # missing from the core afterwards belongs to a removed session.
    known = list(sessions.tokens)

    async def live() -> set[str]:
        return set(rt.core.sessions)

    alive = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(live(), rt._loop))
    gone = [sid for sid in known if sid not in alive]
    for sid in gone:
        sessions.tokens.pop(sid, None)
    return gone
