"""transformers as a test oracle: its LlamaConfig for one of our configs."""

from __future__ import annotations

from typing import Any

import transformers

from parrot_core.engines.builtin.model import LlamaConfig


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
