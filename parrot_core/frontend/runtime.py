"""`Runtime`: the in-process core. It owns an asyncio loop in a background thread, one or more
engines (the builtin engine on the default model unless told otherwise) and the serve layer's
`ServeCoreContextManager`, so every KV context an engine holds is a serve-layer `Context`
whose reference count and token count describe it. With several engines, every piece of work
is placed by the global scheduler (prefix affinity first, then load; serve/scheduler.py), and
the work on one context (a handle, a chat session, a continuation) stays on its engine.

Synchronous methods run their coroutine on the runtime's loop and block; `a`-prefixed
methods are the same coroutines for async callers (they hop onto the runtime's loop too).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from parrot_core.contexts import Context
from parrot_core.engines.base import STRUCTURED_KINDS, Engine, SamplingParams, TokenLogprob, capability, split_structured
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from parrot_core.errors import InvalidRequestError, InvariantError, RuntimeClosedError, UnknownContextError
from parrot_core.graph import NativeFuncNode, Parameter, PerfCriteria, RequestMetadata, SemanticVariable
from parrot_core.frontend import saved_contexts
from parrot_core.frontend.handle import ContextHandle
from parrot_core.serve.core import ServeCore
from parrot_core.serve.scheduler import SchedTask, check_balance_thresholds

log = logging.getLogger(__name__)
T = TypeVar("T")
Prompt = str | Sequence[int]
EXPIRY_PERIOD_S = 10.0
CLOSE_GRACE_S = 5.0  # how long close() lets in-flight calls unwind before cancelling them
_CURRENT: list[Runtime] = []  # runtimes entered with `with`, innermost last


def current_runtime() -> Runtime:
    """The runtime of the innermost `with P.Runtime()` block."""
    if not _CURRENT:
        raise RuntimeClosedError("no Runtime is active: call inside `with P.Runtime() as rt:` or use fn.invoke(rt, ...)")
    return _CURRENT[-1]


@dataclass(frozen=True)
class StreamDelta:
    """Part of a streamed generation; the last one has `finish_reason` set. With `logprobs=k`,
    `logprobs` has one entry per token of `token_ids`; with `prompt_logprobs=k`, the first delta
    carries one entry per prompt token (the first None: nothing precedes it)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    stop_token_id: int | None = None  # last delta: the EOS / stop token id that ended it (not output)


