"""Tool calling (server/tools.py): the parser and renderer on text, and round trips with the
official `openai` client (required, named and auto; streaming and not) on the tiny and the
real model. Call arguments are checked against their schema with `jsonschema_rs` (an
independent validator)."""

from __future__ import annotations

import json

import httpx
import jsonschema_rs
import openai
import pytest

from parrot_core.engines.builtin.tokenizer import Tokenizer
from parrot_core.engines.base import StructuredSpec
from parrot_core.server.http_errors import APIError
from parrot_core.server.tools import (
    ToolCallParser,
    parse_reply,
    parse_tool_setup,
    render_chat,
    template_renders_tools,
    tool_grammar,
)
from tests.server.conftest import client_for, settle

WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}}, "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The forecast for a city.", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a zone.", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def check_call(call: object, allowed: set[str]) -> dict:
    """An OpenAI tool call (object or chunk-accumulated dict) that names an allowed tool and
    whose arguments are JSON that validates against its schema; returns the arguments."""
    data = call if isinstance(call, dict) else call.model_dump()
    assert data["id"].startswith("call_") and len(data["id"]) == 5 + 24 and data["type"] == "function", data
    name = data["function"]["name"]
    assert name in allowed, data
    arguments = json.loads(data["function"]["arguments"])
    jsonschema_rs.validate(SCHEMAS[name], arguments)
    return arguments


# -- text ---------------------------------------------------------------------------------------
def setup(choice: object = "auto"):
    return parse_tool_setup(TOOLS, choice, None)


def test_parse_reply_finds_valid_calls_and_leaves_everything_else_as_content():
    text = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>\n'
    )
    content, calls = parse_reply(text, setup())
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Rome", "days": 2}), ("get_time", {"zone": "CET"})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    # no call: the text is the content, unchanged (whitespace too)
    assert parse_reply("  plain answer\n", setup()) == ("  plain answer\n", [])
    # bad blocks stay in the content: not JSON, an unknown tool, arguments off the schema, unterminated
    for bad in (
        "<tool_call>\nnot json\n</tool_call>",
        '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "days": 2}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}',
    ):
        assert parse_reply("Hi " + bad, setup()) == ("Hi " + bad, []), bad
    # a named choice accepts only that function
    content, calls = parse_reply('<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>', setup(NAMED))
    assert calls == [] and content is not None and "get_time" in content


def test_streaming_parser_agrees_with_the_whole_reply_however_the_text_is_cut():
    text = (
        "Sure <tool_c! then\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 7}}\n</tool_call>\n'
        "<tool_call>\nbroken\n</tool_call> tail\n"
    )
    whole_content, whole_calls = parse_reply(text, setup())
    assert whole_content == "Sure <tool_c! then\n<tool_call>\nbroken\n</tool_call> tail" and len(whole_calls) == 1
    for size in (1, 2, 5, 13, len(text)):
        parser = ToolCallParser(setup())
        pieces, calls = [], []
        for at in range(0, len(text), size):
            content, new = parser.push(text[at : at + size])
            pieces.append(content)
            calls += new
        pieces.append(parser.finish())
        assert "".join(pieces) == whole_content, size
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
    # text that may start a call is held back until it is known
    parser = ToolCallParser(setup())
    assert parser.push("ok <tool_") == ("ok", [])
    assert parser.push("x>") == (" <tool_x>", [])


def test_bad_tools_and_tool_choices_are_400s_naming_the_field():
    cases = [
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], None, "tools"),
        ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], None, "tools"),
        ([{"type": "function", "function": {"name": "has space"}}], None, "tools"),
        ([{"type": "retrieval"}], None, "tools"),
        ([{"type": "function", "function": {"name": "f"}}] * 2, None, "tools"),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        (TOOLS, "sometimes", "tool_choice"),
        (None, "required", "tool_choice"),
        (None, NAMED, "tool_choice"),
    ]
    for tools, choice, param in cases:
        with pytest.raises(APIError) as e:
            parse_tool_setup(tools, choice, None)
        assert e.value.status == 400 and e.value.param == param, (tools, choice, e.value)
    assert parse_tool_setup(None, None, None) is None and parse_tool_setup(None, "auto", None) is None
    assert parse_tool_setup(TOOLS, None, None).choice == "auto"


def test_tool_grammar_accepts_exactly_the_calls_format():
    tools = setup("required").tools
    spec = StructuredSpec(grammar=tool_grammar(tools, many=True))
    assert "get_weather" in spec.grammar_text and "get_time" in spec.grammar_text
    with pytest.raises(APIError) as e:  # a schema llguidance cannot enforce is the tools' fault
        parse_tool_setup([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "bogus"}}}}}], "required", None).structured()
    assert e.value.param == "tools"


def test_render_puts_tools_in_the_system_prompt_when_the_template_ignores_them(real_model):
    tok = real_model.tokenizer
    assert not template_renders_tools(tok)  # SmolLM2's template has no tools
    history = [
        {"role": "system", "content": "Be brief."},
        *MESSAGES,
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        {"role": "tool", "content": "warm", "tool_call_id": "call_2"},
    ]
    text = render_chat(tok.apply_chat_template, False, history, setup(), add_generation_prompt=True)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and '"name": "get_time"' in system
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call><|im_end|>' in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwarm\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # tool_choice none: no tools in the prompt
    assert "# Tools" not in render_chat(tok.apply_chat_template, False, history, setup("none"), add_generation_prompt=True)


