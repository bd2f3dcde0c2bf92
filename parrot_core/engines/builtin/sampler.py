"""Token sampling: greedy, temperature, min-p, top-k and top-p, one row per request; and
`apply_penalties` (min_tokens, logit_bias, repetition/frequency/presence penalties), which the
engine applies to the logits first.

Each sampled row draws exactly one uniform number from its own generator (or the global RNG when
it has none) and picks its token by inverse CDF over its filtered distribution. A row's result
therefore depends only on its logits, its parameters and its generator, never on the other rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from parrot_core.engines.base import SamplingParams, TokenLogprob


@torch.inference_mode()
def sample(logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token id per row of `logits` [B, V]. Greedy rows (temperature 0) take the argmax."""
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError("sample() needs logits [B, V] with one params and one generator per row")
    # argmax in float32: the same index (the first maximum, ties included: every bfloat16 is a
    # float32), and torch's bfloat16 argmax is ~5x slower (3 ms for 32 x 49,152 logits here)
    out = (logits if logits.dtype in (torch.float32, torch.float64) else logits.float()).argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    vocab = logits.shape[1]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits[rows].to(dtype)
    ps = [params[i] for i in rows]
    x = x / torch.tensor([p.temperature for p in ps], dtype=dtype, device=x.device)[:, None]
    x = _min_p(x, [p.min_p for p in ps])
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in ps]
    top_ps = [p.top_p if p.top_p < 1.0 else float("inf") for p in ps]

    if all(k == vocab for k in ks) and all(p == float("inf") for p in top_ps):
        order = None
        probs = torch.softmax(x, dim=-1)
    else:
        x, order = torch.sort(x, dim=-1, descending=True, stable=True)
        rank = torch.arange(vocab, device=x.device)[None, :]
        x = x.masked_fill(rank >= torch.tensor(ks, device=x.device)[:, None], float("-inf"))
        probs = torch.softmax(x, dim=-1)
        # top-p: keep the smallest head of the sorted list whose mass reaches top_p (>= 1 token)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = mass_before >= torch.tensor(top_ps, dtype=dtype, device=x.device)[:, None]
        probs = probs.masked_fill(drop, 0.0)

    cdf = torch.cumsum(probs, dim=-1)
    u = torch.stack([_uniform(generators[i], dtype).to(x.device) for i in rows])
    picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    # u * total can round up to total: fall back to the last token with nonzero probability
    last_nonzero = vocab - 1 - torch.argmax((probs.flip(-1) > 0).to(torch.int8), dim=-1)
    picks = torch.minimum(picks, last_nonzero)
    if order is not None:
        picks = order.gather(1, picks[:, None])[:, 0]
    for i, tok in zip(rows, picks.tolist()):
        out[i] = tok
    return out


@torch.inference_mode()
def token_logprobs(logits: Tensor, token_ids: Sequence[int], num_top: Sequence[int]) -> list[TokenLogprob]:
    """For each row of `logits` [N, V]: the logprob of `token_ids[i]` under log_softmax of the
    raw row (float64 for float64 logits, else float32), its rank (1 + the number of tokens with a
    strictly larger logprob) and the `num_top[i]` most likely tokens."""
    if logits.dim() != 2 or logits.shape[0] != len(token_ids) or len(token_ids) != len(num_top):
        raise ValueError("token_logprobs() needs logits [N, V] with one token id and one top count per row")
    if not token_ids:
        return []
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lp = torch.log_softmax(logits.to(dtype), dim=-1)
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, ids[:, None])
    ranks = (lp > chosen).sum(dim=-1) + 1
    k = max(num_top)
    top_vals, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], ids[:, None][:, :0])
    chosen_l, ranks_l, vals_l, tids_l = chosen[:, 0].tolist(), ranks.tolist(), top_vals.tolist(), top_ids.tolist()
    return [
        TokenLogprob(t, chosen_l[i], ranks_l[i], tuple(zip(tids_l[i][: num_top[i]], vals_l[i][: num_top[i]])))
        for i, t in enumerate(token_ids)
    ]
def _min_p(x: Tensor, min_ps: list[float]) -> Tensor:
    """Drop (-inf) the tokens of each row whose probability is below its `min_p` times the
    row's largest; rows with `min_p` 0 are returned as they are."""
    if not any(min_ps):
        return x
    probs = torch.softmax(x, dim=-1)
    threshold = torch.tensor(min_ps, dtype=x.dtype, device=x.device)[:, None] * probs.max(dim=-1, keepdim=True).values
    return x.masked_fill(probs < threshold, float("-inf"))


@torch.inference_mode()
def apply_penalties(
    logits: Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[tuple[Sequence[int], Sequence[int]] | None],
    eos_token_id: int | None,
) -> Tensor:
    """`logits` [B, V] with each row's logit processing applied (see `SamplingParams`): in this
    order min_tokens, logit_bias, repetition penalty, frequency and presence penalties.
    `histories[i]` is row i's (prompt ids, output ids) so far; it may be None for a row whose
    params do not `processes_logits`. Returns `logits` itself when no row processes logits,
    otherwise a copy in which only the rows that do differ."""
    if len(params) != logits.shape[0] or len(histories) != len(params):
        raise ValueError("apply_penalties() needs logits [B, V] with one params and one history per row")
    rows = [i for i, p in enumerate(params) if p.processes_logits]
    if not rows:
        return logits
    out = logits.clone()
    device = logits.device
    for i in rows:
        p, history = params[i], histories[i]
        if history is None:
            raise ValueError(f"row {i} processes logits but has no token history")
        prompt_ids, output_ids = history
        row = out[i]  # a view: the updates below write into `out`
        if len(output_ids) < p.min_tokens:
            stops = list(p.stop_token_ids) + ([eos_token_id] if eos_token_id is not None and not p.ignore_eos else [])
            if stops:
                row[torch.tensor(stops, device=device)] = float("-inf")
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], device=device)
            row[ids] += torch.tensor([b for _, b in p.logit_bias], dtype=row.dtype, device=device)
        output = torch.tensor(list(output_ids), dtype=torch.long, device=device)
        if p.repetition_penalty != 1:
            seen = torch.cat([torch.tensor(list(prompt_ids), dtype=torch.long, device=device), output]).unique()
            x = row[seen]
            row[seen] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and len(output):
            counts = torch.bincount(output, minlength=row.shape[0])[: row.shape[0]].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return out


def skip_draws(generator: torch.Generator, n: int, logits_dtype: torch.dtype) -> None:
    """Advance `generator` past the `n` draws that `sample` takes for `n` tokens sampled from
    logits of `logits_dtype` (a resumed generation continues its random stream)."""
    dtype = torch.float64 if logits_dtype == torch.float64 else torch.float32
    for _ in range(n):
        _uniform(generator, dtype)


def _uniform(generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.rand((), generator=generator, dtype=dtype, device=device)
