"""Chat sessions on a tiny float64 model with the real tokenizer and SmolLM2's chat template."""

from __future__ import annotations

import threading

import pytest

import parrot_core as P
from parrot_core.chat.transcript import common_prefix_len
from parrot_core.engines.builtin.tokenizer import Tokenizer
from parrot_core.errors import EngineError, InvalidRequestError, RequestTooLargeError, RuntimeClosedError, UnknownSessionError
from tests.chat.conftest import SYSTEM, assert_tokens_are_the_conversation, computed


def system_ids(rt: P.Runtime, system: str) -> list[int]:
    return rt.tokenize_prompt(rt.apply_chat_template([{"role": "system", "content": system}], add_generation_prompt=False))


def test_each_turn_reuses_the_whole_conversation_and_computes_only_its_new_tokens(chat_rt, scratch_rt):
    rt = chat_rt
    with rt.chat(system=SYSTEM) as s:
        root = system_ids(rt, SYSTEM)
        assert s.token_ids == root  # cache_warmup: the system prompt is filled at once
        info = s.cache_info()
        assert info["is_prefilled"] and info["has_cache"] and info["context_length"] == len(root) == info["shared_prefix_tokens"]
        last_reason = None
        for i, question in enumerate(["Hello there.", "What is two plus two?", "And three plus three?", "Thanks."]):
            before, c0 = s.token_ids, computed(rt)
            out = s.send(question, max_tokens=8, temperature=0.0)
            after = s.token_ids
            prompt = after[: len(after) - len(out.token_ids)]
            assert after[len(prompt) :] == out.token_ids  # the reply's tokens as generated
            assert prompt[: len(before)] == before  # the previous conversation, replies included, is kept
            assert out.cached_tokens == len(before) and out.prompt_tokens == len(prompt)
            # computed: the new tokens, plus the last reply token if that reply hit max_tokens (a
            # sampled token's KV is only computed when something follows it)
            assert computed(rt) - c0 == len(prompt) - len(before) + (last_reason == "length")
            assert_tokens_are_the_conversation(rt, s)
            assert scratch_rt.generate(prompt, max_tokens=8, temperature=0.0).token_ids == out.token_ids
            assert s.messages[-2:] == [{"role": "user", "content": question}, {"role": "assistant", "content": out.text}]
            assert s.cache_info()["message_count"] == 1 + 2 * (i + 1)
            last_reason = out.finish_reason


def test_stream_yields_the_reply_and_an_abandoned_stream_leaves_the_session_as_it_was(chat_rt):
    rt = chat_rt
    with rt.chat(system=SYSTEM) as s, rt.chat(system=SYSTEM) as twin:
        deltas = list(s.stream("Tell me a story.", max_tokens=6, temperature=0.0))
        reference = twin.send("Tell me a story.", max_tokens=6, temperature=0.0)
        assert [t for d in deltas for t in d.token_ids] == reference.token_ids
        assert "".join(d.text for d in deltas) == reference.text
        assert deltas[-1].finish_reason == reference.finish_reason and all(d.finish_reason is None for d in deltas[:-1])
        assert s.messages == twin.messages and s.token_ids == twin.token_ids

        messages, tokens = s.messages, s.token_ids
        stream = s.stream("Another one.", max_tokens=20, temperature=0.0)
        next(stream)
        stream.close()  # abandoned mid-reply
        rt.engine.wait_idle()
        assert s.messages == messages and s.token_ids == tokens
        assert rt.stats()["contexts_live"] == 3  # the shared system prompt and the two sessions' contexts
        out = s.send("Another one.", max_tokens=4, temperature=0.0)
        assert out.cached_tokens == len(tokens)


async def test_async_forms(chat_rt):
    rt = chat_rt
    with rt.chat(system=SYSTEM) as s, rt.chat(system=SYSTEM) as twin:
        out = await s.asend("Hi!", max_tokens=5, temperature=0.0)
        ref = twin.send("Hi!", max_tokens=5, temperature=0.0)
        assert out.token_ids == ref.token_ids
        ids = [t async for d in s.astream("Again.", max_tokens=5, temperature=0.0) for t in d.token_ids]
        assert ids == twin.send("Again.", max_tokens=5, temperature=0.0).token_ids
        assert s.token_ids == twin.token_ids