@dataclass(frozen=True)
class GenerateOutput:
    """One generation. `token_ids` are what the context gained (a final EOS / stop token id
    is not included); `text` is cut before a stop string; `cached_tokens` of the prompt's
    tokens came from the prefix cache instead of being computed. `logprobs` (with
    `logprobs=k`): one `TokenLogprob` per token of `token_ids`; `prompt_logprobs` (with
    `prompt_logprobs=k`): one per prompt token, the first None. `stop_token_id`: the EOS or
    stop token id that ended the generation (not in `token_ids`; with logprobs, its entry is
    the last of `logprobs`)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    stop_token_id: int | None = None


class Runtime:
    """The in-process core: one engine's KV pool, the serve layer's contexts and the local
    program session, behind blocking methods (and `a`-prefixed async forms).

    Lifecycle (cyllama's context lifecycle, for a runtime that serves many contexts):
    - The KV pool is allocated once, when the engine is built, and reused for the runtime's
      whole life: contexts take and give back blocks; nothing is ever reallocated.
    - `flush_cache()` forgets the cached KV that nothing holds (the analogue of
      `kv_cache_clear()`); `reset()` drops every context, session and cached prefix while the
      model and the pool stay (the analogue of `reset_context()`).
    - `close()` is idempotent and `with` closes. A runtime dropped without `close()` is closed
      when it is garbage collected, and one still open at interpreter exit is closed before
      the interpreter shuts down; neither raises nor prints.
    - A closed runtime refuses work: every method that needs its engine or loop (generate,
      streams, the context API and handles, programs, stats, check_invariants, flush_cache,
      reset, save and load, a new `with` block) raises `RuntimeClosedError`; `close()` is a
      no-op. The pure tokenizer helpers (tokenize, detokenize, tokenize_prompt,
      apply_chat_template) hold no resource and keep working; attributes (`closed`, `engine`,
      `core`, `contexts`) stay readable.

    Contexts saved with `ContextHandle.save(path)` / `save_context` come back, in this or any
    runtime on the same model, with `load_context(path)` (engines/builtin/kv_io.py).

    Engines: `Runtime()` builds the builtin engine from the keyword options; `engine=` takes
    any engine (`BuiltinEngine`, `VLLMEngine`, `OpenAIEngine`); `engines=[...]` several, named
    `engine_ids` ("builtin-0", "vllm-0", ...). `engine` is the first: suspendable generations
    and loaded contexts go there; other work is placed by the global scheduler (see the
    module docstring): by prefix affinity, then load, and by load alone once the engines' task
    counts differ by more than `balance_abs_threshold` tasks and `balance_rel_threshold` times.
    What an engine cannot do raises `UnsupportedByEngineError`.
    """

    # Chat sessions live in `parrot_core.chat`, a layer above this one; importing it (as
    # `import parrot_core` does) sets this to its `ChatSessionManager`.
    _chat_manager_factory: ClassVar[Callable[[Runtime], Any] | None] = None
    # Suspendable generations live in `parrot_core.switching`, beside chat; importing it sets
    # this to its `SwitchingManager`.
    _switching_factory: ClassVar[Callable[..., Any] | None] = None

    def __init__(
        self,
        model: str | None = None,
        *,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        kv_cache_memory_gb: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        engine: Engine | None = None,
        engines: Sequence[Engine] | None = None,
        latency_cap: int = 4,
        constant_prefix_timeout: float = 600.0,
        session_timeout: float | None = None,
        max_suspended: int = 1024,
        suspended_ttl: float = 600.0,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
    ) -> None:
        check_balance_thresholds(balance_abs_threshold, balance_rel_threshold)  # before any engine is built
        if engines:
            if engine is not None:
                raise InvalidRequestError("give either engine or engines, not both")
            engine = engines[0]
        if engine is None:
            config = EngineConfig(
                model=model,
                block_size=block_size,
                num_kv_blocks=num_kv_blocks,
                enable_prefix_caching=enable_prefix_caching,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max_model_len,
                kv_cache_memory_gb=kv_cache_memory_gb,
                dtype=dtype,
                device=device,
            )
            engine = BuiltinEngine.from_gguf(model, config)
        self.engine = engine  # the first engine: suspendable generations and loaded contexts go there
        all_engines = list(engines or [engine])
        if len({id(e) for e in all_engines}) != len(all_engines):
            raise InvalidRequestError("the same engine is given twice")
        self.engine_ids = _engine_ids(all_engines)
        self.engine_id = self.engine_ids[0]
        self.core = ServeCore(
            dict(zip(self.engine_ids, all_engines)),
            latency_cap=latency_cap,
            constant_prefix_timeout=constant_prefix_timeout,
            session_timeout=session_timeout,
            balance_abs_threshold=balance_abs_threshold,
            balance_rel_threshold=balance_rel_threshold,
        )
        self.contexts = self.core.contexts
        self.session = self.core.create_session("local", weak_variables=True)  # callers hold their variables
        self.session.permanent = True
        self._closed = False
        self._chat_sessions: Any = None
        self._chat_lock = threading.Lock()
        self._switching: Any = None
        self._switching_limits = {"max_suspended": max_suspended, "max_age": suspended_ttl}
        if Runtime._switching_factory is not None:
            self._switching = Runtime._switching_factory(self, **self._switching_limits)  # checks the limits now
        self._loop = asyncio.new_event_loop()
        self.core.bind_loop(self._loop)
        self._thread = threading.Thread(target=self._loop.run_forever, name="parrot-runtime", daemon=True)
        self._thread.start()
        # Only a weak reference lives on the loop, so a runtime nobody holds is collected.
        self._finalizer = weakref.finalize(self, _release, self._loop, self.core, self._thread)
        self._loop.call_soon_threadsafe(_tick, weakref.ref(self))

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Runtime:
        if self._closed:
            raise RuntimeClosedError("this Runtime is closed")
        _CURRENT.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self in _CURRENT:
            _CURRENT.remove(self)
        self.close()

    def close(self) -> None:
        """Refuse new work, remove the sessions, close the engines (every queued or running
        engine request fails with `RuntimeClosedError`), let the callers hear it, then stop
        the loop. Every call still waiting raises `RuntimeClosedError`; nothing hangs.
        Idempotent."""
        if self._closed:
            return
        if self._chat_sessions is not None:
            self._chat_sessions.close()  # frees their KV while the loop still runs
        self._closed = True
        if self._finalizer.detach() is not None:  # closing now: garbage collection has nothing left to do
            _shutdown(self._loop, self.core, self._thread)

    def flush_cache(self) -> int:
        """Forget the cached KV that nothing holds (free blocks keep no prefix for later hits),
        the analogue of `kv_cache_clear()`. Contexts, handles and pinned prefixes keep theirs.
        Returns how many blocks were forgotten."""
        return self._run(self._flush_cache())

    async def _flush_cache(self) -> int:
        return sum([await asyncio.to_thread(e.reset_prefix_cache) for e in self.core.engines.values()])

    def reset(self) -> None:
        """Drop every context, session and cached prefix while the model and the KV pool stay
        (the analogue of `reset_context()`): chat sessions are closed, program sessions removed
        (their pending outputs fail), constant-prefix pins dropped, every held context released
        (handles from before are dead: their methods raise `UnknownContextError`, `with`
        exits quietly), and the prefix cache forgotten. The local program session starts
        afresh (variables from before belong to the removed one). Work in flight is aborted:
        a generation ends with finish_reason "abort", a fill fails. Afterwards no context is
        live, every block is free, and the runtime works as new (counters keep counting)."""
        if self._closed:
            raise RuntimeClosedError("this Runtime is closed")
        if self._chat_sessions is not None:
            self._chat_sessions.close()  # the manager stays usable
        self._run(self._reset())

    async def _reset(self) -> None:
        if self._switching is not None:
            self._switching.clear()
        for sid in list(self.core.sessions):
            await self.core.remove_session(sid)
        self.session = self.core.create_session("local", weak_variables=True)
        self.session.permanent = True
        for var_id in list(self.contexts.constant_prefix_contexts):
            self.contexts.free_constant_prefix_contexts(var_id)
            if var_id in self.core.constants:
                self.core.constants.remove(var_id)
        # What is left is held by handles (the context API, plain generations in flight);
        # children have larger ids than their parents, so they are released first.
        for ctx in sorted(self.contexts.contexts.values(), key=lambda c: -c.context_id):
            if ctx.alive:
                with contextlib.suppress(UnknownContextError):  # held by no handle: its children's
                    self.contexts.free_context(ctx)
        if self.contexts.contexts:
            raise InvariantError(f"reset() left contexts held by something else: {sorted(self.contexts.contexts)}")
        await self._flush_cache()  # after the engines' frees, which were posted before it

    @property
    def closed(self) -> bool:
        return self._closed

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeClosedError("this Runtime is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking Runtime call from inside the runtime's own loop would deadlock; use the async form")
        try:
            return asyncio.run_coroutine_threadsafe(coro, self._loop).result()
        except concurrent.futures.CancelledError:  # cancelled by close()
            raise RuntimeClosedError("the Runtime was closed while this call was running") from None

    async def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the runtime's loop from any async caller."""
        if self._closed:
            coro.close()
            raise RuntimeClosedError("this Runtime is closed")
        if asyncio.get_running_loop() is self._loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    # -- tokens ----------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer().encode(text)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer().decode(list(token_ids))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        """The model's chat template over `messages`; `template_kwargs` (e.g. `tools=`) reach
        the template as variables."""
        return self._tokenizer().apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)

    def _tokenizer(self):  # noqa: ANN202 - the engine's Tokenizer
        if self.engine.tokenizer is None:
            raise InvalidRequestError("this engine has no tokenizer: pass token ids")
        return self.engine.tokenizer

    # -- what the engines can take, together ------------------------------------------------
    @property
    def max_model_len(self) -> int:
        """The longest sequence every engine runs (work may go to any of them)."""
        return min(e.max_model_len for e in self.core.engines.values())

    @property
    def vocab_size(self) -> int | None:
        """The model's vocabulary size (token ids are below it), or None if no engine says."""
        sizes = [v for e in self.core.engines.values() if (v := getattr(e, "vocab_size", None))]
        return min(sizes) if sizes else None

    @property
    def capacity_tokens(self) -> int:
        """The KV slots of the largest engine: the most one request can ever hold."""
        return max(i.num_blocks_total * i.block_size for i in (e.runtime_info() for e in self.core.engines.values()))

    @property
    def max_num_seqs(self) -> int:
        """Sequences the engines run at once, together (64 for an engine that does not say)."""
        return sum(getattr(e, "max_num_seqs", 64) for e in self.core.engines.values())

    def engine_of(self, ctx: Context) -> Any:
        """The engine that holds `ctx`."""
        return self.core.engines[ctx.engine_id]

    async def _split(self, ctx: Context, source: Context, drop_last: int) -> None:
        """Make the new engine context `ctx` hold `source`'s tokens but its last `drop_last`,
        sharing their KV (the engine's optional `split`; chat sessions need it)."""
        split = capability(self.engine_of(ctx), "split", "chat sessions (carving a turn's context from the last one)")
        await split(ctx.context_id, source.context_id, drop_last)

    def _prefix_keys(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt's `PrefixAffinity` keys (none with one engine: there is nothing to choose)."""
        return self.core.scheduler.affinity.keys(prompt_ids) if len(self.core.engines) > 1 else []

    def _on_engine_up(self, ctx: Context) -> bool:
        """Whether `ctx` is alive on an engine that takes work now (not closed, not resting
        after failures): KV a new turn may build on."""
        return ctx.alive and ctx.engine_id not in self.core.scheduler.down_engines()

    def _place_root(self, prompt_ids: Sequence[int] = ()) -> Hashable:
        """The engine a new root context goes to: the one that ran the longest prefix of
        `prompt_ids`, else the least loaded (the global scheduler's `pick`)."""
        return self.core.scheduler.pick(self._prefix_keys(prompt_ids))

    def tokenize_prompt(self, text: str) -> list[int]:
        """`text` as the start of a sequence: with the model's BOS if it asks for one."""
        return self._tokenizer().encode_prompt(text)

    def _to_ids(self, prompt: Prompt, *, starts_sequence: bool = True) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenize_prompt(prompt) if starts_sequence else self.tokenize(prompt)
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise InvalidRequestError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        return ids

    # -- generate ----------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], max_tokens: int = 16, **sampling: Any) -> Any:
        """Generate for one prompt (text or token ids) or, given a list of prompts, for all of
        them as one concurrent batch (returns a list, in order). Sampling options: temperature,
        top_p, top_k, seed, stop, stop_token_ids, ignore_eos, logprobs and prompt_logprobs
        (0-20 alternatives per token; see `SamplingParams`), and structured output: one of
        json_schema= (a dict or JSON text), json_object=True, regex=, choice=[...], grammar=
        (Lark), or structured=`StructuredSpec`."""
        return self._run(self._generate_any(prompts, max_tokens, sampling))

    async def agenerate(self, prompts: Prompt | Sequence[Prompt], max_tokens: int = 16, **sampling: Any) -> Any:
        return await self._on_loop(self._generate_any(prompts, max_tokens, sampling))

    async def _generate_any(self, prompts: Any, max_tokens: int, sampling: dict[str, Any]) -> Any:
        switch = _switch_options(sampling)
        params = _sampling_params(max_tokens, sampling)
        if switch is not None:
            return await self._generate_suspendable(prompts, params, switch)
        if _is_batch(prompts):
            ids = [self._to_ids(p) for p in prompts]
            return list(await asyncio.gather(*(self._generate_one(i, params) for i in ids)))
        return await self._generate_one(self._to_ids(prompts), params)

    async def astream(self, prompt: Prompt, max_tokens: int = 16, **sampling: Any) -> AsyncIterator[StreamDelta]:
        """Stream one generation from any event loop. Stopping the iteration early (or
        cancelling the task that iterates) aborts the generation and frees its KV. With
        `time_limit` / `token_quantum` / `pid`, the deltas are `SliceDelta`s of a suspendable
        generation (see `generate`); stopping early discards it."""
        switch = _switch_options(sampling)
        params = _sampling_params(max_tokens, sampling)
        ids = self._to_ids(prompt)
        if switch is not None:
            make: Callable[[], AsyncIterator[Any]] = lambda: self.switching.start(ids, params, **switch)  # noqa: E731
        else:
            make = lambda: self._stream_one(ids, params)  # noqa: E731
        async with contextlib.aclosing(self._stream_async(make)) as deltas:
            async for delta in deltas:
                yield delta

    # -- suspendable generations (parrot_core.switching) --------------------------------------
    @property
    def switching(self) -> Any:
        """This runtime's suspendable generations: a `parrot_core.switching.SwitchingManager`."""
        if self._switching is None:
            raise InvalidRequestError("suspendable generations need parrot_core.switching: `import parrot_core` loads it")
        return self._switching

    async def _generate_suspendable(self, prompts: Any, params: SamplingParams, switch: dict[str, Any]) -> Any:
        if _is_batch(prompts):
            return await self.switching.generate_batch([self._to_ids(p) for p in prompts], params, **switch)
        return await self.switching.generate(self._to_ids(prompts), params, **switch)

    def resume(self, pid: str, time_limit: float | None = None, token_quantum: int | None = None, *, owner: str | None = None) -> Any:
        """Continue the suspended generation `pid` for one more slice (None limits: to its end).
        Returns a `SlicedOutput` of what the slice added ("suspended" again, or its end). An
        unknown pid (never made, finished, discarded or expired): `UnknownGenerationError`.
        `owner`: the pid's namespace (a server's caller; None for in-process callers), here
        and in `suspended` / `discard`."""
        return self._run(self._resume(pid, time_limit, token_quantum, owner))

    async def aresume(self, pid: str, time_limit: float | None = None, token_quantum: int | None = None, *, owner: str | None = None) -> Any:
        return await self._on_loop(self._resume(pid, time_limit, token_quantum, owner))

    async def _resume(self, pid: str, time_limit: float | None, token_quantum: int | None, owner: str | None) -> Any:
        return await self.switching.resume_slice(pid, owner=owner, time_limit=time_limit, token_quantum=token_quantum)

    async def astream_resume(
        self, pid: str, time_limit: float | None = None, token_quantum: int | None = None, *, owner: str | None = None
    ) -> AsyncIterator[Any]:
        """`resume` as a stream of `SliceDelta`s (from any event loop); an unknown pid raises
        at the first iteration. Stopping early discards the generation."""
        make = lambda: self.switching.resume(pid, owner=owner, time_limit=time_limit, token_quantum=token_quantum)  # noqa: E731
        async with contextlib.aclosing(self._stream_async(make)) as deltas:
            async for delta in deltas:
                yield delta

    def suspended(self, *, owner: str | None = None) -> list[Any]:
        """The suspended generations (`SuspendedInfo`: pid, tokens so far, age, resident or
        not), least recently suspended first."""
        return self._run(self.switching.suspended(owner))

    async def asuspended(self, *, owner: str | None = None) -> list[Any]:
        return await self._on_loop(self.switching.suspended(owner))

    def discard(self, pid: str, *, owner: str | None = None) -> None:
        """Free a suspended generation and its KV (`UnknownGenerationError` if there is none)."""
        self._run(self._discard(pid, owner))

    async def adiscard(self, pid: str, *, owner: str | None = None) -> None:
        await self._on_loop(self._discard(pid, owner))

    async def _discard(self, pid: str, owner: str | None) -> None:
        self.switching.discard(pid, owner)

    def clear_suspended(self) -> int:
        """Free every suspended generation (of every owner) and its KV; returns how many."""
        return self._run(self._clear_suspended())

    async def _clear_suspended(self) -> int:
        return self.switching.clear()

    def round_robin(
        self,
        prompts: Sequence[Prompt],
        max_tokens: int = 16,
        *,
        token_quantum: int | None = None,
        time_limit: float | None = None,
        slots: int | None = None,
        **sampling: Any,
    ) -> Any:
        """Generate for many prompts (agents) in turns: at most `slots` (default
        `max_num_seqs`) at once, each for a quantum (`token_quantum` tokens and/or
        `time_limit` seconds), then suspended with its KV kept while the next one runs.
        Returns a `RoundRobinResult`: each agent's whole output and a record of every slice."""
        return self._run(self._round_robin(prompts, max_tokens, token_quantum, time_limit, slots, sampling))

    async def around_robin(
        self,
        prompts: Sequence[Prompt],
        max_tokens: int = 16,
        *,
        token_quantum: int | None = None,
        time_limit: float | None = None,
        slots: int | None = None,
        **sampling: Any,
    ) -> Any:
        return await self._on_loop(self._round_robin(prompts, max_tokens, token_quantum, time_limit, slots, sampling))

    async def _round_robin(
        self, prompts: Sequence[Prompt], max_tokens: int, token_quantum: int | None, time_limit: float | None, slots: int | None, sampling: dict[str, Any]
    ) -> Any:
        params = _sampling_params(max_tokens, sampling)
        ids = [self._to_ids(p) for p in prompts]
        return await self.switching.round_robin(ids, params, token_quantum=token_quantum, time_limit=time_limit, slots=slots)

    def _stream_sync(self, make: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
        """Run the async iterator `make()` on the runtime's loop; yield its items in the calling
        thread. Closing this iterator early cancels the other."""
        if self._closed:
            raise RuntimeClosedError("this Runtime is closed")
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking Runtime call from inside the runtime's own loop would deadlock; use the async form")
        items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        end = object()

        async def produce() -> None:
            try:
                async with contextlib.aclosing(make()) as it:
                    async for item in it:
                        items.put(item)
                items.put(end)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                items.put(e)
                if isinstance(e, asyncio.CancelledError):
                    raise

        future = asyncio.run_coroutine_threadsafe(produce(), self._loop)
        try:
            while True:
                item = items.get()
                if item is end:
                    return
                if isinstance(item, asyncio.CancelledError):  # cancelled by Runtime.close()
                    raise RuntimeClosedError("the Runtime was closed while this call was running")
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            future.cancel()  # no-op once finished; otherwise abandons the turn


    async def _stream_async(self, make: Callable[[], AsyncIterator[T]]) -> AsyncIterator[T]:
        """Run the async iterator `make()` on the runtime's loop and yield its items on the
        calling loop (any loop, the runtime's own included). Stopping early cancels the other;
        a cancellation by `close()` surfaces as `RuntimeClosedError`."""
        if self._closed:
            raise RuntimeClosedError("this Runtime is closed")
        caller = asyncio.get_running_loop()
        if caller is self._loop:
            async with contextlib.aclosing(make()) as it:
                async for item in it:
                    yield item
            return
        items: asyncio.Queue[Any] = asyncio.Queue()
        end = object()

        def put(item: object) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone
                caller.call_soon_threadsafe(items.put_nowait, item)

        async def produce() -> None:
            try:
                async with contextlib.aclosing(make()) as it:
                    async for item in it:
                        put(item)
                put(end)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                put(e)
                if isinstance(e, asyncio.CancelledError):
                    raise

        future = asyncio.run_coroutine_threadsafe(produce(), self._loop)
        try:
            while True:
                item = await items.get()
                if item is end:
                    return
                if isinstance(item, asyncio.CancelledError):
                    raise RuntimeClosedError("the Runtime was closed while this call was running")
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            future.cancel()

    async def _stream_one(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StreamDelta]:
        """A fresh context holding the prompt and its generation: one engine request (prefill
        and first sample in one step), placed like all other work; freed at the end, also
        when abandoned."""
        work = SchedTask(None, [len(prompt_ids)], params.max_tokens, prefix_keys=self._prefix_keys(prompt_ids))
        async with self.core.scheduler.admit(work) as engine_id:
            ctx = self.contexts.new_context(engine_id)
            try:
                self.contexts.record_fill(ctx, len(prompt_ids))
                async with contextlib.aclosing(self._stream_in(ctx, params, prompt_ids)) as deltas:  # reconciled before the free
                    async for delta in deltas:
                        yield StreamDelta(
                            delta.token_ids,
                            delta.text,
                            delta.finish_reason,
                            len(prompt_ids),
                            delta.cached_tokens,
                            delta.logprobs,
                            delta.prompt_logprobs,
                            delta.stop_token_id,
                        )
            finally:
                if ctx.alive:  # reset() may have released it already
                    self.contexts.free_context(ctx)

    async def _stream_in(self, ctx: Context, params: SamplingParams, prompt_ids: Sequence[int] = ()) -> AsyncIterator[Any]:
        """Generate in `ctx` itself, after `prompt_ids` (already recorded): the sampled tokens
        join the context (R4: reserve `max_tokens`, then reconcile to what was produced, also
        when abandoned)."""
        self.contexts.reserve_generate(ctx, params.max_tokens)
        produced = 0
        try:
            async for delta in self.engine_of(ctx).generate(ctx.context_id, ctx.parent_context_id, params, prompt_ids):
                produced += len(delta.token_ids)
                yield delta
        finally:
            self.contexts.reconcile_generate(ctx, produced)

    async def _generate_one(self, prompt_ids: list[int], params: SamplingParams) -> GenerateOutput:
        return await collect(self._stream_one(prompt_ids, params), len(prompt_ids))

    async def _generate_in(self, ctx: Context, params: SamplingParams) -> GenerateOutput:
        """Generate in a context held through the context API, placed like all other work."""
        work = SchedTask(None, [0], params.max_tokens, required_engine=ctx.engine_id, prior_tokens=ctx.chain_tokens)
        async with self.core.scheduler.admit(work):
            return await collect(self._stream_in(ctx, params), 0)

    async def _fill_in(self, ctx: Context, prompt_ids: list[int]) -> int:
        """Append tokens to a context held through the context API (placed like all other
        work); returns how many came from the prefix cache."""
        work = SchedTask(None, [len(prompt_ids)], 0, required_engine=ctx.engine_id, prior_tokens=ctx.chain_tokens)
        async with self.core.scheduler.admit(work):
            if not ctx.alive:  # freed, or dropped by reset(): the engine must not create it anew
                raise UnknownContextError(f"context {ctx.context_id} is not alive (freed, or dropped by reset())")
            result = await self.engine_of(ctx).fill(ctx.context_id, ctx.parent_context_id, prompt_ids)
            self.contexts.record_fill(ctx, len(prompt_ids))
            return result.cached_tokens

    # -- n samples of one prompt: one prefill, forked -----------------------------------------
    async def astream_forks(
        self, prompt: Prompt, max_tokens: int, samplings: Sequence[dict[str, Any]]
    ) -> AsyncIterator[tuple[int, StreamDelta]]:
        """One generation per entry of `samplings` (the sampling options of each, as
        `astream`'s), all after `prompt`, which is computed once: it fills one context, which
        is forked once per generation; the generations run concurrently. Yields (which, delta)
        in arrival order. Every delta's `prompt_tokens` is the prompt's length; `cached_tokens`
        is what the fill found in the prefix cache for the first generation, the whole prompt
        for the others (they reuse the fill). Stopping early (or cancelling) aborts them all
        and frees their KV."""
        params = [_sampling_params(max_tokens, s) for s in samplings]
        ids = self._to_ids(prompt)
        async with contextlib.aclosing(self._stream_async(lambda: self._stream_forks(ids, params))) as items:
            async for item in items:
                yield item

    async def _stream_forks(self, prompt_ids: list[int], params: list[SamplingParams]) -> AsyncIterator[tuple[int, StreamDelta]]:
        parent = self.contexts.new_context(self._place_root(prompt_ids))
        parent_held = True
        children: list[Context] = []
        out: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        tasks: list[asyncio.Task[None]] = []
        try:
            cached = await self._fill_in(parent, prompt_ids)
            for _ in params:
                children.append((await self._open(parent)).context)
            self.contexts.free_context(parent)  # the children hold it
            parent_held = False

            async def run(i: int) -> None:
                ctx, p = children[i], params[i]
                try:
                    work = SchedTask(None, [0], p.max_tokens, required_engine=ctx.engine_id, prior_tokens=ctx.chain_tokens)
                    async with self.core.scheduler.admit(work), contextlib.aclosing(self._stream_in(ctx, p)) as deltas:
                        async for d in deltas:
                            delta = StreamDelta(
                                d.token_ids, d.text, d.finish_reason, len(prompt_ids), cached if i == 0 else len(prompt_ids),
                                d.logprobs, None, d.stop_token_id,
                            )
                            out.put_nowait((i, delta))
                    out.put_nowait((i, None))
                except Exception as e:  # noqa: BLE001 - handed to the consumer
                    out.put_nowait((i, e))

            tasks = [asyncio.create_task(run(i)) for i in range(len(params))]
            remaining = len(tasks)
            while remaining:
                i, item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    remaining -= 1
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for ctx in [*children, parent] if parent_held else children:
                if ctx.alive:  # reset() may have released it already
                    self.contexts.free_context(ctx)

    # -- programs: semantic functions, native functions, variables -------------------------
    def submit_call(
        self, template: str, parameters: Sequence[Parameter], literals: dict[str, str], metadata: RequestMetadata
    ) -> dict[str, SemanticVariable]:
        """Submit one semantic call to the local session; returns its output variables by
        name at once (they run when fetched, or at once if `metadata.criteria` is set)."""

        async def submit() -> dict[str, SemanticVariable]:
            request = self.session.submit_call(template, parameters, metadata, literals)
            return dict(request.outputs)

        return self._run(submit())

    def submit_native(
        self, func: Any, name: str, inputs: dict[str, Any], outputs: list[str], criteria: PerfCriteria | None
    ) -> dict[str, SemanticVariable]:
        async def submit() -> dict[str, SemanticVariable]:
            svs = {k: v if isinstance(v, SemanticVariable) else self.session.new_variable(k, v) for k, v in inputs.items()}
            outs = {k: self.session.new_variable(k) for k in outputs}
            self.session.submit_native(NativeFuncNode(func=func, inputs=svs, outputs=outs, name=name, criteria=criteria))
            return outs

        return self._run(submit())

    def variable(self, name: str = "", content: str | None = None) -> SemanticVariable:
        async def make() -> SemanticVariable:
            return self.session.new_variable(name, content)

        return self._run(make())

    # -- the forkable context API ------------------------------------------------------------
    def new_context(self) -> ContextHandle:
        """An empty root context. Free it (or use it as a context manager) when done."""
        return self._run(self._open(None))

    async def _open(self, parent: Context | None) -> ContextHandle:
        ctx = self.contexts.new_context(self._place_root()) if parent is None else self.contexts.fork_context(parent)
        try:
            # An empty fill creates the engine context now, so a fork holds its parent's
            # tokens as of the fork, whatever the parent does next.
            await self.engine_of(ctx).fill(ctx.context_id, ctx.parent_context_id, [])
        except BaseException:
            self.contexts.free_context(ctx)
            raise
        return ContextHandle(self, ctx)

    # -- chat sessions (parrot_core.chat) -----------------------------------------------------
    @property
    def chat_sessions(self) -> Any:
        """This runtime's chat sessions: a `P.ChatSessionManager`, made on first use."""
        with self._chat_lock:
            if self._chat_sessions is None:
                if self._closed:
                    raise RuntimeClosedError("this Runtime is closed")
                if Runtime._chat_manager_factory is None:
                    raise InvalidRequestError("chat sessions need parrot_core.chat: `import parrot_core` loads it")
                self._chat_sessions = Runtime._chat_manager_factory(self)
            return self._chat_sessions

    def chat(
        self, system: str | None = None, session_id: str | None = None, config: Any = None, restore: str | os.PathLike[str] | None = None
    ) -> Any:
        """A new `P.ChatSession` (with `system` as its system prompt, `session_id` or a new
        id, a `P.ChatSessionConfig`): a conversation that keeps its KV across turns. With
        `restore`, the session `ChatSession.save` wrote there, KV included (see
        `ChatSessionManager.restore_session`)."""
        return self.chat_sessions.create_session(system=system, session_id=session_id, config=config, restore=restore)

    # -- saving and restoring contexts ----------------------------------------------------------
    def save_context(self, context: ContextHandle | Context, path: str | os.PathLike[str]) -> int:
        """Write a context's tokens (its whole sequence, ancestors included) and their KV to
        `path` as a safetensors file (format: engines/builtin/kv_io.py); KV that was evicted is
        recomputed first. The context must not be generating. Returns the tokens saved."""
        ctx = context.context if isinstance(context, ContextHandle) else context
        return self._run(saved_contexts.save_context(self, ctx, path))

    async def asave_context(self, context: ContextHandle | Context, path: str | os.PathLike[str]) -> int:
        ctx = context.context if isinstance(context, ContextHandle) else context
        return await self._on_loop(saved_contexts.save_context(self, ctx, path))

    def load_context(self, path: str | os.PathLike[str]) -> ContextHandle:
        """A new root context holding the tokens saved at `path` (by this or any runtime on the
        same model, any block size), their KV written into fresh blocks without computing
        anything and registered in the prefix cache; generating from it gives what generating
        from the saved context would have. A file saved from another model or dtype, damaged,
        truncated or of another format raises `kv_io.ContextFileError` (an
        `InvalidRequestError`) and changes nothing."""
        return self._run(self._load_handle(path))

    async def aload_context(self, path: str | os.PathLike[str]) -> ContextHandle:
        return await self._on_loop(self._load_handle(path))

    async def _load_handle(self, path: str | os.PathLike[str]) -> ContextHandle:
        return ContextHandle(self, await saved_contexts.load_context(self, path))

    # -- introspection -----------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Blocks, contexts and counters, summed over the engines (`engine_stats()` has them
        per engine)."""
        infos = [e.runtime_info() for e in self.core.engines.values()]
        queries = sum(i.prefix_cache_queries for i in infos)
        hits = sum(i.prefix_cache_hits for i in infos)
        return {
            "blocks_total": sum(i.num_blocks_total for i in infos),
            "blocks_free": sum(i.num_blocks_free for i in infos),
            "blocks_cached": sum(i.num_blocks_cached for i in infos),
            "blocks_used": sum(i.num_blocks_used for i in infos),
            "contexts_live": self._run(self._count_contexts()),
            "engine_contexts": sum(i.num_contexts for i in infos),
            "prefix_cache_queries": queries,
            "prefix_cache_hits": hits,
            "prefix_cache_hit_rate": hits / queries if queries else 0.0,
            "prompt_tokens_computed": sum(i.prompt_tokens_computed for i in infos),
            "generation_tokens": sum(i.generation_tokens for i in infos),
            "num_preemptions": sum(i.num_preemptions for i in infos),
            "context_forks": self.contexts.forks_total,
            "context_cache_hits": self.contexts.cache_hits_total,
        }

    def engine_stats(self) -> dict[str, Any]:
        """Each engine's `RuntimeInfo`, by engine id, and whether the scheduler counts it down."""
        down = self.core.scheduler.down_engines()
        return {eid: {"info": e.runtime_info(), "down": down.get(eid)} for eid, e in self.core.engines.items()}

    async def _count_contexts(self) -> int:
        return len(self.contexts.contexts)

    def check_invariants(self) -> None:
        """Raise if any rule of the serve layer or the engine is broken, or if the two
        disagree about which contexts exist."""
        self._run(self._check_invariants())

    async def _check_invariants(self) -> None:
        from parrot_core.errors import InvariantError

        self.contexts.check_invariants()
        for engine_id, engine in self.core.engines.items():
            if getattr(engine, "closed", False):  # gone (one of several): nothing left to compare
                continue
            serve_ids = {c.context_id for c in self.contexts.contexts.values() if c.engine_id == engine_id}
            engine_ids = await asyncio.to_thread(engine.context_ids)
            await asyncio.to_thread(engine.check_invariants)
            if serve_ids != engine_ids:
                raise InvariantError(f"engine {engine_id!r}: serve contexts {sorted(serve_ids)} != engine contexts {sorted(engine_ids)}")


async def collect(stream: AsyncIterator[Any], prompt_tokens: int = 0) -> GenerateOutput:
    """Drain a stream of deltas (engine deltas or `StreamDelta`s, whose own `prompt_tokens`
    win) into one output."""
    ids: list[int] = []
    pieces: list[str] = []
    reason, cached = "abort", 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    stop_token_id: int | None = None
    async for delta in stream:
        ids.extend(delta.token_ids)
        pieces.append(delta.text)
        reason = delta.finish_reason or reason
        cached = getattr(delta, "cached_tokens", cached)
        prompt_tokens = getattr(delta, "prompt_tokens", prompt_tokens)
        if delta.logprobs is not None:
            logprobs = (logprobs or []) + delta.logprobs
        if delta.prompt_logprobs is not None:
            prompt_logprobs = delta.prompt_logprobs
        stop_token_id = getattr(delta, "stop_token_id", None)
    return GenerateOutput("".join(pieces), ids, reason, prompt_tokens, cached, logprobs, prompt_logprobs, stop_token_id)


def _tick(ref: weakref.ref[Runtime]) -> None:
    """Expire idle constant prefixes now and then (on the loop; no busy loop)."""
    rt = ref()
    if rt is not None and not rt._closed:
        rt._loop.create_task(rt.core.expire())
        if rt._switching is not None:
            rt._switching.expire()
        rt._loop.call_later(EXPIRY_PERIOD_S, _tick, ref)


def _shutdown(loop: asyncio.AbstractEventLoop, core: ServeCore, thread: threading.Thread) -> None:
    """Close a runtime: remove the sessions, close the engines (every queued or running
    engine request fails with `RuntimeClosedError`), let the callers hear it, stop the loop."""
    try:
        asyncio.run_coroutine_threadsafe(core.close(), loop).result(timeout=60)
    finally:
        for engine in core.engines.values():
            engine.close()
        asyncio.run_coroutine_threadsafe(_finish_tasks(CLOSE_GRACE_S), loop).result(timeout=CLOSE_GRACE_S + 30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def _release(loop: asyncio.AbstractEventLoop, core: ServeCore, thread: threading.Thread) -> None:
    """A runtime nobody closed was collected, or the interpreter is exiting: shut it down,
    quietly. Collected on its own loop's thread, it cannot wait for that loop there: another
    thread does it."""
    def run() -> None:
        try:
            _shutdown(loop, core, thread)
        except BaseException:  # noqa: BLE001 - nobody is left to hear it
            log.debug("closing an abandoned Runtime failed", exc_info=True)

    if threading.current_thread() is thread:
        threading.Thread(target=run, name="parrot-runtime-release", daemon=True).start()
    else:
        run()


async def _finish_tasks(grace_s: float) -> None:
    """Give the loop's other tasks `grace_s` to finish (the engines have failed their work, so
    they are unwinding), then cancel the rest."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if not others:
        return
    _, pending = await asyncio.wait(others, timeout=grace_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _sampling_params(max_tokens: int, sampling: dict[str, Any]) -> SamplingParams:
    allowed = ({f.name for f in dataclasses.fields(SamplingParams)} | set(STRUCTURED_KINDS)) - {"max_tokens"}
    unknown = sorted(set(sampling) - allowed)
    if unknown:
        raise InvalidRequestError(f"unknown sampling options: {', '.join(unknown)}")
    return SamplingParams(max_tokens=max_tokens, **split_structured(sampling))


def _switch_options(sampling: dict[str, Any]) -> dict[str, Any] | None:
    """Take `time_limit`, `token_quantum` and `pid` (and a server's `owner`, the pid's
    namespace, and `meta`, its notes kept with the generation) out of `sampling`: None if none
    of the first three was given (a plain generation), else the options of a suspendable one."""
    switch = {k: sampling.pop(k) for k in ("time_limit", "token_quantum", "pid", "owner", "meta") if k in sampling}
    return switch if any(switch.get(k) is not None for k in ("time_limit", "token_quantum", "pid")) else None


def _is_batch(prompts: Any) -> bool:
    """A list of prompts, as opposed to one prompt of token ids."""
    return isinstance(prompts, Sequence) and not isinstance(prompts, str) and any(
        isinstance(p, (str, Sequence)) for p in prompts
    )


def _engine_ids(engines: Sequence[Any]) -> list[str]:
    """Ids for the engines, in order: the kind and a count per kind ("builtin-0", "vllm-0",
    "builtin-1", ...). Metrics label and scheduler key."""
    seen: dict[str, int] = {}
    ids = []
    for engine in engines:
        kind = type(engine).__name__.lower().removesuffix("engine") or "engine"
        ids.append(f"{kind}-{seen.get(kind, 0)}")
        seen[kind] = seen.get(kind, 0) + 1
    return ids
