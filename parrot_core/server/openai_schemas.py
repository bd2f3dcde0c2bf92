"""The pydantic request and response models of the OpenAI-compatible API."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, WrapValidator, field_validator
from pydantic_core import PydanticCustomError

from parrot_core.engines.base import StructuredSpec
from parrot_core.errors import InvalidRequestError
from parrot_core.server.http_errors import APIError
from parrot_core.server.tools import ToolSetup, parse_tool_setup

MAX_STOP = 64
MAX_N = 128
MAX_LOGPROBS = 20  # vLLM's cap on logprobs / top_logprobs (OpenAI's: 5 for completions, 20 for chat)
MAX_LOGIT_BIAS = 1024  # OpenAI allows 300
# vLLM request fields this server does not implement, with the value it behaves as: any other
# value is a 400 naming the field (unknown fields are ignored, as vLLM does; these are not
# unknown, and ignoring them would silently change what the client asked for)
UNSUPPORTED_EXTRAS: dict[str, object] = {
    "structured_outputs": None,
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
    "guided_grammar": None,
    "allowed_token_ids": None,
    "bad_words": None,
    "truncate_prompt_tokens": None,
    "use_beam_search": False,
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    # OpenAI's deprecated forerunners of tools / tool_choice
    "functions": None,
    "function_call": None,
}
GREEDY_BELOW = 1e-5  # temperatures this small are greedy (dividing logits by them overflows)
TokenId = Annotated[int, Field(strict=True, ge=0)]


def _one_of(message: str) -> WrapValidator:
    """Replace pydantic's one-error-per-union-member report by one plain message."""

    def validate(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid_type", message) from None

    return WrapValidator(validate)


Prompt = Annotated[
    str | list[str] | list[TokenId] | list[list[TokenId]],
    _one_of("must be a string, a list of strings, a list of token ids (integers >= 0) or a list of such lists"),
]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


# -- request models ---------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, strict=True)
    # vLLM's: with include_usage, every chunk carries the usage so far (without it, as vLLM, nothing)
    continuous_usage_stats: bool = Field(False, strict=True)


class _SamplingRequest(BaseModel):
    """Fields shared by both generation endpoints."""

    # strict: JSON's true / false or "0.5" are not numbers, 0 / 1 are not booleans (ints are numbers)
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)

    model: str | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: Int64 | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    stop: Annotated[
        str | Annotated[list[str], Field(max_length=MAX_STOP)] | None,
        _one_of(f"must be a string or a list of at most {MAX_STOP} strings"),
    ] = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=1024)] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    user: str | None = None
    # vLLM's
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    SUPPORTED_EXTRAS: ClassVar[frozenset[str]] = frozenset()  # of UNSUPPORTED_EXTRAS, what a subclass implements

    def check_supported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options can only be given when stream is true", param="stream_options")
        extra = self.model_extra or {}
        for name, harmless in UNSUPPORTED_EXTRAS.items():
            if name not in self.SUPPORTED_EXTRAS and extra.get(name, harmless) not in (None, harmless):
                hint = "" if harmless is None else f" (only {json.dumps(harmless)})"
                raise APIError(400, f"{name} is not supported by this server{hint}", param=name)

    def sampling(self) -> dict[str, Any]:
        """Keyword arguments of `Runtime.astream` (besides the prompt and max_tokens)."""
        temperature = 1.0 if self.temperature is None else self.temperature
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {
            "temperature": 0.0 if temperature < GREEDY_BELOW else temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": -1 if self.top_k is None else self.top_k,
            "seed": self.seed,
            "stop": stop,
            "stop_token_ids": list(self.stop_token_ids or []),
            "ignore_eos": self.ignore_eos,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty,
            "logit_bias": self.logit_bias_ids(),
            "min_tokens": self.min_tokens,
            "min_p": self.min_p or 0.0,
        }

    @property
    def samples_per_prompt(self) -> int:
        """How many sequences each prompt runs (`n`; completions' `best_of` when larger)."""
        return self.n

    def logit_bias_ids(self) -> dict[int, float]:
        """`logit_bias` with its keys (JSON strings, as OpenAI's) as token ids; 400 for a key
        that is not a non-negative integer or a bias outside [-100, 100]. The vocabulary is
        checked by the caller."""
        out: dict[int, float] = {}
        for key, bias in (self.logit_bias or {}).items():
            if not key.isascii() or not key.isdigit():
                raise APIError(400, f"logit_bias keys must be token ids (non-negative integers), got {key!r}", param="logit_bias")
            if not -100 <= bias <= 100:
                raise APIError(400, f"logit_bias values must be in [-100, 100], got {bias!r} for {key!r}", param="logit_bias")
            out[int(key)] = bias
        return out

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class _SwitchableRequest(BaseModel):
    """Extensions of the generation endpoints (parrot_core.switching): with `time_limit`
    (seconds) or `token_quantum` (tokens) the generation is suspended when that passes
    (`finish_reason: "suspended"`) and continues with `POST /v1/generations/{pid}/resume`;
    `pid` names it (in the caller's namespace; made up when left out, and sent back as the
    response's `pid`)."""

    time_limit: float | None = Field(None, gt=0)
    token_quantum: int | None = Field(None, ge=1)
    pid: str | None = Field(None, pattern=r"^[A-Za-z0-9._:@-]{1,128}$")

    @property
    def suspendable(self) -> bool:
        return self.time_limit is not None or self.token_quantum is not None or self.pid is not None


# vLLM's structured_outputs keys -> StructuredSpec fields
_STRUCTURED_OUTPUTS = {"json": "json_schema", "json_object": "json_object", "regex": "regex", "choice": "choice", "grammar": "grammar"}


# vLLM's legacy guided_* fields -> StructuredSpec fields
_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


class _StructuredRequest(_SamplingRequest):
    """Structured output: OpenAI's `response_format` (`{"type": "text"}`, `{"type":
    "json_object"}`, `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`),
    vLLM's `structured_outputs` extra (`{"json" | "regex" | "choice" | "grammar" |
    "json_object": ...}`) or one of vLLM's legacy `guided_json` / `guided_regex` /
    `guided_choice` / `guided_grammar` extras (the same as `structured_outputs`' json / regex /
    choice / grammar); only one of them. A bad one, or a second, is a 400 naming the field."""

    SUPPORTED_EXTRAS: ClassVar[frozenset[str]] = frozenset({"structured_outputs", *_GUIDED})
    response_format: dict[str, Any] | None = None

    def structured(self) -> StructuredSpec | None:
        extra = self.model_extra or {}
        fmt = self.response_format
        given = [name for name in ("structured_outputs", *_GUIDED) if extra.get(name) is not None]
        if fmt is not None and fmt.get("type", "text") != "text":
            given.insert(0, "response_format")
        if len(given) > 1:
            raise APIError(400, f"give only one of {', '.join(given)}", param=given[1])
        if not given:
            return None
        name = given[0]
        if name == "response_format":
            return self._spec_from_response_format(fmt)  # type: ignore[arg-type]
        if name == "structured_outputs":
            return self._spec_from_outputs(extra[name])
        try:
            return StructuredSpec(**{_GUIDED[name]: extra[name]})
        except (InvalidRequestError, TypeError) as e:
            raise APIError(400, f"{name}: {e}", param=name) from e

    @staticmethod
    def _spec_from_outputs(outputs: object) -> StructuredSpec:
        param = "structured_outputs"
        if not isinstance(outputs, dict):
            raise APIError(400, "structured_outputs must be an object", param=param)
        given = {k: v for k, v in outputs.items() if v is not None and v is not False}
        unknown = sorted(set(given) - set(_STRUCTURED_OUTPUTS))
        if unknown:
            raise APIError(400, f"structured_outputs: {', '.join(unknown)} not supported (only {', '.join(_STRUCTURED_OUTPUTS)})", param=param)
        try:
            return StructuredSpec(**{_STRUCTURED_OUTPUTS[k]: v for k, v in given.items()})
        except (InvalidRequestError, TypeError) as e:
            raise APIError(400, f"structured_outputs: {e}", param=param) from e

    @staticmethod
    def _spec_from_response_format(fmt: dict[str, Any]) -> StructuredSpec | None:
        param = "response_format"
        kind = fmt.get("type")
        try:
            if kind == "text":
                return None
            if kind == "json_object":
                return StructuredSpec(json_object=True)
            if kind == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                    raise APIError(400, "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}", param=param)
                return StructuredSpec(json_schema=spec["schema"])
        except InvalidRequestError as e:
            raise APIError(400, f"response_format: {e}", param=param) from e
        raise APIError(400, f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}", param=param)

    def check_supported(self) -> None:
        super().check_supported()
        self.structured()

    def sampling(self) -> dict[str, Any]:
        return {**super().sampling(), "structured": self.structured()}