def test_editing_an_earlier_message_reuses_exactly_the_longest_common_token_prefix(chat_rt, scratch_rt):
    rt = chat_rt
    with rt.chat(system=SYSTEM) as s:
        for q in ["My cat is called Tom.", "Tell me about cats please.", "What about dogs?"]:
            s.send(q, max_tokens=6, temperature=0.0)
        old = s.token_ids
        edited = s.messages
        assert edited[3]["content"] == "Tell me about cats please."
        edited[3]["content"] = "Tell me about cats now."
        assert not s.should_invalidate(s.messages) and s.should_invalidate(edited)
        s.messages = edited
        assert s.messages == edited and s.token_ids == old  # nothing is computed until the next turn
        c0 = computed(rt)
        out = s.send("And birds?", max_tokens=6, temperature=0.0)
        prompt = s.token_ids[: len(s.token_ids) - len(out.token_ids)]
        common = common_prefix_len(old, prompt)
        assert common < len(old)
        assert out.cached_tokens == common and out.prompt_tokens == len(prompt)
        assert computed(rt) - c0 == len(prompt) - common  # the rest, never KV of a changed token
        # token-exact: the unchanged words of the edited message are reused too
        assert rt.engine.tokenizer.decode(prompt[:common], skip_special_tokens=False).endswith("Tell me about cats")
        assert_tokens_are_the_conversation(rt, s)
        assert scratch_rt.generate(prompt, max_tokens=6, temperature=0.0).token_ids == out.token_ids


def test_a_new_system_prompt_reuses_the_tokens_it_shares_with_the_old_one(chat_rt):
    rt = chat_rt
    with rt.chat(system="You are a terse assistant. Be kind.") as s:
        s.send("Hi.", max_tokens=4, temperature=0.0)
        old = s.token_ids
        s.messages = [{"role": "system", "content": "You are a terse assistant. Be rude."}, *s.messages[1:]]
        c0 = computed(rt)
        out = s.send("Bye.", max_tokens=4, temperature=0.0)
        prompt = s.token_ids[: len(s.token_ids) - len(out.token_ids)]
        assert out.cached_tokens == common_prefix_len(old, prompt) > 5
        assert computed(rt) - c0 == len(prompt) - out.cached_tokens
        assert s.cache_info()["shared_prefix_tokens"] == len(system_ids(rt, "You are a terse assistant. Be rude."))
        assert len(rt.chat_sessions.prefixes) == 1  # the old system prompt's context went with its last user
        assert_tokens_are_the_conversation(rt, s)


def test_a_reply_cut_by_a_stop_string_is_reused_only_up_to_the_cut(chat_rt):
    rt = chat_rt
    with rt.chat(system=SYSTEM) as probe:
        full = probe.send("Hello.", max_tokens=8, temperature=0.0)
    stop = rt.detokenize(full.token_ids[3:4]).strip()
    assert stop
    with rt.chat(system=SYSTEM) as s:
        out = s.send("Hello.", max_tokens=8, temperature=0.0, stop=[stop])
        assert out.finish_reason == "stop" and stop not in out.text
        held = s.token_ids  # the context holds the tokens generated, the stop string's too
        assert held[-len(out.token_ids) :] == out.token_ids and stop in rt.detokenize(out.token_ids)
        nxt = s.send("Go on.", max_tokens=4, temperature=0.0)
        assert nxt.cached_tokens < len(held)  # the stop string's tokens are not part of the conversation
        assert_tokens_are_the_conversation(rt, s)


def test_over_max_context_length_the_oldest_turns_go_and_the_system_prompt_stays(chat_rt):
    rt = chat_rt
    limit, max_tokens = 120, 8
    with rt.chat(system=SYSTEM, config=P.ChatSessionConfig(max_context_length=limit)) as s:
        root = system_ids(rt, SYSTEM)
        sent = [f"Question number {i}, please answer." for i in range(8)]
        for q in sent:
            c0 = computed(rt)
            out = s.send(q, max_tokens=max_tokens, temperature=0.0)
            assert out.prompt_tokens + max_tokens <= limit
            assert out.cached_tokens >= len(root)  # the system prompt is never computed again
            assert s.token_ids[: len(root)] == root
            assert_tokens_are_the_conversation(rt, s)
        info = s.cache_info()
        assert info["turns_dropped"] >= 1 and info["max_context"] == limit
        messages = s.messages
        assert messages[0] == {"role": "system", "content": SYSTEM}
        assert len(messages) == 1 + 2 * (len(sent) - info["turns_dropped"])
        assert [m["content"] for m in messages[1::2]] == sent[info["turns_dropped"] :]  # the latest turns, in order

        # a turn that can never fit is refused and changes nothing
        before = (s.messages, s.token_ids, s.cache_info())
        with pytest.raises(RequestTooLargeError, match="at most 120"):
            s.send("word " * 200, max_tokens=max_tokens)
        with pytest.raises(RequestTooLargeError):
            s.send("Hi", max_tokens=limit)
        assert (s.messages, s.token_ids, s.cache_info()) == before
        assert rt.stats()["contexts_live"] == 2


def test_a_failed_turn_leaves_the_session_as_it_was(chat_rt):
    rt = chat_rt
    with rt.chat(system=SYSTEM) as s:
        s.send("One.", max_tokens=4, temperature=0.0)
        messages, tokens = s.messages, s.token_ids
        rt.engine.fail_next_generate = True
        with pytest.raises(EngineError, match="injected"):
            s.send("Two.", max_tokens=4, temperature=0.0)
        assert s.messages == messages and s.token_ids == tokens
        rt.engine.wait_idle()
        assert rt.stats()["contexts_live"] == 2
        assert s.send("Two.", max_tokens=4, temperature=0.0).cached_tokens == len(tokens)
        assert_tokens_are_the_conversation(rt, s)


def test_two_threads_on_one_session_take_turns(chat_rt):
    rt = chat_rt
    rt.engine.hold_s = 0.02  # each generate lingers, so overlapping turns could not go unseen
    start = threading.Barrier(2)
    errors: list[BaseException] = []
    with rt.chat(system=SYSTEM) as s:

        def talk(name: str) -> None:
            try:
                start.wait()
                for i in range(3):
                    s.send(f"{name} {i}", max_tokens=3, temperature=0.0)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=talk, args=(n,)) for n in ("A", "B")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert rt.engine.max_in_flight == 1
        msgs = s.messages[1:]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * 6
        users = [m["content"] for m in msgs[::2]]
        assert [u for u in users if u[0] == "A"] == ["A 0", "A 1", "A 2"]
        assert [u for u in users if u[0] == "B"] == ["B 0", "B 1", "B 2"]
        assert_tokens_are_the_conversation(rt, s)


def test_eight_sessions_in_eight_threads_run_concurrently(chat_rt):
    rt = chat_rt
    rt.engine.barrier = 8  # the first eight generates wait for each other: serialized sessions would never get there
    errors: list[BaseException] = []

    def talk(i: int) -> None:
        try:
            with rt.chat(system=f"You are assistant number {i % 2}.") as s:
                for t in range(2):
                    s.send(f"Session {i}, turn {t}.", max_tokens=4, temperature=0.0)
                assert_tokens_are_the_conversation(rt, s)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert rt.engine.max_in_flight == 8
    assert rt.chat_sessions.all_sessions() == [] and len(rt.chat_sessions.prefixes) == 0
    # the fixture then checks that no context or block is left


def test_sessions_with_the_same_system_prompt_compute_it_once(make_chat_runtime):
    rt = make_chat_runtime(enable_prefix_caching=False)  # so nothing could be reused but the shared context
    system = "You are a helpful assistant who answers in one word. " * 3
    root = system_ids(rt, system)
    c0 = computed(rt)
    a, b = rt.chat(system=system), rt.chat(system=system)
    assert computed(rt) - c0 == len(root)
    assert a.cache_info()["shared_prefix_tokens"] == b.cache_info()["shared_prefix_tokens"] == len(root)
    assert len(rt.chat_sessions.prefixes) == 1
    assert a.send("x", max_tokens=3, temperature=0.0).cached_tokens == len(root)
    assert b.send("y", max_tokens=3, temperature=0.0).cached_tokens == len(root)
    assert rt.stats()["contexts_live"] == 3  # one system-prompt context and the two sessions' own
    a.close()
    assert rt.stats()["contexts_live"] == 2
    b.close()
    assert rt.stats()["contexts_live"] == 0

    # sessions created at the same moment in four threads: one fills it, the others wait for it
    rt.engine.hold_s = 0.05
    start = threading.Barrier(4)
    made: list[P.ChatSession] = []

    def create() -> None:
        start.wait()
        made.append(rt.chat(system=system + "Really."))

    c0 = computed(rt)
    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(made) == 4 and computed(rt) - c0 == len(system_ids(rt, system + "Really."))
    for s in made:
        s.close()


def test_fork_shares_the_kv_and_then_goes_its_own_way(chat_rt, scratch_rt):
    rt = chat_rt
    with rt.chat(system=SYSTEM) as s:
        s.send("My name is Ann.", max_tokens=6, temperature=0.0)
        at_fork = s.token_ids
        used, c0 = rt.stats()["blocks_used"], computed(rt)
        with s.fork() as f:
            assert f.session_id != s.session_id and f.session_id in rt.chat_sessions.all_sessions()
            assert f.token_ids == at_fork and f.messages == s.messages
            assert rt.stats()["blocks_used"] == used and computed(rt) == c0  # shared, not copied
            fo = f.send("What is my name?", max_tokens=5, temperature=0.0)
            so = s.send("Where do I live?", max_tokens=5, temperature=0.0)
            assert fo.cached_tokens == so.cached_tokens == len(at_fork)
            assert f.messages[-2]["content"] == "What is my name?" and s.messages[-2]["content"] == "Where do I live?"
            prompt = f.token_ids[: len(f.token_ids) - len(fo.token_ids)]
            assert scratch_rt.generate(prompt, max_tokens=5, temperature=0.0).token_ids == fo.token_ids
            assert_tokens_are_the_conversation(rt, f)
            assert_tokens_are_the_conversation(rt, s)
        assert f.closed and f.session_id not in rt.chat_sessions.all_sessions()


def test_clear_invalidate_close_and_bad_input(chat_rt):
    rt = chat_rt
    s = rt.chat(system=SYSTEM, session_id="mine")
    with pytest.raises(InvalidRequestError, match="already exists"):
        rt.chat(session_id="mine")
    s.send("One.", max_tokens=3, temperature=0.0)
    s.add_message("user", "Two.")
    s.add_message("assistant", "Three.")
    assert [m["content"] for m in s.messages[-2:]] == ["Two.", "Three."]
    for bad in ([{"role": "user"}], [{"role": "", "content": "x"}], "hello", [{"role": "user", "content": 3}]):
        with pytest.raises(InvalidRequestError):
            s.messages = bad
    with pytest.raises(InvalidRequestError):
        s.send(42)
    with pytest.raises(InvalidRequestError):
        s.send("x", max_tokens=0)
    with pytest.raises(InvalidRequestError):
        s.send("x", colour="red")

    s.clear_messages()
    assert s.messages == [{"role": "system", "content": SYSTEM}]
    assert s.token_ids == system_ids(rt, SYSTEM) and rt.stats()["contexts_live"] == 1
    s.send("Hi.", max_tokens=3, temperature=0.0)

    s.invalidate_cache()
    info = s.cache_info()
    assert not info["has_cache"] and not info["is_prefilled"] and info["context_length"] == 0 and info["message_count"] == 3
    assert rt.stats()["contexts_live"] == 0 and not s.should_invalidate(s.messages)
    out = s.send("Hello again.", max_tokens=3, temperature=0.0)
    assert out.prompt_tokens == len(s.token_ids) - len(out.token_ids)
    assert_tokens_are_the_conversation(rt, s)

    s.close()
    s.close()  # idempotent
    assert s.closed and "mine" not in rt.chat_sessions
    with pytest.raises(UnknownSessionError):
        s.send("x")
    with pytest.raises(InvalidRequestError):
        P.ChatSessionConfig(max_context_length=0)


def test_the_session_manager(chat_rt):
    rt = chat_rt
    chats = rt.chat_sessions
    assert isinstance(chats, P.ChatSessionManager) and rt.chat_sessions is chats
    default = chats.get_session()
    assert default.session_id == "default" and chats.get_session(None) is default and default.messages == []
    config = P.ChatSessionConfig(max_context_length=512, cache_warmup=False)
    a = chats.get_session("a", config)
    assert a.config == config and chats.get_session("a") is a
    with pytest.raises(InvalidRequestError):
        chats.get_session("a", P.ChatSessionConfig())
    b = rt.chat(system=SYSTEM, session_id="b", config=config)
    assert not b.cache_info()["is_prefilled"]  # no warmup: filled at the first turn
    assert sorted(chats.all_sessions()) == ["a", "b", "default"] and len(chats) == 3
    default.send("Hello.", max_tokens=3, temperature=0.0)  # no system prompt: the template's default one
    assert_tokens_are_the_conversation(rt, default)
    b.send("Hello.", max_tokens=3, temperature=0.0)
    chats.clear_session("b")
    assert b.messages == [{"role": "system", "content": SYSTEM}]
    live = rt.stats()["contexts_live"]
    chats.remove_session("b")
    assert b.closed and "b" not in chats and rt.stats()["contexts_live"] == live - 1
    for missing in ("b", "nobody"):
        with pytest.raises(UnknownSessionError):
            chats.remove_session(missing)
        with pytest.raises(UnknownSessionError):
            chats.clear_session(missing)
    chats.clear_session()  # the default session
    assert default.messages == []
    chats.remove_session()
    chats.remove_session("a")
    assert chats.all_sessions() == []


