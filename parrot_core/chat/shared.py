"""System prompts shared between chat sessions: one context per system prompt, computed once.

Every session of a runtime whose conversation starts with the same rendered system prompt forks
its own context from one `SharedPrefix`. The prefix is reference-counted by the sessions that
use it and freed when the last one lets go. Everything here runs on the runtime's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from parrot_core.chat.transcript import common_prefix_len
from parrot_core.contexts import Context
from parrot_core.frontend.runtime import Runtime


@dataclass(eq=False)
class SharedPrefix:
    """The context holding a rendered system prompt `text` as `token_ids` (the sequence's
    start: a BOS first if the model asks for one). `users`: sessions holding it."""

    text: str
    token_ids: tuple[int, ...]
    context: Context
    ready: asyncio.Future[bool]  # True once filled; False if its filler failed or gave up
    users: int = 1


class SharedPrefixes:
    """The shared system-prompt contexts of one runtime, by rendered text."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._by_text: dict[str, SharedPrefix] = {}

    def __len__(self) -> int:
        return len(self._by_text)

    async def acquire(
        self, text: str, token_ids: Sequence[int], hint: tuple[Context, Sequence[int]] | None = None
    ) -> tuple[SharedPrefix, int]:
        """The prefix for `text`, with one more user; and how many tokens this call computed
        for it (0 when it already existed). The first caller fills it; concurrent callers wait
        for that fill (and fill it themselves if it failed). `hint`: a context and the tokens it
        holds; the longest common token prefix is taken from it (KV shared, not recomputed).
        A prefix whose engine is down (or gone) is never handed out: it leaves the map (its
        users keep it until they let go) and a new one is made on an engine that is up."""
        self._forget_if_down(text)
        if hint is not None and not self._rt._on_engine_up(hint[0]):
            hint = None
        while (prefix := self._by_text.get(text)) is not None:
            prefix.users += 1
            try:
                filled = await asyncio.shield(prefix.ready)
            except BaseException:
                self.release(prefix)
                raise
            if filled:
                return prefix, 0
            self.release(prefix)  # its filler failed and dropped it from the map: try again
        # beside the context it takes tokens from (split shares KV within one engine)
        engine_id = hint[0].engine_id if hint is not None and hint[0].alive else self._rt._place_root(token_ids)
        ctx = self._rt.contexts.new_context(engine_id)
        prefix = SharedPrefix(text, tuple(token_ids), ctx, asyncio.get_running_loop().create_future())
        self._by_text[text] = prefix
        try:
            computed = await self._fill(ctx, prefix.token_ids, hint)
        except BaseException:
            del self._by_text[text]  # before waking the waiters, so they do not find it again
            prefix.ready.set_result(False)
            self.release(prefix)
            raise
        prefix.ready.set_result(True)
        set_pinned = getattr(self._rt.engine_of(ctx), "set_pinned", None)
        if set_pinned is not None:  # many sessions build on it: its KV is evicted last
            set_pinned(ctx.context_id, True)
        return prefix, computed

    def _forget_if_down(self, text: str) -> None:
        prefix = self._by_text.get(text)
        if prefix is not None and prefix.ready.done() and not self._rt._on_engine_up(prefix.context):
            del self._by_text[text]

    def retain(self, prefix: SharedPrefix) -> None:
        prefix.users += 1

    def release(self, prefix: SharedPrefix) -> None:
        """One user fewer; the last one frees the context (once its sessions' contexts, its
        children, are gone too)."""
        prefix.users -= 1
        if prefix.users > 0:
            return
        if self._by_text.get(prefix.text) is prefix:
            del self._by_text[prefix.text]
        if prefix.context.alive:
            self._rt.contexts.free_context(prefix.context)

    async def _fill(self, ctx: Context, token_ids: tuple[int, ...], hint: tuple[Context, Sequence[int]] | None) -> int:
        rt = self._rt
        reused = 0
        if hint is not None and hint[0].alive:
            source, source_ids = hint
            reused = common_prefix_len(source_ids, token_ids)
            if reused:
                await rt._split(ctx, source, len(source_ids) - reused)
                rt.contexts.record_fill(ctx, reused)
        rest = list(token_ids[reused:])
        if not rest:
            return 0
        return len(rest) - await rt._fill_in(ctx, rest)
