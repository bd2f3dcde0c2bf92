"""A Llama forward pass over a paged KV pool, in torch (CPU or CUDA, any float dtype), on
vLLM's CPU kernels where vLLM's CPU build is installed (`cpu_kernels.py`).

A forward step takes the new tokens of several sequences (prefill chunks and single decode
tokens, mixed freely), writes their K/V into the slots the caller chose (`block_id * block_size
+ offset`), and attends each query over its sequence's slots as listed by its block table.

The pool is one of two layouts (`allocate_kv_cache` picks):
- `cpu_kernels.VllmKVCache`, vLLM's CPU block layout, when vLLM's CPU build can run here: one
  call of its paged kernel per layer attends every sequence of the step from the block tables;
- `KVCache`, token-major (one flat tensor per layer for K and one for V, indexed by slot),
  attended by torch's kernels on these paths (all exact; no padding ever gets attention weight):
  - a fresh prefill (nothing cached) attends over its own new K/V with a causal mask;
  - a chunk over a cached context gathers the context's K/V and uses an offset causal mask;
  - decode tokens (one new token per sequence) are batched into one SDPA with a key-padding mask;
  - sequences that share their first P blocks and compute tokens after them (decodes, or chunks
    of up to `shared_prefix_max_query` tokens over a cached context) use cascade attention: the
    shared prefix is attended once for all their queries (one GEMM per KV head), each suffix on
    its own (causal within it), and the two are merged exactly with their log-sum-exp.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from parrot_core.engines.builtin.cpu_kernels import PagedBatch, VllmKVCache, vllm_kv_supported, vllm_matmul, vllm_ops_for


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and constants of a Llama-family decoder (no biases, SiLU MLP, RMSNorm, RoPE)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    rope_freq_factors: tuple[float, ...] | None = None  # per-frequency divisors (GGUF `rope_freqs`)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even, got {self.head_dim}")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise ValueError("rope_freq_factors must hold head_dim / 2 values")


class KVCache:
    """The paged KV pool, token-major: per layer one K and one V tensor of shape [num_slots,
    kv_heads, head_dim], slot = block_id * block_size + offset. Read and written through
    `write`, `read` and `copy_block`, which `cpu_kernels.VllmKVCache` (vLLM's block layout) also
    offers; the model attends over this one with torch's kernels."""

    def __init__(self, k: list[Tensor], v: list[Tensor], block_size: int) -> None:
        self.k, self.v, self.block_size = k, v, block_size

    @classmethod
    def allocate(
        cls,
        config: LlamaConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> KVCache:
        # zeroed, not empty: padded gathers read unused slots, and 0 * NaN garbage would be NaN
        shape = (num_blocks * block_size, config.num_kv_heads, config.head_dim)
        k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        return cls(k, v, block_size)

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0] // self.block_size

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store tokens' K and V [n, kv_heads, head_dim] at slots [n] (int64) of one layer."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def read(self, layer: int, slots: Tensor) -> tuple[Tensor, Tensor]:
        """The K and V stored at slots [n] of one layer: two fresh [n, kv_heads, head_dim]."""
        return self.k[layer].index_select(0, slots), self.v[layer].index_select(0, slots)

    def copy_block(self, src_block: int, dst_block: int, num_slots: int | None = None) -> None:
        """Copy the first `num_slots` slots (default: all) of a block into another, in every layer."""
        n = self.block_size if num_slots is None else num_slots
        s, d = src_block * self.block_size, dst_block * self.block_size
        for pool in (*self.k, *self.v):
            pool[d : d + n].copy_(pool[s : s + n])


AnyKVCache = KVCache | VllmKVCache


def allocate_kv_cache(
    config: LlamaConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> AnyKVCache:
    """The engine's pool: in vLLM's block layout, attended by its paged CPU kernel, when that
    kernel can run here (cpu_kernels.py); else token-major, attended by torch's kernels."""
    if vllm_kv_supported(config.head_dim, dtype, block_size, device):
        return VllmKVCache.allocate(config.num_layers, config.num_kv_heads, config.head_dim, num_blocks, block_size, dtype)
    return KVCache.allocate(config, num_blocks, block_size, dtype, device)


@dataclass
class ForwardBatch:
    """One model step. Sequences appear in the same order in every per-sequence field, and their
    new tokens are concatenated in that order in the per-token fields."""

    token_ids: Tensor  # [T] int64: the new tokens of all sequences
    positions: Tensor  # [T] int64: absolute position of each new token
    slot_mapping: Tensor  # [T] int64: KV slot written for each new token
    query_lens: list[int]  # new tokens per sequence (sum == T)
    context_lens: list[int]  # tokens per sequence after this step (cached + new)
    block_tables: list[list[int]]  # per sequence, the block ids covering context_lens tokens

    @classmethod
    def build(
        cls,
        new_tokens: Sequence[Sequence[int]],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: str | torch.device = "cpu",
    ) -> ForwardBatch:
        """Positions and slots derived from the block tables: the new tokens of a sequence are the
        last `len(new_tokens[i])` of its `context_lens[i]` tokens."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for toks, ctx, table in zip(new_tokens, context_lens, block_tables, strict=True):
            ids.extend(toks)
            for p in range(ctx - len(toks), ctx):
                positions.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)

        def as_tensor(x: list[int]) -> Tensor:
            return torch.tensor(x, dtype=torch.int64, device=device)

        return cls(
            as_tensor(ids),
            as_tensor(positions),
            as_tensor(slots),
            [len(t) for t in new_tokens],
            list(context_lens),
            [list(t) for t in block_tables],
        )

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


# ---------------------------------------------------------------------------- attention plan


@dataclass
class _Chunk:
    """One sequence with several new tokens, attended on its own; or, for fresh prefills,
    `count` sequences of `q_len` tokens each, back to back in the batch, attended in one call."""

    start: int  # first row of its tokens in the batch
    q_len: int
    ctx_len: int
    slots: Tensor | slice | None  # context slots; None = fresh prefill (attend the new K/V)
    mask: Tensor | None  # [q_len, ctx_len] bool (True = may attend); None with is_causal or q_len 1
    count: int = 1


@dataclass
class _Decode:
    """Sequences with one new token each, attended in one padded SDPA."""

    rows: Tensor | None  # their rows in the batch; None = all rows, in order
    slots: Tensor | slice  # [B * max_len], padded with slot 0
    max_len: int
    mask: Tensor | None  # [B, 1, 1, max_len] bool; None when all lengths are equal


@dataclass
class _SharedPrefix:
    """Sequences sharing a block prefix that ends before their new tokens (cascade attention):
    decodes (one new token each), or chunks of new tokens over a cached context. Their queries
    are laid out padded, `max_query` per member. Several groups, each with a prefix of its own
    of the same length, form one cascade: their prefixes are attended in one kernel call."""

    rows: Tensor | None  # [B * max_query]: the batch row of each padded query (a pad repeats a real one); None = all rows
    out_rows: Tensor | None  # batch rows of the real queries; None: every padded query is real, in `rows` order
    real: Tensor | None  # their positions in the padded layout (None with out_rows None)
    max_query: int
    prefix_slots: Tensor | slice  # [G * Lp]: each group's prefix, group after group
    suffix_slots: Tensor  # [B * max_suffix], padded
    max_suffix: int
    suffix_bias: Tensor | None  # [B, 1, max_query * group, max_suffix]: 0 or -inf (causal, padding); None if none is masked
    num_groups: int = 1  # G groups, each sharing a prefix of its own (all of length Lp)
    group_members: Tensor | None = None  # [G * C]: member of each group slot, C per group (a pad repeats one); None if G == 1
    member_slot: Tensor | None = None  # [B]: each member's group slot; None if G == 1


@dataclass
class _Plan:
    chunks: list[_Chunk]
    decode: _Decode | None
    shared: list[_SharedPrefix]
    last_rows: Tensor  # [num_seqs]: row of each sequence's last new token
    all_last: bool  # every row is a last row (pure decode): nothing to prune
    paged: PagedBatch | None = None  # a VllmKVCache step: its kernel attends every row


class _Workspace:
    """Reusable buffers: the torch paths' gathers, and a step's activations on vLLM's ops path.
    Fresh large tensors page-fault on CPU (measured: paged attention up to 6x slower; 90,000-
    190,000 faults, 4-8% of the wall time, in a harness row of 2,048-token steps whose sizes
    change from step to step), so these buffers only ever grow and are written again."""

    def __init__(self) -> None:
        self._bufs: dict[int | str, Tensor] = {}

    def get(self, key: int | str, rows: int, like: Tensor) -> Tensor:
        return self.matrix(key, rows, like.shape[1:], like.dtype, like.device)

    def matrix(self, key: int | str, rows: int, tail: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A buffer [rows, *tail], reused by every later call with this key (contents undefined)."""
        numel = rows * math.prod(tail)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            size = max(numel, 2 * buf.numel() if buf is not None and buf.dtype == dtype else 0)
            buf = self._bufs[key] = torch.empty(size, dtype=dtype, device=device)
        return buf[:numel].view(rows, *tail)

    def gather(self, key: int, pool: Tensor, slots: Tensor | slice) -> Tensor:
        if isinstance(slots, slice):  # consecutive slots: a view, no copy
            return pool[slots]
        out = self.get(key, slots.numel(), pool)
        torch.index_select(pool, 0, slots, out=out)
        return out


def _merge_groups(groups: list[list[int]]) -> list[list[list[int]]]:
    """Groups (of one prefix length) put together into cascades, smallest first, as long as
    padding every group of a cascade to its largest costs at most half again its real rows."""
    merged: list[list[list[int]]] = []
    for group in sorted(groups, key=len):
        last = merged[-1] if merged else None
        if last is not None and 2 * (len(last) + 1) * len(group) <= 3 * (sum(map(len, last)) + len(group)):
            last.append(group)
        else:
            merged.append([group])
    return merged


def _common_prefix_len(tables: list[list[int]]) -> int:
    first = tables[0]
    n = min(len(t) for t in tables)
    for t in tables[1:]:
        i = 0
        while i < n and t[i] == first[i]:
            i += 1
        n = i
    return n


# ---------------------------------------------------------------------------- model


class Linear:
    """`y = x @ weight.T` for x [N, in]. On CPU in float32 or bfloat16 the product runs on a
    copy of the weight prepacked for oneDNN: vLLM's GEMM (`cpu_kernels.VllmMatmul`) when vLLM's
    CPU build is installed, else torch's. Torch's ran at 236 GFLOP/s against F.linear's 101 in
    float32 on one core of an AVX-512 EPYC (2048 x 576 x 3072; 219 vs 97 at 32 rows), 473 vs
    464 in bfloat16 (418 vs 348 at 32 rows). Each row's result does not depend on the other
    rows (tests/engines/test_model.py checks it bitwise). Other devices and dtypes (float64:
    the tests' oracle models) use F.linear. `weight` stays as given."""

    __slots__ = ("weight", "_packed", "_vllm")

    def __init__(self, weight: Tensor, rows_hint: int = 2048) -> None:
        self.weight = weight
        self._vllm = vllm_matmul(weight) if os.environ.get("PARROT_CORE_ONEDNN", "1") != "0" else None
        self._packed = _onednn_pack(weight, rows_hint) if self._vllm is None else None

    def __call__(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """The product, written into `out` [N, out_features] when given (and returned)."""
        if self._vllm is not None:
            return self._vllm(x, out)
        if self._packed is None:
            y = F.linear(x, self.weight)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")
        return y if out is None else out.copy_(y)

    @property
    def packed(self) -> bool:
        return self._packed is not None or self._vllm is not None


def _onednn_pack(weight: Tensor, rows_hint: int) -> Tensor | None:
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not torch.backends.mkldnn.is_available() or os.environ.get("PARROT_CORE_ONEDNN", "1") == "0":
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows_hint)
    except (RuntimeError, AttributeError):  # a build without these ops: the plain product
        return None


@dataclass
class _Layer:
    attn_norm: Tensor
    wqkv: Linear  # [(heads + 2 * kv_heads) * head_dim, hidden]: q, k, v stacked
    wo: Linear
    mlp_norm: Tensor
    w_gate_up: Linear  # [2 * intermediate, hidden]: gate, up stacked
    w_down: Linear


class LlamaModel:
    """Llama weights plus the forward step. Weights are taken under `transformers`
    LlamaForCausalLM names (see `state_dict_hf`); q/k/v and gate/up are fused into copies."""

    def __init__(
        self,
        config: LlamaConfig,
        weights: dict[str, Tensor],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)

        def w(name: str) -> Tensor:
            if name not in weights:
                raise KeyError(f"weight {name!r} is missing")
            return weights[name].to(device=self.device, dtype=dtype)

        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        self.lm_head = Linear(self.embed if config.tie_word_embeddings else w("lm_head.weight"))
        self.layers: list[_Layer] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(
                _Layer(
                    attn_norm=w(p + "input_layernorm.weight"),
                    wqkv=Linear(torch.cat([w(p + f"self_attn.{n}_proj.weight") for n in "qkv"])),
                    wo=Linear(w(p + "self_attn.o_proj.weight")),
                    mlp_norm=w(p + "post_attention_layernorm.weight"),
                    w_gate_up=Linear(torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")])),
                    w_down=Linear(w(p + "mlp.down_proj.weight")),
                )
            )
        self._rope_len = 0
        self._extend_rope(config.max_position_embeddings)
        # Engines on several threads may share this model: one forward (or logits) call runs at
        # a time. vLLM's CPU kernels and the step buffers are not safe under concurrent calls
        # (two threads stepping at once corrupted rows, up to 8.0 off in a test).
        self._lock = threading.Lock()
        self._ws = _Workspace()
        # The torch paths' choices (a VllmKVCache pool is attended by vLLM's kernel instead).
        # Cascade attention for a group of decode sequences sharing a block prefix pays a fixed
        # cost of small ops per layer; it wins once members x shared tokens is large enough.
        # Measured (SmolLM2-135M, 2 CPU threads): break-even near 2048, -13% step time at 4096
        # (B=4 x 1024, B=16 x 256), -42% at 32 x 1024. See benchmarks/model_speed.py.
        self.enable_shared_prefix = True
        self.shared_prefix_min_batch = 2
        self.shared_prefix_min_tokens = 256
        self.shared_prefix_min_work = 4096  # query tokens * shared tokens
        self.shared_prefix_max_query = 256  # longer chunks attend on their own
        # vLLM's fused CPU kernels for RoPE and residual add + RMS norm when vLLM's CPU build is
        # installed (2-9x faster than the torch ops at 2,048 rows: ~6% of a prefill step);
        # None: the torch ops. Tests set it to None to check one against the other.
        self.fused_ops = vllm_ops_for(dtype, self.device)

    # -- construction helpers ---------------------------------------------------------------

    @classmethod
    def random(
        cls, config: LlamaConfig, seed: int, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"
    ) -> LlamaModel:
        """A model with seeded random weights, scaled so that activations and logits are O(1)."""
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape: int, std: float) -> Tensor:
            return torch.randn(*shape, generator=g, dtype=torch.float64) * std

        def norm() -> Tensor:
            return 1.0 + rnd(config.hidden_size, std=0.1)

        h, d = config.hidden_size, config.head_dim
        weights = {"model.embed_tokens.weight": rnd(config.vocab_size, h, std=1.0), "model.norm.weight": norm()}
        if not config.tie_word_embeddings:
            weights["lm_head.weight"] = rnd(config.vocab_size, h, std=h**-0.5)
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            weights[p + "input_layernorm.weight"] = norm()
            weights[p + "post_attention_layernorm.weight"] = norm()
            weights[p + "self_attn.q_proj.weight"] = rnd(config.num_heads * d, h, std=2 * h**-0.5)
            weights[p + "self_attn.k_proj.weight"] = rnd(config.num_kv_heads * d, h, std=2 * h**-0.5)
            weights[p + "self_attn.v_proj.weight"] = rnd(config.num_kv_heads * d, h, std=h**-0.5)
            weights[p + "self_attn.o_proj.weight"] = rnd(h, config.num_heads * d, std=(config.num_heads * d) ** -0.5)
            weights[p + "mlp.gate_proj.weight"] = rnd(config.intermediate_size, h, std=h**-0.5)
            weights[p + "mlp.up_proj.weight"] = rnd(config.intermediate_size, h, std=h**-0.5)
            weights[p + "mlp.down_proj.weight"] = rnd(h, config.intermediate_size, std=config.intermediate_size**-0.5)
        return cls(config, weights, dtype=dtype, device=device)

    def state_dict_hf(self) -> dict[str, Tensor]:
        """The weights under `transformers` LlamaForCausalLM names (fresh tensors)."""
        c = self.config
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        out = {"model.embed_tokens.weight": self.embed.clone(), "model.norm.weight": self.norm.clone()}
        out["lm_head.weight"] = out["model.embed_tokens.weight"] if c.tie_word_embeddings else self.lm_head.weight.clone()
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            wq, wk, wv = layer.wqkv.weight.split([q, kv, kv])
            gate, up = layer.w_gate_up.weight.split(c.intermediate_size)
            out[p + "input_layernorm.weight"] = layer.attn_norm.clone()
            out[p + "post_attention_layernorm.weight"] = layer.mlp_norm.clone()
            out[p + "self_attn.q_proj.weight"] = wq.clone()
            out[p + "self_attn.k_proj.weight"] = wk.clone()
            out[p + "self_attn.v_proj.weight"] = wv.clone()
            out[p + "self_attn.o_proj.weight"] = layer.wo.weight.clone()
            out[p + "mlp.gate_proj.weight"] = gate.clone()
            out[p + "mlp.up_proj.weight"] = up.clone()
            out[p + "mlp.down_proj.weight"] = layer.w_down.weight.clone()
        return out

    def _extend_rope(self, length: int) -> None:
        # computed in float32 then cast, as transformers does, so float64 runs match it exactly
        c = self.config
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        if c.rope_freq_factors is not None:
            inv_freq = inv_freq / torch.tensor(c.rope_freq_factors, dtype=torch.float32)
        freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self._cos = freqs.cos().to(device=self.device, dtype=self.dtype)  # [length, head_dim / 2]
        self._sin = freqs.sin().to(device=self.device, dtype=self.dtype)
        self._cos_sin = torch.cat([self._cos, self._sin], dim=-1)  # [length, head_dim]: the fused kernel's table
        self._rope_len = length

    # -- forward ------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: AnyKVCache, output_rows: Tensor | None = None) -> Tensor:
        """Run one step. Writes the new tokens' K/V into `kv` at `batch.slot_mapping` and returns
        the final-normed hidden state of each sequence's last new token: [num_seqs, hidden]; or,
        given `output_rows` (indices into the batch's new tokens), of those tokens instead. The
        result is the caller's own tensor. Calls from several threads run one at a time."""
        with self._lock:
            return self._forward(batch, kv, output_rows)

    def _forward(self, batch: ForwardBatch, kv: AnyKVCache, output_rows: Tensor | None) -> Tensor:
        c = self.config
        n_q, n_kv, d = c.num_heads, c.num_kv_heads, c.head_dim
        eps = c.rms_norm_eps
        plan = self._paged_plan(batch, kv) if isinstance(kv, VllmKVCache) else self._plan(batch, kv.block_size)
        if max(batch.context_lens) > self._rope_len:
            self._extend_rope(max(max(batch.context_lens), 2 * self._rope_len))
        num_tokens = batch.token_ids.shape[0]
        fused = self.fused_ops
        if fused is None:
            cos = self._cos[batch.positions].unsqueeze(1)  # [T, 1, d/2]
            sin = self._sin[batch.positions].unsqueeze(1)

        # On vLLM's ops path every large activation is written into the model's reused buffers
        # (see _Workspace); elsewhere (None) each op makes its own.
        ws = self._ws if fused is not None else None

        def buffer(key: str, rows: int, *tail: int) -> Tensor | None:
            return None if ws is None else ws.matrix(key, rows, tail, self.dtype, self.device)

        if ws is None:
            x = F.embedding(batch.token_ids, self.embed)
        else:
            x = torch.index_select(self.embed, 0, batch.token_ids, out=buffer("x", num_tokens, c.hidden_size))
        y: Tensor | None = None  # the previous layer's output, added into x by the next norm
        last_layer = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, h = _add_rms_norm(x, y, layer.attn_norm, eps, fused)
            qkv = layer.wqkv(h, buffer("qkv", num_tokens, (n_q + 2 * n_kv) * d))
            if fused is not None:  # rotates q and k in place, inside qkv
                fused.rotary_embedding(batch.positions, qkv[:, : n_q * d], qkv[:, n_q * d : (n_q + n_kv) * d], d, self._cos_sin, True)
                qkv = qkv.view(num_tokens, n_q + 2 * n_kv, d)
                q, k, v = qkv[:, :n_q], qkv[:, n_q : n_q + n_kv], qkv[:, n_q + n_kv :]
            else:
                qkv = qkv.view(num_tokens, n_q + 2 * n_kv, d)
                qk = _rope(qkv[:, : n_q + n_kv], cos, sin)
                q, k, v = qk[:, :n_q], qk[:, n_q:], qkv[:, n_q + n_kv :]
            kv.write(i, batch.slot_mapping, k, v)
            if plan.paged is not None:
                assert isinstance(kv, VllmKVCache)
                o = kv.attend(i, q, plan.paged, buffer("o", num_tokens, n_q, d))  # [T, n_q, d]
            else:
                assert isinstance(kv, KVCache)
                o = self._attention(q, k, v, kv.k[i], kv.v[i], plan)
            o = o.reshape(o.shape[0], n_q * d)
            if i == last_layer and output_rows is not None:
                o, x = o[output_rows], x[output_rows]
            elif i == last_layer and not plan.all_last:  # only the last tokens' outputs are needed
                o, x = o[plan.last_rows], x[plan.last_rows]
            rows = o.shape[0]
            # the fused norm turns wo's output into h in place; h's last reader is w_gate_up,
            # so w_down may write the same buffer
            x, h = _add_rms_norm(x, layer.wo(o, buffer("y", rows, c.hidden_size)), layer.mlp_norm, eps, fused)
            gate_up = layer.w_gate_up(h, buffer("gate_up", rows, 2 * c.intermediate_size))
            y = layer.w_down(_silu_mul(gate_up, buffer("act", rows, c.intermediate_size)), buffer("y", rows, c.hidden_size))
        hidden = _add_rms_norm(x, y, self.norm, eps, fused)[1]
        return hidden if ws is None else hidden.clone()  # the caller keeps it past the next step

    @torch.inference_mode()
    def compute_logits(self, hidden: Tensor) -> Tensor:
        """[N, hidden] -> [N, vocab]."""
        with self._lock:
            return self.lm_head(hidden)

    # -- attention ----------------------------------------------------------------------------

    def _paged_plan(self, batch: ForwardBatch, kv: VllmKVCache) -> _Plan:
        """A step on vLLM's layout: its kernel attends every row, from the block tables."""
        _check_lengths(batch, kv.block_size)
        qlens = batch.query_lens
        ends = list(itertools.accumulate(qlens, initial=-1))[1:]
        paged = kv.prepare(qlens, batch.context_lens, batch.block_tables, self.config.num_heads)
        return _Plan([], None, [], _rows(ends, self.device), all(q == 1 for q in qlens), paged)

    def _plan(self, batch: ForwardBatch, block_size: int) -> _Plan:
        """Everything about the batch's attention on torch's paths that is the same in every layer."""
        _check_lengths(batch, block_size)
        qlens, ctxs, tables = batch.query_lens, batch.context_lens, batch.block_tables
        dev = self.device
        chunks: list[_Chunk] = []
        decode_seqs: list[int] = []
        cached_chunks: list[int] = []  # several new tokens over a cached context
        starts: list[int] = []
        start = 0
        for i, (ql, ctx) in enumerate(zip(qlens, ctxs)):
            starts.append(start)
            if ql == 1:
                decode_seqs.append(i)
            elif ctx == ql:
                last = chunks[-1] if chunks else None
                if last is not None and last.slots is None and last.q_len == ql and last.start + last.count * ql == start:
                    last.count += 1  # one batched causal call: ~10-25% faster than one call per sequence
                else:
                    chunks.append(_Chunk(start, ql, ctx, None, None))
            else:
                cached_chunks.append(i)
            start += ql
        all_decode = len(decode_seqs) == len(qlens)

        shared: list[_SharedPrefix] = []
        if self.enable_shared_prefix:
            # decodes and chunks form separate groups (a chunk pads its group's queries)
            groups: dict[tuple[int, bool], list[int]] = {}
            for i in decode_seqs + [i for i in cached_chunks if qlens[i] <= self.shared_prefix_max_query]:
                groups.setdefault((tables[i][0], qlens[i] == 1), []).append(i)
            by_length: dict[tuple[int, bool], list[list[int]]] = {}  # (prefix blocks, decodes?) -> groups
            for (_, is_decode), members in groups.items():
                n_blocks = self._shared_prefix_blocks(members, qlens, ctxs, tables, block_size)
                if n_blocks:
                    by_length.setdefault((n_blocks, is_decode), []).append(members)
            grouped: set[int] = set()
            for (n_blocks, _), same_length in by_length.items():
                for merged in _merge_groups(same_length):
                    shared.append(self._shared_group(merged, n_blocks, starts, qlens, ctxs, tables, block_size, all_decode))
                    grouped.update(i for g in merged for i in g)
            decode_seqs = [i for i in decode_seqs if i not in grouped]
            cached_chunks = [i for i in cached_chunks if i not in grouped]
        for i in cached_chunks:
            ql, ctx = qlens[i], ctxs[i]
            slots = _slot_range(tables[i], block_size, ctx) or _slots(tables[i], block_size, ctx, dev)
            pos = torch.arange(ctx - ql, ctx, device=dev)
            mask = torch.arange(ctx, device=dev)[None, :] <= pos[:, None]
            chunks.append(_Chunk(starts[i], ql, ctx, slots, mask))

        decode = None
        if decode_seqs:
            lens = [ctxs[i] for i in decode_seqs]
            max_len = max(lens)
            slots: Tensor | slice | None = None
            if len(decode_seqs) == 1:
                slots = _slot_range(tables[decode_seqs[0]], block_size, max_len)
            if slots is None:
                slots = torch.stack([_slots(tables[i], block_size, max_len, dev, pad=True) for i in decode_seqs]).view(-1)
            mask = None
            if min(lens) != max_len:
                mask = (torch.arange(max_len, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None])[:, None, None, :]
            rows = None if all_decode and len(decode_seqs) == len(qlens) else _rows([starts[i] for i in decode_seqs], dev)
            decode = _Decode(rows, slots, max_len, mask)

        ends = [s + q - 1 for s, q in zip(starts, qlens)]
        return _Plan(chunks, decode, shared, _rows(ends, dev), all_decode)

    def _shared_prefix_blocks(
        self, members: list[int], qlens: list[int], ctxs: list[int], tables: list[list[int]], block_size: int
    ) -> int:
        """How many leading blocks a group shares and attends once, or 0 when the cascade would
        not pay (too few members, too short a prefix, too little work, mostly padding)."""
        if len(members) < self.shared_prefix_min_batch:
            return 0
        n_blocks = _common_prefix_len([tables[i] for i in members])
        # the prefix ends before every member's first new token (decodes keep at least it)
        n_blocks = min(n_blocks, min((ctxs[i] - qlens[i]) // block_size for i in members))
        prefix_len = n_blocks * block_size
        if n_blocks < 1 or prefix_len < self.shared_prefix_min_tokens:
            return 0
        queries = [qlens[i] for i in members]
        if sum(queries) * prefix_len < self.shared_prefix_min_work:
            return 0
        if len(members) * max(queries) > 2 * sum(queries):
            return 0  # mostly padding: the plain paths do less work
        return n_blocks

    def _shared_group(
        self,
        groups: list[list[int]],
        n_blocks: int,
        starts: list[int],
        qlens: list[int],
        ctxs: list[int],
        tables: list[list[int]],
        block_size: int,
        all_decode: bool,
    ) -> _SharedPrefix:
        """The cascade of `groups` (lists of batch sequences), each sharing its first `n_blocks`
        blocks; `all_decode`: every sequence of the batch is a decode."""
        dev = self.device
        members = sorted(i for g in groups for i in g)  # batch order: rows and outputs stay in it
        is_whole_batch = all_decode and len(members) == len(qlens)
        prefix_len = n_blocks * block_size
        queries = [qlens[i] for i in members]
        max_query = max(queries)
        suffix_lens = [ctxs[i] - prefix_len for i in members]
        max_suffix = max(suffix_lens)
        suffix_slots = torch.stack(
            [_slots(tables[i][n_blocks:], block_size, max_suffix, dev, pad=True) for i in members]
        ).view(-1)
        # query j of a member (j < its query count) sits at suffix position (suffix - queries + j)
        # and sees the suffix up to there; a padding query sees key 0 only (finite, then dropped)
        key = torch.arange(max_suffix, device=dev)
        j = torch.arange(max_query, device=dev)
        last = torch.tensor(suffix_lens, device=dev)[:, None] - torch.tensor(queries, device=dev)[:, None] + j  # [B, Q]
        is_real = j[None, :] < torch.tensor(queries, device=dev)[:, None]
        last = torch.where(is_real, last, torch.zeros_like(last))
        bias = None
        if max_query > 1 or min(suffix_lens) != max_suffix:
            see = key[None, None, :] <= last[:, :, None]  # [B, Q, S]
            g = self.config.num_heads // self.config.num_kv_heads
            bias = torch.zeros(see.shape, dtype=self.dtype, device=dev).masked_fill_(~see, float("-inf"))
            bias = bias[:, None, :, None, :].expand(-1, 1, -1, g, -1).reshape(len(members), 1, max_query * g, max_suffix)
        rows = out_rows = real = None
        if max_query > 1:
            padded = [starts[i] + min(q, qlens[i] - 1) for i in members for q in range(max_query)]
            rows = _rows(padded, dev)
            if not bool(is_real.all()):
                real = is_real.reshape(-1).nonzero()[:, 0]
                out_rows = rows[real]
        elif not is_whole_batch:
            rows = _rows([starts[i] for i in members], dev)
        prefix_tables = [tables[g[0]][:n_blocks] for g in groups]
        if len(groups) == 1:
            table = prefix_tables[0]
            prefix_slots = _slot_range(table, block_size, prefix_len) or _slots(table, block_size, prefix_len, dev)
            return _SharedPrefix(rows, out_rows, real, max_query, prefix_slots, suffix_slots, max_suffix, bias)
        # several groups: group slots of C members each, a smaller group's pads repeat its first member
        position = {i: p for p, i in enumerate(members)}
        width = max(len(g) for g in groups)
        slot_member = [position[g[min(c, len(g) - 1)]] for g in groups for c in range(width)]
        member_slot = [0] * len(members)
        for k, g in enumerate(groups):
            for c, i in enumerate(g):
                member_slot[position[i]] = k * width + c
        prefix_slots = torch.cat([_slots(t, block_size, prefix_len, dev) for t in prefix_tables])
        return _SharedPrefix(
            rows, out_rows, real, max_query, prefix_slots, suffix_slots, max_suffix, bias,
            len(groups), _rows(slot_member, dev), _rows(member_slot, dev),
        )  # fmt: skip

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor, plan: _Plan) -> Tensor:
        """q [T, heads, d], the new k/v [T, kv_heads, d] (already in the pool) -> [T, heads, d]."""
        only = len(plan.chunks) + (plan.decode is not None) + len(plan.shared) == 1
        out = None if only else torch.empty_like(q)
        for ch in plan.chunks:
            rows = ch.count * ch.q_len
            if ch.slots is None:  # fresh prefills: [count, heads, q, d], views of the batch rows
                qs, ks, vs = (t[ch.start : ch.start + rows].view(ch.count, ch.q_len, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(rows, *q.shape[1:])
                if out is None:
                    return o
                out[ch.start : ch.start + rows] = o
                continue
            qs = q[ch.start : ch.start + ch.q_len].transpose(0, 1).unsqueeze(0)  # [1, heads, q, d]
            ks = self._ws.gather(0, k_pool, ch.slots)
            vs = self._ws.gather(1, v_pool, ch.slots)
            ks, vs = ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0)
            if ch.mask is not None and q.dtype in (torch.bfloat16, torch.float16):
                # a masked SDPA takes CPU's slow math path in half precision: attend in float32
                o = F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), attn_mask=ch.mask, enable_gqa=True)
                o = o.to(q.dtype)[0].transpose(0, 1)
            else:
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=ch.mask, enable_gqa=True)
                o = o[0].transpose(0, 1)
            if out is None:
                return o
            out[ch.start : ch.start + ch.q_len] = o
        if plan.decode is not None:
            dec = plan.decode
            qd = q if dec.rows is None else q[dec.rows]
            n = qd.shape[0]
            if n > 1 and q.dtype not in (torch.float32, torch.float64):
                # half precisions: SDPA's CPU path is 2-3x slower here (see _attend_decodes)
                assert isinstance(dec.slots, Tensor)
                o = _attend_decodes(qd, k_pool, v_pool, dec.slots, dec.mask, self._ws)
            else:
                ks = self._ws.gather(0, k_pool, dec.slots)
                vs = self._ws.gather(1, v_pool, dec.slots)
                if n == 1:
                    o = _attend_one(qd[0], ks, vs)[None]
                else:
                    ks = ks.view(n, dec.max_len, *k_pool.shape[1:])
                    vs = vs.view(n, dec.max_len, *v_pool.shape[1:])
                    o = F.scaled_dot_product_attention(
                        qd.unsqueeze(2), ks.transpose(1, 2), vs.transpose(1, 2), attn_mask=dec.mask, enable_gqa=True
                    )[:, :, 0]
            if out is None:
                return o
            _put(out, dec.rows, o)
        for sh in plan.shared:
            qd = q if sh.rows is None else q[sh.rows]
            o = self._cascade(qd, k_pool, v_pool, sh)
            if sh.real is not None:
                o = o[sh.real]
            if out is None:
                return o
            _put(out, sh.rows if sh.out_rows is None else sh.out_rows, o)
        assert out is not None
        return out

    def _cascade(self, q: Tensor, k_pool: Tensor, v_pool: Tensor, sh: _SharedPrefix) -> Tensor:
        """Exact attention of B members' padded queries [B * Q, heads, d] over (shared prefix ++
        own suffix, causal within the suffix) -> [B * Q, heads, d]."""
        n_q, d = q.shape[1], q.shape[2]
        n_kv = k_pool.shape[1]
        g, nq = n_q // n_kv, sh.max_query
        b = q.shape[0] // nq
        # [B, kv, Q * g, d]: a KV head's queries, query-major
        qg = (q * (1.0 / math.sqrt(d))).view(b, nq, n_kv, g, d).transpose(1, 2).reshape(b, n_kv, nq * g, d)
        # shared prefix: all queries of a group and KV head against its prefix in one kernel call,
        # the G groups side by side (as the kernel's batch), each padded to C members
        n_groups = sh.num_groups
        width = b if sh.group_members is None else sh.group_members.shape[0] // n_groups
        kp = self._ws.gather(2, k_pool, sh.prefix_slots).view(n_groups, -1, n_kv, d)  # [G, Lp, kv, d]
        vp = self._ws.gather(3, v_pool, sh.prefix_slots).view(n_groups, -1, n_kv, d)
        q_slots = qg if sh.group_members is None else qg[sh.group_members]  # [G * C, kv, Q * g, d]
        q_flat = q_slots.view(n_groups, width, n_kv, nq * g, d).transpose(1, 2).reshape(n_groups, n_kv, width * nq * g, d)
        # the fused CPU flash kernel, which also returns the log-sum-exp: 4.5x faster here than
        # GEMM + softmax for 3,072 queries x 1,024 keys per KV head in float32 (13.7 vs 62 ms);
        # half precisions attend in float32 this way (a bfloat16 row-3 decode step: 271 -> 178 ms)
        work = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
        o_p, lse_p = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_flat.to(work), kp.transpose(1, 2).to(work), vp.transpose(1, 2).to(work), 0.0, False, scale=1.0
        )[:2]
        o_p, lse_p = o_p.to(q.dtype), lse_p[..., None].to(q.dtype)  # [G, kv, C * Q * g, d or 1]
        o_p = o_p.view(n_groups, n_kv, width, nq * g, d).transpose(1, 2).reshape(n_groups * width, n_kv, nq * g, d)
        lse_p = lse_p.view(n_groups, n_kv, width, nq * g, 1).transpose(1, 2).reshape(n_groups * width, n_kv, nq * g, 1)
        if sh.member_slot is not None:
            o_p, lse_p = o_p[sh.member_slot], lse_p[sh.member_slot]  # [B, kv, Q * g, d]
        # own suffixes, padded to the longest
        ks = self._ws.gather(0, k_pool, sh.suffix_slots).view(b, sh.max_suffix, n_kv, d)
        vs = self._ws.gather(1, v_pool, sh.suffix_slots).view(b, sh.max_suffix, n_kv, d)
        scores = torch.matmul(qg, ks.permute(0, 2, 3, 1))  # [B, kv, Q * g, S]
        if sh.suffix_bias is not None:
            scores = scores + sh.suffix_bias
        o_s, lse_s = _softmax_attend(scores, vs.transpose(1, 2))
        # merge the two partial softmaxes: the prefix's share of the total mass is
        # e^lse_p / (e^lse_p + e^lse_s) = sigmoid(lse_p - lse_s)
        share = torch.sigmoid(lse_p - lse_s)
        o = o_s + share * (o_p - o_s)  # [B, kv, Q * g, d]
        return o.view(b, n_kv, nq, g, d).transpose(1, 2).reshape(b * nq, n_q, d)