def test_runtime_close_closes_every_chat_session(make_chat_runtime):
    rt = make_chat_runtime(checked=False)
    a = rt.chat(system=SYSTEM)
    a.send("Hi.", max_tokens=3, temperature=0.0)
    b = rt.chat_sessions.get_session()
    b.send("Hello.", max_tokens=3, temperature=0.0)
    rt.engine.wait_idle()
    rt.check_invariants()
    rt.close()
    assert a.closed and b.closed and rt.contexts.contexts == {}  # every chat context was freed, not dropped
    with pytest.raises(RuntimeClosedError):
        a.send("Again.")
    with pytest.raises(RuntimeClosedError):
        rt.chat()
    a.close()  # quiet after the runtime closed


def test_a_model_without_a_chat_template_is_a_clear_error(make_chat_runtime, real_model):
    bare = Tokenizer(real_model.tokenizer.backend, eos_token_id=real_model.tokenizer.eos_token_id)
    rt = make_chat_runtime(tokenizer=bare)
    with pytest.raises(InvalidRequestError, match="no chat template"):
        rt.chat()
    assert rt.chat_sessions.all_sessions() == []


# A template of another family: a BOS, the system prompt inside the first user turn, trimmed
# contents (a reply that starts with a space no longer matches its own tokens).
OTHER_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user\n"
    "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "{{ m['content'] | trim }}<|im_end|>\n{% elif m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{{ m['content'] | trim }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_any_chat_template_the_model_carries(make_chat_runtime, real_model):
    tok = Tokenizer(real_model.tokenizer.backend, bos_token_id=0, eos_token_id=2, chat_template=OTHER_TEMPLATE, add_bos_token=True)
    rt = make_chat_runtime(tokenizer=tok)
    scratch = make_chat_runtime(tokenizer=tok, enable_prefix_caching=False)
    with rt.chat(system=SYSTEM) as s:
        assert s.cache_info()["shared_prefix_tokens"] == 1  # the template renders only the BOS before the first user turn
        diverged, last_reason = 0, None
        for q in ["  First question.  ", "Second question.", "Third."]:
            before, c0 = s.token_ids, computed(rt)
            out = s.send(q, max_tokens=6, temperature=0.0)
            prompt = s.token_ids[: len(s.token_ids) - len(out.token_ids)]
            assert prompt[0] == 0  # the sequence starts with the BOS
            assert tok.decode(prompt, skip_special_tokens=False) == rt.apply_chat_template(s.messages[:-1])
            common = common_prefix_len(before, prompt)
            diverged += common < len(before)
            assert out.cached_tokens == common
            assert computed(rt) - c0 == len(prompt) - common + (last_reason == "length" and common == len(before))
            assert scratch.generate(prompt, max_tokens=6, temperature=0.0).token_ids == out.token_ids
            last_reason = out.finish_reason
        assert diverged  # a trimmed reply was reused only up to where its text changed


def test_a_turn_returns_the_logprobs_of_its_reply_and_refuses_prompt_logprobs(chat_rt, scratch_rt):
    """A turn's `logprobs=k` are the reply's, equal to a from-scratch run of the same tokens;
    `prompt_logprobs` would describe only the turn's new tokens, so it is refused."""
    rt = chat_rt
    with rt.chat(system=SYSTEM) as s:
        s.send("Hello there.", max_tokens=4, temperature=0.0)
        out = s.send("And you?", max_tokens=5, temperature=0.0, logprobs=2)
        prompt = s.token_ids[: len(s.token_ids) - len(out.token_ids)]
        ref = scratch_rt.generate(prompt, max_tokens=5, temperature=0.0, logprobs=2)
        assert [lp.token_id for lp in out.logprobs] == out.token_ids == ref.token_ids
        assert [lp.logprob for lp in out.logprobs] == pytest.approx([lp.logprob for lp in ref.logprobs], abs=1e-9)
        streamed = [lp for d in s.stream("Bye.", max_tokens=3, temperature=0.0, logprobs=0) for lp in d.logprobs or []]
        assert len(streamed) == 3
        with pytest.raises(InvalidRequestError, match="prompt_logprobs"):
            s.send("No.", max_tokens=2, prompt_logprobs=1)
