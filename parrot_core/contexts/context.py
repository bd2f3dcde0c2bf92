"""The serve layer's `Context`: metadata about a chunk of KV cache held by one engine."""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
from collections.abc import Hashable
from dataclasses import dataclass, field

from parrot_core.errors import ContextFailedError
from parrot_core.graph.variable import shielded


class ContextScope(str, enum.Enum):
    GLOBAL = "global"  # a constant prefix shared by every session; pinned while in use
    SESSION = "session"  # owned by one session (or by no session, for runtime handles)


@dataclass(eq=False)
class Context:
    """Metadata only: the KV lives in the engine under `context_id`.

    `tokens_num` counts this context's own tokens (not the parent's): filled tokens, plus
    `reserved_tokens` held for a Generate in flight. `ref_count` is owned by the
    `ServeCoreContextManager` (rule R1); nobody else writes it.

    Ready state (rule R3): the first `claim()` returns True and that caller sends the Fill;
    everyone else awaits `wait_ready()`, which raises `ContextFailedError` if the Fill failed,
    and returns False if the claimer gave up without a verdict (`unclaim()`): then the waiter
    claims the context itself and fills it alone.
    """

    context_id: int
    engine_id: Hashable
    parent_context: Context | None
    scope: ContextScope = ContextScope.SESSION
    session_id: str | None = None
    tokens_num: int = 0
    reserved_tokens: int = 0
    ref_count: int = 0
    pinned: bool = False
    alive: bool = True
    children: set[int] = field(default_factory=set)
    _claimed: bool = False
    _ready: concurrent.futures.Future[bool] = field(default_factory=concurrent.futures.Future, repr=False)

    def __repr__(self) -> str:
        parent = self.parent_context.context_id if self.parent_context else None
        return (
            f"Context(id={self.context_id}, engine={self.engine_id!r}, parent={parent}, scope={self.scope.value},"
            f" ref={self.ref_count}, tokens={self.tokens_num}, alive={self.alive})"
        )

    @property
    def parent_context_id(self) -> int | None:
        return self.parent_context.context_id if self.parent_context else None

    @property
    def chain_tokens(self) -> int:
        """Tokens of this context and all its ancestors: the length of its KV sequence."""
        total, ctx = 0, self
        while ctx is not None:
            total += ctx.tokens_num
            ctx = ctx.parent_context
        return total

    # -- ready state (R3) ----------------------------------------------------------------
    def claim(self) -> bool:
        """True for the first caller only: that caller must fill the context and then call
        `mark_ready()`, `unclaim()` or, through the manager, `fail_context()`."""
        if self._claimed:
            return False
        self._claimed = True
        return True

    @property
    def is_claimed(self) -> bool:
        return self._claimed

    @property
    def is_ready(self) -> bool:
        return self._ready.done() and self._ready.exception() is None and self._ready.result()

    @property
    def is_failed(self) -> bool:
        return self._ready.done() and self._ready.exception() is not None

    def mark_ready(self) -> None:
        if not self._ready.done():
            self._ready.set_result(True)

    def unclaim(self) -> None:
        """The claimer gave up without a verdict (it was cancelled, or its fill ran together
        with other contexts and failed): the context is not failed; the next task that needs
        it claims it and fills it alone. Wakes the current waiters for that."""
        if self._ready.done():
            return
        self._claimed = False
        waiters, self._ready = self._ready, concurrent.futures.Future()
        waiters.set_result(False)

    def _mark_failed(self, error: BaseException) -> None:
        if not self._ready.done():
            failure = ContextFailedError(f"context {self.context_id} failed to fill: {error}")
            failure.__cause__ = error
            self._ready.set_exception(failure)

    async def wait_ready(self) -> bool:
        """True once filled; False if the claimer gave up (claim it then); raises
        `ContextFailedError` if the fill failed."""
        return await shielded(self._ready)
