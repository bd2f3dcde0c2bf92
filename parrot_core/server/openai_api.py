"""The OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`,
`/tokenize`, `/detokenize` (their models are in `openai_schemas`).

Contracts:
- Every request is checked (model name, sampling values, prompt length against the model's
  context, token ids against the vocabulary) before any KV is allocated; what can never run
  is answered 400 before a stream starts. Unknown extra fields are accepted and ignored, like
  vLLM; known knobs this engine cannot honour (`suffix`, `allowed_token_ids`, ...) are a 400
  naming the field. Tools (`tools`, `tool_choice`) are rendered and parsed by `tools`.
  Structured output
  (`response_format` json_object / json_schema, vLLM's `structured_outputs` and `guided_*`) constrains each
  sequence of the request (`openai_schemas._StructuredRequest`).
- Logprobs are the model's raw distribution (log_softmax of the logits, before temperature,
  top-k, top-p and penalties); -inf is sent as -9999.0 (JSON has no infinity), as vLLM does.
  Tokens are shown as their own text (`Tokenizer.token_text`); in chat, `bytes` are that
  text's UTF-8.
- Each prompt x `n` (or `best_of`) is one sequence. A prompt's samples are forked from one
  context holding it (`Runtime.astream_forks`: the prompt is computed once, counted once in
  usage and metrics) unless its logprobs are wanted (then each is its own `Runtime.astream`,
  computing them); one sample is one `Runtime.astream`. Sample j > 0 of a seeded request
  samples with seed + j. `best_of` keeps, per prompt, the `n` samples of highest cumulative
  logprob, best first; usage counts every sample's tokens. A client that goes away
  (non-streaming: its connection closes; streaming: the response is cancelled) closes those
  streams, which aborts the requests and frees their KV.
- Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`; after a
  stream started they are sent as one `data:` event, followed by `data: [DONE]`.
- CPU-heavy request work (tokenizing, chat templates, detokenizing, checking token ids) runs
  in a worker thread, never on the event loop, so one large request cannot stall the others.
- A request still running when a shutdown's grace period ends (`ServeState.abort_all`) is
  aborted: a 503, or in a stream an error event followed by `data: [DONE]`.
- `/v1/chat/completions` with `prompt_cache_key` runs as a turn of that key's chat session
  (`chat_api.ChatSessions.keyed_turn`); the chat-session routes reuse `generate_chat`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from parrot_core.engines.base import SamplingParams, TokenLogprob
from parrot_core.errors import InvalidRequestError
from parrot_core.server.http_errors import ERROR_RESPONSES, STREAM_RESPONSE, APIError, api_error_from
from parrot_core.server.tools import (
    ParsedCall,
    ToolCallParser,
    ToolSetup,
    parse_reply,
    parse_tool_setup,
    render_chat,
    template_renders_tools,
)
from parrot_core.server.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    PromptLogprob,
    PromptTokensDetails,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    ToolCall,
    TopLogprob,
    Usage,
    _SamplingRequest,
)

if TYPE_CHECKING:
    from parrot_core.frontend.runtime import Runtime, StreamDelta
    from parrot_core.server.app import ServeState

log = logging.getLogger(__name__)


# -- helpers ----------------------------------------------------------------------------------
def get_state(request: Request) -> ServeState:
    return request.app.state.serve


def check_api_key(request: Request) -> None:
    """Dependency of every protected route: 401 unless the bearer token matches."""
    get_state(request).check_api_key(request.headers.get("authorization"))


router = APIRouter(dependencies=[Depends(check_api_key)], responses=ERROR_RESPONSES)


@dataclass
class _Seq:
    """One sequence to generate: one prompt, one of its `n` samples."""

    index: int
    prompt_ids: list[int]
    max_tokens: int
    sampling: dict[str, Any]
    # Where the deltas come from instead of a plain generation of `prompt_ids` (e.g. a chat
    # session's turn); called once, closing its iterator must abort the work.
    source: Callable[[], AsyncIterator[StreamDelta]] | None = None
    # `max_tokens=0` with echo: one token is sampled (the engine always samples one) and dropped
    score_only: bool = False
    # the samples of one prompt with the same `fork` run forked from one context holding it
    fork: int | None = None


@dataclass
class _Result:
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None


_MIN_LOGPROB = -9999.0  # what -inf is sent as


def _lp(x: float) -> float:
    return max(x, _MIN_LOGPROB)


def _token_text(rt: Runtime, token_id: int) -> str:
    tok = rt.engine.tokenizer
    return tok.token_text(token_id) if tok is not None else str(token_id)


def completion_logprobs(
    rt: Runtime, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None], offset: int, k: int | None = None
) -> CompletionLogprobs:
    """OpenAI's legacy shape for `token_ids` (their logprobs `entries`, None where a token has
    nothing before it), text offsets counted from `offset`. `top_logprobs` holds the `k` (all
    the entry has when None) most likely tokens plus the token itself, as vLLM's does."""
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries, strict=True):
        text = _token_text(rt, token_id)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_lp(entry.logprob))
        top = {_token_text(rt, t): _lp(v) for t, v in entry.top[:k]}
        top.setdefault(text, _lp(entry.logprob))
        out.top_logprobs.append(top)
    return out


