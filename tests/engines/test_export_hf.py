"""`export_hf` / `parrot-core export-hf`: a GGUF model written as a Hugging Face directory that
`transformers` loads to the same logits, token ids and chat prompts as the builtin engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from parrot_core.engines.builtin.default_model import default_model_path
from parrot_core.engines.builtin.export_hf import export_hf
from parrot_core.engines.builtin.gguf_loader import load_gguf
from parrot_core.engines.builtin.model import ForwardBatch, KVCache, LlamaModel
from parrot_core.engines.builtin.tokenizer import load_hf_tokenizer
from parrot_core.errors import ModelLoadError

from .test_gguf_real import _TOKENS, write_llama_gguf


def _all_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    bs = 16
    n_blocks = -(-len(ids) // bs)
    kv = KVCache.allocate(model.config, n_blocks, bs, dtype=model.dtype)
    batch = ForwardBatch.build([ids], [len(ids)], [list(range(n_blocks))], bs)
    return model.compute_logits(model.forward(batch, kv, torch.arange(len(ids))))


def _assert_same_model(gguf_path: str, out_dir: str, text: str, atol: float) -> None:
    loaded = load_gguf(gguf_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    ids = loaded.tokenizer.encode(text)
    assert hf_tok(text, add_special_tokens=False).input_ids == ids
    messages = [{"role": "user", "content": text}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        loaded.tokenizer.apply_chat_template(messages)
    )
    ours = _all_logits(LlamaModel(loaded.config, loaded.weights), ids)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0]
    assert (ours - theirs).abs().max().item() <= atol


def test_tiny_export_loads_in_transformers_with_identical_logits(tiny_gguf, tmp_path):
    src = tiny_gguf
    out = export_hf(src, tmp_path / "hf")
    assert sorted(os.listdir(out)) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["torch_dtype"]) == (2, 2, "float32")
    _assert_same_model(src, out, "ab ab a!b", atol=1e-5)


def test_the_exported_tokenizer_loads_back_as_the_same_tokenizer(tiny_gguf, tmp_path):
    src = tiny_gguf
    original = load_gguf(src).tokenizer
    back = load_hf_tokenizer(export_hf(src, tmp_path / "hf"))
    text = "ab ab a!b"
    assert back.encode(text) == original.encode(text) and back.encode_prompt(text) == original.encode_prompt(text)
    assert (back.bos_token_id, back.eos_token_id, back.add_bos_token) == (
        original.bos_token_id, original.eos_token_id, original.add_bos_token,
    )  # fmt: skip
    messages = [{"role": "user", "content": text}]
    assert back.apply_chat_template(messages) == original.apply_chat_template(messages)
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        load_hf_tokenizer(str(tmp_path))


def test_existing_directory_is_kept_unless_overwrite(tiny_gguf, tmp_path):
    src = tiny_gguf
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export_hf(src, out)
    assert os.listdir(out) == ["keep.txt"]
    export_hf(src, out, dtype=torch.bfloat16, overwrite=True)
    assert "keep.txt" not in os.listdir(out)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert [p for p in os.listdir(tmp_path) if p.startswith(".export-")] == []  # no temporary left


def test_rope_frequency_factors_are_refused_and_nothing_is_written(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("PARROT_CORE_CACHE_DIR", str(tmp_path / "cache"))
    src = str(tmp_path / "tiny.gguf")
    model = tiny_llama(vocab_size=len(_TOKENS), dtype=torch.float32, rope_freq_factors=(1.0,) * 8)
    write_llama_gguf(src, model, rope_freqs=model.config.rope_freq_factors)
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        export_hf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".export-")] == []


@pytest.mark.real_model
def test_cli_exports_the_default_model_exactly(tmp_path):
    out = tmp_path / "smollm2"
    cmd = [sys.executable, "-m", "parrot_core.cli", "export-hf", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr  # an existing export is kept
    _assert_same_model(default_model_path(), str(out), "The capital of France is Paris. Naïve café 123", atol=5e-4)
    # and transformers' greedy generation from the export is the builtin engine's, id for id
    import parrot_core as P

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with P.Runtime() as rt:
        for prompt in ("The capital of France is", "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n"):
            ids = rt.tokenize_prompt(prompt)
            out = rt.generate(ids, max_tokens=12, temperature=0.0)
            ours = out.token_ids + ([out.stop_token_id] if out.stop_token_id is not None else [])  # HF keeps the EOS
            with torch.no_grad():
                theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :]
            assert ours == theirs.tolist(), prompt
