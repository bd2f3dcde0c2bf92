"""Prometheus metrics of one server app, in a registry of its own (so apps never collide).

Names mirror vLLM's under the `parrot_core:` prefix, with the label `model_name`:
- read from each engine at scrape time, with the label `engine` too (its id, e.g.
  "builtin-0"): `prefix_cache_queries_total`, `prefix_cache_hits_total` (in tokens),
  `prompt_tokens_computed_total`, `num_preemptions_total` (counters), `kv_cache_usage_perc`
  (0-1), `kv_blocks_total`, `kv_blocks_free`, `kv_blocks_cached`, `num_requests_running`,
  `num_requests_waiting`, `engine_up` (1, or 0 while the scheduler gives it no work) (gauges);
- read from the serve layer at scrape time: `context_forks_total` (counter), `contexts_live`;
- counted per request by the server: `prompt_tokens_total`, `generation_tokens_total`,
  `request_success_total{finished_reason}`, histograms `time_to_first_token_seconds` and
  `e2e_request_latency_seconds`.

Counters read from an engine are exported as running sums of their increases, so they only
ever grow, even if the engine's own counter goes back (a replaced or reset engine).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "parrot_core:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (snapshot key, metric name without prefix and `_total`, help)
_ENGINE_COUNTERS = [
    ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    ("prompt_tokens_computed", "prompt_tokens_computed", "Prompt tokens whose KV was computed (not reused)."),
    ("num_preemptions", "num_preemptions", "Requests preempted for lack of KV blocks (recomputed later)."),
]
_ENGINE_GAUGES = [
    ("kv_cache_usage_perc", "kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)."),
    ("blocks_total", "kv_blocks_total", "KV blocks in the pool."),
    ("blocks_free", "kv_blocks_free", "KV blocks free and holding no reusable prefix."),
    ("blocks_cached", "kv_blocks_cached", "KV blocks free but holding a reusable prefix."),
    ("num_running", "num_requests_running", "Engine requests running."),
    ("num_waiting", "num_requests_waiting", "Engine requests waiting to run."),
    ("up", "engine_up", "1 if the engine takes new work, 0 while it is down (closed or failing)."),
]
_CORE_COUNTERS = [("context_forks", "context_forks", "Contexts forked from a parent context.")]
_CORE_GAUGES = [("contexts_live", "contexts_live", "Live KV contexts.")]


def runtime_snapshot(runtime) -> dict[str, Any]:  # noqa: ANN001 - a Runtime
    """`runtime.stats()` (summed over the engines) plus running/waiting counts and KV usage,
    and the same per engine under "engines" ({engine id: {key: value}}). Blocks on the
    runtime's loop: call it from a worker thread, never from the runtime's own loop."""
    stats: dict[str, Any] = dict(runtime.stats())
    engines = {}
    for engine_id, entry in runtime.engine_stats().items():
        info = entry["info"]
        engines[engine_id] = {
            "prefix_cache_queries": info.prefix_cache_queries,
            "prefix_cache_hits": info.prefix_cache_hits,
            "prompt_tokens_computed": info.prompt_tokens_computed,
            "num_preemptions": info.num_preemptions,
            "kv_cache_usage_perc": info.num_blocks_used / info.num_blocks_total if info.num_blocks_total else 0.0,
            "blocks_total": info.num_blocks_total,
            "blocks_free": info.num_blocks_free,
            "blocks_cached": info.num_blocks_cached,
            "num_running": info.num_running,
            "num_waiting": info.num_waiting,
            "up": 0.0 if entry["down"] else 1.0,
        }
    stats["num_running"] = sum(e["num_running"] for e in engines.values())
    stats["num_waiting"] = sum(e["num_waiting"] for e in engines.values())
    stats["kv_cache_usage_perc"] = stats["blocks_used"] / stats["blocks_total"] if stats["blocks_total"] else 0.0
    stats["engines"] = engines
    return stats


class _Monotone:
    """Running sums of the increases of counters that may go back."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._total: dict[str, float] = {}
        self._lock = threading.Lock()

    def update(self, key: str, current: float) -> float:
        with self._lock:
            last = self._last.get(key)
            grew = current if last is None or current < last else current - last
            self._last[key] = current
            self._total[key] = self._total.get(key, 0.0) + grew
            return self._total[key]


class _RuntimeCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, float] | None], model_name: Callable[[], str]) -> None:
        self._snapshot = snapshot
        self._model_name = model_name
        self._sums = _Monotone()

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        if snap is None:  # no runtime yet (loading) or it is closed
            return
        name = self._model_name()
        engines = snap["engines"]
        for key, metric, doc in _ENGINE_COUNTERS:
            family = CounterMetricFamily(PREFIX + metric, doc, labels=["model_name", "engine"])
            for engine_id, values in engines.items():
                family.add_metric([name, engine_id], self._sums.update(f"{engine_id}/{key}", float(values[key])))
            yield family
        for key, metric, doc in _ENGINE_GAUGES:
            family = GaugeMetricFamily(PREFIX + metric, doc, labels=["model_name", "engine"])
            for engine_id, values in engines.items():
                family.add_metric([name, engine_id], float(values[key]))
            yield family
        for key, metric, doc in _CORE_COUNTERS:
            family = CounterMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            family.add_metric([name], self._sums.update(key, float(snap[key])))
            yield family
        for key, metric, doc in _CORE_GAUGES:
            family = GaugeMetricFamily(PREFIX + metric, doc, labels=["model_name"])
            family.add_metric([name], float(snap[key]))
            yield family


class ServeMetrics:
    """The metrics of one app. `snapshot()` returns `runtime_snapshot(...)` or None."""

    def __init__(self, snapshot: Callable[[], dict[str, float] | None], model_name: Callable[[], str]) -> None:
        self.registry = CollectorRegistry()
        self._model_name = model_name
        labels = ["model_name"]
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            labels,
            buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
            registry=self.registry,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Time from a request's arrival to its last token.",
            labels,
            buckets=(0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0),
            registry=self.registry,
        )
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished sequences.", labels, registry=self.registry)
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Generated tokens of finished sequences.", labels, registry=self.registry
        )
        self.request_success = Counter(
            PREFIX + "request_success", "Sequences finished, by reason.", [*labels, "finished_reason"], registry=self.registry
        )
        self.registry.register(_RuntimeCollector(snapshot, model_name))

    def observe_sequence(
        self, *, ttft: float | None, e2e: float, prompt_tokens: int, generation_tokens: int, finish_reason: str
    ) -> None:
        """Record one finished (or aborted) sequence."""
        name = self._model_name()
        if ttft is not None:
            self.ttft.labels(name).observe(ttft)
        self.e2e.labels(name).observe(e2e)
        self.prompt_tokens.labels(name).inc(prompt_tokens)
        self.generation_tokens.labels(name).inc(generation_tokens)
        self.request_success.labels(name, finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