NATIVE_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}"
    "{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}\n{% endfor %}"
)


def test_render_passes_tools_to_a_template_that_renders_them(real_model):
    tok = Tokenizer(real_model.tokenizer.backend, chat_template=NATIVE_TEMPLATE)
    assert template_renders_tools(tok)
    history = [
        *MESSAGES,
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
        {"role": "tool", "content": "snow", "tool_call_id": "c1"},
    ]
    text = render_chat(tok.apply_chat_template, True, history, setup(), add_generation_prompt=False)
    assert text.startswith("TOOLS:get_weather;get_time;user: ")  # the template's own rendering
    assert "assistant: [get_weather Oslo]" in text  # arguments reach the template as an object
    assert "tool: snow(c1)" in text


# -- the server, tiny model ---------------------------------------------------------------------
@pytest.fixture
def served(make_runtime, start_server):
    rt = make_runtime(max_model_len=1024, num_kv_blocks=256)  # the tools' system prompt is long
    server = start_server(rt)
    return rt, client_for(server), server.url


def test_required_and_named_choices_always_give_calls_that_validate(served):
    rt, client, _ = served
    for seed in range(4):
        out = client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=60, seed=seed
        )
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        check_call(choice.message.tool_calls[0], {"get_weather", "get_time"})
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, max_tokens=60, seed=5, n=3)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls" and [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
        check_call(choice.message.tool_calls[0], {"get_weather"})
    settle(rt)


def test_streamed_calls_come_as_openai_tool_call_deltas(served):
    rt, client, _ = served
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, max_tokens=60, seed=2, stream=True,
        stream_options={"include_usage": True},
    )
    calls: dict[int, dict] = {}
    reasons = []
    content = ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasons.append(choice.finish_reason)
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": "", "type": "", "function": {"name": "", "arguments": ""}})
                call["id"] += d.id or ""
                call["type"] += d.type or ""
                call["function"]["name"] += d.function.name or ""
                call["function"]["arguments"] += d.function.arguments or ""
    assert content == "" and list(calls) == [0]
    check_call(calls[0], {"get_weather"})
    assert [r for r in reasons if r] == ["tool_calls"]
    # the same request, not streamed, gives the same call
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, max_tokens=60, seed=2)
    assert out.choices[0].message.tool_calls[0].function.arguments == calls[0]["function"]["arguments"]
    settle(rt)


def test_round_trip_history_with_tool_calls_and_tool_results(served):
    rt, client, url = served
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=60, seed=0)
    call = first.choices[0].message.tool_calls[0]
    history = [
        *MESSAGES,
        first.choices[0].message.model_dump(exclude_none=True),  # as an agent loop sends it back
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24C"},
    ]
    second = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the prompt holds the call and its result, as /tokenize renders them
    tokens = httpx.post(url + "/tokenize", json={"messages": history, "tools": TOOLS}).json()
    assert second.usage.prompt_tokens == tokens["count"]
    prompt = rt.detokenize(tokens["tokens"])
    assert f'"name": "{call.function.name}"' in prompt and "<tool_response>\nSunny, 24C\n</tool_response>" in prompt
    settle(rt)


def test_auto_parses_what_the_model_wrote_and_none_renders_no_tools(served):
    rt, client, _ = served
    out = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=30, temperature=0, extra_body={"return_token_ids": True}
    )
    choice = out.choices[0]
    content, calls = parse_reply(rt.detokenize(choice.token_ids), parse_tool_setup(TOOLS, "auto", None))
    assert choice.message.content == content and len(choice.message.tool_calls or []) == len(calls)
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1, temperature=0)
    none = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=1, temperature=0)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < out.usage.prompt_tokens
    settle(rt)


def test_bad_tool_requests_are_400s_over_http(served):
    rt, client, _ = served
    bad = [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
        ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    ]
    for change, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": "tiny", "messages": MESSAGES, "max_tokens": 2, **change})
        assert e.value.body["param"] == param, (change, e.value.body)
    settle(rt)


# -- the real model -----------------------------------------------------------------------------
@pytest.mark.real_model
def test_real_model_tool_calls_required_named_streaming_and_not(real_served):
    rt, _, client = real_served(block_size=16, num_kv_blocks=256, max_model_len=2048)
    model = rt.engine.model_name
    for choice_kind in ("required", NAMED):
        out = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice=choice_kind, max_tokens=80, temperature=0)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        for call in choice.message.tool_calls:
            check_call(call, {"get_weather"} if choice_kind == NAMED else set(SCHEMAS))
    stream = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice=NAMED, max_tokens=80, temperature=0, stream=True)
    deltas = [d for chunk in stream for c in chunk.choices for d in (c.delta.tool_calls or [])]
    assert deltas and deltas[0].index == 0 and deltas[0].function.name == "get_weather"
    streamed = "".join(d.function.arguments or "" for d in deltas if d.index == 0)
    assert streamed == out.choices[0].message.tool_calls[0].function.arguments  # greedy: the same call
    # auto: whatever the model wrote is split into content and valid calls
    auto = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, max_tokens=60, temperature=0, extra_body={"return_token_ids": True})
    content, calls = parse_reply(rt.detokenize(auto.choices[0].token_ids), parse_tool_setup(TOOLS, "auto", None))
    assert auto.choices[0].message.content == content and len(auto.choices[0].message.tool_calls or []) == len(calls)
    for call in auto.choices[0].message.tool_calls or []:
        check_call(call, set(SCHEMAS))
    settle(rt)
