"""A chat session on the real default model (SmolLM2-135M-Instruct, float32)."""

from __future__ import annotations

import pytest

from parrot_core import Runtime
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from tests.chat.conftest import assert_tokens_are_the_conversation, computed
from tests.frontend.conftest import assert_no_leak

pytestmark = pytest.mark.real_model

QUESTIONS = [
    "What is the capital of France?",
    "And the capital of Germany?",
    "Which of the two cities is larger?",
    "Name a famous museum there.",
    "What language do people speak there?",
    "Thank you, goodbye!",
]


@pytest.fixture
def real_chat_rt(real_model, real_llama):
    rt = Runtime(engine=BuiltinEngine(real_llama, real_model.tokenizer, EngineConfig(num_kv_blocks=96), real_model.model_name))
    yield rt
    try:
        assert_no_leak(rt)
    finally:
        rt.close()


def test_six_turns_reuse_the_conversation_and_match_a_replay_from_scratch(real_chat_rt, real_model, real_llama):
    rt = real_chat_rt
    system = "You are a helpful assistant. Answer briefly."
    turns = []
    with rt.chat(system=system) as s:
        last_reason = None
        for question in QUESTIONS:
            before, c0 = s.token_ids, computed(rt)
            out = s.send(question, max_tokens=12, temperature=0.0)
            after = s.token_ids
            prompt = after[: len(after) - len(out.token_ids)]
            assert after[len(prompt) :] == out.token_ids  # the reply's token ids, as generated
            assert prompt[: len(before)] == before  # everything before, the model's replies included
            assert out.cached_tokens == len(before) and out.prompt_tokens == len(prompt)
            # only the new tokens are computed (and the last reply token, whose KV a sampled
            # token only gets when something follows it)
            assert computed(rt) - c0 == len(prompt) - len(before) + (last_reason == "length")
            # the new tokens: the previous reply's end-of-turn marker (the engine never appends the
            # EOS that ends a reply), then the user turn and the assistant's header
            delta = real_model.tokenizer.decode(prompt[len(before) :], skip_special_tokens=False)
            user_turn = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
            assert delta == (user_turn if not turns else "<|im_end|>\n" + user_turn)
            assert_tokens_are_the_conversation(rt, s)
            turns.append((prompt, out.token_ids))
            last_reason = out.finish_reason
        assert "Paris" in s.messages[2]["content"]

    scratch = Runtime(engine=BuiltinEngine(real_llama, real_model.tokenizer, EngineConfig(num_kv_blocks=96, enable_prefix_caching=False)))
    with scratch:
        for prompt, reply in turns:  # a fresh context holding the session's exact tokens, then generate
            assert scratch.generate(prompt, max_tokens=12, temperature=0.0).token_ids == reply
        assert_no_leak(scratch)
