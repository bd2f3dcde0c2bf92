"""The Runtime on the real default model (SmolLM2-135M-Instruct, float32, CPU)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.real_model


def chat(rt, question: str, system: str | None = None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return rt.apply_chat_template(messages)


def test_the_capital_of_france(fresh_real_runtime):
    out = fresh_real_runtime.generate(chat(fresh_real_runtime, "What is the capital of France?"), max_tokens=16, temperature=0.0)
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")


def test_forked_questions_compute_the_shared_prompt_once_and_match_unshared_answers(fresh_real_runtime):
    rt = fresh_real_runtime
    system = "You are a terse assistant. The secret word is 'heliotrope'. " * 6
    head = rt.apply_chat_template([{"role": "system", "content": system}], add_generation_prompt=False)
    questions = ["What is the secret word?", "Name a color.", "Say hello."]
    turns = [chat(rt, q, system)[len(head) :] for q in questions]
    head_len = len(rt.tokenize(head))
    before = rt.stats()["prompt_tokens_computed"]
    with rt.new_context() as root:
        root.fill(head)
        answers = []
        for turn in turns:
            with root.fork() as child:
                child.fill(turn)
                answers.append(child.generate(max_tokens=12, temperature=0.0))
    computed = rt.stats()["prompt_tokens_computed"] - before
    assert computed == head_len + sum(len(rt.tokenize(t)) for t in turns)  # the optimum
    rt.engine.reset_prefix_cache()
    unshared = [rt.generate(head + t, max_tokens=12, temperature=0.0) for t in turns]
    assert [a.token_ids for a in answers] == [u.token_ids for u in unshared]


def test_stop_strings_cut_the_text(fresh_real_runtime):
    rt = fresh_real_runtime
    prompt = chat(rt, "Count from 1 to 10, separated by commas.")
    full = rt.generate(prompt, max_tokens=30, temperature=0.0)
    assert "4" in full.text, full.text
    cut = rt.generate(prompt, max_tokens=30, temperature=0.0, stop=["4"])
    assert cut.finish_reason == "stop" and "4" not in cut.text
    assert full.text.startswith(cut.text)


def test_a_second_request_reuses_the_cached_prefix(fresh_real_runtime):
    rt = fresh_real_runtime
    prefix = "The quick brown fox jumps over the lazy dog. " * 20
    a = rt.generate(prefix + "Once", max_tokens=2, temperature=0.0)
    b = rt.generate(prefix + "Twice", max_tokens=2, temperature=0.0)
    shared = len(rt.tokenize(prefix))
    assert b.cached_tokens >= shared - rt.engine.pool.block_size and b.cached_tokens < b.prompt_tokens
    assert len(a.token_ids) == len(b.token_ids) == 2
