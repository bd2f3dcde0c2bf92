"""The engine protocol: the only thing the layers above know about an engine.

An engine holds the real KV cache of *contexts* named by integer ids that the serve layer
chooses. A context is created by the first primitive that names it; it then extends its parent
(if any) with its own tokens. The serve layer frees a context once nothing references it, and
always frees children before parents.

Primitives:
- `fill(context_id, parent_context_id, token_ids)`: append tokens to the context and compute
  their KV. Returns once the KV is computed.
- `generate(context_id, parent_context_id, params, prompt_token_ids=())`: append the prompt
  tokens (if any) and sample after the context's last token, appending each sampled token to the
  same context; yields deltas as they come. A plain request is one generate: its prompt is
  computed and the first token sampled in the same step, with no window in which the request
  holds KV while waiting. A separate `fill` is for what is filled once and shared.
- Memory: an engine holds KV as a cache of each context's tokens. It may drop the KV of a
  context that no request is running on and recompute it, exactly, when the context is next
  used; so work that fits the engine alone always runs eventually, and only work that can
  never fit is refused (`RequestTooLargeError`, with the numbers).
- `free_context(context_id)`: drop the context; never blocks, never raises for an id the
  engine has already dropped (the serve layer's bookkeeping is the source of truth).
- `runtime_info()`: a snapshot of load and cache figures for scheduling and metrics.

Optional: `set_pinned(context_id, pinned)`: the serve layer keeps this context for many
users (a constant prefix); under memory pressure its KV is evicted after other idle contexts'.

Optional: `split(context_id, source_id, drop_last)` creates a context holding the source's
tokens except its last `drop_last`, sharing their KV. With it the serve layer fills a run of
new contexts with one fill (one forward pass) into the last of them and carves out the rest.

Optional, saving and restoring contexts (the builtin engine: `engines/builtin/kv_io.py` holds
the file format and the `ContextKV` / `KVSpec` types):
- `kv_spec`: what a saved context must match to be imported (model fingerprint, KV dtype and
  shape). KV travels per token, so the block size need not match.
- `export_context(context_id) -> ContextKV`: the context's whole token sequence (ancestors
  included), its KV and the hidden state its next token is sampled from. Evicted KV is
  recomputed first; a context a request is running on is refused (`InvalidRequestError`).
- `import_context(context_id, kv)`: create a root context holding those tokens with that KV,
  nothing computed, its full blocks registered in the prefix cache like computed ones. Atomic.
- `reset_prefix_cache() -> int`: forget the cached prefixes of blocks nothing holds.

Optional: `vocab_size` (token ids are below it) and `max_num_seqs` (sequences it runs at
once), which the server checks requests against.

Optional, for suspendable generations (`parrot_core.switching`): two reads that are posted
when called (in order with the engine's other work: one made before a `generate` sees the
context before the generate touches it) and awaited on the event loop:
- `context_tokens(context_id) -> Awaitable[list[int]]`: the context's whole token sequence
  (ancestors included); after an aborted generate, what it appended, handed out or not.
- `kv_residency(context_ids) -> Awaitable[dict[int, tuple[int, int]]]`: for each of those
  contexts the engine holds, (its tokens, those whose KV is computed). An engine of text
  contexts (no KV here) reports 0 computed; what its server's cache supplies shows up only
  as a generate's `cached_tokens`.
- `check_resumable(params)` (if present): `InvalidRequestError` if a generation sampled with
  `params` cannot be continued across slices (`prior_output_tokens`) on this engine.

Lifecycle and checks, which every engine a `Runtime` holds provides (blocking calls, made from
a worker thread, never on the event loop):
- `tokenizer`: a `Tokenizer` (engines/builtin/tokenizer.py), or None for an engine that only
  takes token ids;
- `close()`: idempotent; every queued or running request fails with `RuntimeClosedError`;
  `closed` says whether it was called;
- `context_ids() -> set[int]`: the contexts the engine holds now (the serve layer checks that
  it agrees); `check_invariants()`: raise `InvariantError` if the engine's own bookkeeping is
  broken.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import llguidance

from parrot_core.errors import InvalidRequestError, RequestTooLargeError, UnsupportedByEngineError

FINISH_LENGTH = "length"  # max_tokens reached
FINISH_STOP = "stop"  # EOS, a stop token id or a stop string
FINISH_ABORT = "abort"  # the caller went away
MAX_LOGPROBS = 20  # the most alternatives a request may ask for per token (vLLM's default cap)


def capability(engine: Any, name: str, purpose: str) -> Any:
    """The engine's optional method `name` (see the module docstring), or
    `UnsupportedByEngineError` saying that `purpose` needs it and this engine lacks it."""
    method = getattr(engine, name, None)
    if method is None:
        kind = type(engine).__name__
        raise UnsupportedByEngineError(f"{purpose} needs an engine with `{name}`; {kind} ({engine.model_name!r}) has none")
    return method


def check_request(
    held: int,
    tokens: Sequence[int],
    params: SamplingParams | None,
    *,
    vocab_size: int,
    max_model_len: int,
    block_size: int,
    num_blocks: int | None,
) -> None:
    """What every engine checks before a fill (`params` None) or a generate appends `tokens`
    to a context that holds `held` tokens: ids in the vocabulary, the whole sequence (plus
    `max_tokens`) within `max_model_len` and within a pool of `num_blocks` blocks (None:
    unknown), and, for a generate, something to continue and stop/bias ids in the vocabulary.
    `InvalidRequestError` / `RequestTooLargeError` with the numbers."""
    bad = [t for t in tokens if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"token ids must be integers in [0, {vocab_size}); got {bad[:5]}")
    generated = params.max_tokens if params is not None else 0
    total = held + len(tokens) + generated
    if total > max_model_len:
        raise RequestTooLargeError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested"
            f" {total} tokens ({held + len(tokens)} in the context, {generated} to generate)."
        )
    blocks = -(-total // block_size)
    if num_blocks and blocks > num_blocks:
        raise RequestTooLargeError(f"the request needs {blocks} KV blocks ({total} tokens) but the pool holds only {num_blocks}")
    if params is None:
        return
    if not held and not tokens:
        raise InvalidRequestError("cannot generate from an empty context: fill it first")
    for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", [t for t, _ in params.logit_bias])):
        if any(t >= vocab_size for t in ids):
            raise InvalidRequestError(f"{name} must hold token ids in [0, {vocab_size}); got {[t for t in ids if t >= vocab_size][:5]}")


def check_resumable_by_resend(params: SamplingParams, engine: str) -> None:
    """For engines that keep no sampling state between requests (vLLM, OpenAI-compatible
    servers), where a resumed generation is a fresh request over the prompt plus the output so
    far: `InvalidRequestError` naming what such a request cannot continue (penalties that count
    only the output, a seeded random stream)."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(params, name):
            raise InvalidRequestError(f"{name} cannot be suspended on {engine}: it counts the earlier output, which a resumed request sends as prompt")
    if params.seed is not None and params.temperature > 0:
        raise InvalidRequestError(f"seed (with temperature > 0) cannot be suspended on {engine}: a resumed request restarts the random stream")


