"""`parrot-core serve --engine SPEC`: which engines a server runs, as text.

SPEC is a comma-separated list of engine specs, or the path of a JSON file holding a list of
engine objects:
- `builtin` (the engine over `--model`, the default model if none, with the server's engine
  flags), or `builtin:PATH.gguf`;
  JSON: {"kind": "builtin", "model": "PATH.gguf", ...EngineConfig fields}
- `vllm:MODEL_DIR` (a Hugging Face directory, e.g. from `parrot-core export-hf`; the server's
  --dtype, --block-size, --max-num-seqs, --max-num-batched-tokens, --max-model-len and
  --enable-prefix-caching pass through);
  JSON: {"kind": "vllm", "model_dir": "DIR", ...vLLM engine arguments, e.g.
  "tensor_parallel_size": 2, "distributed_executor_backend": "ray"}
- `openai:MODEL@BASE_URL` (any OpenAI-compatible server, e.g.
  `openai:smollm2@http://10.0.0.5:8000/v1`; the key from OPENAI_API_KEY if set);
  JSON: {"kind": "openai", "base_url": "URL", "model": "NAME", "api_key": "...", "tokenizer": "DIR or GGUF"}
Every spec is parsed and checked (`InvalidRequestError` naming it) before any engine loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from parrot_core.errors import InvalidRequestError

if TYPE_CHECKING:
    from parrot_core.server.settings import ServeSettings

KINDS = ("builtin", "vllm", "openai")


@dataclass(frozen=True)
class EngineSpec:
    kind: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_engine_specs(text: str) -> list[EngineSpec]:
    """The engine specs of a `--engine` value (a list, or a JSON file's path)."""
    text = text.strip()
    if text.endswith(".json") or os.path.isfile(text):
        return _from_json_file(text)
    specs = [_from_text(part.strip()) for part in text.split(",")]
    if not specs:
        raise InvalidRequestError("--engine names no engine")
    return specs


def _from_text(part: str) -> EngineSpec:
    kind, _, rest = part.partition(":")
    if kind not in KINDS:
        raise InvalidRequestError(f"--engine: unknown engine {part!r}; use builtin[:GGUF], vllm:MODEL_DIR or openai:MODEL@BASE_URL")
    if kind == "builtin":
        return EngineSpec("builtin", {"model": rest} if rest else {})
    if kind == "vllm":
        if not rest:
            raise InvalidRequestError("--engine vllm needs a model directory: vllm:MODEL_DIR")
        return EngineSpec("vllm", {"model_dir": rest})
    model, at, url = rest.partition("@")
    if not (model and at and url):
        raise InvalidRequestError(f"--engine {part!r}: an OpenAI engine is openai:MODEL@BASE_URL")
    return EngineSpec("openai", {"model": model, "base_url": url})


def _from_json_file(path: str) -> list[EngineSpec]:
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError) as e:
        raise InvalidRequestError(f"--engine {path!r}: cannot read a JSON list of engines: {e}") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise InvalidRequestError(f"--engine {path!r}: the file must hold a non-empty JSON list of objects")
    specs = []
    for entry in entries:
        options = dict(entry)
        kind = options.pop("kind", None)
        if kind not in KINDS:
            raise InvalidRequestError(f"--engine {path!r}: each engine needs a kind in {KINDS}, got {kind!r}")
        required = {"vllm": ("model_dir",), "openai": ("model", "base_url")}.get(kind, ())
        missing = [r for r in required if r not in options]
        if missing:
            raise InvalidRequestError(f"--engine {path!r}: a {kind} engine needs {', '.join(missing)}")
        specs.append(EngineSpec(kind, options))
    return specs


def build_engines(specs: list[EngineSpec], settings: ServeSettings) -> list[Any]:
    """The engines, built in order; if one fails to build, those built before are closed."""
    built: list[Any] = []
    try:
        for spec in specs:
            built.append(_BUILDERS[spec.kind](spec.options, settings))
    except BaseException:
        for engine in built:
            engine.close()
        raise
    return built


def _builtin(options: dict[str, Any], settings: ServeSettings) -> Any:
    import dataclasses

    from parrot_core.engines.builtin.config import dtype_from_name
    from parrot_core.engines.builtin.engine import BuiltinEngine

    options = dict(options)
    if isinstance(options.get("dtype"), str):
        options["dtype"] = dtype_from_name(options["dtype"])
    try:
        config = dataclasses.replace(settings.engine_config(), **options)
    except TypeError as e:
        raise InvalidRequestError(f"--engine builtin: {e}") from None
    return BuiltinEngine(config.model, config=config)


def _vllm(options: dict[str, Any], settings: ServeSettings) -> Any:
    from parrot_core.engines.vllm import VLLMEngine

    args: dict[str, Any] = {
        "dtype": "float32" if settings.dtype == "auto" else settings.dtype,
        "block_size": settings.block_size,
        "max_num_seqs": settings.max_num_seqs,
        "max_num_batched_tokens": settings.max_num_batched_tokens,
        "enable_prefix_caching": settings.enable_prefix_caching,
    }
    if settings.max_model_len is not None:
        args["max_model_len"] = settings.max_model_len
    args.update(options)
    return VLLMEngine(args.pop("model_dir"), **args)


def _openai(options: dict[str, Any], settings: ServeSettings) -> Any:
    from parrot_core.engines.openai import OpenAIEngine

    options = dict(options)
    options.setdefault("api_key", os.environ.get("OPENAI_API_KEY"))
    return OpenAIEngine(options.pop("base_url"), options.pop("model"), **options)


_BUILDERS: dict[str, Callable[[dict[str, Any], ServeSettings], Any]] = {"builtin": _builtin, "vllm": _vllm, "openai": _openai}
