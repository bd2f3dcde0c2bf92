"""`/metrics`, `/flush_cache`, the stats log line and the idle self-check."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from parrot_core.errors import InvariantError
from parrot_core.server.app import create_app
from parrot_core.server.metrics import ServeMetrics
from parrot_core.server.server import StatsLogger
from parrot_core.server.settings import ServeSettings

COUNTERS = [
    "parrot_core:prefix_cache_queries",
    "parrot_core:prefix_cache_hits",
    "parrot_core:prompt_tokens",
    "parrot_core:generation_tokens",
    "parrot_core:num_preemptions",
    "parrot_core:context_forks",
    "parrot_core:prompt_tokens_computed",
    "parrot_core:request_success",
]
GAUGES = [
    "parrot_core:kv_cache_usage_perc",
    "parrot_core:num_requests_running",
    "parrot_core:num_requests_waiting",
    "parrot_core:contexts_live",
    "parrot_core:kv_blocks_total",
]
HISTOGRAMS = ["parrot_core:time_to_first_token_seconds", "parrot_core:e2e_request_latency_seconds"]


def scrape(client: TestClient) -> dict[str, dict[tuple, float]]:
    """family name -> {(sample name, labels): value}"""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        out[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    return out


@pytest.fixture
def client(tiny_runtime):
    app = create_app(tiny_runtime, ServeSettings(served_model_name="tiny", log_stats_interval=0))
    with TestClient(app) as c:
        yield c


def traffic(client: TestClient, tag: str) -> None:
    prefix = "A shared prefix that is long enough to fill a few blocks of sixteen tokens. " * 3
    for q in ("one", "two"):
        r = client.post("/v1/completions", json={"prompt": prefix + tag + q, "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": tag}], "max_tokens": 3, "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")


def test_named_series_exist_and_counters_only_grow(client):
    traffic(client, "first")
    first = scrape(client)
    for name in COUNTERS + GAUGES + HISTOGRAMS:
        assert name in first, (name, sorted(first))
    for name in COUNTERS:
        assert any(key[0] == name + "_total" and ("model_name", "tiny") in key[1] for key in first[name]), first[name]
    engine = (("engine", "builtin-0"), ("model_name", "tiny"))
    assert first["parrot_core:engine_up"][("parrot_core:engine_up", engine)] == 1
    reasons = {dict(key[1])["finished_reason"] for key in first["parrot_core:request_success"] if key[0].endswith("_total")}
    assert "length" in reasons
    assert first["parrot_core:kv_blocks_total"][("parrot_core:kv_blocks_total", engine)] == 128
    traffic(client, "second")
    second = scrape(client)
    grew = set()
    for name in COUNTERS + HISTOGRAMS:
        for key, value in first[name].items():
            if key[0].endswith("_created"):
                continue
            assert second[name][key] >= value, (name, key, value, second[name][key])
            if second[name][key] > value:
                grew.add(name)
    for name in ["parrot_core:prefix_cache_queries", "parrot_core:prefix_cache_hits", "parrot_core:prompt_tokens",
                 "parrot_core:generation_tokens", "parrot_core:request_success"] + HISTOGRAMS:
        assert name in grew, name
    ttft_count = second["parrot_core:time_to_first_token_seconds"][
        ("parrot_core:time_to_first_token_seconds_count", (("model_name", "tiny"),))
    ]
    assert ttft_count == 6  # three sequences per round
    tokens = second["parrot_core:generation_tokens"][("parrot_core:generation_tokens_total", (("model_name", "tiny"),))]
    assert tokens >= 2 * 8


def test_engine_counters_never_go_back():
    snap = {"prefix_cache_queries": 100, "prefix_cache_hits": 40, "prompt_tokens_computed": 60, "num_preemptions": 2,
            "kv_cache_usage_perc": 0.5, "blocks_total": 8, "blocks_free": 4, "blocks_cached": 0,
            "num_running": 1, "num_waiting": 0, "up": 1}
    metrics = ServeMetrics(lambda: {"context_forks": 3, "contexts_live": 1, "engines": {"e0": dict(snap)}}, lambda: "m")

    def value(name: str) -> float:
        text = metrics.render().decode()
        family = next(f for f in text_string_to_metric_families(text) if f.name == name)
        return family.samples[0].value

    assert value("parrot_core:prefix_cache_queries") == 100
    snap["prefix_cache_queries"] = 130
    assert value("parrot_core:prefix_cache_queries") == 130
    snap["prefix_cache_queries"] = 10  # the engine's counter restarted (a new engine)
    assert value("parrot_core:prefix_cache_queries") == 140
    snap["prefix_cache_queries"] = 15
    assert value("parrot_core:prefix_cache_queries") == 145


def test_flush_cache_drops_cached_prefixes(client, tiny_runtime):
    traffic(client, "flush")
    tiny_runtime.engine.wait_idle()
    cached = tiny_runtime.stats()["blocks_cached"]
    assert cached > 0
    r = client.post("/flush_cache")
    assert r.status_code == 200 and r.json() == {"flushed_blocks": cached}
    assert tiny_runtime.stats()["blocks_cached"] == 0
    prompt = "A shared prefix that is long enough to fill a few blocks of sixteen tokens. " * 3 + "flushone"
    again = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_stats_line_and_idle_self_check(client, tiny_runtime, caplog):
    state = client.app.state.serve
    times = iter([0.0, 10.0, 20.0, 30.0])
    logger = StatsLogger(state, clock=lambda: next(times))
    traffic(client, "stats")
    tiny_runtime.engine.wait_idle()
    with caplog.at_level(logging.INFO, logger="parrot_core.server"):
        logger.tick()
    line = caplog.records[-1].getMessage()
    for part in ("Avg prompt throughput", "Avg generation throughput", "Running: 0 reqs", "Waiting: 0 reqs",
                 "KV cache usage", "Prefix cache hit rate"):
        assert part in line, line
    assert logger.violations == 0

    calls = []

    def broken() -> None:
        calls.append(1)
        raise InvariantError("block 3 has ref_count 2 but 1 holder")

    real_check = tiny_runtime.check_invariants
    tiny_runtime.check_invariants = broken
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="parrot_core.server"):
            logger.tick()
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert errors and "SELF-CHECK FAILED" in errors[0].getMessage() and "ref_count" in errors[0].getMessage()
        assert logger.violations == 1 and calls == [1]
        state.in_flight = 1  # a request in flight: no check
        logger.tick()
        assert calls == [1]
    finally:
        state.in_flight = 0
        tiny_runtime.check_invariants = real_check


def test_every_engine_has_its_own_series(real_model, tiny_text_llama):
    import torch

    from parrot_core import Runtime
    from parrot_core.engines.builtin.config import EngineConfig
    from parrot_core.engines.builtin.engine import BuiltinEngine

    def engine(blocks: int) -> BuiltinEngine:
        config = EngineConfig(block_size=16, num_kv_blocks=blocks, max_model_len=256, dtype=torch.float32)
        return BuiltinEngine(tiny_text_llama, real_model.tokenizer, config, "tiny")

    rt = Runtime(engines=[engine(128), engine(64)])
    try:
        with TestClient(create_app(rt, ServeSettings(served_model_name="tiny", log_stats_interval=0))) as client:
            traffic(client, "two")
            for e in rt.core.engines.values():
                e.wait_idle()
            got = scrape(client)
        blocks = {dict(k[1])["engine"]: v for k, v in got["parrot_core:kv_blocks_total"].items()}
        assert blocks == {"builtin-0": 128, "builtin-1": 64}
        up = {dict(k[1])["engine"]: v for k, v in got["parrot_core:engine_up"].items()}
        assert up == {"builtin-0": 1, "builtin-1": 1}
        queries = {dict(k[1])["engine"]: v for k, v in got["parrot_core:prefix_cache_queries"].items() if k[0].endswith("_total")}
        assert set(queries) == {"builtin-0", "builtin-1"} and sum(queries.values()) > 0
        rt.check_invariants()
        stats = rt.stats()
        assert stats["contexts_live"] == 0 and stats["blocks_used"] == 0, stats
    finally:
        rt.close()