def find_stop(text: str, stops: Sequence[str], checked_chars: int) -> int | None:
    """Where the earliest of `stops` begins in `text`, or None. Only matches that reach past
    the first `checked_chars` characters are looked for (the text before was already checked,
    so a match there would have been found then)."""
    start = max(0, checked_chars - max(len(s) for s in stops))
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model's raw distribution (log_softmax of the
    logits, before any sampling transform). `rank`: 1 + how many tokens have a strictly larger
    logprob. `top`: the most likely tokens as (token id, logprob), most likely first (ties in
    any order), as many as the request asked for."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# JSON without free whitespace: a small model given the choice can emit newlines until max_tokens.
# A schema's own "x-guidance" options override this.
_JSON_DEFAULTS: Any = {"whitespace_flexible": False}


@dataclass(frozen=True)
class StructuredSpec:
    """What a constrained generation must produce: exactly one of
    - `json_schema`: a JSON schema (a dict or its JSON text; stored as canonical JSON text),
    - `json_object`: True for any JSON object,
    - `regex`: a regular expression the whole output matches (Rust `regex` syntax),
    - `choice`: one of these strings, exactly,
    - `grammar`: a Lark grammar (llguidance's dialect, `start` rule first).
    JSON is generated without free whitespace unless the schema's `x-guidance` options say
    otherwise. Validated on construction: a spec that does not compile is an
    `InvalidRequestError` naming its field. `grammar_text` is the compiled llguidance grammar
    the engine builds its matcher from."""

    json_schema: str | Mapping[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    grammar_text: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError(f"structured output needs exactly one of {', '.join(STRUCTURED_KINDS)}; got {given or 'none'}")
        kind = given[0]
        value = getattr(self, kind)
        try:
            grammar = self._compile(kind, value)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(f"{kind}: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar)
        if error:
            raise InvalidRequestError(f"{kind} is not valid: {error.strip()}")
        object.__setattr__(self, "grammar_text", grammar)

    def _compile(self, kind: str, value: Any) -> str:
        if kind == "json_schema":
            schema = json.loads(value) if isinstance(value, str) else value
            if not isinstance(schema, Mapping):
                raise ValueError(f"a JSON schema must be a JSON object, got {value!r}")
            object.__setattr__(self, "json_schema", json.dumps(schema, sort_keys=True))
            return llguidance.LLMatcher.grammar_from_json_schema(dict(schema), defaults=_JSON_DEFAULTS)
        if kind == "json_object":
            if value is not True:
                raise ValueError(f"must be true or false, got {value!r}")
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_DEFAULTS)
        if kind == "choice":
            if isinstance(value, str) or not value or any(not isinstance(c, str) or not c for c in value):
                raise ValueError(f"must be a non-empty list of non-empty strings, got {value!r}")
            object.__setattr__(self, "choice", tuple(value))
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
        if not isinstance(value, str) or not value:
            raise ValueError(f"must be a non-empty string, got {value!r}")
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(value)
        return llguidance.LLMatcher.grammar_from_lark(value)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> StructuredSpec | None:
        """The spec named by keyword options (`json_schema=`, `regex=`, `choice=`, ...; the
        spelling of `rt.generate` and `P.Output`), or None when none is given."""
        given = {k: options[k] for k in STRUCTURED_KINDS if options.get(k) not in (None, False)}
        return cls(**given) if given else None


def split_structured(options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` with the structured-output keywords (`json_schema`, `regex`, `choice`,
    `grammar`, `json_object`) replaced by one `structured` spec: how `rt.generate(...,
    json_schema=...)` and `P.Output(json_schema=...)` become `SamplingParams` fields."""
    rest = {k: v for k, v in options.items() if k not in STRUCTURED_KINDS}
    spec = StructuredSpec.from_options(options)
    if spec is not None:
        if rest.get("structured") is not None:
            raise InvalidRequestError("give either structured= or one of json_schema/json_object/regex/choice/grammar, not both")
        rest["structured"] = spec
    return rest


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one generation. Validated on construction (typed error, clear message).

    `temperature == 0` is greedy. `top_k` of -1 or 0 and `top_p == 1` disable those filters. `seed`
    makes a sampled generation reproducible independently of what else runs in the batch.
    Stop strings are matched on the detokenized output and are not included in it; stop token
    ids (and EOS unless `ignore_eos`) end the generation and are not included either.

    `logprobs` (0..MAX_LOGPROBS): each sampled token comes with its logprob and the `logprobs`
    most likely alternatives. `prompt_logprobs` (0..MAX_LOGPROBS): the same for each prompt
    token the generate carries, computed in the same forward (a request asking for them does
    not take prompt tokens from the prefix cache, whose KV has no logits). Logprobs are of the
    distribution the model produced: log_softmax of the raw logits, before temperature, top-k
    and top-p (vLLM's default, "raw_logprobs"). Neither changes which token is sampled.
    Logit processing, applied in this order before temperature (`sampler.apply_penalties`):
    - `min_tokens`: EOS (unless `ignore_eos`) and the stop token ids get -inf until that many
      tokens were generated (stop strings still apply).
    - `logit_bias`: {token id: bias in [-100, 100]} added to those logits (ids must be in the
      vocabulary; the engine checks).
    - `repetition_penalty` (vLLM/HF, > 0, 1 is off): a token seen in the prompt or the output
      has its logit divided by it if positive, multiplied by it otherwise.
    - `frequency_penalty` and `presence_penalty` (OpenAI, [-2, 2], 0 is off): a token's logit
      loses `frequency * count + presence * (count > 0)`, count = its occurrences in the output.
    `min_p` (vLLM, [0, 1], 0 is off) is applied after temperature: tokens whose probability is
    below `min_p` times the largest are dropped. Rows without any of these are untouched.
    `structured` (a `StructuredSpec`, or a mapping of its fields): the output must belong to
    its language. Each step, tokens that cannot continue it get -inf (after the processing
    above; if that leaves nothing, the grammar's tokens are taken from the raw logits); EOS
    is allowed only where the output is complete, and the generation ends ("stop") as soon
    as the grammar admits no further token. `max_tokens` can still cut it ("length").
    `prior_output_tokens` (a resumed generation, `parrot_core.switching`): the context's last
    that many tokens are this generation's output from earlier slices. Penalties and
    `min_tokens` count them as output (`min_tokens` may then exceed `max_tokens` by up to
    that many), and a seeded generator continues after the draws they took, so the slices
    together sample what one uninterrupted generation would. `max_tokens` counts new tokens.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] = ()  # stored as sorted pairs
    min_tokens: int = 0
    min_p: float = 0.0
    structured: StructuredSpec | Mapping[str, Any] | None = None
    prior_output_tokens: int = 0

    def __post_init__(self) -> None:
        self._check_basic()
        self._check_processing()
        if isinstance(self.structured, Mapping):
            unknown = sorted(set(self.structured) - set(STRUCTURED_KINDS))
            if unknown:
                raise InvalidRequestError(f"structured: unknown fields {unknown}; it takes one of {', '.join(STRUCTURED_KINDS)}")
            object.__setattr__(self, "structured", StructuredSpec(**self.structured))
        elif self.structured is not None and not isinstance(self.structured, StructuredSpec):
            raise InvalidRequestError(f"structured must be a StructuredSpec, a mapping of its fields or None, got {self.structured!r}")

    def _check_basic(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise InvalidRequestError(f"top_k must be an integer >= 1, or -1 or 0 to disable it, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63):
            raise InvalidRequestError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError(f"stop must hold non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS):
                raise InvalidRequestError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {k!r}")

    def _check_processing(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _finite(value) or not -2 <= value <= 2:
                raise InvalidRequestError(f"{name} must be a number in [-2, 2], got {value!r}")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidRequestError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        bias = self.logit_bias
        try:
            pairs = tuple(sorted((bias.items() if isinstance(bias, Mapping) else bias), key=lambda kv: kv[0]))
            ok = all(_index(t) and _finite(b) and -100 <= b <= 100 for t, b in pairs)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InvalidRequestError(f"logit_bias must map token ids (integers >= 0) to numbers in [-100, 100], got {bias!r}")
        if len({t for t, _ in pairs}) != len(pairs):
            raise InvalidRequestError(f"logit_bias names a token id twice, got {bias!r}")
        object.__setattr__(self, "logit_bias", pairs)
        if not _index(self.prior_output_tokens):
            raise InvalidRequestError(f"prior_output_tokens must be an integer >= 0, got {self.prior_output_tokens!r}")
        most = self.max_tokens + self.prior_output_tokens
        if not _index(self.min_tokens) or self.min_tokens > most:
            raise InvalidRequestError(f"min_tokens must be an integer in [0, max_tokens={most}], got {self.min_tokens!r}")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise InvalidRequestError(f"min_p must be a number in [0, 1], got {self.min_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def processes_logits(self) -> bool:
        """Whether `sampler.apply_penalties` changes this row (it needs the token history)."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1 or self.logit_bias or self.min_tokens
        )


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _index(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


@dataclass(frozen=True)
class FillResult:
    """What a Fill did: `num_tokens` appended, of which `cached_tokens` came from the engine's
    prefix cache instead of being computed."""

    context_id: int
    num_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class GenerationDelta:
    """New token ids of one generation. The last delta has `finish_reason` set; `text` is the
    detokenized text of these tokens (stop strings already cut). `cached_tokens`: of the prompt
    tokens the generate carried, how many the prefix cache supplied. `logprobs` (when the
    params ask for them): one entry per token of `token_ids`, then one for `stop_token_id`.
    `prompt_logprobs` (when asked, on the first delta only): one entry per prompt token the
    generate carried, None for a token with nothing before it in the context.
    `stop_token_id` (last delta only): the EOS or stop token id that ended the generation; it
    is not output (`token_ids`, `text`) and does not join the context.
    `reused_tokens` (engines that keep no KV per context, whose every request carries the
    context's whole sequence: vLLM, OpenAI-compatible servers; None on others): of that whole
    sequence, how many tokens their prefix cache supplied (the context's earlier tokens too),
    in the counting of whoever computed them (a remote server counts its own tokens)."""

    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    stop_token_id: int | None = None
    reused_tokens: int | None = None


@dataclass(frozen=True)
class RuntimeInfo:
    """A snapshot of an engine's load and cache. Token counts are KV slots."""

    model_name: str
    block_size: int
    num_blocks_total: int
    num_blocks_free: int  # never used, or freed without a reusable hash
    num_blocks_cached: int  # free but still holding a reusable prefix (evictable)
    num_contexts: int
    num_running: int
    num_waiting: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which were found
    prompt_tokens_computed: int
    generation_tokens: int
    num_preemptions: int
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def num_blocks_used(self) -> int:
        return self.num_blocks_total - self.num_blocks_free - self.num_blocks_cached


@runtime_checkable
class Engine(Protocol):
    """What the serve layer needs from an engine. See the module docstring for the contract."""

    model_name: str
    max_model_len: int  # the longest context (prompt + generated tokens) it runs

    async def fill(self, context_id: int, parent_context_id: int | None, token_ids: Sequence[int]) -> FillResult: ...

    def generate(
        self,
        context_id: int,
        parent_context_id: int | None,
        params: SamplingParams,
        prompt_token_ids: Sequence[int] = (),
    ) -> AsyncIterator[GenerationDelta]: ...

    def free_context(self, context_id: int) -> None: ...

    def runtime_info(self) -> RuntimeInfo: ...
