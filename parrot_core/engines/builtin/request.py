"""A primitive (Fill or Generate) as the engine's step loop tracks it."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import llguidance
import torch

from parrot_core.engines.base import SamplingParams, TokenLogprob
from parrot_core.engines.builtin.kv_contexts import KVContext
from parrot_core.engines.builtin.tokenizer import IncrementalDetokenizer


class Kind(enum.Enum):
    FILL = "fill"
    GENERATE = "generate"


@dataclass(eq=False)
class EngineRequest:
    """Work on one context. A Fill computes the context's uncomputed tokens. A Generate first
    does the same, then samples: each sampled token is appended to the context (uncomputed)
    and computed in the next step, which yields the logits for the next sample.

    `emit(event)` is called on the engine thread with a `GenerationDelta`, a `FillResult`
    or an exception; the last event of a request is a FillResult, a delta with a finish
    reason, or an exception.
    """

    request_id: int
    kind: Kind
    context: KVContext
    emit: Callable[[object], None]
    params: SamplingParams | None = None
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    new_tokens: int = 0  # tokens this request asked to append (Fill)
    cached_tokens: int = 0  # of the uncomputed tokens, how many the prefix cache supplied
    num_admissions: int = 0  # > 1 after a preemption (then its recompute is not a cache hit)
    slots: list[int] = field(default_factory=list)  # KV slots of this step's tokens
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # detokenized output, stop strings not yet cut
    sent_chars: int = 0
    finished: bool = False
    # Prompt logprobs still to be delivered (with the first delta): the prompt's tokens are
    # context positions [prompt_start, prompt_start + len(prompt_logprobs)); None when not asked
    # for or already sent.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_start: int = 0
    # The grammar state of a structured generate (params.structured): it has consumed every
    # output token so far. None for a request without a spec.
    matcher: llguidance.LLMatcher | None = None

    @property
    def num_uncomputed(self) -> int:
        return len(self.context.token_ids) - self.context.num_computed

    @property
    def uses_prefix_cache(self) -> bool:
        """False while prompt logprobs are owed: cached KV has no logits, so every prompt token
        must be computed by this request."""
        return self.prompt_logprobs is None

    @property
    def wants_all_rows(self) -> bool:
        """This step's computed tokens all need their hidden states (for prompt logprobs)."""
        return self.prompt_logprobs is not None

    @property
    def sampling(self) -> bool:
        """A Generate that has started producing tokens (its remaining work is decode)."""
        return self.kind is Kind.GENERATE and bool(self.output_ids)
