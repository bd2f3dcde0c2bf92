"""`ContextHandle`: a forkable KV context held by the user (the context API of a Runtime)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from parrot_core.contexts import Context

if TYPE_CHECKING:
    from parrot_core.frontend.runtime import GenerateOutput, Prompt, Runtime


class ContextHandle:
    """A forkable KV context. Blocking methods; `with` frees it on exit. After the runtime's
    `reset()` the context is gone: methods raise `UnknownContextError`, `with` exits quietly."""

    def __init__(self, runtime: Runtime, ctx: Context) -> None:
        self._rt = runtime
        self._ctx = ctx
        self._open = True

    def __repr__(self) -> str:
        return f"ContextHandle(id={self._ctx.context_id}, tokens={self.tokens_num}, alive={self._ctx.alive})"

    def __enter__(self) -> ContextHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._open and not self._rt.closed and self._ctx.alive:
            self.free()

    @property
    def context_id(self) -> int:
        return self._ctx.context_id

    @property
    def context(self) -> Context:
        return self._ctx

    @property
    def tokens_num(self) -> int:
        """This context's own tokens (not its parent's)."""
        return self._ctx.tokens_num

    def fill(self, prompt: Prompt) -> int:
        """Append text or token ids; returns how many of them came from the prefix cache."""
        return self._rt._run(self._fill(prompt))

    async def _fill(self, prompt: Prompt) -> int:
        starts = self._ctx.chain_tokens == 0  # the first tokens of the sequence (a BOS may lead them)
        return await self._rt._fill_in(self._ctx, self._rt._to_ids(prompt, starts_sequence=starts))

    def fork(self) -> ContextHandle:
        """A child context that starts with everything this one holds now."""
        return self._rt._run(self._rt._open(self._ctx))

    def generate(self, max_tokens: int = 16, **sampling: Any) -> GenerateOutput:
        """Generate after this context's tokens; the output joins this context."""
        from parrot_core.frontend.runtime import _sampling_params

        params = _sampling_params(max_tokens, sampling)
        return self._rt._run(self._rt._generate_in(self._ctx, params))

    def save(self, path: str | os.PathLike[str]) -> int:
        """Write this context's tokens (its whole sequence, ancestors included) and their KV to
        `path` (safetensors); `Runtime.load_context(path)` brings them back in this or any
        runtime on the same model. Returns the tokens saved."""
        return self._rt.save_context(self, path)

    def free(self) -> None:
        """Release this handle; the KV goes once no child context needs it."""
        self._rt._run(self._free())
        self._open = False

    async def _free(self) -> None:
        self._rt.contexts.free_context(self._ctx)