class CompletionRequest(_StructuredRequest, _SwitchableRequest):
    """`echo`: the prompt's text leads each choice's text (and, with `logprobs`, the prompt's
    tokens lead its logprobs, the first one null); `max_tokens=0` is allowed with `echo`
    (scoring a prompt, as lm-evaluation-harness does): nothing is generated."""

    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    # vLLM's: each choice's prompt_logprobs (None first, then per prompt token its own and the
    # `prompt_logprobs` most likely tokens, {token_id: {logprob, rank, decoded_token}})
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # vLLM's: each choice's prompt_token_ids and token_ids (streaming: each chunk's token_ids,
    # a choice's first chunk its prompt_token_ids)
    return_token_ids: bool = False

    def check_supported(self) -> None:
        super().check_supported()
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 is only allowed with echo)", param="max_tokens")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of < self.n:
            raise APIError(400, f"best_of must be at least n ({self.n}), got {self.best_of}", param="best_of")
        if self.stream and self.samples_per_prompt > self.n:
            raise APIError(400, "best_of larger than n cannot be streamed", param="best_of")

    @property
    def samples_per_prompt(self) -> int:
        return max(self.n, self.best_of or 0)

    def sampling(self) -> dict[str, Any]:
        # best_of ranks the sequences by their cumulative logprob: they need their tokens' logprobs
        picking = self.samples_per_prompt > self.n
        return {
            **super().sampling(),
            "logprobs": 0 if self.logprobs is None and picking else self.logprobs,
            "prompt_logprobs": max(wanted) if (wanted := self._prompt_logprobs_wanted()) else None,
        }

    def _prompt_logprobs_wanted(self) -> list[int]:
        """How many alternatives the prompt's tokens need: echo's `logprobs`, `prompt_logprobs`."""
        wanted = [self.logprobs] if self.echo and self.logprobs is not None else []
        return wanted + ([self.prompt_logprobs] if self.prompt_logprobs is not None else [])


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI's


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


def _content_as_documented(schema: dict[str, Any]) -> None:
    """The OpenAPI schema shows `content` as a required string or list of parts (what every
    message but an assistant's with `tool_calls` needs), not the nullable field it is."""
    content = schema["properties"]["content"]
    content["anyOf"] = [option for option in content["anyOf"] if option.get("type") != "null"]
    content.pop("default", None)
    content["description"] = "null (or left out) only on an assistant message with tool_calls"
    schema["required"] = [*schema.get("required", []), "content"]


class ChatMessage(BaseModel):
    """One chat message. `content` is required and never null, except on an assistant
    message with `tool_calls`. A `tool` message's `tool_call_id` (the call it answers, as
    OpenAI's clients send it) reaches the template when given."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_content_as_documented)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    # validated after the fields above, whose values decide whether it may be null
    content: Annotated[
        str | list[TextPart] | None, _one_of("must be a string or a list of text parts {'type': 'text', 'text': ...}")
    ] = Field(None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_needed(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise PydanticCustomError("missing", "Field required (it may only be null on an assistant message with tool_calls)")
        return value

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return "".join(part.text for part in self.content) if isinstance(self.content, list) else self.content

    def as_template_input(self) -> dict[str, Any]:
        """What the chat template gets: role (developer as system) and content, plus the
        assistant's `tool_calls` / a tool message's `tool_call_id` and `name` when given."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.role == "tool" and self.name is not None:
            out["name"] = self.name
        return out


class ChatLogprobsRequest(_SamplingRequest):
    """Chat's `logprobs` (a bool) and `top_logprobs` (how many alternatives per token)."""

    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true", param="top_logprobs")

    def sampling(self) -> dict[str, Any]:
        return {**super().sampling(), "logprobs": (self.top_logprobs or 0) if self.logprobs else None}


