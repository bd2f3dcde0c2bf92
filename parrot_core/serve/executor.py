"""Running one completion chain (or native function) of a session's graph.

A chain's coroutine: wait until activated -> wait for its inputs -> tokenize each Fill on its
own -> get an engine from the global scheduler -> get contexts from the context manager ->
for each context: the first claimer fills it, others wait for it -> generate -> set the
output variable -> free the task's contexts. Any failure fails the output variable, which
fails every consumer in turn; the session and the core go on.

Output k+1 of a request continues output k's KV: chain k keeps a reference on its Gen context
(`retain`) until chain k+1 has forked from it (or the session ends).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any

from parrot_core.contexts import Context, ContextTask, NodeSpec
from parrot_core.engines.base import SamplingParams, split_structured
from parrot_core.errors import EngineError, InvalidRequestError, ParrotError
from parrot_core.graph import CompletionChain, NativeFuncNode, PerfCriteria, PlaceholderGen

if TYPE_CHECKING:
    from parrot_core.serve.core import ServeCore

log = logging.getLogger(__name__)
_task_ids = itertools.count()


class ChainExecutor:
    """Runs the chains and native functions of one session on the core's event loop."""

    def __init__(self, core: ServeCore, session_id: str, on_done: Callable[[CompletionChain | NativeFuncNode], None]) -> None:
        self.core = core
        self.session_id = session_id
        self.on_done = on_done  # a chain or native node finished (its outputs are set or failed)
        self.prompt_tokens = 0  # tokens of the Fills the chains sent (what one-by-one calls would send)
        self.tasks: set[asyncio.Task[None]] = set()
        self.executing = 0  # chains on an engine and native functions running now
        self._retained: dict[int, tuple[Context, tuple]] = {}  # chain id -> (gen context, holder key)

    def launch_chain(self, chain: CompletionChain) -> None:
        self._spawn(self._run_chain(chain))

    def launch_native(self, node: NativeFuncNode) -> None:
        self._spawn(self._run_native(node))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @property
    def busy(self) -> bool:
        """Work is running now. Chains that wait to be fetched or for an input that may never
        arrive do not count: a session holding only those may expire."""
        return self.executing > 0

    # -- chains --------------------------------------------------------------------------
    async def _run_chain(self, chain: CompletionChain) -> None:
        executing = False
        try:
            await asyncio.wrap_future(chain.activated)
            texts = [await node.sv.wait() for node in chain.fills]  # an upstream error passes on as is
            parent: Context | None = None
            retained_key = None
            if chain.prev_chain is not None:
                await chain.prev_chain.gen.sv.wait()
                parent, retained_key = self._retained.pop(chain.prev_chain.chain_id)
            executing = True
            self.executing += 1
            try:
                await self._execute(chain, texts, parent, retained_key)
            finally:
                self.executing -= 1
        except asyncio.CancelledError:
            _fail(chain.gen.sv, ParrotError("the session was removed before this call finished"))
            raise
        except BaseException as e:  # noqa: BLE001 - the error becomes the variable's value
            if executing and not isinstance(e, ParrotError):
                log.exception("chain %s failed", chain.gen.sv.id)
                e = EngineError(f"{type(e).__name__}: {e}")
            _fail(chain.gen.sv, e)
        self.on_done(chain)

    async def _execute(self, chain: CompletionChain, texts: list[str], parent: Context | None, retained_key: Any) -> None:
        core, request = self.core, chain.request
        metadata = request.metadata
        params = sampling_params(chain.gen)
        tokenizer = core.tokenizer_for(metadata.models)
        # Each Fill is tokenized on its own; the first of a fresh sequence may start with BOS.
        token_lists = [tokenizer.encode_prompt(t) if i == 0 and parent is None else tokenizer.encode(t) for i, t in enumerate(texts)]
        token_lists.append([])
        self.prompt_tokens += sum(map(len, token_lists))
        nodes = [NodeSpec(n.sv.id, True, n.sv.is_constant_prefix) for n in chain.fills]
        nodes.append(NodeSpec(chain.gen.sv.id, is_fill=False))
        ctask = ContextTask(
            task_id=("chain", next(_task_ids)),
            engine_id=None,
            nodes=nodes,
            session_id=self.session_id,
            parent_context=parent,
            fuse_fill=metadata.fuse_fill,
        )
        stask = core.new_sched_task(ctask, [len(t) for t in token_lists], params.max_tokens, chain, parent)
        engine_id = await core.scheduler.place(stask)
        ctask.engine_id = engine_id
        error: BaseException | None = None
        try:
            contexts = core.contexts.set_task_contexts(ctask)
            if retained_key is not None:
                core.contexts.release(retained_key)
                retained_key = None
            text = await self._fill_and_generate(engine_id, contexts, token_lists, params)
            nxt = _next_chain(chain)
            if nxt is not None:  # output k+1 will fork from this output's context
                self._retained[chain.chain_id] = (contexts[-1], core.contexts.retain(contexts[-1], self.session_id))
            chain.gen.sv.set(text)
        except BaseException as e:
            error = e
            raise
        finally:
            if retained_key is not None:
                core.contexts.release(retained_key)
            if ctask.contexts:
                core.contexts.free_task_contexts(ctask)
            core.scheduler.finish(stask, error)

    async def _fill_and_generate(
        self, engine_id: Hashable, contexts: list[Context], token_lists: list[list[int]], params: SamplingParams
    ) -> str:
        core = self.core
        engine = core.engines[engine_id]
        # one entry per distinct context (a fused run is one context over several nodes)
        groups: list[tuple[Context, list[int]]] = []
        for ctx, tokens in zip(contexts[:-1], token_lists[:-1]):
            if groups and groups[-1][0] is ctx:
                groups[-1][1].extend(tokens)
            else:
                groups.append((ctx, list(tokens)))
        i = 0
        while i < len(groups):
            ctx, _ = groups[i]
            if not ctx.claim():
                if await ctx.wait_ready():  # another task fills it (R3)
                    i += 1
                continue  # its filler gave up without a verdict: claim it now
            run = [groups[i]]
            i += 1
            # The new contexts that follow, each the child of the previous, are filled with the
            # same engine call: one forward pass instead of one per context.
            while hasattr(engine, "split") and i < len(groups) and groups[i][0].parent_context is run[-1][0] and groups[i][0].claim():
                run.append(groups[i])
                i += 1
            await self._fill_run(engine, run)
        gen_ctx = contexts[-1]
        gen_ctx.claim()
        core.contexts.reserve_generate(gen_ctx, params.max_tokens)
        produced = 0
        pieces: list[str] = []
        try:
            async for delta in engine.generate(gen_ctx.context_id, gen_ctx.parent_context_id, params):
                produced += len(delta.token_ids)
                pieces.append(delta.text)
        finally:
            core.contexts.reconcile_generate(gen_ctx, produced)
        gen_ctx.mark_ready()
        return "".join(pieces)

    async def _fill_run(self, engine: Any, run: list[tuple[Context, list[int]]]) -> None:
        """Fill contexts c1 <- c2 <- ... <- ck (all claimed by this task): one fill of every
        token into ck, then c1..ck-1 carved out of it as prefixes.

        Failure isolation (R3): a lone context whose fill failed is failed (its waiters get
        the error; it leaves the prefix cache, so the next task makes a fresh one). When a run
        of several fails, which of them caused it is unknown, and when this task is cancelled
        (its session went away) none of them did: then the contexts not yet filled are handed
        back unclaimed, so the next task that needs one fills it alone; only this task fails.
        """
        core = self.core
        for ctx, tokens in run:
            core.contexts.record_fill(ctx, len(tokens))
        last = run[-1][0]
        try:
            tokens = [t for _, toks in run for t in toks]
            await engine.fill(last.context_id, run[0][0].parent_context_id, tokens)
            last.mark_ready()
            after = len(tokens)
            for ctx, toks in run[:-1]:
                after -= len(toks)
                await engine.split(ctx.context_id, last.context_id, after)
                ctx.mark_ready()
        except BaseException as e:
            if len(run) == 1 and not isinstance(e, asyncio.CancelledError):
                core.contexts.fail_context(last, e)
                raise
            if not last.is_ready:
                engine.free_context(last.context_id)  # drop whatever the engine computed: refilled from scratch
            for ctx, toks in run:
                if not ctx.is_ready:
                    core.contexts.abandon_fill(ctx, len(toks))
            raise

    # -- native functions ----------------------------------------------------------------
    async def _run_native(self, node: NativeFuncNode) -> None:
        try:
            await asyncio.wrap_future(node.activated)
            for sv in node.inputs.values():
                await sv.wait()
            kwargs = {**node.inputs, **node.outputs}
            self.executing += 1
            try:
                await asyncio.to_thread(node.func, **kwargs)
            finally:
                self.executing -= 1
            for name, sv in node.outputs.items():
                _fail(sv, ParrotError(f"native function {node.name!r} returned without setting output {name!r}"))
        except asyncio.CancelledError:
            for sv in node.outputs.values():
                _fail(sv, ParrotError("the session was removed before this call finished"))
            raise
        except BaseException as e:  # noqa: BLE001
            for sv in node.outputs.values():
                _fail(sv, e)
        self.on_done(node)

    def release_retained(self) -> None:
        for _, key in self._retained.values():
            self.core.contexts.release(key)
        self._retained.clear()


DEFAULT_MAX_TOKENS = 128  # of an output that does not say


def output_sampling(options: Mapping[str, Any]) -> SamplingParams:
    """The sampling of an output from its options (`max_tokens` defaults to 128; a
    structured-output keyword such as `json_schema=` becomes the `structured` spec). Raises
    `InvalidRequestError` for an unknown option or a bad value."""
    try:
        return SamplingParams(**{"max_tokens": DEFAULT_MAX_TOKENS, **split_structured(options)})
    except TypeError as e:
        raise InvalidRequestError(f"bad output options: {e}") from None


def sampling_params(gen: PlaceholderGen) -> SamplingParams:
    return output_sampling(gen.sampling)


def _next_chain(chain: CompletionChain) -> CompletionChain | None:
    chains = chain.request.chains
    i = chains.index(chain)
    return chains[i + 1] if i + 1 < len(chains) else None


def _fail(sv: Any, error: BaseException) -> None:
    if not sv.done:
        sv.fail(error)


def criteria_of(chain: CompletionChain) -> PerfCriteria:
    return chain.criteria or PerfCriteria.THROUGHPUT
