"""Load a llama-architecture GGUF file: config, dequantized weights, tokenizer, chat template.

The file is memory-mapped and parsed ONCE by a small reader of the GGUF container (v2/v3,
little-endian). `gguf.GGUFReader` is not used: it decodes every element of every metadata array
into its own numpy view when it opens a file (about 2-3 s for a 49k-token vocabulary), whereas
this reader only records where an array lies and decodes it when asked, so a load whose
tokenizer comes from the on-disk cache never touches the vocabulary. Tensor data is dequantized
with the `gguf` package (`gguf.quants.dequantize`).

Weights come back under `transformers` LlamaForCausalLM names, with the row permutation that
llama.cpp applies to attn_q / attn_k undone, so RoPE uses the rotate-half convention.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from parrot_core.engines.builtin.model import LlamaConfig
from parrot_core.engines.builtin.tokenizer import Tokenizer, load_gguf_tokenizer
from parrot_core.errors import ModelLoadError

_GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format (scalars) ; 8 = string, 9 = array
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_TYPES = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
    6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}  # fmt: skip
_FLOAT32, _STRING, _ARRAY = 6, 8, 9


class LazyArray:
    """A metadata array not decoded yet: `decode()` returns a list of str or a numpy array."""

    def __init__(self, buf: mmap.mmap, offset: int, item_type: int, count: int) -> None:
        self._buf, self._offset, self.item_type, self.count = buf, offset, item_type, count

    def __len__(self) -> int:
        return self.count

    def decode(self) -> list[Any] | np.ndarray:
        if self.item_type in _NUMPY_TYPES:
            return np.frombuffer(self._buf, dtype=_NUMPY_TYPES[self.item_type], count=self.count, offset=self._offset)
        values: list[Any] = []
        offset = self._offset
        for _ in range(self.count):
            value, offset = _read_value(self._buf, offset, self.item_type)
            values.append(value.decode() if isinstance(value, LazyArray) else value)
        return values


def _read_string(buf: mmap.mmap, offset: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, offset)
    start = offset + 8
    return buf[start : start + n].decode("utf-8", errors="replace"), start + n


def _read_value(buf: mmap.mmap, offset: int, value_type: int) -> tuple[Any, int]:
    """One metadata value at `offset`; returns it and the offset just past it."""
    fmt = _SCALAR_FORMATS.get(value_type)
    if fmt is not None:
        value = struct.unpack_from(fmt, buf, offset)[0]
        if value_type == _FLOAT32:  # the shortest decimal that rounds to it: 1e-05, not 9.9999997e-06
            value = float(str(np.float32(value)))
        return value, offset + struct.calcsize(fmt)
    if value_type == _STRING:
        return _read_string(buf, offset)
    if value_type == _ARRAY:
        item_type, count = struct.unpack_from("<IQ", buf, offset)
        start = offset + 12
        return LazyArray(buf, start, item_type, count), _skip_array(buf, start, item_type, count)
    raise ModelLoadError(f"unknown GGUF metadata type {value_type}")


def _skip_array(buf: mmap.mmap, offset: int, item_type: int, count: int) -> int:
    fmt = _SCALAR_FORMATS.get(item_type)
    if fmt is not None:
        return offset + struct.calcsize(fmt) * count
    if item_type == _STRING:
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):  # only the lengths are read: ~30 ms for 100k strings
            offset += 8 + unpack(buf, offset)[0]
        return offset
    for _ in range(count):
        _, offset = _read_value(buf, offset, item_type)
    return offset


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (the reverse of GGUF's ne order)
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A parsed GGUF file: `metadata` (arrays as `LazyArray`) and `tensors` by name."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot open model file {path!r}: {e}") from e
        try:
            self._parse()
        except (struct.error, ValueError, KeyError) as e:
            raise ModelLoadError(f"{path!r} is not a readable GGUF file: {e}") from e

    def _parse(self) -> None:
        buf = self._buf
        if buf[:4] != _GGUF_MAGIC:
            raise ModelLoadError(f"{self.path!r} is not a GGUF file (bad magic)")
        (version,) = struct.unpack_from("<I", buf, 4)
        if version not in (2, 3):
            hint = " (big-endian files are not supported)" if version & 0xFFFF == 0 else ""
            raise ModelLoadError(f"unsupported GGUF version {version}{hint}")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        offset = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, offset = _read_string(buf, offset)
            (value_type,) = struct.unpack_from("<I", buf, offset)
            self.metadata[key], offset = _read_value(buf, offset + 4, value_type)
        raw: list[tuple[str, list[int], int, int]] = []
        for _ in range(n_tensors):
            name, offset = _read_string(buf, offset)
            (n_dims,) = struct.unpack_from("<I", buf, offset)
            dims = list(struct.unpack_from(f"<{n_dims}Q", buf, offset + 4))
            offset += 4 + 8 * n_dims
            qtype, rel = struct.unpack_from("<IQ", buf, offset)
            offset += 12
            raw.append((name, dims, qtype, rel))
        alignment = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = (offset + alignment - 1) // alignment * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, qtype, rel in raw:
            try:
                qt = GGMLQuantizationType(qtype)
                block, type_size = GGML_QUANT_SIZES[qt]
            except (ValueError, KeyError) as e:
                raise ModelLoadError(f"tensor {name!r} has an unknown GGML type {qtype}") from e
            nbytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
            info = GGUFTensorInfo(name, tuple(reversed(dims)), qt, data_start + rel, nbytes)
            if info.offset + nbytes > len(buf):
                raise ModelLoadError(f"{self.path!r} is truncated (tensor {name!r} runs past the end)")
            self.tensors[name] = info

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def read_tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to a fresh float32 array of shape `shape` (numpy order)."""
        info = self.tensors[name]
        block, type_size = GGML_QUANT_SIZES[info.qtype]
        byte_shape = (*info.shape[:-1], info.shape[-1] // block * type_size)
        data = np.frombuffer(self._buf, dtype=np.uint8, count=info.nbytes, offset=info.offset).reshape(byte_shape)
        out = _dequantize_torch(data, info.qtype)
        if out is None:
            try:
                out = dequantize(data, info.qtype)
            except NotImplementedError as e:
                raise ModelLoadError(f"tensor {name!r}: GGML type {info.qtype.name} cannot be dequantized") from e
        out = out.reshape(info.shape)
        # F32 comes back as a read-only view of the mapping; own the memory
        return out if out.flags.owndata and out.flags.writeable else np.array(out, dtype=np.float32)


def _dequantize_torch(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray | None:
    """Q8_0 and Q4_1 dequantized with torch (multi-threaded; ~4x faster than `gguf.quants` and
    bit-identical to it); None for other types. Block layouts (32 weights per block):
    Q8_0 = f16 scale d, 32 x int8 q -> d*q; Q4_1 = f16 d, f16 min m, 16 bytes whose low nibbles
    are weights 0-15 and high nibbles weights 16-31 -> d*q + m."""
    if qtype not in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1):
        return None
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = torch.from_numpy(np.array(raw).reshape(-1, type_size))  # copy: the mapping is read-only

    def f16(col: int) -> torch.Tensor:
        return blocks[:, col : col + 2].contiguous().view(torch.float16).float()

    if qtype == GGMLQuantizationType.Q8_0:
        out = f16(0) * blocks[:, 2:].contiguous().view(torch.int8).float()
    else:
        qs = blocks[:, 4:]
        out = f16(0) * torch.cat([qs & 0x0F, qs >> 4], dim=1).float() + f16(2)
    return out.numpy()


@dataclass
class LoadedModel:
    """What `load_gguf` returns. `weights` are HF-named tensors in the requested dtype/device;
    hand them to `LlamaModel` and drop this reference (the model keeps fused copies)."""

    path: str
    model_name: str
    config: LlamaConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int | None


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rope pairs -> rotate-half halves)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _config_from_metadata(f: GGUFFile) -> LlamaConfig:
    arch = f.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{f.path!r}: architecture {arch!r} is not supported (only 'llama')")

    def need(key: str) -> Any:
        if f"llama.{key}" not in f.metadata:
            raise ModelLoadError(f"{f.path!r}: metadata key 'llama.{key}' is missing")
        return f.metadata[f"llama.{key}"]

    if "token_embd.weight" not in f.tensors:
        raise ModelLoadError(f"{f.path!r}: tensor 'token_embd.weight' is missing")
    hidden = int(need("embedding_length"))
    num_heads = int(need("attention.head_count"))
    head_dim = int(f.get("llama.attention.key_length", hidden // num_heads))
    rope_dim = int(f.get("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ModelLoadError(f"{f.path!r}: partial rotary embeddings (rope dim {rope_dim} != head dim {head_dim})")
    scaling = f.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "") and float(f.get("llama.rope.scaling.factor", 1.0)) != 1.0:
        raise ModelLoadError(f"{f.path!r}: rope scaling {scaling!r} is not supported")
    freq_factors = None
    if "rope_freqs.weight" in f.tensors:
        freq_factors = tuple(float(x) for x in f.read_tensor("rope_freqs.weight").reshape(-1))
    bos, eos = f.get("tokenizer.ggml.bos_token_id"), f.get("tokenizer.ggml.eos_token_id")
    return LlamaConfig(
        vocab_size=int(f.tensors["token_embd.weight"].shape[0]),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(f.get("llama.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rope_theta=float(f.get("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(f.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(f.get("llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in f.tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=None if eos is None else int(eos),
        rope_freq_factors=freq_factors,
    )


def _read_weights(f: GGUFFile, cfg: LlamaConfig, dtype: torch.dtype, device: str | torch.device) -> dict[str, torch.Tensor]:
    def tensor(gguf_name: str, n_head: int = 0) -> torch.Tensor:
        if gguf_name not in f.tensors:
            raise ModelLoadError(f"{f.path!r}: tensor {gguf_name!r} is missing")
        arr = f.read_tensor(gguf_name)
        if n_head:
            arr = _unpermute_rows(arr, n_head)
        return torch.from_numpy(arr).to(device=device, dtype=dtype)

    weights = {"model.embed_tokens.weight": tensor("token_embd.weight"), "model.norm.weight": tensor("output_norm.weight")}
    if not cfg.tie_word_embeddings:
        weights["lm_head.weight"] = tensor("output.weight")
    heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
    for i in range(cfg.num_layers):
        for gguf_name, hf_name in _LAYER_NAMES.items():
            weights[f"model.layers.{i}.{hf_name}.weight"] = tensor(f"blk.{i}.{gguf_name}.weight", heads.get(gguf_name, 0))
    return weights


def gguf_model_name(path: str) -> str:
    """The name a GGUF file is served under: a repo-style id, never the free-text
    `general.name` (which may hold spaces): `DEFAULT_MODEL_NAME` for the default model's file,
    otherwise the file's stem."""
    from parrot_core.engines.builtin.default_model import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME

    base = os.path.basename(path)
    return DEFAULT_MODEL_NAME if base == DEFAULT_MODEL_FILE else os.path.splitext(base)[0]


def load_gguf(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load a llama-architecture GGUF file. Raises `ModelLoadError` for a missing or unreadable
    file, another architecture, or a tokenizer type that cannot be rebuilt."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file not found: {path!r}")
    f = GGUFFile(path)
    config = _config_from_metadata(f)
    tokenizer = load_gguf_tokenizer(f.metadata, path, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
    weights = _read_weights(f, config, dtype, device)
    return LoadedModel(
        path=path,
        model_name=gguf_model_name(path),
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )
