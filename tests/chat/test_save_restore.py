"""Chat sessions saved to disk and restored (issue 12, part 3): `session.save(path)` then
`rt.chat(restore=path)` in a new runtime gives back the conversation with its KV; the next turn
computes only its new tokens and gives the same token ids as never saving. Bad files are typed
errors that change nothing."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import parrot_core as P
from parrot_core.chat.saved import CHAT_KEY
from parrot_core.chat.transcript import common_prefix_len
from parrot_core.engines.builtin import kv_io
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from parrot_core.engines.builtin.model import LlamaModel
from parrot_core.errors import InvalidRequestError, UnknownSessionError
from tests.chat.conftest import SYSTEM, assert_tokens_are_the_conversation, computed, engine_tokens
from tests.frontend.conftest import assert_no_leak

pytestmark = pytest.mark.timeout(300)
GREEDY = dict(temperature=0.0)
FIRST = ["Hello there.", "What is two plus two?"]
THEN = ["And three plus three?", "Thanks, goodbye."]
CONFIG = P.ChatSessionConfig(max_context_length=900, cache_warmup=True)


def talk(session: P.ChatSession, questions: list[str], max_tokens: int = 8) -> list[P.GenerateOutput]:
    return [session.send(q, max_tokens=max_tokens, **GREEDY) for q in questions]


def snapshot(rt: P.Runtime) -> tuple[Any, ...]:
    """Everything a failed restore must leave as it was."""
    rt.engine.wait_idle()
    stats = rt.stats()
    keys = ("contexts_live", "engine_contexts", "blocks_used", "prompt_tokens_computed", "generation_tokens")
    return (rt.chat_sessions.all_sessions(), len(rt.chat_sessions.prefixes), *(stats[k] for k in keys))


def closed_after_check(rt: P.Runtime) -> None:
    assert_no_leak(rt)
    rt.close()


@pytest.fixture
def saved(make_chat_runtime, tmp_path) -> dict[str, Any]:
    """A two-turn conversation saved to a file from a runtime that is then closed, and what it
    was just before the save."""
    rt = make_chat_runtime(checked=False)
    path = tmp_path / "chat.safetensors"
    with rt.chat(system=SYSTEM, session_id="alice", config=CONFIG) as s:
        outs = talk(s, FIRST)
        assert outs[-1].finish_reason == "length"  # its last token's KV is computed at the save
        state = s._state
        before = {
            "messages": s.messages,
            "token_ids": s.token_ids,
            "segments": state.segments,
            "info": s.cache_info(),
        }
        assert s.save(path) == len(s.token_ids)
        assert s.messages == before["messages"] and s.token_ids == before["token_ids"]  # saving changes nothing
    closed_after_check(rt)
    return {"path": path, **before}


def never_saved(make_chat_runtime) -> list[P.GenerateOutput]:
    """The whole conversation in one runtime, never saved."""
    rt = make_chat_runtime()
    with rt.chat(system=SYSTEM, config=CONFIG) as s:
        talk(s, FIRST)
        return talk(s, THEN)


@pytest.mark.parametrize("block_size", [16, 8, 3])
def test_restored_in_a_new_runtime_the_conversation_goes_on_exactly_computing_only_new_tokens(
    make_chat_runtime, saved, block_size
):
    reference = never_saved(make_chat_runtime)
    rt = make_chat_runtime(block_size=block_size)
    c0 = computed(rt)
    with rt.chat(restore=saved["path"]) as s:
        assert computed(rt) == c0  # nothing computed: the KV comes from the file
        assert s.session_id == "alice" and s.config == CONFIG and s.system_prompt == SYSTEM
        assert s.messages == saved["messages"] and s.token_ids == saved["token_ids"]
        assert s._state.segments == saved["segments"]  # text and token ids: validation stays token-exact
        assert s.cache_info() == saved["info"]
        assert engine_tokens(rt, s) == saved["token_ids"]
        assert not s.should_invalidate(s.messages)
        assert_tokens_are_the_conversation(rt, s)

        for i, want in enumerate(reference):
            before, c0 = s.token_ids, computed(rt)
            out = s.send(THEN[i], max_tokens=8, **GREEDY)
            assert out.token_ids == want.token_ids and out.text == want.text
            assert out.cached_tokens == len(before)
            # only the new turn's tokens: the restored reply's last token came with the file; a
            # later reply cut at max_tokens has its last token computed by the next turn, as always
            new = out.prompt_tokens - len(before)
            assert computed(rt) - c0 == new + (i > 0 and reference[i - 1].finish_reason == "length")
            assert_tokens_are_the_conversation(rt, s)


def test_a_restore_shares_the_system_prompt_and_a_copy_goes_on_like_the_original(make_chat_runtime, tmp_path):
    rt = make_chat_runtime()
    path = tmp_path / "chat.safetensors"
    with rt.chat(system=SYSTEM, session_id="original") as s:
        talk(s, FIRST)
        s.save(path)
        with pytest.raises(InvalidRequestError, match="already exists"):  # the saved id is in use
            rt.chat(restore=path)
        c0 = computed(rt)
        with rt.chat(restore=path, session_id="copy") as copy:
            assert computed(rt) == c0
            assert len(rt.chat_sessions.prefixes) == 1  # one shared system-prompt context, not two
            assert copy.cache_info()["shared_prefix_tokens"] == s.cache_info()["shared_prefix_tokens"] > 0
            assert copy._state.root is s._state.root
            assert rt.stats()["contexts_live"] == 3  # the shared prompt and one context per session
            assert sorted(rt.chat_sessions.all_sessions()) == ["copy", "original"]
            a, b = talk(s, THEN[:1])[0], talk(copy, THEN[:1])[0]
            assert a.token_ids == b.token_ids and s.token_ids == copy.token_ids
            assert_tokens_are_the_conversation(rt, copy)
        assert rt.chat_sessions.all_sessions() == ["original"]


def test_a_restore_into_a_runtime_that_already_shares_the_system_prompt_computes_nothing(make_chat_runtime, saved):
    rt = make_chat_runtime(block_size=4)
    with rt.chat(system=SYSTEM, config=CONFIG) as other:  # fills the shared system prompt
        root = other._state.root
        c0 = computed(rt)
        with rt.chat_sessions.restore_session(saved["path"], session_id="bob") as s:
            assert computed(rt) == c0
            assert s._state.root is root and len(rt.chat_sessions.prefixes) == 1
            assert s.token_ids == saved["token_ids"] and engine_tokens(rt, s) == saved["token_ids"]
            out = s.send(THEN[0], max_tokens=8, **GREEDY)
            assert out.cached_tokens == len(saved["token_ids"])
            assert_tokens_are_the_conversation(rt, s)


def test_after_a_restore_an_edited_history_reuses_the_longest_common_token_prefix(
    make_chat_runtime, saved, scratch_rt
):
    rt = make_chat_runtime(block_size=8)
    with rt.chat(restore=saved["path"]) as s:
        old = s.token_ids
        edited = s.messages
        assert edited[1]["content"] == FIRST[0]
        edited[1]["content"] = "Hello over there."
        assert s.should_invalidate(edited)
        s.messages = edited
        c0 = computed(rt)
        out = s.send(THEN[0], max_tokens=8, **GREEDY)
        prompt = s.token_ids[: len(s.token_ids) - len(out.token_ids)]
        common = common_prefix_len(old, prompt)
        assert s.cache_info()["shared_prefix_tokens"] < common < len(old)  # past the system prompt, into the edit
        assert out.cached_tokens == common and computed(rt) - c0 == len(prompt) - common
        assert rt.engine.tokenizer.decode(prompt[:common], skip_special_tokens=False).endswith("Hello")
        assert_tokens_are_the_conversation(rt, s)
        assert scratch_rt.generate(prompt, max_tokens=8, **GREEDY).token_ids == out.token_ids


def test_a_session_without_a_system_prompt_restores_as_one_root_context(make_chat_runtime, tmp_path):
    path = tmp_path / "plain.safetensors"
    a = make_chat_runtime(checked=False)
    with a.chat(session_id="nosys") as s:
        talk(s, FIRST[:1])
        s.save(path)
        tokens, messages = s.token_ids, s.messages
        reference = talk(s, THEN[:1])[0]
    closed_after_check(a)
    rt = make_chat_runtime(block_size=5)
    with rt.chat(restore=path) as s:
        assert s._state.root is None and s.system_prompt is None
        assert s.messages == messages and s.token_ids == tokens and len(rt.chat_sessions.prefixes) == 0
        c0 = computed(rt)
        out = talk(s, THEN[:1])[0]
        assert out.token_ids == reference.token_ids and out.cached_tokens == len(tokens)
        assert computed(rt) - c0 == out.prompt_tokens - len(tokens)
        assert_tokens_are_the_conversation(rt, s)


def test_a_given_config_replaces_the_saved_one_and_the_dropped_turns_come_back(make_chat_runtime, tmp_path):
    path = tmp_path / "short.safetensors"
    rt = make_chat_runtime()
    with rt.chat(system=SYSTEM, session_id="short", config=P.ChatSessionConfig(max_context_length=120)) as s:
        talk(s, [f"Question number {i}, please answer." for i in range(6)])
        dropped = s.cache_info()["turns_dropped"]
        assert dropped >= 1
        s.save(path)
    with rt.chat(restore=path) as r:
        assert r.config == P.ChatSessionConfig(max_context_length=120) and r.cache_info()["turns_dropped"] == dropped
    bigger = P.ChatSessionConfig(max_context_length=600, cache_warmup=False)
    with rt.chat(restore=path, config=bigger) as r:
        assert r.config == bigger and r.cache_info()["turns_dropped"] == dropped


async def test_async_save_and_restore(make_chat_runtime, tmp_path):
    rt = make_chat_runtime()
    path = tmp_path / "async.safetensors"
    with rt.chat(system=SYSTEM) as s:
        await s.asend(FIRST[0], max_tokens=6, **GREEDY)
        assert await s.asave(path) == len(s.token_ids)
        copy = await rt.chat_sessions.arestore_session(path, session_id="async-copy")
        with copy:
            assert copy.token_ids == s.token_ids and copy.messages == s.messages
            a, b = await s.asend(FIRST[1], max_tokens=6, **GREEDY), await copy.asend(FIRST[1], max_tokens=6, **GREEDY)
            assert a.token_ids == b.token_ids


@pytest.mark.parametrize("system", [SYSTEM, None])
def test_a_session_closed_while_it_is_restored_keeps_nothing(make_chat_runtime, tmp_path, system):
    rt = make_chat_runtime()
    path = tmp_path / "closing.safetensors"
    with rt.chat(system=system, session_id="orig") as s:
        talk(s, FIRST[:1])
        s.save(path)
    before = snapshot(rt)
    engine_import = rt.engine.import_context

    async def import_then_close(context_id: int, kv: Any) -> None:
        await engine_import(context_id, kv)
        rt.chat_sessions._get("closing")._close_now()  # what Runtime.close() / reset() do, mid-restore

    rt.engine.import_context = import_then_close
    with pytest.raises(UnknownSessionError, match="closed"):
        rt.chat(restore=path, session_id="closing")
    assert snapshot(rt) == before  # no session, shared prompt, context or block kept


# -- errors --------------------------------------------------------------------------------------


def other_model_runtime(tiny_chat_llama: LlamaModel, real_model: Any) -> P.Runtime:
    """The same tiny architecture and tokenizer, other weights (another seed)."""
    other = LlamaModel.random(tiny_chat_llama.config, seed=1, dtype=torch.float64)
    return P.Runtime(engine=BuiltinEngine(other, real_model.tokenizer, EngineConfig(num_kv_blocks=256, dtype=torch.float64), "tiny"))


def header_bytes(path: Path) -> tuple[int, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return n, data


def test_bad_files_are_typed_errors_that_change_nothing(make_chat_runtime, saved, tmp_path, tiny_chat_llama, real_model):
    rt = make_chat_runtime()
    with rt.chat(system=SYSTEM, session_id="alice") as bystander:  # the saved id is taken here
        talk(bystander, FIRST[:1])
        before = snapshot(rt)

        def refused(path: Any, match: str, error: type[Exception] = P.ContextFileError, **kwargs: Any) -> None:
            with pytest.raises(error, match=match):
                rt.chat(restore=path, **{"session_id": "restored", **kwargs})
            assert snapshot(rt) == before

        # a truncated file
        truncated = tmp_path / "truncated.safetensors"
        truncated.write_bytes(saved["path"].read_bytes()[: saved["path"].stat().st_size // 2])
        refused(truncated, "damaged or truncated")
        # the chat state edited inside the header (same length, so the file still parses): the checksum covers it
        n, data = header_bytes(saved["path"])
        assert FIRST[0].encode() in data[8 : 8 + n]
        edited = tmp_path / "edited.safetensors"
        edited.write_bytes(data.replace(FIRST[0].encode(), b"Jello there.", 1))
        refused(edited, "checksum")
        # a plain saved context, no chat state
        plain = tmp_path / "plain.safetensors"
        with rt.new_context() as ctx:
            ctx.fill("Just some text.")
            rt.save_context(ctx, plain)
        before = snapshot(rt)
        refused(plain, "no chat session")
        # no file, another chat format version
        refused(tmp_path / "missing.safetensors", "no saved context")
        future = tmp_path / "future.safetensors"
        rewrite_chat_state(saved["path"], future, rt.engine.kv_spec, version=2)
        refused(future, "format version 2")
        # misuse
        refused(saved["path"], "already exists", InvalidRequestError, session_id="alice")
        refused(saved["path"], "system prompt", InvalidRequestError, system=SYSTEM)
        refused(saved["path"], "ChatSessionConfig", InvalidRequestError, config={"max_context_length": 5})
        refused(42, "path", InvalidRequestError)
        assert bystander.send(FIRST[1], max_tokens=4, **GREEDY).cached_tokens > 0  # the runtime works on

    # another model (same architecture and tokenizer, another seed)
    other = other_model_runtime(tiny_chat_llama, real_model)
    try:
        before = snapshot(other)
        with pytest.raises(P.ContextFileError, match="another model"):
            other.chat(restore=saved["path"])
        assert snapshot(other) == before
        closed_after_check(other)
    finally:
        other.close()


def rewrite_chat_state(source: Path, target: Path, spec: kv_io.KVSpec, **changes: Any) -> None:
    """Copy a saved chat session, changing its chat state (written with a valid checksum)."""
    kv = kv_io.read_context_file(source, spec)
    state = {**json.loads(kv.extra[CHAT_KEY]), **changes}
    kv_io.write_context_file(target, dataclasses.replace(kv, extra={CHAT_KEY: json.dumps(state)}), spec)


def test_a_chat_state_that_does_not_add_up_to_the_tokens_is_refused(make_chat_runtime, saved, tmp_path):
    rt = make_chat_runtime()
    before = snapshot(rt)
    cases: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "short": lambda s: {"segments": s["segments"][:-1]},
        "long": lambda s: {"segments": [*s["segments"], {"text": "x", "num_tokens": 1}]},
        "no_messages": lambda s: {"messages": [{"role": "user"}]},
        "bad_config": lambda s: {"config": {"max_context_length": 0, "cache_warmup": True}},
    }
    state = json.loads(kv_io.read_context_file(saved["path"], rt.engine.kv_spec).extra[CHAT_KEY])
    for name, change in cases.items():
        target = tmp_path / f"{name}.safetensors"
        rewrite_chat_state(saved["path"], target, rt.engine.kv_spec, **change(state))
        with pytest.raises(P.ContextFileError):
            rt.chat(restore=target)
        assert snapshot(rt) == before, name
    # a system prompt whose tokens are not what this model's tokenizer makes of it
    target = tmp_path / "tokenizer.safetensors"
    system = {**state["system"], "text": state["system"]["text"].replace("terse", "tense")}
    rewrite_chat_state(saved["path"], target, rt.engine.kv_spec, system=system)
    with pytest.raises(P.ContextFileError, match="another tokenizer"):
        rt.chat(restore=target)
    assert snapshot(rt) == before


def test_what_cannot_be_saved_is_a_typed_error(chat_rt, tmp_path):
    rt = chat_rt
    with rt.chat() as empty:  # no system prompt, no turn: no KV
        with pytest.raises(InvalidRequestError, match="no KV"):
            empty.save(tmp_path / "empty.safetensors")
    with rt.chat(system=SYSTEM) as s:
        talk(s, FIRST[:1])
        with pytest.raises(P.ContextFileError, match="cannot write"):
            s.save(tmp_path / "no-such-folder" / "x.safetensors")
        s.messages = [*s.messages, {"role": "user", "content": "x", "meta": object()}]
        with pytest.raises(InvalidRequestError, match="not JSON"):
            s.save(tmp_path / "odd.safetensors")
        assert not (tmp_path / "odd.safetensors").exists()
        s.invalidate_cache()
        assert s.system_prompt == SYSTEM
        with pytest.raises(InvalidRequestError, match="no KV"):
            s.save(tmp_path / "invalidated.safetensors")
    with pytest.raises(UnknownSessionError):
        s.save(tmp_path / "closed.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_kv_io_extra_is_stored_checked_and_optional(tmp_path, tiny_llama):
    engine = BuiltinEngine(tiny_llama(seed=0), None, EngineConfig(block_size=4, num_kv_blocks=16, dtype=torch.float64))
    try:
        spec = engine.kv_spec
        kv = kv_io.ContextKV([5, 6, 7], torch.zeros(2, 3, 2, 16, dtype=torch.float64), torch.ones(2, 3, 2, 16, dtype=torch.float64))
        kv_io.write_context_file(tmp_path / "none.safetensors", kv, spec)
        with safe_open(str(tmp_path / "none.safetensors"), framework="pt") as f:
            assert "extra" not in f.metadata()  # a file without extra is the format as before
        assert kv_io.read_context_file(tmp_path / "none.safetensors", spec).extra == {}
        kv2 = kv_io.ContextKV(kv.token_ids, kv.k, kv.v, None, {"a": "1", "b": "é"})
        kv_io.write_context_file(tmp_path / "extra.safetensors", kv2, spec)
        assert kv_io.read_context_file(tmp_path / "extra.safetensors", spec).extra == {"a": "1", "b": "é"}
        with pytest.raises(InvalidRequestError, match="strings to strings"):
            bad = dataclasses.replace(kv, extra={"a": 1})
            kv_io.write_context_file(tmp_path / "bad.safetensors", bad, spec)
        assert not (tmp_path / "bad.safetensors").exists()
    finally:
        engine.close()


# -- the real model ------------------------------------------------------------------------------


@pytest.mark.real_model
def test_the_real_model_restores_a_conversation_exactly(real_model, real_llama, tmp_path):
    def make(block_size: int) -> P.Runtime:
        config = EngineConfig(num_kv_blocks=96 * 16 // block_size, block_size=block_size)
        return P.Runtime(engine=BuiltinEngine(real_llama, real_model.tokenizer, config, real_model.model_name))

    system = "You are a helpful assistant. Answer briefly."
    first = ["What is the capital of France?", "And the capital of Germany?"]
    then = "Which of the two cities is larger?"
    path = tmp_path / "real.safetensors"
    runtimes = [make(16)]
    try:
        with runtimes[0].chat(system=system) as s:  # never saved: the reference
            talk(s, first, max_tokens=10)
            reference = s.send(then, max_tokens=10, **GREEDY)
        with runtimes[0].chat(system=system, session_id="real") as s:
            talk(s, first, max_tokens=10)
            s.save(path)
            tokens = s.token_ids
        closed_after_check(runtimes[0])
        runtimes.append(make(8))
        rt = runtimes[1]
        c0 = computed(rt)
        with rt.chat(restore=path) as s:
            assert s.token_ids == tokens and "Paris" in s.messages[2]["content"] and computed(rt) == c0
            out = s.send(then, max_tokens=10, **GREEDY)
            assert out.token_ids == reference.token_ids and out.cached_tokens == len(tokens)
            assert computed(rt) - c0 == out.prompt_tokens - len(tokens)
            assert_tokens_are_the_conversation(rt, s)
        closed_after_check(rt)
    finally:
        for rt in runtimes:
            rt.close()
