"""`parrot-core serve --engine`: engine specs parsed and checked before anything loads, and
the runtime built from them."""

from __future__ import annotations

import json

import pytest
import torch

from parrot_core.errors import InvalidRequestError
from parrot_core.server.engine_specs import EngineSpec, parse_engine_specs
from parrot_core.server.server import build_runtime
from parrot_core.server.settings import ServeSettings



def test_text_specs():
    assert parse_engine_specs("builtin") == [EngineSpec("builtin")]
    assert parse_engine_specs("builtin:/m/a.gguf, vllm:/m/hf ,openai:smollm2@http://h:8000/v1") == [
        EngineSpec("builtin", {"model": "/m/a.gguf"}),
        EngineSpec("vllm", {"model_dir": "/m/hf"}),
        EngineSpec("openai", {"model": "smollm2", "base_url": "http://h:8000/v1"}),
    ]


@pytest.mark.parametrize(
    "text, message",
    [("sglang", "unknown engine 'sglang'"), ("vllm", "model directory"), ("openai:http://h:1/v1", "MODEL@BASE_URL"),
     ("builtin,", "unknown engine ''"), ("missing.json", "cannot read")],
)  # fmt: skip
def test_bad_specs_are_typed_errors_naming_them_before_anything_loads(text, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_engine_specs(text)
    with pytest.raises(InvalidRequestError, match=message):
        ServeSettings(engine=text)


def test_a_json_file_lists_engines_with_their_options(tmp_path):
    path = tmp_path / "engines.json"
    path.write_text(json.dumps([{"kind": "builtin", "num_kv_blocks": 8}, {"kind": "vllm", "model_dir": "/d", "tensor_parallel_size": 2}]))
    assert parse_engine_specs(str(path)) == [
        EngineSpec("builtin", {"num_kv_blocks": 8}),
        EngineSpec("vllm", {"model_dir": "/d", "tensor_parallel_size": 2}),
    ]
    path.write_text(json.dumps([{"kind": "openai", "model": "m"}]))
    with pytest.raises(InvalidRequestError, match="needs base_url"):
        parse_engine_specs(str(path))
    path.write_text(json.dumps({"kind": "builtin"}))
    with pytest.raises(InvalidRequestError, match="JSON list"):
        parse_engine_specs(str(path))


def test_threads_sets_the_engine_threads_torch_thread_count(tiny_gguf):
    before = torch.get_num_threads()
    assert ServeSettings().threads is None
    with pytest.raises(InvalidRequestError, match="threads must be >= 1"):
        ServeSettings(threads=0)
    wanted = 1 if before > 1 else 2
    rt = build_runtime(ServeSettings(model=tiny_gguf, threads=wanted, num_kv_blocks=16))
    try:
        assert rt.engine.call(torch.get_num_threads) == wanted  # the engine's own step thread
        assert len(rt.generate("ab", max_tokens=2, temperature=0.0, ignore_eos=True).token_ids) == 2
        rt.check_invariants()
        assert rt.stats()["contexts_live"] == 0 and rt.stats()["blocks_used"] == 0
    finally:
        rt.close()
        torch.set_num_threads(before)


def test_two_builtin_engines_from_flags_and_a_file(tiny_gguf, tmp_path):
    gguf = tiny_gguf
    rt = build_runtime(ServeSettings(model=gguf, engine="builtin,builtin", num_kv_blocks=32))
    try:
        assert rt.engine_ids == ["builtin-0", "builtin-1"]
        assert [e.runtime_info().num_blocks_total for e in rt.core.engines.values()] == [32, 32]
        out = rt.generate("ab ab", max_tokens=3, temperature=0.0, ignore_eos=True)
        assert len(out.token_ids) == 3
        rt.check_invariants()
        assert rt.stats()["contexts_live"] == 0 and rt.stats()["blocks_used"] == 0
    finally:
        rt.close()
    path = tmp_path / "engines.json"
    path.write_text(json.dumps([{"kind": "builtin", "num_kv_blocks": 16}, {"kind": "builtin", "num_kv_blocks": 24, "block_size": 8}]))
    rt = build_runtime(ServeSettings(model=gguf, engine=str(path)))
    try:
        infos = [e.runtime_info() for e in rt.core.engines.values()]
        assert [(i.num_blocks_total, i.block_size) for i in infos] == [(16, 16), (24, 8)]
        rt.check_invariants()
    finally:
        rt.close()
    with pytest.raises(InvalidRequestError, match="no_such_option"):
        path.write_text(json.dumps([{"kind": "builtin", "no_such_option": 1}]))
        build_runtime(ServeSettings(model=gguf, engine=str(path)))
