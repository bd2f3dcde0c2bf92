"""A real uvicorn server driven by the official `openai` client."""

from __future__ import annotations

import httpx
import openai
import pytest

from parrot_core import Runtime
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from tests.server.conftest import TINY_MAX_LEN, client_for, settle



def test_completion_matches_the_runtime_and_reports_usage(served):
    rt, _, client = served
    prompt = "The quick brown fox"
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    expected = rt.generate(prompt, max_tokens=6, temperature=0.0, ignore_eos=True)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == "tiny"
    assert len(out.choices) == 1
    choice = out.choices[0]
    assert choice.index == 0 and choice.text == expected.text and choice.finish_reason == "length"
    assert choice.logprobs is None
    assert out.usage.prompt_tokens == len(rt.tokenize(prompt))
    assert out.usage.completion_tokens == 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6
    assert out.usage.prompt_tokens_details.cached_tokens == 0


def test_completion_prompt_forms_and_n(served):
    rt, _, client = served
    ids = rt.tokenize("one two three")
    out = client.completions.create(
        model="tiny", prompt=["alpha beta", "one two three"], max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[1].text == rt.generate(ids, max_tokens=3, temperature=0.0, ignore_eos=True).text
    assert out.usage.prompt_tokens == len(rt.tokenize("alpha beta")) + len(ids)
    single = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert single.choices[0].text == out.choices[1].text
    out = client.completions.create(model="tiny", prompt=[ids, ids], max_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].text == out.choices[1].text
    out = client.completions.create(
        model="tiny", prompt="sampled", n=3, max_tokens=8, temperature=1.0, seed=7, extra_body={"ignore_eos": True, "top_k": 50}
    )
    assert [c.index for c in out.choices] == [0, 1, 2] and out.usage.completion_tokens == 24
    again = client.completions.create(
        model="tiny", prompt="sampled", n=3, max_tokens=8, temperature=1.0, seed=7, extra_body={"ignore_eos": True, "top_k": 50}
    )
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded: reproducible
    assert len({c.text for c in out.choices}) > 1  # yet the samples differ


def test_stop_strings_and_stop_token_ids(served):
    rt, _, client = served
    full = client.completions.create(model="tiny", prompt="x y z", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    ids = rt.generate("x y z", max_tokens=12, temperature=0.0, ignore_eos=True).token_ids
    stop_id = ids[3]
    cut = client.completions.create(
        model="tiny", prompt="x y z", max_tokens=12, temperature=0, extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]}
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens == ids.index(stop_id) + 1  # the stop token counts (vLLM), though not in the text
    assert full.choices[0].text.startswith(cut.choices[0].text)


def test_chat_completion_uses_the_chat_template(served):
    rt, _, client = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)
    expected = rt.generate(rt.apply_chat_template(messages), max_tokens=5, temperature=0.0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == len(rt.tokenize(rt.apply_chat_template(messages)))
    assert out.usage.completion_tokens == len(expected.token_ids)


def test_streaming_completion_and_chat(served):
    rt, _, client = served
    full = client.completions.create(model="tiny", prompt="Stream me", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="Stream me",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    with_choices = [c for c in chunks if c.choices]
    assert len(with_choices) >= 2
    assert "".join(c.choices[0].text for c in with_choices) == full.choices[0].text
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0

    messages = [{"role": "user", "content": "Stream a chat"}]
    full_chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full_chat.choices[0].message.content


def test_sse_wire_format(served):
    _, server, _ = served
    body = {"prompt": "wire", "max_tokens": 3, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=30) as http, http.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])


def test_second_request_sharing_a_long_prefix_reports_cached_tokens(served):
    rt, _, client = served
    prefix = "A long shared system prompt about parrots and prefixes. " * 8
    first = client.completions.create(model="tiny", prompt=prefix + "First?", max_tokens=2, temperature=0)
    second = client.completions.create(model="tiny", prompt=prefix + "Second?", max_tokens=2, temperature=0)
    shared = len(rt.tokenize(prefix))
    assert shared >= 64
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= shared - rt.engine.config.block_size and cached < second.usage.prompt_tokens


def test_models_tokenize_detokenize(served):
    rt, server, client = served
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].object == "model" and models.data[0].owned_by
    assert models.data[0].model_extra["max_model_len"] == TINY_MAX_LEN
    with httpx.Client(base_url=server.url, timeout=30) as http:
        tok = http.post("/tokenize", json={"prompt": "Hello world"}).json()
        assert tok["tokens"] == rt.tokenize("Hello world") and tok["count"] == len(tok["tokens"])
        assert tok["max_model_len"] == TINY_MAX_LEN
        assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "Hello world"}
        chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
        assert chat["tokens"] == rt.tokenize(rt.apply_chat_template([{"role": "user", "content": "Hi"}]))


