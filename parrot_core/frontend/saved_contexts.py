"""Contexts saved to disk and loaded back (llama.cpp's slot save/restore, for the serve
layer's contexts). The file format and its checks are the builtin engine's
(`engines/builtin/kv_io.py`); here a serve-layer `Context` is saved, or a new one is made from
a file, placed through the global scheduler like every other piece of work.

Both run on the runtime's loop. They are the building blocks of `ContextHandle.save`,
`Runtime.save_context` / `load_context` and of anything else that holds contexts (a chat
session saves its context with `save_context(rt, ctx, path)` and restores it with
`load_context(rt, path, session_id)`, or with `read_context` then `import_context` to look at
what the file holds, its `extra` strings, before anything changes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from parrot_core.contexts import Context
from parrot_core.engines.base import capability
from parrot_core.engines.builtin import kv_io
from parrot_core.engines.builtin.kv_io import ContextFileError, ContextKV
from parrot_core.errors import UnknownContextError
from parrot_core.serve.scheduler import SchedTask

if TYPE_CHECKING:
    from parrot_core.frontend.runtime import Runtime

PathLike = str | os.PathLike[str]
__all__ = ["ContextFileError", "ContextKV", "import_context", "load_context", "read_context", "save_context"]


async def save_context(rt: Runtime, ctx: Context, path: PathLike, extra: Mapping[str, str] | None = None) -> int:
    """Write `ctx`'s tokens (its whole sequence, ancestors included), their KV and the hidden
    state its next token is sampled from to `path`, with the strings `extra` (read back as
    `ContextKV.extra`); KV the engine evicted is recomputed first. Refused while a request runs
    on `ctx` (`InvalidRequestError`); `UnknownContextError` for a dead context;
    `kv_io.ContextFileError` if `path` cannot be written. Returns the tokens saved."""
    if not ctx.alive:
        raise UnknownContextError(f"context {ctx.context_id} is not alive (freed, or dropped by reset())")
    engine = rt.core.engines[ctx.engine_id]
    work = SchedTask(None, [0], 0, required_engine=ctx.engine_id, prior_tokens=ctx.chain_tokens)
    export = capability(engine, "export_context", "saving a context")
    async with rt.core.scheduler.admit(work):
        kv = await export(ctx.context_id)
    if extra:
        kv = dataclasses.replace(kv, extra=dict(extra))
    await asyncio.to_thread(kv_io.write_context_file, path, kv, engine.kv_spec)
    return len(kv.token_ids)


async def load_context(rt: Runtime, path: PathLike, session_id: str | None = None) -> Context:
    """A new root context on the runtime's engine holding the tokens saved at `path`, their KV
    written without computing anything, held by one handle reference (release it with
    `rt.contexts.free_context(ctx)`; it belongs to `session_id` if given). The file is read and
    checked first: another model or dtype, damage, truncation or another format raise
    `kv_io.ContextFileError` and change nothing."""
    return await import_context(rt, await read_context(rt, path), session_id)


async def read_context(rt: Runtime, path: PathLike) -> ContextKV:
    """The saved context at `path` (tokens, KV, `extra`), read and checked against the
    runtime's engine as `load_context` does; changes nothing."""
    spec = capability(rt.engine, "kv_spec", "loading a saved context")
    return await asyncio.to_thread(kv_io.read_context_file, path, spec)


async def import_context(rt: Runtime, kv: ContextKV, session_id: str | None = None) -> Context:
    """A new root context holding `kv` (from `read_context`), as `load_context` makes it.
    Atomic: on an error nothing is left behind."""
    import_kv = capability(rt.engine, "import_context", "loading a saved context")
    work = SchedTask(None, [len(kv.token_ids)], 0, required_engine=rt.engine_id)
    async with rt.core.scheduler.admit(work):
        ctx = rt.contexts.new_context(rt.engine_id, session_id)
        try:
            await import_kv(ctx.context_id, kv)
            rt.contexts.record_fill(ctx, len(kv.token_ids))
        except BaseException:
            if ctx.alive:  # reset() may have released it already
                rt.contexts.free_context(ctx)
            raise
    return ctx
