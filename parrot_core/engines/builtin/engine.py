"""The builtin engine: a paged-attention Llama behind the engine protocol.

Threading: one step-loop thread owns the block pool, the context tree, the scheduler and the
model. Every public call posts a command to it and returns a future (or an async stream);
nothing else touches engine state. A failure inside a step fails the requests of that step
(their callers get `EngineError`) and the loop goes on.

A step: run the queued commands, schedule, run the model once over every scheduled token
(prefill chunks and decodes together), commit the KV, sample the requests that reached their
last token, and report to the callers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import llguidance
import llguidance.torch
import torch

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
    find_stop,
)
from parrot_core.engines.builtin.block_pool import BlockPool
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.kv_contexts import ContextExistsError, KVContext, KVContextTree
from parrot_core.engines.builtin.kv_io import ContextKV, KVSpec, model_fingerprint
from parrot_core.engines.builtin.model import ForwardBatch, LlamaModel, allocate_kv_cache
from parrot_core.engines.builtin.request import EngineRequest, Kind
from parrot_core.engines.builtin.sampler import apply_penalties, sample, skip_draws, token_logprobs
from parrot_core.engines.builtin.scheduler import Scheduler
from parrot_core.engines.builtin.tokenizer import Tokenizer
from parrot_core.errors import (
    EngineError,
    InvalidRequestError,
    OutOfBlocksError,
    ParrotError,
    RuntimeClosedError,
    UnknownContextError,
)

if TYPE_CHECKING:
    from parrot_core.engines.builtin.gguf_loader import LoadedModel

log = logging.getLogger(__name__)
T = TypeVar("T")
_EXPORT_ATTEMPTS = 4  # recomputes of an evicted context before export gives up (pressure evicts it again)
_LOGPROB_ROWS = 256  # prompt logprobs: logits computed this many rows at a time (bounds memory)
_GRAMMAR_CACHE = 64  # compiled grammars kept (a fresh matcher is a copy of the cached one)


class BuiltinEngine:
    """Implements `parrot_core.engines.base.Engine` over a `LlamaModel` on CPU or GPU."""

    def __init__(
        self,
        model: LlamaModel | str | os.PathLike[str] | None = None,
        tokenizer: Tokenizer | None = None,
        config: EngineConfig | None = None,
        model_name: str | None = None,
        **options: Any,
    ) -> None:
        """`BuiltinEngine()` runs the default model, `BuiltinEngine("model.gguf")` a llama GGUF
        file; `options` are `EngineConfig` fields (block_size, num_kv_blocks, max_num_seqs,
        dtype, ...). Given a `LlamaModel`, its `tokenizer` (or None: token ids only) and
        `config` go with it."""
        if options:
            if config is not None:
                raise InvalidRequestError("give either config or EngineConfig fields as options, not both")
            try:
                config = EngineConfig(**options)
            except TypeError as e:
                raise InvalidRequestError(f"unknown engine option: {e}") from None
        self.config = config = config or EngineConfig()
        self._active: dict[int, EngineRequest] = {}  # context id -> the request working on it
        self._last_used: dict[int, int] = {}  # context id -> step it was last used (idle eviction)
        self._pinned: set[int] = set()  # context ids whose KV is evicted last (set_pinned)
        self._grammars: dict[str, llguidance.LLMatcher] = {}  # grammar text -> matcher in its start state
        self._ids = itertools.count()
        self._step_no = 0
        self.stats = {"prompt_tokens_computed": 0, "generation_tokens": 0, "steps": 0, "forward_seconds": 0.0, "evicted_blocks": 0, "restored_tokens": 0}
        self._commands: list[Callable[[], None]] = []
        self._wakeup = threading.Condition()
        self._closed = False
        # The model is loaded and the KV pool allocated on the step-loop thread itself: see `_run`.
        built: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(built, model, tokenizer, model_name), name="parrot-engine", daemon=True
        )
        self._thread.start()
        built.result()  # a load error is raised here, in the caller's thread

    def _build(self, model: LlamaModel | str | os.PathLike[str] | None, tokenizer: Tokenizer | None, model_name: str | None) -> None:
        """The model (loaded here when given a path or None), the KV pool, the block tree and
        the scheduler. Runs on the step-loop thread, before its loop."""
        config = self.config
        if model is None or isinstance(model, (str, os.PathLike)):
            model, loaded = _load_model(model or config.model, config.dtype, config.device)
            tokenizer, model_name = loaded.tokenizer, model_name or loaded.model_name
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name or "model"
        self._thread.name = f"parrot-engine-{self.model_name}"
        mc = model.config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        num_blocks = config.num_kv_blocks or _blocks_for_memory(mc, config)
        self.kv = allocate_kv_cache(mc, num_blocks, config.block_size, config.dtype, config.device)
        self.pool = BlockPool(num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching)
        self.tree = KVContextTree(self.pool, config.cache_namespace, copy_block=self.kv.copy_block)
        self.scheduler = Scheduler(self.tree, config.max_num_seqs, config.max_num_batched_tokens, self._evict_idle)
        self.eos_token_id = tokenizer.eos_token_id if tokenizer is not None else mc.eos_token_id

    @classmethod
    def from_gguf(cls, path: str | None = None, config: EngineConfig | None = None) -> BuiltinEngine:
        """The engine over a llama GGUF file (None: `config.model`, else the default model)."""
        return cls(path, config=config)

    # -- the engine protocol -------------------------------------------------------------
    async def fill(self, context_id: int, parent_context_id: int | None, token_ids: Sequence[int]) -> FillResult:
        future: concurrent.futures.Future[FillResult] = concurrent.futures.Future()
        tokens = list(token_ids)
        self._post(lambda: self._start(Kind.FILL, context_id, parent_context_id, tokens, None, _future_sink(future)))
        return await asyncio.wrap_future(future)

    async def generate(
        self,
        context_id: int,
        parent_context_id: int | None,
        params: SamplingParams,
        prompt_token_ids: Sequence[int] = (),
    ) -> AsyncIterator[GenerationDelta]:
        loop = asyncio.get_running_loop()
        prompt = list(prompt_token_ids)
        queue: asyncio.Queue[object] = asyncio.Queue()
        holder: dict[str, EngineRequest] = {}

        def emit(event: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass

        def start() -> None:
            req = self._start(Kind.GENERATE, context_id, parent_context_id, prompt, params, emit)
            if req is not None:
                holder["req"] = req

        self._post(start)
        finished = False
        try:
            while True:
                event = await queue.get()
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                assert isinstance(event, GenerationDelta)
                finished = event.finish_reason is not None
                yield event
                if finished:
                    return
        finally:
            if not finished:  # the caller went away: stop generating
                self._post(lambda: self._abort(holder.get("req")))

    async def split(self, context_id: int, source_id: int, drop_last: int) -> None:
        """Create `context_id` holding `source_id`'s tokens except its last `drop_last`,
        sharing their KV (nothing is computed). Lets the serve layer fill a run of new
        contexts with one fill into the last of them, then carve out the others."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                if source_id in self._active:
                    raise InvalidRequestError(f"context {source_id} is busy with another request")
                source = self.tree.get(source_id)
                self.tree.create_prefix(context_id, source_id, len(source.token_ids) - drop_last)
                self._last_used[context_id] = self._step_no
                future.set_result(None)
            except Exception as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)

        self._post(run)
        await asyncio.wrap_future(future)

    def set_pinned(self, context_id: int, pinned: bool) -> None:
        """Evict this context's KV after other idle contexts' (a shared constant prefix), or
        no longer. Never blocks, never raises."""

        def run() -> None:
            if pinned:
                self._pinned.add(context_id)
            else:
                self._pinned.discard(context_id)

        with contextlib.suppress(RuntimeClosedError):
            self._post(run)

    def free_context(self, context_id: int) -> None:
        """Drop the context (aborting a request still working on it). Never blocks, never
        raises: after `close()` there is nothing left to free."""
        with contextlib.suppress(RuntimeClosedError):
            self._post(lambda: self._free(context_id))

    def runtime_info(self) -> RuntimeInfo:
        pool, tree = self.pool, self.tree
        return RuntimeInfo(
            model_name=self.model_name,
            block_size=pool.block_size,
            num_blocks_total=pool.num_blocks,
            num_blocks_free=pool.num_free,
            num_blocks_cached=pool.num_cached_free,
            num_contexts=len(tree),
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            prefix_cache_queries=tree.queries,
            prefix_cache_hits=tree.hits,
            prompt_tokens_computed=self.stats["prompt_tokens_computed"],
            generation_tokens=self.stats["generation_tokens"],
            num_preemptions=self.scheduler.num_preemptions,
            extra={
                "steps": self.stats["steps"],
                "forward_seconds": self.stats["forward_seconds"],
                "evicted_blocks": self.stats["evicted_blocks"],
                "restored_tokens": self.stats["restored_tokens"],
            },
        )

    # -- saving and restoring contexts (optional protocol methods) ------------------------
    @functools.cached_property
    def kv_spec(self) -> KVSpec:
        """What a saved context must match to be imported here (model fingerprint, KV dtype
        and shape); the block size is informational: KV travels per token."""
        mc = self.model.config
        return KVSpec(
            fingerprint=model_fingerprint(self.model),
            model_name=self.model_name,
            dtype=self.kv.dtype,
            hidden_dtype=self.model.dtype,
            num_layers=mc.num_layers,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            hidden_size=mc.hidden_size,
            vocab_size=mc.vocab_size,
            block_size=self.pool.block_size,
        )

    async def export_context(self, context_id: int) -> ContextKV:
        """The context's tokens (its whole sequence, ancestors' tokens included), their KV and
        the hidden state its next token is sampled from, copied to the CPU. KV that was evicted
        (or a last token whose hidden state was not kept) is computed first, exactly as a fill
        computes it. Raises `UnknownContextError` for an unknown context, `InvalidRequestError`
        for an empty one or one a request is running on. Changes no token of the context."""
        for _ in range(_EXPORT_ATTEMPTS):
            exported = await self._on_thread(lambda: self._export_now(context_id))
            if exported is not None:
                return exported
            await self._compute_context(context_id)
        raise OutOfBlocksError(f"context {context_id}: its KV was evicted again each time it was recomputed; retry when the pool is less busy")

    async def import_context(self, context_id: int, kv: ContextKV) -> None:
        """Create root context `context_id` holding `kv.token_ids`, their KV written from `kv`
        (nothing computed; blocks the prefix cache already holds for the same tokens are shared
        instead) and full blocks registered in the prefix cache like computed ones. With
        `kv.last_hidden` the next generate samples at once; without it, it recomputes the last
        token. Atomic: on any error (a taken id, bad shapes or ids, too long, no room even after
        evicting idle contexts: `OutOfBlocksError`) nothing changes."""
        await self._on_thread(lambda: self._import_now(context_id, kv))

    # -- reads for suspendable generations (optional protocol methods) --------------------
    def context_tokens(self, context_id: int) -> asyncio.Future[list[int]]:
        """The context's whole token sequence, read on the engine thread by the command posted
        now (after an aborted generate: every token it sampled). Unknown: `UnknownContextError`."""
        return asyncio.wrap_future(self._submit(lambda: list(self.tree.get(context_id).token_ids)))

    def kv_residency(self, context_ids: Sequence[int]) -> asyncio.Future[dict[int, tuple[int, int]]]:
        """(tokens, tokens with KV computed) of each of these contexts the engine holds, read
        on the engine thread by the command posted now: before any generate posted later."""
        ids = list(context_ids)

        def read() -> dict[int, tuple[int, int]]:
            held = (self.tree.get(cid) for cid in ids if cid in self.tree)
            return {ctx.context_id: (len(ctx.token_ids), ctx.num_computed) for ctx in held}

        return asyncio.wrap_future(self._submit(read))

    async def _on_thread(self, fn: Callable[[], T]) -> T:
        """`call` for async callers: run `fn` on the engine thread without blocking the loop."""
        return await asyncio.wrap_future(self._submit(fn))

    async def _compute_context(self, context_id: int) -> None:
        """Compute the uncomputed tokens of an existing context (a fill of no new tokens)."""
        future: concurrent.futures.Future[FillResult] = concurrent.futures.Future()
        sink = _future_sink(future)

        def start() -> None:
            if context_id not in self.tree:  # freed meanwhile: never create it anew
                sink(UnknownContextError(f"unknown context {context_id}"))
            else:
                self._start(Kind.FILL, context_id, None, [], None, sink)

        self._post(start)
        await asyncio.wrap_future(future)

    def _export_now(self, context_id: int) -> ContextKV | None:
        """On the engine thread: the export if every token's KV and the last hidden state are
        there, else None (after forgetting the last token's KV if only its hidden state is
        missing, so that computing the context yields it)."""
        if context_id in self._active:
            raise InvalidRequestError(f"context {context_id} is busy with another request")
        ctx = self.tree.get(context_id)
        n = len(ctx.token_ids)
        if n == 0:
            raise InvalidRequestError(f"context {context_id} is empty: nothing to save")
        if ctx.num_computed == n and ctx.last_hidden is None:
            self.tree.uncompute_last(ctx)
        if ctx.num_computed < n:
            return None
        idx = torch.tensor(self.tree.slots(ctx, 0, n), dtype=torch.long, device=self.kv.device)
        k, v = (torch.stack(per_layer).cpu() for per_layer in zip(*(self.kv.read(i, idx) for i in range(self.model.config.num_layers))))
        hidden = ctx.last_hidden
        assert isinstance(hidden, torch.Tensor)
        self._last_used[context_id] = self._step_no
        return ContextKV(list(ctx.token_ids), k, v, hidden.detach().to("cpu", copy=True))

    def _import_now(self, context_id: int, kv: ContextKV) -> None:
        mc, n = self.model.config, len(kv.token_ids)
        shape = (mc.num_layers, n, mc.num_kv_heads, mc.head_dim)
        if n == 0 or tuple(kv.k.shape) != shape or tuple(kv.v.shape) != shape:
            raise InvalidRequestError(f"KV of shape {tuple(kv.k.shape)} / {tuple(kv.v.shape)} for {n} tokens; expected {shape}")
        if kv.last_hidden is not None and tuple(kv.last_hidden.shape) != (mc.hidden_size,):
            raise InvalidRequestError(f"last_hidden of shape {tuple(kv.last_hidden.shape)}; expected ({mc.hidden_size},)")
        if context_id in self.tree:
            raise ContextExistsError(f"context {context_id} already exists")
        need = -(-n // self.pool.block_size)
        ctx = self.tree.create(context_id, None)
        try:
            self._validate(ctx, kv.token_ids, None)
            if self.pool.num_available < need:
                self._evict_idle(need)  # before the lookup below, so it cannot evict this context's hits
            self.tree.append_tokens(ctx, kv.token_ids)
            self.tree.match_prefix(ctx)
            start = ctx.num_computed
            idx = torch.tensor(self.tree.allocate_slots(ctx, n - start), dtype=torch.long, device=self.kv.device)
            for layer in range(mc.num_layers):
                k, v = (t[layer, start:].to(self.kv.device, self.kv.dtype) for t in (kv.k, kv.v))
                self.kv.write(layer, idx, k, v)
            self.tree.commit(ctx, n - start)
        except BaseException:
            self.tree.free(context_id)
            raise
        if kv.last_hidden is not None:
            ctx.last_hidden = kv.last_hidden.to(self.model.device, self.model.dtype)
        self._last_used[context_id] = self._step_no
        self.stats["restored_tokens"] += n - start

    # -- helpers for the runtime and tests -------------------------------------------------
    def call(self, fn: Callable[[], T], timeout: float | None = 60) -> T:
        """Run `fn` on the engine thread and return its result (state is only safe there)."""
        if threading.current_thread() is self._thread:
            return fn()
        return self._submit(fn).result(timeout)

    def _submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `fn` on the engine thread; its result or exception lands in the future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)

        self._post(run)
        return future

    def check_invariants(self) -> None:
        self.call(self.tree.check_invariants)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def max_num_seqs(self) -> int:
        return self.config.max_num_seqs

    def context_ids(self) -> set[int]:
        """The ids of the contexts the engine holds now."""
        return self.call(lambda: {c.context_id for c in self.tree.contexts()})

    def reset_prefix_cache(self) -> int:
        """Forget the prefixes of free blocks (in-use KV is untouched). Returns how many."""
        return self.call(self.pool.reset_prefix_cache)

    def wait_idle(self, timeout: float = 60) -> None:
        """Block until no request is waiting or running (for tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while self.call(lambda: self.scheduler.has_work or bool(self._commands)):
            if time.monotonic() > deadline:
                raise TimeoutError("engine still busy")
            time.sleep(0.005)

    def close(self) -> None:
        with self._wakeup:
            if self._closed:
                return
            self._closed = True
            self._wakeup.notify()
        self._thread.join(timeout=30)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the step-loop thread ------------------------------------------------------------
    def _post(self, command: Callable[[], None]) -> None:
        with self._wakeup:
            if self._closed:
                raise RuntimeClosedError(f"engine {self.model_name!r} is closed")
            self._commands.append(command)
            self._wakeup.notify()

    def _run(
        self,
        built: concurrent.futures.Future[None],
        model: LlamaModel | str | os.PathLike[str] | None,
        tokenizer: Tokenizer | None,
        model_name: str | None,
    ) -> None:
        """The step-loop thread: build the engine, then loop until closed. Every large torch op
        of the engine (load, weight packing, KV allocation, steps) runs on this one thread: with
        the CPU build's OpenMP (libgomp), each thread that starts parallel work keeps a worker
        pool of its own, and once the pools hold more threads than there are cores, every
        worker sleeps between ops instead of spinning. Loading on the caller's thread made each
        step 25-40% slower (a 32-sequence decode step: ~80 -> ~110 ms on 2 cores)."""
        try:
            self._build(model, tokenizer, model_name)
        except BaseException as e:  # noqa: BLE001 - raised again in the constructor's thread
            self._closed = True
            built.set_exception(e)
            return
        built.set_result(None)
        self._loop()

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                while not self._commands and not self.scheduler.has_work and not self._closed:
                    self._wakeup.wait()
                commands, self._commands = self._commands, []
            self._run_commands(commands)
            if self._closed:
                break
            if self.scheduler.has_work:
                try:
                    self._step()
                except Exception:  # a bug in one step must not take the engine down
                    log.exception("engine step crashed; failing its requests")
                    self._fail_all(EngineError("internal engine error (see the server log)"))
        # Closed: `_post` takes no more commands. Those already queued still run (each answers
        # its caller), then every request still queued or running fails: nobody is left waiting.
        with self._wakeup:
            commands, self._commands = self._commands, []
        self._run_commands(commands)
        self._fail_all(RuntimeClosedError("the engine was closed"))

    @staticmethod
    def _run_commands(commands: list[Callable[[], None]]) -> None:
        for command in commands:
            try:
                command()
            except Exception:  # a command reports to its own caller; never kill the loop
                log.exception("engine command failed")

    def _start(
        self,
        kind: Kind,
        context_id: int,
        parent_id: int | None,
        tokens: list[int],
        params: SamplingParams | None,
        emit: Callable[[object], None],
    ) -> EngineRequest | None:
        try:
            ctx = self._context_for(context_id, parent_id)
            self._validate(ctx, tokens, params)
            generator = None
            if params is not None and params.seed is not None:
                generator = torch.Generator(device="cpu").manual_seed(params.seed)
                if not params.greedy:  # a resumed generation continues its random stream
                    skip_draws(generator, params.prior_output_tokens, self.model.dtype)
            matcher = self._matcher(params.structured) if params is not None and params.structured is not None else None
        except Exception as e:  # the caller must always hear back, whatever went wrong
            emit(e if isinstance(e, ParrotError) else EngineError(f"{type(e).__name__}: {e}"))
            return None
        prompt_lp: list[TokenLogprob | None] | None = None
        if params is not None and params.prompt_logprobs is not None:
            prompt_lp = self._prepare_prompt_logprobs(ctx, tokens, params.prompt_logprobs)
        prompt_start = len(ctx.token_ids)
        self.tree.append_tokens(ctx, tokens)
        if kind is Kind.GENERATE and ctx.last_hidden is None and ctx.num_computed == len(ctx.token_ids):
            self.tree.uncompute_last(ctx)  # no hidden state kept (a carved-out prefix): recompute one token
        req = EngineRequest(next(self._ids), kind, ctx, emit, params=params, new_tokens=len(tokens), generator=generator)
        req.prompt_logprobs, req.prompt_start, req.matcher = prompt_lp, prompt_start, matcher
        if kind is Kind.GENERATE:
            req.detokenizer = self.tokenizer.detokenizer() if self.tokenizer is not None else None
        if kind is Kind.FILL and req.num_uncomputed == 0:
            emit(FillResult(context_id, 0, 0))  # nothing to compute
            return None
        self._active[context_id] = req
        self._last_used[context_id] = self._step_no
        self.scheduler.add(req)
        return req

    def _prepare_prompt_logprobs(self, ctx: KVContext, tokens: list[int], k: int) -> list[TokenLogprob | None]:
        """Before `tokens` join `ctx`: the prompt-logprob list to fill as the prompt is computed.
        Its first entry needs the hidden state of the token before the prompt: taken at once
        when the context keeps it, else that token is recomputed with the prompt (the request
        then skips the prefix cache, so every later row is computed too). A prompt starting
        the sequence has nothing before its first token: that entry stays None."""
        entries: list[TokenLogprob | None] = [None] * len(tokens)
        n = len(ctx.token_ids)
        if n == 0 or not tokens or ctx.num_computed < n:
            return entries  # nothing before, or the token before is still to be computed
        if ctx.last_hidden is None:
            self.tree.uncompute_last(ctx)
            return entries
        assert isinstance(ctx.last_hidden, torch.Tensor)
        logits = self.model.compute_logits(ctx.last_hidden[None])
        entries[0] = token_logprobs(logits, tokens[:1], [k])[0]
        return entries

    @functools.cached_property
    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        """The tokenizer as llguidance needs it (built once, ~0.3 s for a 49k vocabulary)."""
        if self.tokenizer is None:
            raise InvalidRequestError("structured output needs a tokenizer; this engine has none")
        eos = self.eos_token_id
        return llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.model.config.vocab_size, eos_token=eos)

    @functools.cached_property
    def _ll_executor(self) -> llguidance.LLExecutor:
        return llguidance.LLExecutor()

    def _matcher(self, spec: StructuredSpec) -> llguidance.LLMatcher:
        """A matcher in the start state of `spec`'s grammar, compiled once per grammar."""
        template = self._grammars.get(spec.grammar_text)
        if template is None:
            template = llguidance.LLMatcher(self._ll_tokenizer, spec.grammar_text, log_level=0)
            if template.is_error():
                raise InvalidRequestError(f"structured output does not compile for this model: {template.get_error()}")
            if len(self._grammars) >= _GRAMMAR_CACHE:
                self._grammars.pop(next(iter(self._grammars)))
            self._grammars[spec.grammar_text] = template
        return template.deep_copy()

    def _mask_structured(self, logits: torch.Tensor, raw: torch.Tensor, gens: list[tuple[EngineRequest, Any]]) -> torch.Tensor:
        """A copy of `logits` in which each row of a structured request has -inf on the tokens
        its grammar does not allow next; other rows are untouched. A row left with nothing
        (the logit processing forbade every allowed token, e.g. min_tokens vs. a finished
        grammar) takes the grammar's tokens from its raw logits: the grammar wins."""
        rows = [i for i, (r, _) in enumerate(gens) if r.matcher is not None]
        vocab = logits.shape[1]
        bitmask = llguidance.torch.allocate_token_bitmask(len(rows), vocab)
        matchers = [(gens[i][0].matcher, k) for k, i in enumerate(rows)]
        llguidance.torch.fill_next_token_bitmask_par(self._ll_executor, matchers, bitmask)  # type: ignore[arg-type]
        bits = (bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
        allowed = bits.reshape(len(rows), -1)[:, :vocab].bool().to(logits.device)
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        sub = logits.index_select(0, index).masked_fill(~allowed, float("-inf"))
        dead = torch.isinf(sub).all(dim=-1) & allowed.any(dim=-1)
        if bool(dead.any()):
            sub[dead] = raw.index_select(0, index)[dead].masked_fill(~allowed[dead], float("-inf"))
        out = logits.clone()
        out[index] = sub
        return out

    def _context_for(self, context_id: int, parent_id: int | None) -> KVContext:
        if context_id in self._active:
            raise InvalidRequestError(f"context {context_id} is busy with another request")
        if context_id in self.tree:
            return self.tree.get(context_id)
        if parent_id is not None and parent_id not in self.tree:
            raise InvalidRequestError(f"parent context {parent_id} of context {context_id} does not exist on this engine")
        return self.tree.create(context_id, parent_id)

    def _validate(self, ctx: KVContext, tokens: list[int], params: SamplingParams | None) -> None:
        check_request(
            len(ctx.token_ids), tokens, params,
            vocab_size=self.vocab_size, max_model_len=self.max_model_len, block_size=self.pool.block_size, num_blocks=self.pool.num_blocks,
        )  # fmt: skip
        if params is not None and params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")

    def _free(self, context_id: int) -> None:
        req = self._active.get(context_id)
        if req is not None:
            self._abort(req)
        self.tree.free(context_id)
        self._last_used.pop(context_id, None)
        self._pinned.discard(context_id)

    def _abort(self, req: EngineRequest | None) -> None:
        if req is None or req.finished:
            return
        self.scheduler.remove(req)
        self._finish(req, FINISH_ABORT)

    def _evict_idle(self, blocks_needed: int) -> int:
        """Drop the KV of contexts that no running request works on (held, waiting or done),
        least recently used first and pinned ones last, until `blocks_needed` blocks are
        available. Their tokens stay; they are recomputed (mostly re-hit in the prefix cache)
        on their next use. Returns the blocks available."""
        running = self.scheduler.running_context_ids()
        idle = [c for c in self.tree.contexts() if c.blocks and c.context_id not in running]
        order = lambda c: (c.context_id in self._pinned, self._last_used.get(c.context_id, -1))  # noqa: E731
        for ctx in sorted(idle, key=order):
            if self.pool.num_available >= blocks_needed:
                break
            before = self.pool.num_available
            self.tree.release(ctx)
            self.stats["evicted_blocks"] += self.pool.num_available - before
        return self.pool.num_available

    # -- one step ------------------------------------------------------------------------
    def _step(self) -> None:
        self._step_no += 1
        self.stats["steps"] += 1
        plan = self.scheduler.schedule()
        for req in plan.preempted:
            log.debug("request %d preempted (KV blocks exhausted); it will be recomputed", req.request_id)
        if plan.empty:
            # Unreachable by the scheduler's contract (the earliest request always progresses);
            # if it happens anyway, fail the head of the line loudly rather than spin.
            req = (self.scheduler.running or list(self.scheduler.waiting))[0]
            self.scheduler.remove(req)
            self.tree.release(req.context)
            log.error("engine made no progress; failing request %d", req.request_id)
            self._fail(req, OutOfBlocksError(f"no progress possible for request {req.request_id} ({self.pool.num_available} blocks available)"))
            return
        try:
            hidden, rows = self._forward(plan.compute) if plan.compute else (None, [])
            ready: list[tuple[EngineRequest, torch.Tensor]] = []
            for (req, n), (first, last) in zip(plan.compute, rows, strict=True):
                ctx = req.context
                if not req.sampling:
                    self.stats["prompt_tokens_computed"] += n
                assert hidden is not None
                if req.prompt_logprobs is not None:
                    self._record_prompt_logprobs(req, hidden[first : last + 1], ctx.num_computed)
                self.tree.commit(ctx, n)
                if req.num_uncomputed == 0:
                    ctx.last_hidden = hidden[last]
                    ready.append((req, hidden[last]))
            ready.extend((req, req.context.last_hidden) for req in plan.sample_only)
            self._postprocess(ready)
        except Exception as e:  # noqa: BLE001 - a bad step fails its requests, not the engine
            log.exception("engine step failed")
            error = EngineError(f"engine step failed: {e}")
            for req in [r for r, _ in plan.compute] + plan.sample_only:
                self.scheduler.remove(req)
                self.tree.release(req.context)
                self._fail(req, error)

    def _forward(self, compute: list[tuple[EngineRequest, int]]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Run the model over the scheduled tokens. Returns the hidden states it kept and, per
        request, the (first, last) row of its own in them: only its last token's row, or every
        computed token's row for a request owed prompt logprobs."""
        new_tokens, context_lens, tables = [], [], []
        for req, n in compute:
            ctx = req.context
            new_tokens.append(ctx.token_ids[ctx.num_computed : ctx.num_computed + n])
            context_lens.append(ctx.num_computed + n)
            tables.append(self.tree.block_table(ctx))
        batch = ForwardBatch.build(new_tokens, context_lens, tables, self.pool.block_size, self.config.device)
        output_rows: torch.Tensor | None = None
        if any(req.wants_all_rows for req, _ in compute):
            kept: list[int] = []
            start_row = 0
            for req, n in compute:
                kept.extend(range(start_row, start_row + n) if req.wants_all_rows else [start_row + n - 1])
                start_row += n
            output_rows = torch.tensor(kept, dtype=torch.long, device=batch.token_ids.device)
        rows, at = [], 0
        for req, n in compute:
            width = n if output_rows is not None and req.wants_all_rows else 1
            rows.append((at, at + width - 1))
            at += width
        start = time.perf_counter()
        hidden = self.model.forward(batch, self.kv) if output_rows is None else self.model.forward(batch, self.kv, output_rows)
        self.stats["forward_seconds"] += time.perf_counter() - start
        return hidden, rows

    def _record_prompt_logprobs(self, req: EngineRequest, hidden: torch.Tensor, first_position: int) -> None:
        """`hidden` holds the rows of context positions first_position.. just computed; the row at
        position p gives the logprob of the token at p + 1 when that token is in the prompt."""
        entries = req.prompt_logprobs
        assert entries is not None and req.params is not None and req.params.prompt_logprobs is not None
        tokens = req.context.token_ids
        lo = max(first_position, req.prompt_start - 1)
        hi = min(first_position + hidden.shape[0], req.prompt_start + len(entries) - 1)  # rows [lo, hi)
        for a in range(lo, hi, _LOGPROB_ROWS):
            b = min(a + _LOGPROB_ROWS, hi)
            logits = self.model.compute_logits(hidden[a - first_position : b - first_position])
            targets = tokens[a + 1 : b + 1]
            for p, entry in zip(range(a, b), token_logprobs(logits, targets, [req.params.prompt_logprobs] * len(targets))):
                entries[p + 1 - req.prompt_start] = entry

    def _postprocess(self, ready: list[tuple[EngineRequest, Any]]) -> None:
        for req, _ in ready:
            self._last_used[req.context.context_id] = self._step_no
        fills = [req for req, _ in ready if req.kind is Kind.FILL]
        gens = [(req, h) for req, h in ready if req.kind is Kind.GENERATE]
        for req in fills:
            self.scheduler.remove(req)
            self._active.pop(req.context.context_id, None)
            req.finished = True
            _emit(req, FillResult(req.context.context_id, req.new_tokens, req.cached_tokens))
        if not gens:
            return
        logits = self.model.compute_logits(torch.stack([h for _, h in gens]))
        params = [r.params for r, _ in gens]
        raw = logits  # logprobs are of the model's own distribution (vLLM's raw_logprobs)
        if any(p.processes_logits for p in params):
            histories = [_history(r) if p.processes_logits else None for (r, _), p in zip(gens, params)]
            logits = apply_penalties(logits, params, histories, self.eos_token_id)
        if any(r.matcher is not None for r, _ in gens):
            logits = self._mask_structured(logits, raw, gens)
        tokens = sample(logits, params, [r.generator for r, _ in gens])
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        lps: list[TokenLogprob | None] = [None] * len(gens)
        if wanted:
            ks = [params[i].logprobs for i in wanted]
            for i, lp in zip(wanted, token_logprobs(raw[wanted], [tokens[i] for i in wanted], ks)):  # type: ignore[arg-type]
                lps[i] = lp
        for (req, _), token, lp in zip(gens, tokens, lps, strict=True):
            self._accept_token(req, token, lp)

    def _delta(
        self,
        req: EngineRequest,
        token_ids: list[int],
        text: str,
        reason: str | None = None,
        lp: TokenLogprob | None = None,
        stop_token_id: int | None = None,
    ) -> GenerationDelta:
        """A delta of `req`, with the logprobs its params ask for (the prompt's on the first;
        `lp` is that of the token in `token_ids`, or of `stop_token_id`)."""
        assert req.params is not None
        logprobs = None
        if req.params.logprobs is not None:
            logprobs = [lp] if (token_ids or stop_token_id is not None) and lp is not None else []
        prompt, req.prompt_logprobs = req.prompt_logprobs, None
        return GenerationDelta(token_ids, text, reason, req.cached_tokens, logprobs, prompt, stop_token_id)

    def _accept_token(self, req: EngineRequest, token: int, lp: TokenLogprob | None = None) -> None:
        params = req.params
        assert params is not None
        if (token == self.eos_token_id and not params.ignore_eos) or token in params.stop_token_ids:
            self._flush_text(req)  # the end token is not output, but bytes held back are
            self._finish(req, FINISH_STOP, lp=lp, stop_token_id=token)
            return
        if req.matcher is not None and not req.matcher.consume_token(token):
            self.scheduler.remove(req)
            self._fail(req, EngineError(f"token {token} broke the structured-output grammar: {req.matcher.get_error()}"))
            return
        req.output_ids.append(token)
        self.tree.append_tokens(req.context, [token])
        self.stats["generation_tokens"] += 1
        if req.detokenizer is not None:
            req.text += req.detokenizer.push([token])
        if req.matcher is not None and req.matcher.is_stopped():  # the grammar admits nothing more
            self._flush_text(req)
            self._finish(req, FINISH_STOP, token_ids=[token], lp=lp)
        elif params.stop and self._cut_at_stop(req):
            self._finish(req, FINISH_STOP, token_ids=[token], lp=lp)
        elif len(req.output_ids) >= params.max_tokens:
            stopped = self._flush_text(req)
            self._finish(req, FINISH_STOP if stopped else FINISH_LENGTH, token_ids=[token], lp=lp)
        else:
            hold = max((len(s) - 1 for s in params.stop), default=0)  # a stop string may be starting
            safe = max(req.sent_chars, len(req.text) - hold)
            piece = req.text[req.sent_chars : safe]
            req.sent_chars = safe
            _emit(req, self._delta(req, [token], piece, lp=lp))

    def _flush_text(self, req: EngineRequest) -> bool:
        """The generation ends: add what the detokenizer held back (a multi-byte character
        in progress). Returns True if a stop string then cut the text."""
        if req.detokenizer is not None:
            req.text += req.detokenizer.flush()
        return bool(req.params and req.params.stop) and self._cut_at_stop(req)

    @staticmethod
    def _cut_at_stop(req: EngineRequest) -> bool:
        assert req.params is not None
        at = find_stop(req.text, req.params.stop, req.sent_chars)
        if at is None:
            return False
        req.text = req.text[:at]
        return True

    def _finish(
        self,
        req: EngineRequest,
        reason: str,
        token_ids: list[int] | None = None,
        lp: TokenLogprob | None = None,
        stop_token_id: int | None = None,
    ) -> None:
        self.scheduler.remove(req)
        self._active.pop(req.context.context_id, None)
        req.finished = True
        if req.kind is Kind.FILL:
            _emit(req, EngineError(f"fill of context {req.context.context_id} was aborted"))
            return
        piece = req.text[req.sent_chars :]
        req.sent_chars = len(req.text)
        _emit(req, self._delta(req, token_ids or [], piece, reason, lp, stop_token_id))

    def _fail(self, req: EngineRequest, error: BaseException) -> None:
        self._active.pop(req.context.context_id, None)
        req.finished = True
        _emit(req, error)

    def _fail_all(self, error: BaseException) -> None:
        for req in list(self._active.values()):
            self.scheduler.remove(req)
            self._fail(req, error)


def load_model(
    path: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[LlamaModel, LoadedModel]:
    """A llama GGUF file's `LlamaModel` (None: the default model) and the rest the file holds
    (tokenizer, name, config; its `weights` emptied: the model keeps fused copies), for engines
    that share one set of weights: `BuiltinEngine(model, loaded.tokenizer, ...)`. Built on a
    short-lived thread of its own, so the caller's thread never starts an OpenMP pool that
    would slow every engine's steps (see `BuiltinEngine._run`). Raises `ModelLoadError` as
    `load_gguf` does."""
    result: concurrent.futures.Future[tuple[LlamaModel, LoadedModel]] = concurrent.futures.Future()

    def build() -> None:
        try:
            result.set_result(_load_model(path, dtype, device))
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            result.set_exception(e)

    worker = threading.Thread(target=build, name="parrot-load-model")
    worker.start()
    worker.join()  # its OpenMP pool ends with it
    return result.result()


def _load_model(path: str | os.PathLike[str] | None, dtype: torch.dtype, device: str) -> tuple[LlamaModel, LoadedModel]:
    from parrot_core.engines.builtin.default_model import default_model_path
    from parrot_core.engines.builtin.gguf_loader import load_gguf

    loaded = load_gguf(str(path or default_model_path()), dtype=dtype, device=device)
    model = LlamaModel(loaded.config, loaded.weights, dtype=dtype, device=device)
    loaded.weights = {}
    return model, loaded


def _history(req: EngineRequest) -> tuple[list[int], list[int]]:
    """A generate's (prompt ids, output ids): the context holds the prompt, then the output
    (that of earlier slices, `prior_output_tokens`, included)."""
    tokens = req.context.token_ids
    n = len(req.output_ids) + (req.params.prior_output_tokens if req.params is not None else 0)
    return tokens[: len(tokens) - n], tokens[len(tokens) - n :]


def _emit(req: EngineRequest, event: object) -> None:
    """Report to a request's caller; a caller that is gone must not break the step loop."""
    try:
        req.emit(event)
    except Exception:
        log.exception("could not report to the caller of request %d", req.request_id)


def _future_sink(future: concurrent.futures.Future[Any]) -> Callable[[object], None]:
    def emit(event: object) -> None:
        if future.done():
            return
        if isinstance(event, BaseException):
            future.set_exception(event)
        else:
            future.set_result(event)

    return emit


def _blocks_for_memory(mc: Any, config: EngineConfig) -> int:
    bytes_per_slot = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * torch.finfo(config.dtype).bits // 8
    return max(1, int(config.kv_cache_memory_gb * 2**30) // (bytes_per_slot * config.block_size))
