"""`ServeSettings`: the one object behind `parrot-core serve`'s flags, the `PARROT_CORE_*`
environment variables and the Python API (`serve(ServeSettings(...))`).

Precedence: a CLI flag beats an environment variable, which beats the default. Flag names
follow vLLM's (`--max-num-seqs`, `--enable-prefix-caching/--no-enable-prefix-caching`, ...);
each flag is generated from a field, so adding a field adds its flag and its variable.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import typer

from parrot_core.errors import InvalidRequestError
from parrot_core.serve.scheduler import check_balance_thresholds

ENV_PREFIX = "PARROT_CORE_"
DEFAULT_MAX_REQUEST_BODY_BYTES = 8 * 1024 * 1024


def _doc(text: str, *, argument: bool = False) -> dict[str, Any]:
    return {"help": text, "argument": argument}


@dataclass(frozen=True)
class ServeSettings:
    """Settings of one server. Engine fields mean what `EngineConfig`'s fields mean."""

    model: str | None = field(default=None, metadata=_doc("A llama GGUF file; default: the bundled SmolLM2-135M-Instruct.", argument=True))
    engine: str = field(
        default="builtin",
        metadata=_doc(
            "The engines, comma-separated: builtin[:GGUF], vllm:MODEL_DIR, openai:MODEL@BASE_URL (e.g."
            " builtin,builtin for two builtin engines), or a JSON file listing them (see engine_specs.py)."
        ),
    )
    host: str = field(default="127.0.0.1", metadata=_doc("Address to bind."))
    port: int = field(default=8000, metadata=_doc("Port to bind (0 picks a free one)."))
    threads: int | None = field(
        default=None,
        metadata=_doc("CPU threads for the engines' tensor ops (torch.set_num_threads); default: torch's, one per core."),
    )
    balance_abs_threshold: int = field(
        default=64,
        metadata=_doc("With several engines: requests go by load, not prefix affinity, once engines' task counts differ by more than this..."),
    )
    balance_rel_threshold: float = field(
        default=1.5, metadata=_doc("... and the busiest has more than this many times the least busy's (SGLang's gateway's defaults).")
    )
    block_size: int = field(default=16, metadata=_doc("Tokens per KV block."))
    num_kv_blocks: int | None = field(default=None, metadata=_doc("KV blocks in the pool; default: sized from --kv-cache-memory-gb."))
    kv_cache_memory_gb: float = field(default=1.0, metadata=_doc("KV pool size in GiB when --num-kv-blocks is not given."))
    max_num_seqs: int = field(default=64, metadata=_doc("Most sequences running at once."))
    max_model_len: int | None = field(default=None, metadata=_doc("Longest prompt + completion; default: the model's own limit."))
    max_num_batched_tokens: int = field(default=2048, metadata=_doc("Most tokens computed in one engine step."))
    enable_prefix_caching: bool = field(default=True, metadata=_doc("Reuse the KV of prompt prefixes seen before."))
    dtype: str = field(
        default="auto", metadata=_doc("Weights and KV: auto (float32), float32/float, bfloat16, float16/half (vLLM's names).")
    )
    served_model_name: str | None = field(default=None, metadata=_doc("The `model` name clients use; default: the model's name."))
    api_key: str | None = field(default=None, metadata=_doc("If set, every /v1 call needs `Authorization: Bearer <key>`."))
    max_waiting_requests: int = field(
        default=256, metadata=_doc("Sequences that may wait beyond the engine's --max-num-seqs; more get HTTP 429.")
    )
    log_stats_interval: float = field(default=10.0, metadata=_doc("Seconds between stats log lines and idle self-checks; 0 disables."))
    session_timeout: float = field(
        default=600.0,
        metadata=_doc(
            "Seconds after which an idle session is removed: a program session (no call, no pending get), a chat session,"
            " a prompt_cache_key conversation."
        ),
    )
    max_prompt_cache_keys: int = field(
        default=64,
        metadata=_doc("Most prompt_cache_key conversations kept pinned at once (least recently used dropped first); 0 ignores the key."),
    )
    max_chat_sessions: int = field(
        default=1024,
        metadata=_doc(
            "Most chat sessions (POST /v1/chat/sessions) open at once; one more gets HTTP 429 until one is deleted or"
            " expires (--session-timeout); 0 refuses them all."
        ),
    )
    chat_save_dir: str | None = field(
        default=None, metadata=_doc("Directory where chat sessions are saved and restored from; default: saving is disabled.")
    )
    max_request_body_bytes: int = field(
        default=DEFAULT_MAX_REQUEST_BODY_BYTES, metadata=_doc("Largest request body in bytes (default 8 MiB); a bigger one gets HTTP 413.")
    )
    max_suspended_generations: int = field(
        default=1024, metadata=_doc("Most suspended generations kept (time_limit / token_quantum); the least recently suspended go first.")
    )
    suspended_generation_ttl: float = field(
        default=600.0, metadata=_doc("Seconds a suspended generation is kept without being resumed before it is freed.")
    )
    shutdown_grace_seconds: float = field(
        default=30.0,
        metadata=_doc("On SIGTERM/SIGINT: seconds requests in flight get to finish (new ones get 503) before the rest are aborted."),
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidRequestError(f"port must be in [0, 65535], got {self.port}")
        check_balance_thresholds(self.balance_abs_threshold, self.balance_rel_threshold)
        if self.threads is not None and self.threads < 1:
            raise InvalidRequestError(f"threads must be >= 1, got {self.threads}")
        if self.max_waiting_requests < 0:
            raise InvalidRequestError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        if self.session_timeout <= 0:
            raise InvalidRequestError(f"session_timeout must be > 0, got {self.session_timeout}")
        if self.max_prompt_cache_keys < 0:
            raise InvalidRequestError(f"max_prompt_cache_keys must be >= 0, got {self.max_prompt_cache_keys}")
        if self.max_chat_sessions < 0:
            raise InvalidRequestError(f"max_chat_sessions must be >= 0, got {self.max_chat_sessions}")
        if self.chat_save_dir is not None and not os.path.isdir(self.chat_save_dir):
            raise InvalidRequestError(f"chat_save_dir {self.chat_save_dir!r} is not an existing directory")
        if self.log_stats_interval < 0:
            raise InvalidRequestError(f"log_stats_interval must be >= 0, got {self.log_stats_interval}")
        if self.max_request_body_bytes < 1:
            raise InvalidRequestError(f"max_request_body_bytes must be >= 1, got {self.max_request_body_bytes}")
        if self.max_suspended_generations < 1:
            raise InvalidRequestError(f"max_suspended_generations must be >= 1, got {self.max_suspended_generations}")
        if not self.suspended_generation_ttl > 0:
            raise InvalidRequestError(f"suspended_generation_ttl must be > 0, got {self.suspended_generation_ttl}")
        if self.shutdown_grace_seconds < 0:
            raise InvalidRequestError(f"shutdown_grace_seconds must be >= 0, got {self.shutdown_grace_seconds}")
        self.engine_config()  # validates the engine fields now, not when the model is loaded
        self.engine_specs()

    def engine_config(self) -> Any:
        """The `EngineConfig` these settings describe."""
        from parrot_core.engines.builtin.config import EngineConfig, dtype_from_name

        return EngineConfig(
            model=self.model,
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks,
            kv_cache_memory_gb=self.kv_cache_memory_gb,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_prefix_caching=self.enable_prefix_caching,
            dtype=dtype_from_name(self.dtype),
        )

    def engine_specs(self) -> list[Any]:
        """The engines `engine` names (`server/engine_specs.py`), parsed and checked."""
        from parrot_core.server.engine_specs import parse_engine_specs

        return parse_engine_specs(self.engine)

    def replace(self, **changes: Any) -> ServeSettings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServeSettings:
        """Defaults, then `PARROT_CORE_<FIELD>` variables, then `overrides`. An empty variable
        means None for optional fields. A bad value raises `InvalidRequestError` naming it."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, kind in _field_types().items():
            var = ENV_PREFIX + name.upper()
            if var in environ:
                values[name] = _parse(var, environ[var], kind)
        unknown = sorted(set(overrides) - set(_field_types()))
        if unknown:
            raise InvalidRequestError(f"unknown settings: {', '.join(unknown)}")
        return cls(**{**values, **overrides})


def _field_types() -> dict[str, tuple[type, bool]]:
    """Field name -> (base type, optional)."""
    hints = typing.get_type_hints(ServeSettings)
    out = {}
    for f in fields(ServeSettings):
        args = typing.get_args(hints[f.name])
        base = next((a for a in args if a is not type(None)), hints[f.name]) if args else hints[f.name]
        out[f.name] = (base, type(None) in args)
    return out


def _parse(var: str, raw: str, kind: tuple[type, bool]) -> Any:
    base, optional = kind
    text = raw.strip()
    if optional and text == "":
        return None
    try:
        if base is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        return base(text)
    except ValueError:
        raise InvalidRequestError(f"{var}={raw!r} is not a valid {base.__name__}") from None


def settings_command(run: Callable[[ServeSettings], None]) -> Callable[..., None]:
    """A typer command whose options are generated from `ServeSettings`' fields; it calls
    `run(ServeSettings.from_env(<the flags given>))`. Flags left out fall back to env/defaults."""
    params = []
    types = _field_types()
    for f in fields(ServeSettings):
        base, _ = types[f.name]
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (env {ENV_PREFIX}{f.name.upper()})"
        if f.metadata["argument"]:
            default = typer.Argument(None, help=help_text, show_default=False)
        elif base is bool:
            default = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_text, show_default=False)
        else:
            default = typer.Option(None, flag, help=help_text, show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=base | None))

    def command(**flags: Any) -> None:
        try:
            settings = ServeSettings.from_env(**{k: v for k, v in flags.items() if v is not None})
        except InvalidRequestError as e:
            raise typer.BadParameter(str(e)) from None
        run(settings)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = run.__name__
    command.__doc__ = run.__doc__
    return command
