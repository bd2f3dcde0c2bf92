"""Write a llama GGUF model as a Hugging Face model directory (safetensors weights, config,
tokenizer), so that engines that cannot read GGUF (vLLM 0.32, `transformers`) load the very same
weights and tokenizer that the builtin engine uses.

Contract of `export_hf(gguf_path, out_dir)`:
- `out_dir/model.safetensors` holds the dequantized weights under `transformers`
  LlamaForCausalLM names, in the requested dtype (q/k rows in rotate-half order, as
  `load_gguf` gives them); `config.json`, `generation_config.json`, `tokenizer.json` and
  `tokenizer_config.json` (with the chat template) describe the rest.
- A model that `LlamaForCausalLM` cannot express exactly (per-frequency RoPE factors) is a
  `ModelLoadError`, and nothing is written.
- The directory is written through a temporary sibling and renamed into place, so a reader
  never sees a half-written export; an existing `out_dir` is replaced only with `overwrite`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from parrot_core.engines.builtin.gguf_loader import LoadedModel, load_gguf
from parrot_core.errors import ModelLoadError

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def export_hf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> str:
    """Export `gguf_path` to `out_dir` (see the module docstring). Returns `out_dir`."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES.values())}, got {dtype}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir!r} exists (pass overwrite=True to replace it)")
    loaded = load_gguf(gguf_path, dtype=dtype)
    if loaded.config.rope_freq_factors is not None:
        raise ModelLoadError(f"{loaded.path!r}: per-frequency RoPE factors (rope_freqs) cannot be exported")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is an ordinary directory
    try:
        _write(loaded, tmp, dtype)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write(loaded: LoadedModel, out_dir: str, dtype: torch.dtype) -> None:
    c = loaded.config
    weights = {k: v.contiguous() for k, v in loaded.weights.items() if not (c.tie_word_embeddings and k == "lm_head.weight")}
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "torch_dtype": _DTYPE_NAMES[dtype],
    }
    _write_json(os.path.join(out_dir, "config.json"), config)
    _write_json(
        os.path.join(out_dir, "generation_config.json"),
        {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id},
    )
    tok = loaded.tokenizer
    tok.backend.save(os.path.join(out_dir, "tokenizer.json"))

    def token(token_id: int | None) -> str | None:
        return None if token_id is None else tok.id_to_token(token_id)

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(tok.bos_token_id),
        "eos_token": token(tok.eos_token_id),
        "add_bos_token": tok.add_bos_token,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": c.max_position_embeddings,
    }
    if tok.chat_template:
        tokenizer_config["chat_template"] = tok.chat_template
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config)


def _write_json(path: str, value: object) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
