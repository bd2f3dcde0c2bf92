"""Tool calling on `/v1/chat/completions`: OpenAI's `tools` and `tool_choice` checked,
rendered through the model's chat template, and the reply parsed back into `tool_calls`.

Contracts:
- A tool is `{"type": "function", "function": {"name", "description"?, "parameters"?,
  "strict"?}}`: a name of 1-64 letters, digits, `_` or `-`, unique; `parameters` a JSON schema
  of an object (missing: no arguments). `tool_choice` is "none", "auto" (the default with
  tools), "required" or `{"type": "function", "function": {"name": ...}}`; "required" or a
  named function without tools, an unknown name, or anything else is a 400 naming the field.
- Calls are written in the Hermes format (Qwen 2.5, Hermes 2 Pro, ...): each call is
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`. A template that renders
  `tools=` itself gets the tools (and the history's `tool_calls` / `tool` messages) as
  `transformers` passes them; a template that ignores them (SmolLM2's) gets the tools described
  in the system prompt (`SYSTEM_TOOLS`, after the request's own system message if any), the
  history's calls written into the assistant's content in the format above and `tool`
  messages as a user message of `<tool_response>` blocks, as Qwen 2.5's template does. With
  `tool_choice` "none" the tools are left out of the prompt.
- "required" and a named function constrain the output (llguidance, `tool_grammar`): one or
  more calls (exactly one with `parallel_tool_calls: false` or a named function) to the
  allowed functions, the arguments matching their schemas; so the reply always parses.
- Parsing ("auto", "required", named): a `<tool_call>` block whose JSON names an allowed tool
  and whose arguments match its schema (`ArgumentsValidator`) becomes a call `call_<24 hex>`
  (arguments as compact JSON text); any other block, and an unterminated one, stays in the
  content. Whitespace around calls is dropped; content that is empty becomes null.
  `ToolCallParser` does this incrementally for streams (text that may start a call is held
  back until it is known), and the non-streaming reply is the same parser run once, so both
  give the same content and calls.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import llguidance
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from parrot_core.engines.base import StructuredSpec
from parrot_core.errors import InvalidRequestError
from parrot_core.server.http_errors import APIError

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}

SYSTEM_TOOLS = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        """The tool as OpenAI and `transformers`' templates spell it."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolSetup:
    """A request's tools and what it lets the model do with them. `choice`: "none", "auto",
    "required" or "function" (then `function` is the name)."""

    tools: tuple[Tool, ...]
    choice: str
    function: str | None = None
    parallel: bool = True
    _validators: dict[str, ArgumentsValidator] = field(default_factory=dict, compare=False, repr=False)

    @property
    def parses(self) -> bool:
        return self.choice != "none"

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "function")

    @property
    def allowed(self) -> tuple[Tool, ...]:
        return tuple(t for t in self.tools if self.function is None or t.name == self.function)

    def structured(self) -> StructuredSpec | None:
        """The constraint of "required" / a named function (None otherwise)."""
        if not self.constrained:
            return None
        try:
            return StructuredSpec(grammar=tool_grammar(self.allowed, many=self.parallel and self.choice == "required"))
        except InvalidRequestError as e:
            raise APIError(400, f"tools: a parameters schema cannot be enforced: {e}", param="tools") from e

    def validator(self, name: str) -> ArgumentsValidator | None:
        """The validator of an allowed tool's arguments (None if `name` is not allowed)."""
        tool = next((t for t in self.allowed if t.name == name), None)
        if tool is None:
            return None
        if name not in self._validators:
            self._validators[name] = ArgumentsValidator(tool.parameters)
        return self._validators[name]


