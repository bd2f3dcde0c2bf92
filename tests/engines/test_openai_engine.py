"""OpenAIEngine against parrot-core's own OpenAI-compatible server, started in the test (a
real uvicorn server over a tiny seeded float64 Llama with the real vocabulary). Greedy text is
compared with an in-process runtime over the same model. No mocks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch

import parrot_core as P
from parrot_core import Runtime
from parrot_core.engines.base import SamplingParams
from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from parrot_core.engines.builtin.model import LlamaConfig, LlamaModel
from parrot_core.engines.openai import OpenAIEngine, byte_tokenizer
from parrot_core.errors import EngineError, InvalidRequestError, ModelLoadError, RuntimeClosedError, UnsupportedByEngineError
from parrot_core.server.server import Server
from tests.conftest import TINY_CONFIG
from tests.server.conftest import SlowModel, settle, start_server, wait_for  # noqa: F401 - start_server is a fixture

pytestmark = pytest.mark.timeout(120)

MAX_LEN = 256
GREEDY = dict(temperature=0.0, ignore_eos=True)
# Long enough (> 2 blocks of 16) for the server's prefix cache to hold a shared part of it.
SYSTEM = "You are the careful assistant of the town library, with its long and detailed rules on loans, maps and rare books. Answer briefly."
QUESTIONS = [" Where are the maps", " Can I borrow rare books", " When does the library open"]


@pytest.fixture(scope="module")
def tiny64(real_model) -> LlamaModel:
    """A tiny random Llama over the real vocabulary in float64: whole and piecewise prefills
    agree exactly, so greedy text compares across engines."""
    config = LlamaConfig(**{**TINY_CONFIG, "vocab_size": real_model.config.vocab_size, "max_position_embeddings": 1024})
    return LlamaModel.random(config, seed=0, dtype=torch.float64)


@pytest.fixture
def make_builtin(tiny64, real_model) -> Iterator[Callable[..., Runtime]]:
    """Factory: in-process runtimes over `tiny64` (served as "tiny"); closed at teardown."""
    made: list[Runtime] = []

    def make(delay: float = 0.0) -> Runtime:
        model: Any = SlowModel(tiny64, delay) if delay else tiny64
        config = EngineConfig(block_size=16, num_kv_blocks=128, max_model_len=MAX_LEN, max_num_seqs=8, max_num_batched_tokens=256, dtype=torch.float64)
        rt = Runtime(engine=BuiltinEngine(model, real_model.tokenizer, config, "tiny"))
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


@pytest.fixture
def served(make_builtin, start_server) -> Iterator[Callable[..., tuple[Runtime, Server]]]:
    """Factory: `served(delay=0.0)` -> (the builtin runtime behind a server, the server). At
    teardown each served runtime must hold no context and no block, and pass its checks."""
    made: list[Runtime] = []

    def make(delay: float = 0.0) -> tuple[Runtime, Server]:
        rt = make_builtin(delay)
        made.append(rt)
        return rt, start_server(rt)

    yield make
    for rt in made:
        settle(rt)


@pytest.fixture
def make_client_runtime(real_model) -> Iterator[Callable[..., Runtime]]:
    """Factory: `make_client_runtime(server_or_url, model="tiny", **engine_options)` -> a
    Runtime over an OpenAIEngine (the real tokenizer unless `tokenizer=` says otherwise);
    checked and closed at teardown."""
    made: list[Runtime] = []

    def make(target: Server | str, model: str = "tiny", **options: Any) -> Runtime:
        url = target if isinstance(target, str) else target.url
        rt = Runtime(engine=OpenAIEngine(url, model, **{"tokenizer": real_model.tokenizer, **options}))
        made.append(rt)
        return rt

    yield make
    for rt in made:
        if not rt.closed:
            rt.check_invariants()
            assert rt.engine.runtime_info().num_running == 0
        rt.close()


def answer_function() -> Any:
    # Every fill boundary is a pre-tokenizer boundary ("." | " Where", "maps" | "?"), so the
    # server, which tokenizes the whole text, gets the ids the in-process fills compute.
    @P.semantic_function()
    def answer(question: P.Input, reply: P.Output(max_tokens=8, **GREEDY)):
        """You are the careful assistant of the town library, with its long and detailed rules on loans, maps and rare books. Answer briefly.{{question}}? Answer:{{reply}}"""

    return answer


def run_program(rt: Runtime) -> list[str]:
    answer = answer_function()
    with rt:
        outputs = [answer(q) for q in QUESTIONS]
        return [o.get(timeout=60) for o in outputs]


def test_the_fill_boundaries_of_these_tests_tokenize_the_same_whole_or_in_pieces(real_model):
    tok = real_model.tokenizer
    for q in QUESTIONS:
        pieces = [SYSTEM, q, "? Answer:"]
        assert tok.encode("".join(pieces)) == [t for p in pieces for t in tok.encode(p)]


def test_a_program_gives_the_same_greedy_text_as_in_process(served, make_builtin, make_client_runtime):
    served_rt, server = served()
    remote = make_client_runtime(server)
    engine = remote.engine
    texts = run_program(remote)
    expected = run_program(make_builtin())
    assert texts == expected
    assert all(texts) and len(set(texts)) == len(texts)  # real, distinct generations
    info = engine.runtime_info()
    # the shared system prompt was sent with every call and the server's cache found it
    assert info.prefix_cache_hits >= 2 * 16 and info.prefix_cache_queries > info.prefix_cache_hits
    assert served_rt.engine.runtime_info().prefix_cache_hits == info.prefix_cache_hits


def test_the_context_api_forks_text_and_reports_the_servers_cached_tokens(served, make_builtin, make_client_runtime, real_model):
    _, server = served()
    tok = real_model.tokenizer

    def run(rt: Runtime) -> tuple[list[Any], list[int]]:
        outs, hits = [], []
        with rt.new_context() as root:
            root.fill(SYSTEM)
            for q in QUESTIONS[:2]:
                with root.fork() as child:
                    child.fill(q + "? Answer:")
                    before = rt.engine.runtime_info().prefix_cache_hits
                    outs.append(child.generate(max_tokens=6, **GREEDY))
                    hits.append(rt.engine.runtime_info().prefix_cache_hits - before)
            return outs, hits

    remote = make_client_runtime(server)
    (got, hits), (expected, _) = run(remote), run(make_builtin())
    assert [o.text for o in got] == [o.text for o in expected]
    assert hits[0] == 0  # the server saw nothing before
    assert hits[1] >= 16 * (len(tok.encode(SYSTEM)) // 16) > 0  # the root's full blocks, from the first fork's request
    # as on every engine, cached_tokens counts only what the generate carried (nothing here)
    assert [o.cached_tokens for o in got] == [o.cached_tokens for o in expected] == [0, 0]

    # generated text joins the context: a second generate sends the path with it
    with remote.new_context() as ctx:
        ctx.fill(SYSTEM + QUESTIONS[0] + "? Answer:")
        first = ctx.generate(max_tokens=4, **GREEDY)
        before = remote.engine.runtime_info().prefix_cache_queries
        ctx.fill(" And")
        ctx.generate(max_tokens=4, **GREEDY)
        sent = remote.engine.runtime_info().prefix_cache_queries - before  # the server's usage.prompt_tokens
        assert sent == len(tok.encode_prompt(SYSTEM + QUESTIONS[0] + "? Answer:" + first.text + " And"))


def test_the_byte_codec_sends_the_same_text_and_round_trips_any_text_exactly(served, make_client_runtime):
    _, server = served()
    with_tokenizer = make_client_runtime(server)
    with_bytes = make_client_runtime(server, tokenizer=None)
    text = "héllo wörld 🎉 日本語 — ünïcödé"
    codec = with_bytes.engine.tokenizer
    assert with_bytes.tokenize(text) == list(text.encode("utf-8"))  # counts are bytes
    assert codec.decode(codec.encode(text)) == text and byte_tokenizer().vocab_size == 256
    prompt = SYSTEM + " Say: " + text
    a = with_bytes.generate(prompt, max_tokens=8, **GREEDY)
    b = with_tokenizer.generate(prompt, max_tokens=8, **GREEDY)
    assert a.text == b.text and a.text
    assert a.token_ids == list(a.text.encode("utf-8"))
    # a fork's path text, non-ASCII included, reaches the server exactly: same answer again
    with with_bytes.new_context() as root:
        root.fill(SYSTEM + " Say: ")
        with root.fork() as child:
            child.fill(text)
            assert child.generate(max_tokens=8, **GREEDY).text == a.text
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        with_bytes.generate(prompt, max_tokens=2, stop_token_ids=[5])


def test_a_bad_request_is_an_invalid_request_error_and_the_runtime_stays_usable(served, make_client_runtime):
    _, server = served()
    wrong_model = make_client_runtime(server, model="no-such-model", max_model_len=MAX_LEN)
    with pytest.raises(InvalidRequestError, match="no-such-model"):
        wrong_model.generate("Hello there.", max_tokens=4)
    with pytest.raises(InvalidRequestError, match="no-such-model"):  # without max_model_len: found out at once
        OpenAIEngine(server.url, "no-such-model")
    wrong_model.check_invariants()

    # an engine told a longer max_model_len than the server has: the server's 400, its message
    rt = make_client_runtime(server, max_model_len=4 * MAX_LEN)
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        rt.generate("Hello there.", max_tokens=MAX_LEN + 10)
    with pytest.raises(InvalidRequestError, match="logprobs"):  # what the engine cannot express
        rt.generate("Hello there.", max_tokens=2, logprobs=1)
    assert rt.generate("Hello there.", max_tokens=3, **GREEDY).finish_reason == "length"
    rt.check_invariants()


def test_a_server_that_is_down_is_an_engine_error_naming_its_url(make_client_runtime):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(EngineError, match=url):
        OpenAIEngine(url, "tiny")  # asks the server for max_model_len
    rt = make_client_runtime(url, max_model_len=MAX_LEN)
    for _ in range(2):  # fails the same way each time: nothing is left half done
        with pytest.raises(EngineError, match=url):
            rt.generate("Hello there.", max_tokens=4)
    with rt.new_context() as ctx:  # the runtime still works: the context API needs no server until a generate
        ctx.fill("Hello.")
    rt.check_invariants()
    assert rt.engine.runtime_info().extra["requests_failed"] == 2


def test_stopping_a_stream_closes_it_and_the_server_aborts(served, make_client_runtime):
    served_rt, server = served(delay=0.02)  # each step takes 20 ms: the stream is still running when it stops
    rt = make_client_runtime(server)
    got: list[Any] = []

    async def consume() -> None:
        async with contextlib.aclosing(rt.astream(SYSTEM, max_tokens=200, **GREEDY)) as stream:
            async for delta in stream:
                got.append(delta)
                if len(got) == 2:
                    break

    asyncio.run(consume())
    assert len(got) == 2 and got[-1].finish_reason is None
    info = served_rt.engine.runtime_info
    wait_for(lambda: info().num_running == 0 and info().num_waiting == 0, what="the server to abort the generation")
    assert info().generation_tokens < 100  # aborted, not run to its end
    rt.check_invariants()
    assert rt.engine.runtime_info().num_running == 0


def test_close_fails_a_running_generation_and_later_calls(served, real_model):
    served_rt, server = served(delay=0.02)
    ids = real_model.tokenizer.encode(SYSTEM)

    async def main() -> None:
        engine = OpenAIEngine(server.url, "tiny", tokenizer=real_model.tokenizer)
        deltas = engine.generate(1, None, SamplingParams(max_tokens=200, **GREEDY), ids)
        first = await deltas.__anext__()
        assert first.finish_reason is None
        await asyncio.to_thread(engine.close)  # from another thread, as a Runtime closes engines
        with pytest.raises(RuntimeClosedError):
            async for _ in deltas:
                pass
        assert engine.closed
        with pytest.raises(RuntimeClosedError):
            await engine.fill(2, None, ids)
        engine.close()  # idempotent

    asyncio.run(main())
    info = served_rt.engine.runtime_info
    wait_for(lambda: info().num_running == 0 and info().num_waiting == 0, what="the server to abort the generation")


def test_contexts_cannot_be_saved(served, make_client_runtime, tmp_path):
    _, server = served()
    rt = make_client_runtime(server)
    with rt.new_context() as ctx:
        ctx.fill("Hello.")
        with pytest.raises(UnsupportedByEngineError, match="saving a context.*OpenAIEngine"):
            ctx.save(tmp_path / "ctx.safetensors")
        with pytest.raises(UnsupportedByEngineError, match="loading a saved context.*OpenAIEngine"):
            rt.load_context(tmp_path / "ctx.safetensors")
    assert not (tmp_path / "ctx.safetensors").exists()


def test_chat_sessions_run_and_a_leading_special_token_reaches_the_server(served, make_builtin, make_client_runtime):
    # SmolLM2's BOS id is <|im_start|>, which its tokenizer does not add (add_bos_token is
    # False): a chat's first fill starts with it, and it must be sent, not dropped as a BOS.
    _, server = served()

    def chat(rt: Runtime) -> list[Any]:
        session = rt.chat(system="You are terse.")
        try:
            return [session.send(text, max_tokens=6, **GREEDY) for text in ("Hi there.", "And again.")]
        finally:
            session.close()

    remote = make_client_runtime(server)
    got, expected = chat(remote), chat(make_builtin())
    assert got[0].text == expected[0].text
    assert got[1].text and got[1].cached_tokens > 0  # the server's cache held the first turn


def test_sampling_options_reach_the_server(served, make_client_runtime):
    _, server = served()
    rt = make_client_runtime(server)
    prompt = SYSTEM + QUESTIONS[0] + "? Answer:"
    greedy = rt.generate(prompt, max_tokens=8, **GREEDY).text
    assert rt.generate(prompt, max_tokens=8, temperature=1.0, top_k=1, ignore_eos=True).text == greedy  # vLLM's top_k
    sampled = [rt.generate(prompt, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True).text for _ in range(2)]
    assert sampled[0] == sampled[1] != greedy  # the seed is sent
    cut = greedy[len(greedy) // 2 :].strip()[:3]
    stopped = rt.generate(prompt, max_tokens=8, stop=[cut], **GREEDY)
    assert stopped.finish_reason == "stop" and stopped.text == greedy[: greedy.index(cut)]
    assert rt.generate(prompt, max_tokens=8, choice=["yes", "no"], **GREEDY).text in ("yes", "no")  # vLLM's structured_outputs
    assert len(rt.generate(prompt, max_tokens=8, regex="[ab]{3}", **GREEDY).text) == 3
    with pytest.raises(InvalidRequestError, match="grammar"):
        rt.generate(prompt, max_tokens=4, grammar='start: "x"')


def test_freeing_a_context_aborts_its_generation(served, real_model):
    served_rt, server = served(delay=0.02)
    ids = real_model.tokenizer.encode(SYSTEM)

    async def main() -> None:
        engine = OpenAIEngine(server.url, "tiny", tokenizer=real_model.tokenizer)
        try:
            deltas = engine.generate(1, None, SamplingParams(max_tokens=200, **GREEDY), ids)
            assert (await deltas.__anext__()).finish_reason is None
            engine.free_context(1)
            rest = [d async for d in deltas]
            assert rest[-1].finish_reason == "abort" and len(rest) < 100
            assert engine.context_ids() == set() and engine.runtime_info().num_running == 0
            engine.check_invariants()
        finally:
            await asyncio.to_thread(engine.close)

    asyncio.run(main())
    info = served_rt.engine.runtime_info
    wait_for(lambda: info().num_running == 0 and info().num_waiting == 0, what="the server to abort the generation")


def test_requests_past_max_num_seqs_wait_their_turn_and_the_pool_is_synthetic(served, make_client_runtime):
    _, server = served()
    prompts = [SYSTEM + q + "? Answer:" for q in QUESTIONS]
    one = make_client_runtime(server, max_num_seqs=1)
    many = make_client_runtime(server)
    info = one.engine.runtime_info()
    assert info.num_blocks_total * info.block_size >= MAX_LEN and info.num_blocks_free == info.num_blocks_total
    assert many.engine.runtime_info().num_blocks_total == 64 * info.num_blocks_total  # max_num_seqs * max_model_len tokens
    queued = one.generate(prompts, max_tokens=6, **GREEDY)  # one request at a time: the others wait their turn
    assert [o.text for o in queued] == [o.text for o in many.generate(prompts, max_tokens=6, **GREEDY)]
    assert one.engine.runtime_info().extra["requests_total"] == 3


def test_the_tokenizer_comes_from_a_gguf_file_or_a_hugging_face_directory(real_model, tmp_path):
    from parrot_core.engines.builtin.default_model import default_model_path

    text = "<|im_start|>user\nHéllo, wörld!<|im_end|>"
    real_model.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    for source in (default_model_path(), str(tmp_path)):
        engine = OpenAIEngine("http://127.0.0.1:1/v1", "m", tokenizer=source, max_model_len=MAX_LEN)  # nothing is asked of the server yet
        assert engine.tokenizer.encode(text) == real_model.tokenizer.encode(text) and not engine.byte_codec
        assert engine.base_url == "http://127.0.0.1:1"
        engine.close()
    with pytest.raises(ModelLoadError, match="not found"):
        OpenAIEngine("http://127.0.0.1:1", "m", tokenizer=str(tmp_path / "missing.gguf"), max_model_len=MAX_LEN)
    with pytest.raises(InvalidRequestError, match="max_num_seqs"):
        OpenAIEngine("http://127.0.0.1:1", "m", max_model_len=MAX_LEN, max_num_seqs=0)


def test_server_token_ids_need_a_tokenizer_and_must_be_its_ids(make_client_runtime):
    with pytest.raises(InvalidRequestError, match="server_token_ids"):
        OpenAIEngine("http://127.0.0.1:1", "m", max_model_len=MAX_LEN, server_token_ids=True)  # the byte codec

    # a real HTTP server that streams one chunk whose ids are not this vocabulary's
    bodies: list[dict[str, Any]] = []

    class Stream(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            chunk = {"choices": [{"index": 0, "text": "hi", "token_ids": [10**9], "finish_reason": None}]}
            payload = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rt = make_client_runtime(f"http://127.0.0.1:{server.server_address[1]}", max_model_len=MAX_LEN, server_token_ids=True)
        with pytest.raises(EngineError, match="token_ids that are not ids of this tokenizer"):
            rt.generate("Hello there.", max_tokens=4)
        assert bodies[0]["return_token_ids"] is True
        rt.check_invariants()
        assert rt.engine.context_ids() == set()
    finally:
        server.shutdown()
        server.server_close()