def prompt_logprobs(rt: Runtime, entries: Sequence[TokenLogprob | None], k: int) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs`: per prompt token (None for one with nothing before it) the
    token itself and the `k` most likely ones, token id -> {logprob, rank, decoded_token}; the
    top tokens' ranks are their places."""
    out: list[dict[str, PromptLogprob] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        own = PromptLogprob(logprob=_lp(entry.logprob), rank=entry.rank, decoded_token=_token_text(rt, entry.token_id))
        found = {str(entry.token_id): own}
        for place, (t, v) in enumerate(entry.top[:k], start=1):
            found.setdefault(str(t), PromptLogprob(logprob=_lp(v), rank=place, decoded_token=_token_text(rt, t)))
        out.append(found)
    return out


def chat_logprobs(rt: Runtime, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    """OpenAI's chat shape: per generated token its text, logprob, UTF-8 bytes and the
    `top_logprobs` most likely tokens."""

    def top(token_id: int, logprob: float) -> TopLogprob:
        text = _token_text(rt, token_id)
        return TopLogprob(token=text, logprob=_lp(logprob), bytes=list(text.encode("utf-8")))

    content = []
    for entry in entries:
        head = top(entry.token_id, entry.logprob)
        content.append(ChatTokenLogprob(**head.model_dump(), top_logprobs=[top(t, v) for t, v in entry.top]))
    return ChatLogprobs(content=content)


def _generated_ids(delta: StreamDelta) -> list[int]:
    """The tokens a delta generated, the EOS or stop token id that ended the generation
    included: counted in usage and reported in logprobs and `return_token_ids` as vLLM does
    (lm-evaluation-harness reads the last logprob entry as the generated token's), though the
    text leaves it out."""
    return delta.token_ids if delta.stop_token_id is None else [*delta.token_ids, delta.stop_token_id]


async def _score_only(deltas: AsyncIterator[StreamDelta]) -> AsyncIterator[StreamDelta]:
    """The deltas of a one-token generation as a generation of none (echo with max_tokens=0):
    the prompt's logprobs are kept, the sampled token dropped."""
    async with contextlib.aclosing(deltas):  # type: ignore[type-var]
        async for delta in deltas:
            logprobs = [] if delta.logprobs is not None else None
            yield replace(
                delta, token_ids=[], text="", logprobs=logprobs, stop_token_id=None, finish_reason="length" if delta.finish_reason else None
            )


def _check_ids(rt: Runtime, ids: Sequence[int], param: str) -> None:
    if not ids:
        raise APIError(400, f"{param} must not be empty", param=param)
    vocab = rt.vocab_size or 2**31
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token ids must be in [0, {vocab}); got {bad[:5]}", param=param)


def _max_tokens_for(rt: Runtime, prompt_len: int, requested: int | None, prompt_param: str) -> int:
    """`requested`, or all the room left when None; 400 if prompt + completion cannot fit."""
    max_len = rt.max_model_len
    pool_tokens = rt.capacity_tokens
    wanted = requested if requested is not None else max(1, min(max_len, pool_tokens) - prompt_len)
    total = prompt_len + wanted
    param = prompt_param if requested is None or prompt_len >= max_len else "max_tokens"
    if total > max_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_len} tokens. However, you requested {total} tokens"
            f" ({prompt_len} in the messages, {wanted} in the completion). Please reduce the length of the"
            " messages or completion.",
            param=param,
        )
    if total > pool_tokens:
        raise APIError(400, f"the request needs {total} tokens of KV cache but the pool holds only {pool_tokens}", param=param)
    return wanted


def _sequences(
    rt: Runtime, prompts: list[list[int]], requested: int | None, body: _SamplingRequest, param: str
) -> list[_Seq]:
    sampling = body.sampling()
    seqs = []
    count = body.samples_per_prompt
    score_only = requested == 0
    # Samples are forked from one context holding the prompt, which is then computed once;
    # not when the prompt's logprobs are wanted: each sample computes them (never taken from a cache).
    fork = count > 1 and not score_only and sampling.get("prompt_logprobs") is None
    for p, ids in enumerate(prompts):
        _check_ids(rt, ids, param)
        max_tokens = _max_tokens_for(rt, len(ids), 1 if score_only else requested, param)
        for j in range(count):
            seed = sampling["seed"]
            # samples of one prompt must differ, yet stay reproducible for a given seed
            params = {**sampling, "seed": seed if seed is None or j == 0 else (seed + j) % 2**64}
            seqs.append(_Seq(p * count + j, ids, max_tokens, params, score_only=score_only, fork=p if fork else None))
    check_sampling(seqs[0].max_tokens, seqs[0].sampling, body)
    _check_vocab(rt, sampling)
    return seqs


def _check_vocab(rt: Runtime, sampling: dict[str, Any]) -> None:
    """Token ids in sampling options (stop_token_ids, logit_bias) must be in the vocabulary."""
    vocab = rt.vocab_size or 2**31
    for name in ("stop_token_ids", "logit_bias"):
        bad = [t for t in sampling[name] if t >= vocab]
        if bad:
            raise APIError(400, f"{name} must hold token ids in [0, {vocab}); got {bad[:5]}", param=name)


def check_sampling(max_tokens: int, sampling: dict[str, Any], body: _SamplingRequest) -> None:
    """Bad sampling values: a 400 (naming the field) before anything runs."""
    try:
        SamplingParams(max_tokens=max_tokens, **sampling)
    except InvalidRequestError as e:
        name = str(e).split(" ", 1)[0]  # its messages start with the field's name
        raise APIError(400, str(e), param=name if name in type(body).model_fields else None) from e


def _completion_prompts(rt: Runtime, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be an empty list", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return [rt.tokenize_prompt(p) if isinstance(p, str) else list(p) for p in prompt]


def _render_chat(
    rt: Runtime, messages: list[ChatMessage], add_generation_prompt: bool, continue_final: bool = False, tools: ToolSetup | None = None
) -> str:
    """The chat template's rendering of `messages` and `tools` (`tools.render_chat`).
    `continue_final` (vLLM's `continue_final_message`, as `transformers` does it): the text is
    cut right after the last message's content, leaving that message open for the model to
    continue; 400 if the rendering does not hold that content."""
    inputs = [m.as_template_input() for m in messages]
    tokenizer = rt.engine.tokenizer
    try:
        native = tokenizer is not None and template_renders_tools(tokenizer)
        text = render_chat(rt.apply_chat_template, native, inputs, tools, add_generation_prompt)
    except InvalidRequestError:
        raise
    except Exception as e:  # a template may fail on any input it dislikes: the request's fault
        raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from e
    if not continue_final:
        return text
    final = inputs[-1]["content"]
    for content in (final, final.strip()):
        at = text.rfind(content) if content else -1
        if at >= 0:
            return text[: at + len(content)]
    raise APIError(400, "continue_final_message: the rendered chat does not hold the last message's content", param="continue_final_message")


def _best(results: Sequence[_Result], count: int, n: int) -> list[int]:
    """Which results are answered, in order: all of them when each prompt ran `n` samples;
    with `best_of` (`count` > `n`), per prompt the `n` of highest cumulative logprob over
    their generated tokens (vLLM's rule), best first, ties in sample order."""
    if count == n:
        return list(range(len(results)))
    picked: list[int] = []
    for start in range(0, len(results), count):
        group = range(start, start + count)
        picked += sorted(group, key=lambda i: -sum(e.logprob for e in results[i].logprobs))[:n]
    return picked


def _usage(results: Sequence[_Result], n: int) -> Usage:
    # A prompt counts once however many samples it has; its cached tokens are the fewest any
    # sample found (the rest reused the first sample's work).
    prompts = [results[i : i + n] for i in range(0, len(results), n)]
    prompt_tokens = sum(group[0].prompt_tokens for group in prompts)
    cached = sum(min(r.cached_tokens for r in group) for group in prompts)
    completion = sum(r.completion_tokens for r in results)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


@dataclass
class _Observed:
    """One sequence's metrics, recorded once when it ends, however it ends."""

    prompt_tokens: int
    count_prompt: bool = True  # False: its prompt is counted on another sequence (forks)
    ttft: float | None = None
    tokens: int = 0
    reason: str = "abort"

    def see(self, delta: StreamDelta, t0: float) -> None:
        if self.ttft is None:
            self.ttft = time.perf_counter() - t0
        self.tokens += len(delta.token_ids)
        if self.count_prompt:
            self.prompt_tokens = delta.prompt_tokens
        self.reason = delta.finish_reason or self.reason

    def record(self, state: ServeState, t0: float) -> None:
        state.metrics.observe_sequence(
            ttft=self.ttft,
            e2e=time.perf_counter() - t0,
            prompt_tokens=self.prompt_tokens if self.count_prompt else 0,
            generation_tokens=self.tokens,
            finish_reason=self.reason,
        )


async def _run_seq(state: ServeState, rt: Runtime, seq: _Seq, t0: float) -> AsyncIterator[StreamDelta]:
    """Stream one sequence; closing this iterator aborts it and frees its KV."""
    seen = _Observed(len(seq.prompt_ids))
    source = seq.source() if seq.source is not None else rt.astream(seq.prompt_ids, seq.max_tokens, **seq.sampling)
    if seq.score_only:
        source = _score_only(source)
    try:
        async with contextlib.aclosing(source) as stream:
            async for delta in stream:
                seen.see(delta, t0)
                yield delta
    except Exception:
        seen.reason = "error"
        raise
    finally:
        seen.record(state, t0)


async def _run_forks(state: ServeState, rt: Runtime, seqs: list[_Seq], t0: float) -> AsyncIterator[tuple[int, StreamDelta]]:
    """The samples of one prompt, forked from one context holding it (`Runtime.astream_forks`:
    the prompt is computed once, and counted once in the metrics); yields (index, delta)."""
    seen = [_Observed(len(seq.prompt_ids), count_prompt=j == 0) for j, seq in enumerate(seqs)]
    source = rt.astream_forks(seqs[0].prompt_ids, seqs[0].max_tokens, [seq.sampling for seq in seqs])
    try:
        async with contextlib.aclosing(source) as stream:
            async for j, delta in stream:
                seen[j].see(delta, t0)
                yield seqs[j].index, delta
    except Exception:
        for s in seen:
            s.reason = "error" if s.reason == "abort" else s.reason
        raise
    finally:
        for s in seen:
            s.record(state, t0)


async def _run_unit(state: ServeState, rt: Runtime, unit: list[_Seq], t0: float) -> AsyncIterator[tuple[int, StreamDelta]]:
    if len(unit) > 1:
        async with contextlib.aclosing(_run_forks(state, rt, unit, t0)) as forks:
            async for item in forks:
                yield item
        return
    async with contextlib.aclosing(_run_seq(state, rt, unit[0], t0)) as stream:
        async for delta in stream:
            yield unit[0].index, delta


def _units(seqs: list[_Seq]) -> list[list[_Seq]]:
    """`seqs` as what runs together: a prompt's forked samples, or one sequence."""
    units: list[list[_Seq]] = []
    for seq in seqs:
        if seq.fork is not None and units and units[-1][0].fork == seq.fork:
            units[-1].append(seq)
        else:
            units.append([seq])
    return units


async def _merge(
    state: ServeState, rt: Runtime, seqs: list[_Seq], t0: float, abortable: bool = True
) -> AsyncIterator[tuple[int, StreamDelta]]:
    """All sequences at once, as (index, delta) in arrival order. The first error is raised
    (with `abortable`, also the shutdown's abort error); closing the iterator cancels every
    sequence (aborting it in the engine)."""
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
    finished = object()
    unregister = state.on_abort(lambda error: queue.put_nowait((-1, None, error))) if abortable else None

    async def pump(unit: list[_Seq]) -> None:
        try:
            async with contextlib.aclosing(_run_unit(state, rt, unit, t0)) as items:
                async for index, delta in items:
                    queue.put_nowait((index, delta, None))
            queue.put_nowait((unit[0].index, finished, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((unit[0].index, None, e))

    tasks = [asyncio.create_task(pump(unit)) for unit in _units(seqs)]
    try:
        remaining = len(tasks)
        while remaining:
            index, delta, error = await queue.get()
            if error is not None:
                raise error
            if delta is finished:
                remaining -= 1
            else:
                yield index, delta
    finally:
        if unregister is not None:
            unregister()
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(state: ServeState, rt: Runtime, seqs: list[_Seq], t0: float) -> list[_Result]:
    """Every sequence to its end; run under `unless_disconnected`, which handles the abort."""
    results = [_Result() for _ in seqs]
    async with contextlib.aclosing(_merge(state, rt, seqs, t0, abortable=False)) as merged:
        async for index, delta in merged:
            r = results[index]
            r.text += delta.text
            generated = _generated_ids(delta)
            r.completion_tokens += len(generated)
            r.token_ids += generated
            r.prompt_tokens, r.cached_tokens = delta.prompt_tokens, delta.cached_tokens
            r.finish_reason = delta.finish_reason or r.finish_reason
            r.logprobs.extend(delta.logprobs or [])
            if delta.prompt_logprobs is not None:
                r.prompt_logprobs = delta.prompt_logprobs
    for seq, r in zip(seqs, results, strict=True):
        r.prompt_token_ids = seq.prompt_ids
    return results


async def _wait_disconnect(request: Request) -> None:
    """Return once the client has gone (the body is already read, so `receive` only reports
    the disconnect; an ASGI server answers it at the latest once the response is sent)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.01)  # a server that keeps sending empty bodies must not spin us


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> tuple[bool, Any]:
    """Run `work` until done or until the client disconnects (then cancel it; returns
    `(False, None)`). Starlette does not cancel a non-streaming handler on disconnect, so this
    race is what aborts it. A shutdown's abort also cancels `work`, and raises its error."""
    job = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    aborted: asyncio.Future[APIError] = asyncio.get_running_loop().create_future()
    unregister = get_state(request).on_abort(lambda error: aborted.done() or aborted.set_result(error))
    try:
        await asyncio.wait({job, watcher, aborted}, return_when=asyncio.FIRST_COMPLETED)
        if job.done():
            return True, job.result()
        if aborted.done():
            raise aborted.result()
        return False, None
    finally:
        unregister()
        aborted.cancel()
        for task in (job, watcher):
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(job, watcher, return_exceptions=True)


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class EventStreamResponse(StreamingResponse):
    """SSE that always watches for the client going away, whatever the ASGI spec version
    (Starlette only notices it at the next write on 2.4+, which is too late for a request
    still waiting in the queue). `on_close` runs once, however the response ends, after
    `content` and then `inner` (what `content` reads from, which may already be running even if
    `content` never started) are closed."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], inner: AsyncIterator[Any] | None = None) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close
        self._inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                for iterator in (self.body_iterator, self._inner):
                    aclose = getattr(iterator, "aclose", None)
                    if aclose is not None:
                        await aclose()
            self._on_close()


async def _first(merged: AsyncIterator[tuple[int, StreamDelta]]) -> tuple[int, StreamDelta] | None:
    """The first item of `merged` (None if it has none); an error or a cancellation here ends
    `merged` too."""
    try:
        return await merged.__anext__()
    except StopAsyncIteration:
        return None


async def _primed(
    first: tuple[int, StreamDelta] | None, merged: AsyncIterator[tuple[int, StreamDelta]]
) -> AsyncIterator[tuple[int, StreamDelta]]:
    """`first` (already taken from `merged`), then the rest of `merged`; closes `merged`."""
    async with contextlib.aclosing(merged):  # type: ignore[type-var]
        if first is not None:
            yield first
        async for item in merged:
            yield item


async def _events(
    seqs: list[_Seq],
    merged: AsyncIterator[tuple[int, StreamDelta]],
    n: int,
    include_usage: bool,
    chunk: Callable[..., dict[str, Any]],
    usage_chunk: Callable[[Usage], dict[str, Any]],
    release: Callable[[], None],
    every_delta: bool = False,
    continuous_usage: bool = False,
) -> AsyncIterator[str]:
    """The SSE events of a streamed generation. `chunk(index, text, finish_reason, first,
    delta)`: `delta` is the engine's (None for the first, empty chunk of each choice).
    `every_delta`: a chunk for every delta that generated a token, even one without text.
    `continuous_usage` (vLLM's `continuous_usage_stats`): every chunk carries the usage so far."""
    results = [_Result(prompt_tokens=len(seq.prompt_ids)) for seq in seqs]

    def with_usage(event: dict[str, Any]) -> dict[str, Any]:
        return {**event, "usage": _usage(results, n).model_dump()} if continuous_usage else event

    try:
        try:
            for seq in seqs:
                first = chunk(seq.index, "", None, True)
                if first:
                    yield _sse(with_usage(first))
            async with contextlib.aclosing(merged):  # type: ignore[type-var]
                async for index, delta in merged:
                    r = results[index]
                    r.completion_tokens += len(_generated_ids(delta))
                    r.prompt_tokens, r.cached_tokens = delta.prompt_tokens, delta.cached_tokens
                    if (
                        delta.text
                        or delta.finish_reason
                        or delta.logprobs
                        or delta.prompt_logprobs is not None
                        or (every_delta and _generated_ids(delta))
                    ):
                        event = chunk(index, delta.text, delta.finish_reason, False, delta)
                        if event:
                            yield _sse(with_usage(event))
            if include_usage:
                yield _sse(usage_chunk(_usage(results, n)))
        except Exception as e:  # noqa: BLE001 - the status line is sent: report it in the stream
            yield _sse(api_error_from(e).body())
        yield "data: [DONE]\n\n"
    finally:
        release()


# -- routes -----------------------------------------------------------------------------------
@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    state = get_state(request)
    rt = state.require_runtime()
    name = state.served_model_name
    card = ModelCard(id=name, created=state.created, root=rt.engine.model_name, max_model_len=rt.max_model_len)
    return ModelList(data=[card])


@router.post("/v1/completions", response_model=CompletionResponse, responses=STREAM_RESPONSE)
async def create_completion(body: CompletionRequest, request: Request) -> Any:
    t0 = time.perf_counter()
    state = get_state(request)
    rt = state.require_runtime()
    state.check_model(body.model)
    body.check_supported()

    def prepare() -> tuple[list[_Seq], list[str]]:
        prompts = _completion_prompts(rt, body.prompt)
        seqs = _sequences(rt, prompts, body.max_tokens, body, "prompt")
        texts = body.prompt if isinstance(body.prompt, list) and len(body.prompt) == len(prompts) else [body.prompt]
        # echo gives back the prompt as sent; a prompt of token ids as their text
        echoes = [t if isinstance(t, str) else rt.detokenize(ids) for t, ids in zip(texts, prompts)] if body.echo else []
        return seqs, echoes

    seqs, echoes = await asyncio.to_thread(prepare)
    pid = _suspendable(request, rt, body, seqs, "completion")
    offsets: dict[int, int] = {}  # text offset of each choice's next token
    echoed: set[int] = set()  # streaming: the choices whose first chunk was sent

    def echo_of(index: int) -> str:
        return echoes[index // body.samples_per_prompt] if body.echo else ""

    def choice_logprobs(index: int, prompt: list[TokenLogprob | None] | None, ids: list[int], entries: list[TokenLogprob]) -> CompletionLogprobs:
        if body.echo and prompt is not None:
            out = completion_logprobs(rt, seqs[index].prompt_ids, prompt, offsets.get(index, 0), body.logprobs)
            offsets[index] = len(echo_of(index))
        else:
            out = CompletionLogprobs()
        more = completion_logprobs(rt, ids, entries, offsets.get(index, 0))
        offsets[index] = offsets.get(index, 0) + sum(len(t) for t in more.tokens)
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(out, name).extend(getattr(more, name))
        return out

    def stream_choice(index: int, text: str, finish_reason: str | None, first: bool, delta: Any = None) -> dict[str, Any] | None:
        if first:
            return None
        logprobs = None
        extra: dict[str, Any] = {}  # vLLM's fields
        if index not in echoed:  # the choice's first chunk: the prompt (with echo) leads it
            echoed.add(index)
            text = echo_of(index) + text
            if body.return_token_ids:
                extra["prompt_token_ids"] = seqs[index].prompt_ids
            if body.prompt_logprobs is not None and delta is not None and delta.prompt_logprobs is not None:
                extra["prompt_logprobs"] = [
                    None if e is None else {t: v.model_dump() for t, v in e.items()}
                    for e in prompt_logprobs(rt, delta.prompt_logprobs, body.prompt_logprobs)
                ]
        if body.logprobs is not None and delta is not None:
            logprobs = choice_logprobs(index, delta.prompt_logprobs, _generated_ids(delta), delta.logprobs or []).model_dump()
        if body.return_token_ids:
            extra["token_ids"] = _generated_ids(delta) if delta is not None else []
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason, **extra}

    def response(request_id: str, created: int, model: str, results: list[Any]) -> CompletionResponse:
        ids = body.return_token_ids
        choices = []
        for place, i in enumerate(_best(results, body.samples_per_prompt, body.n)):
            r = results[i]
            logprobs = choice_logprobs(i, r.prompt_logprobs, r.token_ids, r.logprobs) if body.logprobs is not None else None
            choices.append(
                CompletionChoice(
                    index=place,
                    text=echo_of(i) + r.text,
                    logprobs=logprobs,
                    finish_reason=r.finish_reason,
                    prompt_token_ids=r.prompt_token_ids if ids else None,
                    token_ids=r.token_ids if ids else None,
                    prompt_logprobs=None
                    if body.prompt_logprobs is None or r.prompt_logprobs is None
                    else prompt_logprobs(rt, r.prompt_logprobs, body.prompt_logprobs),
                )
            )
        usage = _usage(results, body.samples_per_prompt)  # best_of: every sample's tokens count
        return CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)

    return await _generate(request, state, rt, seqs, t0, body, "cmpl", "text_completion", stream_choice, response, pid is not None, pid)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=STREAM_RESPONSE)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
    """With `prompt_cache_key` (and one choice, a last message from the user, a generation
    prompt, and `--max-prompt-cache-keys` > 0), the request runs as a turn of the key's chat
    session (`chat_api.ChatSessions.keyed_turn`), whose context stays pinned between requests;
    otherwise as a plain generation (which still reuses cached blocks)."""
    t0 = time.perf_counter()
    state = get_state(request)
    rt = state.require_runtime()
    state.check_model(body.model)
    body.check_supported()

    tools = body.tool_setup()

    def prepare() -> list[_Seq]:
        prompt = _render_chat(rt, body.messages, body.add_generation_prompt, body.continue_final_message, tools)
        return _sequences(rt, [rt.tokenize(prompt)], body.requested_max_tokens, body, "messages")

    seqs = await asyncio.to_thread(prepare)
    keyed = request.app.state.chat_sessions
    key = body.prompt_cache_key
    # A chat session's turn carries no logprobs and renders no tools: such a request runs as a
    # plain generation.
    plain = bool(body.logprobs) or body.prompt_logprobs is not None or tools is not None
    if key is not None and keyed.max_keys and body.n == 1 and body.add_generation_prompt and body.messages[-1].role == "user" and not plain:
        messages = [m.as_template_input() for m in body.messages]
        seqs[0].source = keyed.keyed_turn(rt, key, messages, body.requested_max_tokens, seqs[0].sampling)
    if tools is not None and body.suspendable:  # a resumed slice is not parsed for tool calls
        raise APIError(400, "tools cannot be combined with time_limit, token_quantum or pid", param="tools")
    pid = _suspendable(request, rt, body, seqs, "chat")
    last = body.messages[-1]
    echo = last.text if body.echo and last.role == "assistant" else ""
    parsed_tools = tools if tools is not None and tools.parses else None
    return await generate_chat(request, state, rt, seqs, t0, body, prime=pid is not None, echo=echo, pid=pid, tools=parsed_tools)


def _suspendable(request: Request, rt: Runtime, body: Any, seqs: list[_Seq], api: str) -> str | None:
    """With `time_limit` / `token_quantum` / `pid`, make the sequence a suspendable generation
    (`generations_api`); returns its pid (None for a plain request)."""
    from parrot_core.server import generations_api

    return generations_api.make_suspendable(request, rt, body, seqs, api)


def _chat_stream_choice(
    index: int,
    text: str,
    finish_reason: str | None,
    first: bool,
    delta: Any = None,
    rt: Runtime | None = None,
    echo: str = "",
    token_ids: bool = False,
) -> dict[str, Any] | None:
    """One choice of a chat chunk; with `rt`, the delta's logprobs in the chat shape. `echo`
    is the content of the first chunk (the role's); `token_ids`: the delta's generated ids."""
    message: dict[str, Any] = {"role": "assistant", "content": echo} if first else ({"content": text} if text else {})
    logprobs = None
    if rt is not None and delta is not None and delta.logprobs is not None:
        logprobs = chat_logprobs(rt, delta.logprobs).model_dump()
    choice = {"index": index, "delta": message, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids:
        choice["token_ids"] = _generated_ids(delta) if delta is not None else []
    return choice


async def generate_chat(
    request: Request,
    state: ServeState,
    rt: Runtime,
    seqs: list[_Seq],
    t0: float,
    body: _SamplingRequest,
    prime: bool = False,
    echo: str = "",
    pid: str | None = None,
    tools: ToolSetup | None = None,
) -> Any:
    """Run `seqs` and answer as `/v1/chat/completions` does (`chat.completion`, or its chunks
    as SSE when `body.stream`). `prime`: wait for the first delta before the stream's status
    line, so that an error before it (e.g. a turn that can never fit) is a plain HTTP error.
    `echo` (vLLM's chat echo) leads each choice's content. `pid`: a suspendable generation's,
    sent with the answer (see `_generate`). `tools`: each reply is parsed into content and
    `tool_calls` (`tools.ToolCallParser`; streamed, a call's delta comes whole once its closing
    tag is generated), finish_reason "tool_calls" when it ended with calls."""

    with_logprobs = bool(getattr(body, "logprobs", False))
    ids = bool(getattr(body, "return_token_ids", False))  # chat-session turns have no such field
    prompt_lp: int | None = getattr(body, "prompt_logprobs", None)

    def reason(finish_reason: str | None, calls: Sequence[ParsedCall]) -> str | None:
        return "tool_calls" if calls and finish_reason == "stop" else finish_reason

    def message(r: _Result) -> tuple[AssistantMessage, str | None]:
        if tools is None:
            return AssistantMessage(content=echo + r.text), r.finish_reason
        content, calls = parse_reply(r.text, tools)
        calls_out = [ToolCall.model_validate(c.as_openai()) for c in calls] or None
        return AssistantMessage(content=(echo + (content or "")) or None, tool_calls=calls_out), reason(r.finish_reason, calls)

    def response(request_id: str, created: int, model: str, results: list[Any]) -> ChatCompletionResponse:
        choices = []
        for i, r in enumerate(results):
            answer, finish_reason = message(r)
            choices.append(
                ChatChoice(
                    index=i,
                    message=answer,
                    logprobs=chat_logprobs(rt, r.logprobs) if with_logprobs else None,
                    finish_reason=finish_reason,
                    token_ids=r.token_ids if ids else None,
                )
            )
        prompt_ids = results[0].prompt_token_ids if ids else None
        usage = _usage(results, body.n)
        lps = None
        if prompt_lp is not None and results[0].prompt_logprobs is not None:
            lps = prompt_logprobs(rt, results[0].prompt_logprobs, prompt_lp)
        return ChatCompletionResponse(
            id=request_id, created=created, model=model, choices=choices, usage=usage, prompt_token_ids=prompt_ids, prompt_logprobs=lps
        )

    parsers: dict[int, ToolCallParser] = {}

    def stream_choice(index: int, text: str, finish_reason: str | None, first: bool, delta: Any = None) -> dict[str, Any] | None:
        choice = _chat_stream_choice(index, text, finish_reason, first, delta, rt if with_logprobs else None, echo, ids)
        if tools is None or first or choice is None:
            return choice
        parser = parsers.setdefault(index, ToolCallParser(tools))
        content, calls = parser.push(text)
        if finish_reason is not None:
            content += parser.finish()
        said: dict[str, Any] = {"content": content} if content else {}
        if calls:
            first_call = len(parser.calls) - len(calls)
            said["tool_calls"] = [{"index": first_call + k, **c.as_openai()} for k, c in enumerate(calls)]
        if not said and finish_reason is None and choice["logprobs"] is None and not ids:
            return None  # held back: nothing to say yet
        choice["delta"] = said
        choice["finish_reason"] = reason(finish_reason, parser.calls)
        return choice

    return await _generate(
        request, state, rt, seqs, t0, body, "chatcmpl", "chat.completion.chunk", stream_choice, response, prime, pid
    )


async def _generate(
    request: Request,
    state: Any,
    rt: Any,
    seqs: list[Any],
    t0: float,
    body: Any,
    id_prefix: str,
    chunk_object: str,
    stream_choice: Callable[..., dict[str, Any] | None],
    response: Callable[[str, int, str, list[Any]], Any],
    prime: bool = False,
    pid: str | None = None,
) -> Any:
    """What the generation routes share: admission, then an SSE stream of chunks (built by
    `stream_choice`; None skips one) or one response once every sequence is done (a client
    that left gets nothing: its generation was aborted). `prime`: see `generate_chat`. `pid`
    (a suspendable generation's) is the response's and every chunk's `pid` field."""
    request_id, created, model = f"{id_prefix}-{uuid.uuid4().hex}", int(time.time()), state.served_model_name
    release = state.admit(len(seqs))
    if body.stream:

        def chunk(index: int, text: str, finish_reason: str | None, first: bool, delta: Any = None) -> dict[str, Any]:
            choice = stream_choice(index, text, finish_reason, first, delta)
            if choice is None:
                return {}
            out: dict[str, Any] = {"id": request_id, "object": chunk_object, "created": created, "model": model, "choices": [choice]}
            if first and getattr(body, "return_token_ids", False):  # vLLM's: on a chat choice's first chunk
                out["prompt_token_ids"] = seqs[index].prompt_ids
            if pid is not None:
                out["pid"] = pid
            return {**out, "usage": None} if body.include_usage else out

        def usage_chunk(usage: Usage) -> dict[str, Any]:
            return {"id": request_id, "object": chunk_object, "created": created, "model": model, "choices": [], "usage": usage.model_dump()}

        raw = merged = _merge(state, rt, seqs, t0)
        if prime:
            try:
                done, first = await unless_disconnected(request, _first(raw))
            except BaseException:
                release()
                raise
            if not done:
                release()
                return Response(status_code=499)  # nobody is listening
            merged = _primed(first, raw)
        every_delta = bool(getattr(body, "return_token_ids", False))  # a delta with ids but no text still has ids to send
        continuous = body.include_usage and body.stream_options.continuous_usage_stats  # as vLLM: only with include_usage
        events = _events(seqs, merged, body.samples_per_prompt, body.include_usage, chunk, usage_chunk, release, every_delta, continuous)
        return EventStreamResponse(events, on_close=release, inner=raw)
    try:
        done, results = await unless_disconnected(request, _collect(state, rt, seqs, t0))
    finally:
        release()
    if not done:
        return Response(status_code=499)  # nobody is listening
    answer = response(request_id, created, model, results)
    if pid is not None:
        answer.pid = pid
    return answer


@router.get("/tokenizer_info", response_model=TokenizerInfoResponse)
async def tokenizer_info(request: Request) -> TokenizerInfoResponse:
    rt = get_state(request).require_runtime()
    tok = rt.engine.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer: send token ids")

    def text(token_id: int | None) -> str | None:
        return None if token_id is None else tok.token_text(token_id)

    return TokenizerInfoResponse(
        bos_token=text(tok.bos_token_id),
        eos_token=text(tok.eos_token_id),
        pad_token=None,
        chat_template=tok.chat_template,
        model_max_length=rt.max_model_len,
        add_bos_token=tok.add_bos_token,
    )


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = get_state(request)
    rt = state.require_runtime()
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt")
    if body.messages is not None and not body.messages:
        raise APIError(400, "messages must not be empty", param="messages")
    if body.continue_final_message:
        if body.messages is None or body.messages[-1].role != "assistant":
            raise APIError(400, "continue_final_message needs messages whose last is the assistant's", param="continue_final_message")
        if body.add_generation_prompt:
            raise APIError(400, "continue_final_message needs add_generation_prompt to be false", param="continue_final_message")
    tools = parse_tool_setup(body.tools, None, None)

    def encode() -> list[int]:
        if body.messages is not None:
            return rt.tokenize(_render_chat(rt, body.messages, body.add_generation_prompt, body.continue_final_message, tools))
        return rt.tokenize(body.prompt or "")

    tokens = await asyncio.to_thread(encode)
    strs = None
    if body.return_token_strs:
        tokenizer = rt.engine.tokenizer
        strs = [tokenizer.id_to_token(t) or "" for t in tokens]
    return TokenizeResponse(count=len(tokens), max_model_len=rt.max_model_len, tokens=tokens, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = get_state(request)
    rt = state.require_runtime()
    state.check_model(body.model)
    vocab = rt.vocab_size or 2**31

    def decode() -> str:
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise APIError(400, f"token ids must be in [0, {vocab}); got {bad[:5]}", param="tokens")
        return rt.detokenize(body.tokens)

    return DetokenizeResponse(prompt=await asyncio.to_thread(decode))