@pytest.mark.real_model
def test_real_model_answers_paris_through_the_server(real_model, real_llama, start_server):
    engine = BuiltinEngine(real_llama, real_model.tokenizer, EngineConfig(num_kv_blocks=64, max_model_len=1024), real_model.model_name)
    with Runtime(engine=engine) as rt:
        server = start_server(rt, served_model_name="smollm2")
        client = client_for(server)
        out = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16, temperature=0
        )
        assert "Paris" in out.choices[0].message.content
        assert out.choices[0].finish_reason in ("stop", "length")
        server.stop_thread()
        settle(rt)


def test_streaming_several_choices(served):
    _, _, client = served
    messages = [{"role": "user", "content": "Two answers please"}]
    plain = client.chat.completions.create(
        model="tiny", messages=messages, n=2, max_tokens=6, temperature=0.8, seed=3, extra_body={"ignore_eos": True}
    )
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            n=2,
            max_tokens=6,
            temperature=0.8,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    texts = {0: "", 1: ""}
    finished = {}
    roles = set()
    for c in chunks[:-1]:
        (choice,) = c.choices
        if choice.delta.role:
            roles.add(choice.index)
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finished[choice.index] = choice.finish_reason
    assert roles == {0, 1} and finished == {0: "length", 1: "length"}
    assert [texts[0], texts[1]] == [c.message.content for c in plain.choices]  # seeded: same samples
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12 == plain.usage.completion_tokens


# negative: they reward repetition, which shows on the tiny random model (it rarely repeats)
PENALTIES = {"presence_penalty": -2.0, "frequency_penalty": -0.5}
VLLM_PENALTIES = {"repetition_penalty": 1.3, "min_p": 0.05, "min_tokens": 4}


def test_penalties_and_logit_bias_through_the_openai_client(served):
    rt, _, client = served
    prompt = "one one one one"
    kw = dict(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    plain = client.completions.create(**kw, extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0]
    out = client.completions.create(**kw, **PENALTIES, extra_body={"ignore_eos": True, "return_token_ids": True, **VLLM_PENALTIES})
    choice = out.choices[0]
    expected = rt.generate(prompt, max_tokens=12, temperature=0.0, ignore_eos=True, **PENALTIES, **VLLM_PENALTIES)
    assert choice.token_ids == expected.token_ids and choice.text == expected.text
    assert choice.token_ids != plain.token_ids
    assert len(set(choice.token_ids)) < len(choice.token_ids) == len(set(plain.token_ids))  # it repeats now
    assert choice.prompt_token_ids == rt.tokenize(prompt)
    favourite = rt.tokenize(" parrot")[0]
    biased = client.completions.create(**kw, logit_bias={str(favourite): 100}, extra_body={"ignore_eos": True, "return_token_ids": True})
    assert biased.choices[0].token_ids == [favourite] * 12
    messages = [{"role": "user", "content": "Say one one one"}]
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, **PENALTIES, extra_body={"ignore_eos": True, "return_token_ids": True}
    )
    ids = rt.tokenize(rt.apply_chat_template(messages))
    assert chat.model_extra["prompt_token_ids"] == ids
    assert chat.choices[0].token_ids == rt.generate(ids, max_tokens=8, temperature=0.0, ignore_eos=True, **PENALTIES).token_ids
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(**kw, presence_penalty=2.5)
    assert bad.value.body["param"] == "presence_penalty"
    settle(rt)


def test_token_ids_are_absent_unless_asked_and_tokenize_returns_token_strs(served):
    rt, server, client = served
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=2)
    assert "token_ids" not in out.choices[0].model_extra and "prompt_token_ids" not in out.choices[0].model_extra
    with httpx.Client(base_url=server.url, timeout=30) as http:
        tok = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
        assert tok["token_strs"] == [rt.engine.tokenizer.id_to_token(t) for t in tok["tokens"]] == ["Hello", "Ġworld"]
        assert "token_strs" not in http.post("/tokenize", json={"prompt": "Hello world"}).json()
    settle(rt)


def test_tokenizer_info_describes_the_servers_tokenizer(served):
    """vLLM's `/tokenizer_info`, which lm-evaluation-harness's `tokenizer_backend=remote` reads."""
    rt, server, _ = served
    info = httpx.get(server.url + "/tokenizer_info", timeout=30).json()
    tok = rt.engine.tokenizer
    assert info["eos_token"] == tok.token_text(tok.eos_token_id) == "<|im_end|>"
    assert info["bos_token"] == tok.token_text(tok.bos_token_id)
    assert info["chat_template"] == tok.chat_template and info["model_max_length"] == rt.engine.max_model_len
    assert info["add_bos_token"] is False  # SmolLM2's GGUF asks for none
    settle(rt)
