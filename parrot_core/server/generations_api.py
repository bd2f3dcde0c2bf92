"""Suspendable generations over HTTP (parrot_core.switching).

- `/v1/completions` and `/v1/chat/completions` take the extension fields `time_limit`
  (seconds), `token_quantum` (tokens) and `pid`: the generation is suspended when its limit
  passes, answered with `finish_reason: "suspended"` and the response's (each chunk's) `pid`
  (made up when the request gave none). One prompt, `n` 1; not with echo, structured output,
  `prompt_cache_key` or (with `time_limit`) logprobs.
- `POST /v1/generations/{pid}/resume` (`{"time_limit", "token_quantum", "stream",
  "stream_options"}`) continues it for one more slice (no limit: to its end), answered in the
  shape it was started with (`text_completion` or `chat.completion`, streamed or not), with
  what the slice added; concatenated, the slices are the uninterrupted generation.
- `GET /v1/generations` lists the caller's suspended generations; `DELETE
  /v1/generations/{pid}` frees one (204).

A pid belongs to the caller that created it: its namespace is the caller's bearer token (the
API key it sends, hashed; callers without one share the anonymous namespace). Another caller's
pid is unknown to it: 404 for resume, read and delete alike, and absent from its list, whatever
pids each chooses.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from parrot_core.server.http_errors import ERROR_RESPONSES, STREAM_RESPONSE, APIError
from parrot_core.server.openai_api import _generate, _Seq, _usage, check_api_key, generate_chat, get_state
from parrot_core.server.openai_schemas import CompletionChoice, CompletionResponse, StreamOptions

if TYPE_CHECKING:
    from parrot_core.frontend.runtime import Runtime

router = APIRouter(dependencies=[Depends(check_api_key)], responses=ERROR_RESPONSES)


class ResumeRequest(BaseModel):
    """The next slice's limits (none: to the end) and how to answer."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    time_limit: float | None = Field(None, gt=0)
    token_quantum: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    n: Literal[1] = 1  # what the shared answer code reads

    @property
    def samples_per_prompt(self) -> int:
        return 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class GenerationInfo(BaseModel):
    id: str
    object: Literal["generation"] = "generation"
    api: str  # "completion" or "chat": the shape its answers take
    tokens: int  # output so far
    max_tokens: int
    prompt_tokens: int
    age: float  # seconds since it was created
    idle: float  # seconds since it was suspended
    resident: bool  # its KV is in the engine (False: evicted, recomputed on resume)


class GenerationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[GenerationInfo]


def owner_of(request: Request) -> str:
    """The caller's pid namespace: a hash of its bearer token (never the token itself)."""
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "anonymous"
    return "key-" + hashlib.sha256(token.strip().encode()).hexdigest()[:32]


def make_suspendable(request: Request, rt: Runtime, body: Any, seqs: list[_Seq], api: str) -> str | None:
    """If `body` asks for it (`time_limit` / `token_quantum` / `pid`), turn its one sequence
    into a suspendable generation owned by the caller; returns its pid (None otherwise).
    What cannot be suspended is a 400 naming the field."""
    if not body.suspendable:
        return None
    param = "pid" if body.pid is not None else ("token_quantum" if body.token_quantum is not None else "time_limit")
    if len(seqs) != 1:
        raise APIError(400, f"{param}: a suspendable generation has one prompt and n=1", param=param)
    if getattr(body, "echo", False):
        raise APIError(400, f"{param} cannot be combined with echo", param="echo")
    if getattr(body, "prompt_cache_key", None) is not None:
        raise APIError(400, f"{param} cannot be combined with prompt_cache_key", param="prompt_cache_key")
    seq = seqs[0]
    if seq.score_only:
        raise APIError(400, f"{param} needs max_tokens >= 1", param="max_tokens")
    if any(seq.sampling.get(k) not in (None, False) for k in ("json_schema", "json_object", "regex", "choice", "grammar", "structured")):
        raise APIError(400, f"{param} cannot be combined with structured output", param=param)
    if body.time_limit is not None and seq.sampling.get("logprobs") is not None:
        raise APIError(400, "logprobs cannot be combined with time_limit (use token_quantum)", param="logprobs")
    pid = body.pid or f"gen-{uuid.uuid4().hex[:16]}"
    options = dict(time_limit=body.time_limit, token_quantum=body.token_quantum, pid=pid, owner=owner_of(request), meta={"api": api})
    seq.source = lambda: rt.astream(seq.prompt_ids, seq.max_tokens, **seq.sampling, **options)
    return pid


@router.get("/v1/generations", response_model=GenerationList)
async def list_generations(request: Request) -> GenerationList:
    """The caller's suspended generations, least recently suspended first."""
    rt = get_state(request).require_runtime()
    infos = await rt.asuspended(owner=owner_of(request))
    return GenerationList(data=[_info(i) for i in infos])


@router.get("/v1/generations/{pid}", response_model=GenerationInfo)
async def get_generation(pid: str, request: Request) -> GenerationInfo:
    rt = get_state(request).require_runtime()
    return _info(await _find(rt, pid, owner_of(request)))


@router.delete("/v1/generations/{pid}", status_code=204, response_class=Response)
async def delete_generation(pid: str, request: Request) -> Response:
    """Free a suspended generation and its KV; 404 if the caller has none of that pid."""
    rt = get_state(request).require_runtime()
    await rt.adiscard(pid, owner=owner_of(request))
    return Response(status_code=204)


@router.post("/v1/generations/{pid}/resume", responses=STREAM_RESPONSE)
async def resume_generation(pid: str, body: ResumeRequest, request: Request) -> Any:
    """One more slice, answered as the request that started the generation was."""
    t0 = time.perf_counter()
    state = get_state(request)
    rt = state.require_runtime()
    owner = owner_of(request)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options can only be given when stream is true", param="stream_options")
    info = await _find(rt, pid, owner)

    def source() -> Any:
        return rt.astream_resume(pid, body.time_limit, body.token_quantum, owner=owner)

    seqs = [_Seq(0, [], info.max_tokens - info.tokens, {}, source=source)]
    if info.meta.get("api") == "chat":
        return await generate_chat(request, state, rt, seqs, t0, body, prime=True, pid=pid)

    def stream_choice(index: int, text: str, finish_reason: str | None, first: bool, delta: Any = None) -> dict[str, Any] | None:
        return None if first else {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def response(request_id: str, created: int, model: str, results: list[Any]) -> CompletionResponse:
        choices = [CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason) for i, r in enumerate(results)]
        return CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=_usage(results, 1))

    return await _generate(request, state, rt, seqs, t0, body, "cmpl", "text_completion", stream_choice, response, True, pid)


async def _find(rt: Runtime, pid: str, owner: str) -> Any:
    for info in await rt.asuspended(owner=owner):
        if info.pid == pid:
            return info
    raise APIError(404, f"no suspended generation {pid!r} (unknown, finished, discarded or expired)", param="pid")


def _info(info: Any) -> GenerationInfo:
    return GenerationInfo(
        id=info.pid,
        api=str(info.meta.get("api", "completion")),
        tokens=info.tokens,
        max_tokens=info.max_tokens,
        prompt_tokens=info.prompt_tokens,
        age=info.age,
        idle=info.idle,
        resident=info.resident,
    )
