"""Structured output over the OpenAI API, driven by the official `openai` client: OpenAI's
`response_format` (json_object, json_schema) and vLLM's `structured_outputs` extra on both
routes, streaming and not, on the tiny model; `beta.chat.completions.parse` with a pydantic
model on the real one."""

from __future__ import annotations

import json
import re
from typing import Literal

import openai
import pydantic
import pytest

from tests.server.conftest import settle

SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["colour", "count"],
    "additionalProperties": False,
}


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def served(tiny_runtime, start_server):
    server = start_server(tiny_runtime)
    return tiny_runtime, client_for(server)


def check(value: dict) -> None:
    assert set(value) == {"colour", "count"} and value["colour"] in ("red", "green") and type(value["count"]) is int and 0 <= value["count"] <= 9


def test_completions_structured_outputs_json_regex_choice_grammar(served):
    rt, client = served
    sampled = {"model": "tiny", "prompt": "Answer:", "temperature": 1.0, "seed": 4, "max_tokens": 40}
    out = client.completions.create(**sampled, n=5, extra_body={"structured_outputs": {"json": SCHEMA}})
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        check(json.loads(choice.text))
    out = client.completions.create(**sampled, n=5, extra_body={"structured_outputs": {"regex": r"\d{3}-[ab]"}})
    assert all(c.finish_reason == "stop" and re.fullmatch(r"\d{3}-[ab]", c.text) for c in out.choices), out
    out = client.completions.create(**sampled, n=5, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert all(c.text in ("yes", "no") for c in out.choices), out
    out = client.completions.create(**sampled, extra_body={"structured_outputs": {"grammar": 'start: "x" ("y")*  "z"'}})
    assert re.fullmatch("xy*z", out.choices[0].text), out
    settle(rt)


def test_chat_response_format_json_schema_and_json_object_streaming_and_not(served):
    rt, client = served
    messages = [{"role": "user", "content": "Pick a colour and a number."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}}
    out = client.chat.completions.create(model="tiny", messages=messages, response_format=fmt, max_tokens=40, seed=1)
    assert out.choices[0].finish_reason == "stop"
    check(json.loads(out.choices[0].message.content))
    stream = client.chat.completions.create(model="tiny", messages=messages, response_format=fmt, max_tokens=40, seed=2, stream=True)
    chunks = list(stream)
    check(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)))
    out = client.chat.completions.create(model="tiny", messages=messages, response_format={"type": "json_object"}, max_tokens=20, seed=3)
    assert out.choices[0].message.content.startswith("{")  # the random model's strings run on; the prefix is JSON's
    out = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, extra_body={"structured_outputs": {"choice": ["left", "right"]}}
    )
    assert out.choices[0].message.content in ("left", "right")
    settle(rt)


def test_bad_structured_requests_are_400_naming_the_field(served):
    rt, client = served
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=messages, response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", extra_body={"structured_outputs": {"regex": "(("}})
    assert e.value.body["param"] == "structured_outputs" and "regex" in e.value.body["message"]
    settle(rt)


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    species: Literal["cat", "dog", "parrot"]
    age: int


@pytest.mark.real_model
def test_real_model_beta_parse_returns_a_validated_pydantic_object(real_served):
    rt, _, client = real_served(block_size=16, num_kv_blocks=128, max_model_len=1024)
    messages = [{"role": "user", "content": "Invent a pet. Answer in JSON with its name, species and age."}]
    for seed in (0, 1):
        completion = client.beta.chat.completions.parse(
            model=rt.engine.model_name, messages=messages, response_format=Pet, max_tokens=60, seed=seed, temperature=0.7
        )
        message = completion.choices[0].message
        assert completion.choices[0].finish_reason == "stop", message.content
        assert isinstance(message.parsed, Pet)
        assert Pet.model_validate_json(message.content) == message.parsed
    settle(rt)