def _check_lengths(batch: ForwardBatch, block_size: int) -> None:
    qlens, ctxs, tables = batch.query_lens, batch.context_lens, batch.block_tables
    if not (len(qlens) == len(ctxs) == len(tables)) or not qlens:
        raise ValueError("query_lens, context_lens and block_tables must be non-empty and of equal length")
    if sum(qlens) != batch.token_ids.shape[0]:
        raise ValueError(f"sum(query_lens) = {sum(qlens)} but the batch has {batch.token_ids.shape[0]} tokens")
    for i, (ql, ctx) in enumerate(zip(qlens, ctxs)):
        if ql < 1 or ctx < ql or len(tables[i]) * block_size < ctx:
            raise ValueError(f"sequence {i}: bad lengths (query {ql}, context {ctx}, {len(tables[i])} blocks)")


def _attend_one(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One query per head over all keys: q [heads, d], k/v [L, kv_heads, d] -> [heads, d].
    (For a single decode query plain bmm beats the CPU flash kernel by ~1.5x.)"""
    n_q, d = q.shape
    n_kv = k.shape[1]
    qg = (q * (1.0 / math.sqrt(d))).view(n_kv, n_q // n_kv, d)
    p = torch.softmax(torch.bmm(qg, k.permute(1, 2, 0)), dim=-1)
    return torch.bmm(p, v.transpose(0, 1)).reshape(n_q, d)


def _attend_decodes(q: Tensor, k_pool: Tensor, v_pool: Tensor, slots: Tensor, mask: Tensor | None, ws: _Workspace) -> Tensor:
    """One query per sequence and head over its own keys: q [B, heads, d]; sequence i's keys are
    the pool rows slots[i * L : (i + 1) * L] (padded), mask [B, 1, 1, L] (True = may attend) or
    None -> [B, heads, d]. Per KV head: that head's K and V rows gathered into contiguous [B, L,
    d] buffers, then two batched GEMMs. Used for half precisions, where SDPA's CPU path is 2-3x
    slower: a bfloat16 32-sequence step over ~286 own tokens took 1.2 ms per layer this way,
    1.7 ms gathering every head at once (GEMMs over strided slices copy them), bitwise equal."""
    b, n_q, d = q.shape
    n_kv = k_pool.shape[1]
    g = n_q // n_kv
    length = slots.numel() // b
    qg = (q * (1.0 / math.sqrt(d))).view(b, n_kv, g, d)
    out = torch.empty_like(qg)
    for h in range(n_kv):
        k = ws.gather(4 + 2 * h, k_pool[:, h], slots).view(b, length, d)
        v = ws.gather(5 + 2 * h, v_pool[:, h], slots).view(b, length, d)
        scores = torch.bmm(qg[:, h], k.transpose(1, 2))  # [B, g, L]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, 0], float("-inf"))
        torch.bmm(torch.softmax(scores, dim=-1), v, out=out[:, h])
    return out.view(b, n_q, d)


def _softmax_attend(scores: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(scores) @ v and the rows' log-sum-exp. scores [..., q, L], v [..., L, d]."""
    m = scores.amax(dim=-1, keepdim=True)
    p = torch.exp(scores - m)
    denom = p.sum(dim=-1, keepdim=True)
    return torch.matmul(p, v) / denom, m + torch.log(denom)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if x.dtype in (torch.float16, torch.bfloat16):  # reduce in float32 for half precisions
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    # torch's fused kernel: x * rsqrt(mean(x^2) + eps) * weight in one pass, one output tensor
    # (the three-op form allocated three; fresh large tensors page-fault on CPU)
    return F.rms_norm(x, weight.shape, weight, eps)