class ChatCompletionRequest(ChatLogprobsRequest, _StructuredRequest, _SwitchableRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # OpenAI's tools (server/tools.py): checked by tool_setup(), a 400 naming the field
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's: the response's prompt_logprobs (null, then per prompt token its own and the
    # `prompt_logprobs` most likely tokens); not with stream, as vLLM
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True  # vLLM's
    # vLLM's: the prompt leaves the last (assistant) message open, and the model continues it
    continue_final_message: bool = False
    # vLLM's: the reply's content is prefixed with the last message's when that is the assistant's
    echo: bool = False
    # vLLM's: the response's prompt_token_ids, each choice's token_ids (streaming: each chunk's
    # token_ids, a choice's first chunk the prompt_token_ids)
    return_token_ids: bool = False
    # OpenAI's: requests with the same key keep their conversation's context pinned (openai_api)
    prompt_cache_key: str | None = Field(None, min_length=1, max_length=1024)

    _tool_setup: tuple[ToolSetup | None, StructuredSpec | None] | None = PrivateAttr(None)

    def tool_setup(self) -> ToolSetup | None:
        """The request's tools (None without any), checked once; a 400 naming the field."""
        return self._tools()[0]

    def _tools(self) -> tuple[ToolSetup | None, StructuredSpec | None]:
        if self._tool_setup is None:
            setup = parse_tool_setup(self.tools, self.tool_choice, self.parallel_tool_calls)
            spec = setup.structured() if setup is not None else None
            self._tool_setup = (setup, spec)
        return self._tool_setup

    def check_supported(self) -> None:
        super().check_supported()
        setup = self.tool_setup()
        if setup is not None and setup.constrained and self.structured() is not None:
            raise APIError(400, "tool_choice 'required' or a named function cannot be combined with structured output", param="tool_choice")
        if self.prompt_logprobs is not None and self.stream:
            raise APIError(400, "prompt_logprobs are not available with stream", param="prompt_logprobs")
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise APIError(400, "continue_final_message needs add_generation_prompt to be false", param="continue_final_message")
            if self.messages[-1].role != "assistant":
                raise APIError(400, "continue_final_message needs the last message to be the assistant's", param="continue_final_message")
        if self.echo and not self.add_generation_prompt and self.messages[-1].role != "assistant":
            # vLLM would answer in the last message's role; this server answers as the assistant
            raise APIError(400, "echo with add_generation_prompt false needs the last message to be the assistant's", param="echo")
        if self.return_token_ids and self.prompt_cache_key is not None:
            raise APIError(400, "return_token_ids cannot be combined with prompt_cache_key", param="return_token_ids")

    def sampling(self) -> dict[str, Any]:
        out = {**super().sampling(), "prompt_logprobs": self.prompt_logprobs}
        spec = self._tools()[1]
        if spec is not None:  # tool_choice required / named: the calls' grammar
            out["structured"] = spec
        return out

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM's, as on /v1/chat/completions
    tools: list[dict[str, Any]] | None = None  # rendered as /v1/chat/completions renders them
    return_token_strs: bool = False  # vLLM's: also each token's string


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[TokenId]


# -- response models --------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions logprobs: per token its text, logprob, the most likely
    alternatives (token text -> logprob; the token itself included) and its character offset in
    the choice's text. A token with nothing before it (the prompt's first, with echo) has null."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


def _absent_if_none(value: Any) -> bool:
    return value is None


class PromptLogprob(BaseModel):
    """vLLM's per-token entry of `prompt_logprobs`."""

    logprob: float
    rank: int
    decoded_token: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    # vLLM's, with prompt_logprobs only (absent otherwise); keys are token ids
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(None, exclude_if=_absent_if_none)
    # vLLM's, with return_token_ids only (absent otherwise)
    prompt_token_ids: list[int] | None = Field(None, exclude_if=_absent_if_none)
    token_ids: list[int] | None = Field(None, exclude_if=_absent_if_none)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    pid: str | None = Field(None, exclude_if=_absent_if_none)  # a suspendable generation's (parrot_core.switching)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=_absent_if_none)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    token_ids: list[int] | None = Field(None, exclude_if=_absent_if_none)  # vLLM's, with return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = Field(None, exclude_if=_absent_if_none)  # vLLM's, with return_token_ids
    pid: str | None = Field(None, exclude_if=_absent_if_none)  # a suspendable generation's (parrot_core.switching)
    # vLLM's, with prompt_logprobs only; keys are token ids
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(None, exclude_if=_absent_if_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "parrot-core"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = Field(None, exclude_if=_absent_if_none)  # with return_token_strs


class TokenizerInfoResponse(BaseModel):
    """vLLM's `/tokenizer_info`: what a client needs to tokenize like the server (e.g.
    lm-evaluation-harness's `tokenizer_backend=remote`)."""

    tokenizer_class: str = "PreTrainedTokenizerFast"
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    chat_template: str | None
    model_max_length: int
    add_bos_token: bool


class DetokenizeResponse(BaseModel):
    prompt: str


