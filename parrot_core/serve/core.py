"""`ServeCore`: sessions, engines, the context manager and the global scheduler, on one loop.

Everything here runs on the core's asyncio loop (the Runtime's background loop, or the
server's). Sessions own their variables, graph and running chains; removing a session cancels
its chains, fails their pending outputs and frees every context it holds. Global
constant-prefix variables are shared by all sessions and expire when idle.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from parrot_core.contexts import Context, ContextTask, ServeCoreContextManager
from parrot_core.errors import InvalidRequestError, UnknownSessionError
from parrot_core.graph import (
    GLOBAL_SCOPE,
    CompletionChain,
    ComputeGraph,
    Namespace,
    NativeFuncNode,
    Parameter,
    PerfCriteria,
    RequestChain,
    RequestMetadata,
    SemanticVariable,
    parse_request,
)
from parrot_core.serve.executor import ChainExecutor, criteria_of
from parrot_core.serve.scheduler import GlobalScheduler, SchedTask


class Session:
    """One program's scope: its variables, its DAG and the coroutines running it."""

    def __init__(self, core: ServeCore, session_id: str, *, weak_variables: bool = False) -> None:
        """`weak_variables`: the session keeps a variable only while something else holds it
        (the in-process runtime, whose callers hold the Python objects); a session whose
        clients name variables by id (HTTP) keeps them all."""
        self.core = core
        self.session_id = session_id
        self.namespace = Namespace(f"s{session_id}", clock=core.clock, weak=weak_variables)
        self.graph = ComputeGraph()
        self.executor = ChainExecutor(core, session_id, self._done)
        self.last_access = core.clock()
        self.pending_gets = 0
        self.closed = False
        self.permanent = False  # the in-process runtime's own session never expires

    def touch(self) -> None:
        self.last_access = self.core.clock()

    def submit_call(
        self,
        template: str,
        parameters: Sequence[Parameter],
        metadata: RequestMetadata | None = None,
        literals: Mapping[str, str] | None = None,
    ) -> RequestChain:
        self._check_open()
        self.touch()
        request = parse_request(
            template, parameters, session=self.namespace, constants=self.core.constants, metadata=metadata, literals=literals
        )
        self.graph.insert(request)
        for chain in request.chains:
            chain.gen.sv.on_demand = self._on_demand
            self.executor.launch_chain(chain)
        if request.metadata.criteria is not None:
            for sv in request.outputs.values():
                self.graph.activate(sv, request.metadata.criteria)
        return request

    def submit_native(self, node: NativeFuncNode) -> NativeFuncNode:
        self._check_open()
        self.touch()
        self.graph.insert_native(node)
        for sv in node.outputs.values():
            sv.on_demand = self._on_demand
        self.executor.launch_native(node)
        if node.criteria is not None:
            for sv in node.outputs.values():
                self.graph.activate(sv, node.criteria)
        return node

    def new_variable(self, name: str = "", content: str | None = None) -> SemanticVariable:
        self._check_open()
        self.touch()
        sv = self.namespace.new_variable(name)
        if content is not None:
            sv.set(content)
        return sv

    def variable(self, var_id: str) -> SemanticVariable:
        """A variable of this session (or a global constant). Another session's ids are
        unknown here, by construction of the ids."""
        self.touch()
        if var_id in self.namespace:
            return self.namespace.get(var_id)
        return self.core.constants.get(var_id)

    def activate(self, sv: SemanticVariable, criteria: PerfCriteria | None) -> None:
        self.touch()
        self.graph.activate(sv, criteria)

    def _on_demand(self, sv: SemanticVariable, criteria: PerfCriteria | None) -> None:
        """Called by `sv.get()` / `aget()` from any thread: activate on the core's loop."""
        loop = self.core.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.activate(sv, criteria)
        else:
            loop.call_soon_threadsafe(self.activate, sv, criteria)

    def _done(self, item: CompletionChain | NativeFuncNode) -> None:
        """Forget what finished, so a long-lived session's graph does not grow without end."""
        if isinstance(item, NativeFuncNode):
            self.graph.remove_native(item)
        elif all(c.gen.sv.done for c in item.request.chains):
            self.graph.remove_request(item.request)

    @property
    def busy(self) -> bool:
        return self.pending_gets > 0 or self.executor.busy

    async def close(self) -> None:
        self.closed = True
        tasks = list(self.executor.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.executor.release_retained()
        self.core.contexts.free_session_contexts(self.session_id)

    def _check_open(self) -> None:
        if self.closed:
            raise UnknownSessionError(f"session {self.session_id!r} was removed")


class ServeCore:
    def __init__(
        self,
        engines: Mapping[Hashable, Any],
        *,
        latency_cap: int = 4,
        constant_prefix_timeout: float = 600.0,
        session_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
    ) -> None:
        self.clock = clock
        self.engines: dict[Hashable, Any] = {}
        self.contexts = ServeCoreContextManager(constant_prefix_timeout=constant_prefix_timeout, clock=clock)
        self.scheduler = GlobalScheduler(
            self.contexts,
            latency_cap=latency_cap,
            clock=clock,
            balance_abs_threshold=balance_abs_threshold,
            balance_rel_threshold=balance_rel_threshold,
        )
        self.constants = Namespace(GLOBAL_SCOPE, clock=clock)
        self.sessions: dict[str, Session] = {}
        self.session_timeout = session_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        for engine_id, engine in engines.items():
            self.add_engine(engine_id, engine)

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop every core method runs on (activation from other threads hops onto it)."""
        self.loop = loop

    # -- engines -------------------------------------------------------------------------
    def add_engine(self, engine_id: Hashable, engine: Any) -> None:
        info = engine.runtime_info()
        self.engines[engine_id] = engine
        self.contexts.register_engine(engine_id, engine)
        capacity = info.num_blocks_total * info.block_size
        is_closed = (lambda: bool(engine.closed)) if hasattr(engine, "closed") else None
        self.scheduler.add_engine(engine_id, engine.model_name, capacity, getattr(engine, "max_model_len", None), is_closed)

    def remove_engine(self, engine_id: Hashable) -> None:
        self.scheduler.remove_engine(engine_id)
        self.contexts.remove_engine(engine_id)
        del self.engines[engine_id]

    def tokenizer_for(self, models: Sequence[str]) -> Any:
        for engine in self.engines.values():
            if (not models or engine.model_name in models) and engine.tokenizer is not None:
                return engine.tokenizer
        raise InvalidRequestError(f"no engine with a tokenizer serves {list(models) or 'any model'}")

    def new_sched_task(
        self, ctask: ContextTask, fill_tokens: list[int], max_tokens: int, chain: CompletionChain, parent: Context | None
    ) -> SchedTask:
        models = tuple(chain.request.metadata.models)
        if parent is not None:  # a continuation must run where the previous output's KV is
            models = (self.engines[parent.engine_id].model_name,)
        required = parent.engine_id if parent is not None else None
        prior = parent.chain_tokens if parent is not None else 0
        return SchedTask(
            ctask, fill_tokens, max_tokens, criteria_of(chain), chain.depth or 1, chain.group, models, required, prior
        )

    # -- sessions ------------------------------------------------------------------------
    def create_session(self, session_id: str | None = None, *, weak_variables: bool = False) -> Session:
        session_id = session_id or uuid.uuid4().hex
        if session_id in self.sessions:
            raise InvalidRequestError(f"session {session_id!r} already exists")
        session = Session(self, session_id, weak_variables=weak_variables)
        self.contexts.register_session(session_id)
        self.sessions[session_id] = session
        return session

    def session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise UnknownSessionError(f"unknown session {session_id!r}")
        return session

    async def remove_session(self, session_id: str) -> None:
        session = self.session(session_id)
        del self.sessions[session_id]
        await session.close()

    async def expire(self) -> list[str]:
        """Remove sessions idle past the timeout (never one with a pending get or a running
        chain) and unpin constant prefixes idle past theirs. Returns the removed session ids."""
        removed = []
        if self.session_timeout is not None:
            deadline = self.clock() - self.session_timeout
            for sid, session in list(self.sessions.items()):
                if session.last_access < deadline and not session.busy and not session.permanent:
                    await self.remove_session(sid)
                    removed.append(sid)
        for var_id in self.contexts.free_expired_constant_prefixes():
            if var_id in self.constants:
                self.constants.remove(var_id)
        return removed

    async def close(self) -> None:
        self.scheduler.close()
        for sid in list(self.sessions):
            await self.remove_session(sid)