def _add_rms_norm(x: Tensor, y: Tensor | None, weight: Tensor, eps: float, fused: Any = None) -> tuple[Tensor, Tensor]:
    """The residual stream after adding a layer's output `y` (None: nothing to add), and its
    RMS norm. `x` is the caller's own residual tensor and is updated in place; with vLLM's ops
    (`fused`), so is `y`, a fresh tensor of the caller's, which becomes the norm."""
    if y is not None and fused is not None:
        fused.fused_add_rms_norm(y, x, weight, eps)  # x += y; y = rms_norm(x) * weight
        return x, y
    if y is not None:
        x = x.add_(y)
    return x, _rms_norm(x, weight, eps)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE. x [T, h, d]; cos, sin [T, 1, d/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _silu_mul(gate_up: Tensor, out: Tensor | None = None) -> Tensor:
    """SwiGLU's activation: silu(gate) * up, for gate and up stacked [T, 2 * intermediate];
    written into `out` [T, intermediate] when given. (Multiplying in place into silu's output
    saves a fresh large tensor: 2.2x faster at 2,048 rows in float32, the same result bit for
    bit.)"""
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu(gate) if out is None else torch.ops.aten.silu.out(gate, out=out)
    return act.mul_(up)



def _slots(table: Sequence[int], block_size: int, length: int, device: torch.device, pad: bool = False) -> Tensor:
    """The KV slots of the first `length` tokens of a block table; with `pad`, a table that
    covers fewer tokens is padded with slot 0 (the caller masks those keys out)."""
    blocks = torch.tensor(table, dtype=torch.int64)
    slots = (blocks[:, None] * block_size + torch.arange(block_size)).view(-1)[:length]
    if pad and slots.numel() < length:
        slots = torch.cat([slots, torch.zeros(length - slots.numel(), dtype=torch.int64)])
    return slots.to(device)


def _slot_range(table: Sequence[int], block_size: int, length: int) -> slice | None:
    """The slots of the first `length` tokens as a slice when their blocks are consecutive."""
    n = -(-length // block_size)
    first = table[0]
    if any(table[j] != first + j for j in range(1, n)):
        return None
    return slice(first * block_size, first * block_size + length)


def _rows(rows: list[int], device: torch.device) -> Tensor:
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _put(out: Tensor, rows: Tensor | None, values: Tensor) -> None:
    if rows is None:
        out.copy_(values)
    else:
        out.index_copy_(0, rows, values)