def parse_tool_setup(tools: Sequence[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolSetup | None:
    """The request's tool setup (None when it has no tools and asks for none), or a 400
    naming `tools` or `tool_choice`."""
    parsed = tuple(_parse_tool(i, t) for i, t in enumerate(tools or []))
    names = [t.name for t in parsed]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise APIError(400, f"tools: function names must be unique; {', '.join(dup)} given twice", param="tools")
    choice, function = _parse_choice(tool_choice, parsed)
    if not parsed:
        return None
    return ToolSetup(parsed, choice, function, parallel=parallel_tool_calls is not False)


def _parse_tool(i: int, tool: Any) -> Tool:
    def bad(message: str) -> APIError:
        return APIError(400, f"tools[{i}]: {message}", param="tools")

    if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" or not isinstance(tool.get("function"), Mapping):
        raise bad('each tool must be {"type": "function", "function": {"name": ..., "parameters": {...}}}')
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise bad(f"function.name must be 1-64 letters, digits, '_' or '-'; got {name!r}")
    description = fn.get("description")
    if description is not None and not isinstance(description, str):
        raise bad("function.description must be a string")
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = dict(_NO_ARGUMENTS)
    if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
        raise bad(f"function.parameters of {name!r} must be a JSON schema of an object (type 'object')")
    return Tool(name, description, dict(parameters))


def _parse_choice(choice: Any, tools: tuple[Tool, ...]) -> tuple[str, str | None]:
    param = "tool_choice"
    if choice is None:
        return ("auto" if tools else "none"), None
    if choice in ("none", "auto"):
        return choice, None
    if choice == "required":
        if not tools:
            raise APIError(400, "tool_choice 'required' needs tools", param=param)
        return choice, None
    if isinstance(choice, Mapping) and choice.get("type") == "function" and isinstance(choice.get("function"), Mapping):
        name = choice["function"].get("name")
        if not any(t.name == name for t in tools):
            known = ", ".join(t.name for t in tools) or "none"
            raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools ({known})", param=param)
        return "function", name
    raise APIError(
        400, "tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}", param=param
    )


# -- the grammar of calls -------------------------------------------------------------------
def call_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    """The JSON schema of one call's body, `{"name": ..., "arguments": {...}}`, to any of
    `tools`, with llguidance's options for how it is written."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    # written as json.dumps writes it (and the prompt shows it): ", " and ": ", no other whitespace
    return {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}


def tool_grammar(tools: Sequence[Tool], many: bool) -> str:
    """A Lark grammar (llguidance's) of one call, or of calls one per line with `many`."""
    body = json.dumps(call_schema(tools), ensure_ascii=False)
    start = 'start: call ("\\n" call)*' if many else "start: call"
    return f'{start}\ncall: "{CALL_OPEN}\\n" body "\\n{CALL_CLOSE}"\nbody: %json {body}\n'


# -- checking arguments -----------------------------------------------------------------------
@functools.cache
def _byte_tokenizer() -> llguidance.LLTokenizer:
    """A tokenizer whose tokens are the 256 bytes (and an end token): lets an llguidance
    matcher check any text against a grammar, whatever the model's vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    for n, b in enumerate(extra):  # GPT-2's byte-to-unicode map, as ByteLevel decodes it
        chars[b] = chr(256 + n)
    vocab = {c: b for b, c in chars.items()} | {"<end>": 256}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return llguidance.LLTokenizer(tok.to_str(), n_vocab=257, eos_token=256)


class ArgumentsValidator:
    """Whether a JSON text matches a tool's parameters schema (any whitespace), checked by
    llguidance, the same engine that constrains generation."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(dict(schema), defaults={"whitespace_flexible": True})
        self._template = llguidance.LLMatcher(_byte_tokenizer(), grammar, log_level=0)
        if self._template.is_error():
            raise APIError(400, f"tools: a parameters schema does not compile: {self._template.get_error()}", param="tools")

    def __call__(self, text: str) -> bool:
        matcher = self._template.deep_copy()
        return bool(matcher.consume_tokens(list(text.encode("utf-8")))) and matcher.is_accepting()


# -- rendering --------------------------------------------------------------------------------
def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template renders `tools=` (it changes the prompt)."""
    return _renders_tools(tokenizer)


@functools.lru_cache(maxsize=8)
def _renders_tools(tokenizer: Any) -> bool:
    messages = [{"role": "user", "content": "x"}]
    probe = [Tool("probe_tool", "probe", dict(_NO_ARGUMENTS)).as_openai()]
    try:
        with_tools = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=probe)
    except InvalidRequestError:
        return False
    return with_tools != tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def render_chat(
    render: Callable[..., str], native: bool, messages: Sequence[Mapping[str, Any]], setup: ToolSetup | None, add_generation_prompt: bool
) -> str:
    """The chat template's prompt for `messages` (template inputs: role, content, and
    `tool_calls` with arguments as JSON text, `tool_call_id`) and the tools of `setup` (none
    with tool_choice "none"): given to the template when it renders tools (`native`, see
    `template_renders_tools`), else in the system prompt as the module says. `render` is the
    template (`Tokenizer.apply_chat_template`'s signature)."""
    tools = [t.as_openai() for t in setup.tools] if setup is not None and setup.parses else None
    if native:
        inputs = [_native_message(m) for m in messages]
        extra = {"tools": tools} if tools else {}
        return render(inputs, add_generation_prompt=add_generation_prompt, **extra)
    inputs = _plain_messages(messages)
    if tools:
        listed = SYSTEM_TOOLS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if inputs and inputs[0]["role"] == "system":
            inputs[0] = {"role": "system", "content": f"{inputs[0]['content']}\n\n{listed}"}
        else:
            inputs.insert(0, {"role": "system", "content": listed})
    return render(inputs, add_generation_prompt=add_generation_prompt)


def _native_message(m: Mapping[str, Any]) -> dict[str, Any]:
    """`transformers`' convention: call arguments as objects, content never null."""
    out = {**m, "content": m.get("content") or ""}
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {**c, "function": {"name": c["function"]["name"], "arguments": _arguments_object(c["function"]["arguments"])}}
            for c in m["tool_calls"]
        ]
    return out


def _plain_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Messages with only role and content: calls written into the content, runs of `tool`
    messages as one user message of `<tool_response>` blocks (as Qwen 2.5's template)."""
    out: list[dict[str, str]] = []
    for m in messages:
        content = m.get("content") or ""
        if m["role"] == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": "1"})
            continue
        calls = [format_call(c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls") or []]
        out.append({"role": m["role"], "content": "\n".join([content, *calls] if content else calls)})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments  # as given: the template shows it as text


def format_call(name: str, arguments: str) -> str:
    """One call as the model writes it."""
    args = _arguments_object(arguments)
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{CALL_CLOSE}"


# -- parsing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParsedCall:
    id: str
    name: str
    arguments: str  # compact JSON text

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    """Splits generated text into content and calls as it arrives: `push(text)` returns the
    content that is now certain and the calls completed; `finish()` returns what is left (an
    unterminated call, or whitespace when no call was made)."""

    def __init__(self, setup: ToolSetup) -> None:
        self._setup = setup
        self._buffer = ""  # text not yet decided
        self._held = ""  # whitespace after the last content: dropped if a call follows
        self._in_call = False
        self.calls: list[ParsedCall] = []

    def push(self, text: str) -> tuple[str, list[ParsedCall]]:
        self._buffer += text
        out: list[str] = []
        new: list[ParsedCall] = []
        while True:
            if self._in_call:
                end = self._buffer.find(CALL_CLOSE)
                if end < 0:
                    break
                block, self._buffer = self._buffer[: end + len(CALL_CLOSE)], self._buffer[end + len(CALL_CLOSE) :]
                self._in_call = False
                call = self._parse_block(block)
                if call is None:
                    self._content(self._held + block, out)
                else:
                    self._held = ""
                    new.append(call)
                continue
            start = self._buffer.find(CALL_OPEN)
            if start >= 0:
                piece, self._buffer = self._buffer[:start], self._buffer[start:]
                self._in_call = True
            else:
                keep = _partial_suffix(self._buffer, CALL_OPEN)
                piece, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep :]
            self._content(self._held + piece, out)
            if start < 0:
                break
        self.calls.extend(new)
        return "".join(out), new

    def finish(self) -> str:
        rest, self._buffer, self._in_call = self._buffer, "", False
        held, self._held = self._held, ""
        if not rest and self.calls:
            return ""
        return held + rest

    def _content(self, text: str, out: list[str]) -> None:
        body = text.rstrip()
        self._held = text[len(body) :]
        if body:
            out.append(body)

    def _parse_block(self, block: str) -> ParsedCall | None:
        inner = block[len(CALL_OPEN) : -len(CALL_CLOSE)].strip()
        try:
            value = json.loads(inner)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, dict) or set(value) != {"name", "arguments"} or not isinstance(value["name"], str):
            return None
        validator = self._setup.validator(value["name"])
        arguments = json.dumps(value["arguments"], ensure_ascii=False, separators=(",", ":"))
        if validator is None or not isinstance(value["arguments"], dict) or not validator(arguments):
            return None
        return ParsedCall(new_call_id(), value["name"], arguments)


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def parse_reply(text: str, setup: ToolSetup) -> tuple[str | None, list[ParsedCall]]:
    """A whole reply's content (None if empty) and calls."""
    parser = ToolCallParser(setup)
    content, calls = parser.push(text)
    content += parser.finish()
    return (content or None), calls
