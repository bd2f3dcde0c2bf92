"""transformers as a test oracle: its LlamaConfig for one of our configs, and its
LlamaForCausalLM holding one of our models' weights."""

from __future__ import annotations

from typing import Any

import torch
import transformers

from parrot_core.engines.builtin.model import LlamaConfig, LlamaModel


def hf_llama_config(c: LlamaConfig, **extra: Any) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
        **extra,
    )


def hf_llama_from(model: LlamaModel) -> transformers.LlamaForCausalLM:
    """transformers' LlamaForCausalLM on exactly `model`'s weights (shared, not copied)."""
    hf_config = hf_llama_config(model.config)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_config)
    hf.load_state_dict(model.state_dict_hf(), strict=True, assign=True)
    hf.tie_weights()
    hf.model.rotary_emb.inv_freq = hf.model.rotary_emb.compute_default_rope_parameters(hf_config)[0]
    return hf.eval()
