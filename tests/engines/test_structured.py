"""Structured output (issue 14 part 2) in the engine and the runtime: a request with a
`StructuredSpec` samples only tokens its grammar allows and ends when the grammar is complete;
rows without one are untouched. On a tiny random Llama over the real vocabulary and tokenizer,
whose free output is noise, so every well-formed result is the constraint's work."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import torch

import parrot_core as P
from parrot_core import Runtime
from parrot_core.engines.base import SamplingParams, StructuredSpec
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from parrot_core.engines.builtin.request import EngineRequest, Kind
from parrot_core.errors import InvalidRequestError
from tests.frontend.conftest import assert_no_leak

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "parrot"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}


def check_person(value: object) -> None:
    """SCHEMA, checked by hand (no jsonschema in the environment)."""
    assert isinstance(value, dict) and set(value) == {"name", "age", "pet", "tags"}, value
    assert isinstance(value["name"], str) and len(value["name"]) <= 6, value
    assert type(value["age"]) is int and 0 <= value["age"] <= 120, value
    assert value["pet"] in ("cat", "dog", "parrot"), value
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3 and all(type(t) is bool for t in value["tags"]), value


@pytest.fixture
def rt(tiny_text_llama, real_model):
    runtime = Runtime(engine=BuiltinEngine(tiny_text_llama, real_model.tokenizer, EngineConfig(num_kv_blocks=512), "tiny-text"))
    yield runtime
    assert_no_leak(runtime)
    runtime.close()


# -- the spec ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"regex": "a(b"}, "regex"),
        ({"json_schema": {"type": "bogus"}}, "json_schema"),
        ({"json_schema": "{not json"}, "json_schema"),
        ({"json_schema": [1, 2]}, "json_schema"),
        ({"choice": []}, "choice"),
        ({"choice": "yes"}, "choice"),
        ({"grammar": "start: undefined_rule"}, "grammar"),
        ({"regex": "a", "choice": ["a"]}, "exactly one"),
        ({}, "exactly one"),
    ],
)
def test_a_bad_spec_is_an_invalid_request_naming_the_field(spec, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(structured=spec)
    with pytest.raises(InvalidRequestError, match=field):
        StructuredSpec(**spec)


def test_spec_forms_are_normalized_and_comparable():
    a = SamplingParams(structured={"json_schema": {"b": 1, "type": "object"}})
    b = SamplingParams(structured=StructuredSpec(json_schema='{"type": "object", "b": 1}'))
    assert a == b and hash(a) == hash(b) and a.structured.grammar_text
    assert SamplingParams(structured={"choice": ["x", "y"]}).structured.choice == ("x", "y")
    with pytest.raises(InvalidRequestError, match="unknown fields"):
        SamplingParams(structured={"jsonschema": {}})
    with pytest.raises(InvalidRequestError, match="structured must be"):
        SamplingParams(structured=42)


def test_the_runtime_rejects_a_bad_spec_and_unknown_options(rt):
    with pytest.raises(InvalidRequestError, match="regex"):
        rt.generate("x", regex="(")
    with pytest.raises(InvalidRequestError, match="not both"):
        rt.generate("x", regex="a", structured={"regex": "b"})


# -- generation --------------------------------------------------------------------------
def test_fifty_seeded_samples_all_follow_the_json_schema(rt):
    prompts = [f"Person number {i}:" for i in range(50)]
    outs = rt.generate(prompts, max_tokens=80, temperature=1.0, seed=7, json_schema=SCHEMA)
    for out in outs:
        assert out.finish_reason == "stop", out
        check_person(json.loads(out.text))
    assert len({o.text for o in outs}) > 10  # really sampled, not one forced string
    # the free model on the same prompts produces no JSON at all
    free = rt.generate(prompts[:5], max_tokens=20, temperature=1.0, seed=7)
    assert not any(_is_json(o.text) for o in free)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_json_object_regex_choice_and_lark_grammar(rt):
    sampled = {"temperature": 1.0, "seed": 3}
    # any JSON object: the random model's strings run on, so a cut output is checked as a
    # prefix the grammar accepts, a finished one as a parsed object
    spec = StructuredSpec(json_object=True)
    for out in rt.generate([f"p{i}" for i in range(10)], max_tokens=30, json_object=True, **sampled):
        matcher = rt.engine.call(lambda: rt.engine._matcher(spec))
        assert out.text.startswith("{") and matcher.validate_tokens(out.token_ids) == len(out.token_ids), out
        assert out.finish_reason == "length" or isinstance(json.loads(out.text), dict), out
    pattern = r"[a-z]{3}-\d{2}"
    for out in rt.generate([f"code {i}" for i in range(20)], max_tokens=20, regex=pattern, **sampled):
        assert out.finish_reason == "stop" and re.fullmatch(pattern, out.text), out
    choices = ["red", "green", "blue"]
    picked = [o.text for o in rt.generate([f"colour {i}" for i in range(20)], max_tokens=10, choice=choices, **sampled)]
    assert set(picked) <= set(choices), picked
    grammar = 'start: "(" num ("+" num)* ")"\nnum: /[0-9]/'
    for out in rt.generate([f"sum {i}" for i in range(10)], max_tokens=30, grammar=grammar, **sampled):
        assert out.finish_reason == "stop" and re.fullmatch(r"\(\d(\+\d)*\)", out.text), out
    greedy = rt.generate("colour", max_tokens=10, temperature=0.0, choice=choices)
    assert greedy.text in choices and greedy.finish_reason == "stop"


def test_max_tokens_still_cuts_a_constrained_generation(rt):
    out = rt.generate("x", max_tokens=3, temperature=0.0, regex=r"\d{30}")
    assert re.fullmatch(r"\d+", out.text) and len(out.text) < 30, out
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_streaming_a_constrained_generation(rt):
    async def run() -> list:
        return [d async for d in rt.astream("stream", max_tokens=60, temperature=1.0, seed=1, json_schema=SCHEMA)]

    deltas = asyncio.run(run())
    assert deltas[-1].finish_reason == "stop"
    check_person(json.loads("".join(d.text for d in deltas)))


def test_free_requests_are_unchanged_by_constrained_ones_in_the_same_batch(tiny_text_llama, real_model):
    """Free rows' ids with and without constrained requests beside them, in one engine batch."""
    engine = BuiltinEngine(tiny_text_llama, real_model.tokenizer, EngineConfig(num_kv_blocks=512), "tiny-text")
    tok = real_model.tokenizer
    free = [
        (tok.encode(f"free prompt {i}"), SamplingParams(max_tokens=12, temperature=t, seed=i, ignore_eos=True))
        for i, t in enumerate([0.0, 1.0, 0.7, 1.3])
    ]
    constrained = [
        (tok.encode(f"constrained {i}"), SamplingParams(max_tokens=40, temperature=1.0, seed=i, structured=spec))
        for i, spec in enumerate([{"json_schema": SCHEMA}, {"regex": r"\d{5}"}, {"choice": ["yes", "no"]}])
    ]

    async def run(requests: list, first_id: int) -> list:
        async def one(cid: int, prompt: list[int], params: SamplingParams) -> tuple[list[int], str]:
            ids, text = [], ""
            async for delta in engine.generate(cid, None, params, prompt):
                ids += delta.token_ids
                text += delta.text
            engine.free_context(cid)
            return ids, text

        return await asyncio.gather(*(one(first_id + k, p, s) for k, (p, s) in enumerate(requests)))

    try:
        alone = asyncio.run(run(free, 0))
        mixed = asyncio.run(run(constrained[:2] + free + constrained[2:], 100))
        assert [ids for ids, _ in mixed[2:6]] == [ids for ids, _ in alone]
        check_person(json.loads(mixed[0][1]))
        assert re.fullmatch(r"\d{5}", mixed[1][1]) and mixed[6][1] in ("yes", "no")
        engine.wait_idle()
        engine.check_invariants()
        info = engine.runtime_info()
        assert info.num_contexts == 0 and info.num_blocks_used == 0
    finally:
        engine.close()


def test_masking_leaves_free_rows_bit_identical(tiny_text_llama, real_model):
    engine = BuiltinEngine(tiny_text_llama, real_model.tokenizer, EngineConfig(num_kv_blocks=64), "tiny-text")
    try:
        def masked() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
            spec = StructuredSpec(choice=["yes", "no"])
            reqs = [EngineRequest(i, Kind.GENERATE, None, lambda e: None) for i in range(3)]  # type: ignore[arg-type]
            reqs[1].matcher = engine._matcher(spec)
            logits = torch.randn(3, tiny_text_llama.config.vocab_size, generator=torch.Generator().manual_seed(0))
            return logits, engine._mask_structured(logits, logits, [(r, None) for r in reqs]), [i for i in range(3)]

        logits, out, _ = engine.call(masked)
        assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
        allowed = torch.isfinite(out[1]).nonzero()[:, 0].tolist()
        texts = {real_model.tokenizer.decode([t]) for t in allowed}
        assert allowed and all("yes".startswith(t) or "no".startswith(t) for t in texts), texts
        assert torch.equal(out[1][allowed], logits[1][allowed])
    finally:
        engine.close()


# -- semantic functions ------------------------------------------------------------------
@P.semantic_function()
def profile(who: P.Input, card: P.Output(max_tokens=80, temperature=1.0, seed=5, json_schema=SCHEMA)):
    """Write a profile of {{who}} as JSON: {{card}}"""


def test_a_semantic_function_output_follows_its_json_schema(rt):
    for who in ("Ann", "Bob", "Cy"):
        check_person(json.loads(profile.invoke(rt, who).get(timeout=60)))
    with pytest.raises(InvalidRequestError, match="regex"):
        P.Output(regex="(")
    rt.reset()  # the function's pinned constant prefix, before the leak check
