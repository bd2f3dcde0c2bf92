"""Shared fixtures: the real default model (loaded once per session) and tiny random Llamas."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from parrot_core.engines.builtin.model import LlamaConfig, LlamaModel
from parrot_core.errors import ModelLoadError

TINY_CONFIG = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
)


@pytest.fixture(scope="session")
def real_model():
    """The default model as returned by `load_gguf` (float32, CPU). `make install` always
    installs it, so a missing model is a failure, never a skip."""
    from parrot_core.engines.builtin.default_model import default_model_path
    from parrot_core.engines.builtin.gguf_loader import load_gguf

    try:
        path = default_model_path()
    except ModelLoadError as e:
        pytest.fail(f"the default model is not installed ({e}); run `make install`")
    return load_gguf(path)


@pytest.fixture(scope="session")
def real_llama(real_model) -> LlamaModel:
    """A `LlamaModel` built once from `real_model`."""
    return LlamaModel(real_model.config, real_model.weights)


@pytest.fixture
def tiny_llama() -> Callable[..., LlamaModel]:
    """Factory: `tiny_llama(seed=0, dtype=torch.float64, **config_overrides)` -> a seeded random
    2-layer GQA Llama (hidden 64, 4 heads, 2 KV heads, vocab 101)."""

    def make(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides: Any) -> LlamaModel:
        return LlamaModel.random(LlamaConfig(**{**TINY_CONFIG, **overrides}), seed=seed, dtype=dtype)

    return make


@pytest.fixture(scope="session")
def tiny_text_llama(real_model) -> LlamaModel:
    """A tiny random Llama over the real vocabulary: with the real tokenizer, programs and the
    server work on real text and generate fast."""
    config = LlamaConfig(**{**TINY_CONFIG, "vocab_size": real_model.config.vocab_size, "max_position_embeddings": 1024})
    return LlamaModel.random(config, seed=0, dtype=torch.float32)


@pytest.fixture
def tiny_gguf(tiny_llama, tmp_path, monkeypatch) -> str:
    """A tiny float32 llama written as a GGUF file (tmp_path/tiny.gguf, with its small test
    vocabulary), its tokenizer cache kept in tmp_path."""
    from tests.engines.test_gguf_real import _TOKENS, write_llama_gguf

    monkeypatch.setenv("PARROT_CORE_CACHE_DIR", str(tmp_path / "cache"))
    path = str(tmp_path / "tiny.gguf")
    write_llama_gguf(path, tiny_llama(vocab_size=len(_TOKENS), dtype=torch.float32))
    return path
