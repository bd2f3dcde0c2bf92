"""Stress tools for `parrot-core serve`: abort storm, KV pressure and a mixed soak.

Each scenario starts a real server in a subprocess (`python -m parrot_core.cli serve`, the code
of the checkout holding this script) on a free 127.0.0.1 port with a small KV pool, waits for
/health, drives it with the real `openai` AsyncOpenAI client (httpx for Parrot's program API
and the metrics) and stops it. Only loopback traffic; every loop is bounded in count and time.

- abort_storm: --requests (200) completions and chats, streaming and not, most cancelled at a
  random point: before the first token, at a random time, or by closing a stream mid-way.
- kv_pressure: --pressure-requests (16) concurrent requests of --prompt-len (200) prompt
  tokens + --output-len (100) output tokens (EOS ignored); each fits the pool alone, the pool
  (40 blocks of 16) holds two of them. All should succeed.
- soak: --clients (8) client loops for --duration (300) s: completions, chats, streams, a few
  aborts, and program sessions (POST /v1/session, /v1/semantic_var, /v1/semantic_call, GET
  /v1/semantic_var/..., DELETE) whose calls share one system prompt across sessions.

Per scenario it prints requests done, outcomes, errors by kind (HTTP status or exception
type), p50/p99 latency of the requests that ran to the end, server RSS at start and end, and
the leak check: after the load, wait until the server is idle, POST /flush_cache, read
/metrics: KV blocks used (total - free - cached) and contexts_live must be back at the
baseline taken before the load. The baseline is 0 except in the soak, where it holds the
pinned constant prefix of the shared system prompt (the server keeps it for 600 s; it is
pinned by a warm-up session before the baseline). Writes JSON, a PNG and the server logs to
benchmarks/results/. Exit code: 0, 1 if a leak was found, 2 if a server died or the leak
check could not run.

    python benchmarks/stress.py                              # all three, the issue's sizes
    python benchmarks/stress.py --scenario abort_storm --requests 40
    python benchmarks/stress.py --scenario kv_pressure --num-kv-blocks 64
    python benchmarks/stress.py --scenario soak --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

from _texts import document  # noqa: E402

SCENARIOS = ("abort_storm", "kv_pressure", "soak")
DEFAULT_KV_BLOCKS = {"abort_storm": 512, "kv_pressure": 40, "soak": 512}
WORDS = document().split()
SYSTEM = "You are a terse assistant. Answer from this reference only.\nReference: " + " ".join(WORDS[:120])
# Both program templates start with the same constant text: one pinned prefix for all sessions.
T_ANSWER = SYSTEM + "\nQuestion: {{question}}\nAnswer: {{answer}}"
T_FOLLOWUP = SYSTEM + "\nQuestion: {{question}}\nAnswer: {{answer}}\nIn one word: {{word}}"
SESSION_HEADER = "X-Session-Token"


# -- outcomes ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One client operation. `status`: "ok" (ran to its end), "aborted" (cancelled on purpose
    before its end), "error" (`error` names the kind)."""

    op: str
    status: str
    latency_s: float | None = None
    error: str | None = None


class IncompleteResponse(Exception):
    """A response or stream that ended without a finish reason (or with fewer tokens than
    `ignore_eos` promises)."""


class RouteError(Exception):
    """A program-API call answered with an HTTP error."""

    def __init__(self, route: str, status: int) -> None:
        super().__init__(f"HTTP {status} ({route})")


def error_kind(e: BaseException) -> str:
    """A short name for an error: the HTTP status, a stream's error event, or the type."""
    if isinstance(e, openai.APIStatusError):
        return f"HTTP {e.status_code}"
    if isinstance(e, RouteError):
        return str(e)
    if isinstance(e, openai.APIError) and isinstance(e.body, dict):  # an error event in a stream
        return f"stream error: {e.body.get('code') or e.body.get('type')}"
    return type(e).__name__


async def timed(op: str, work: Awaitable[str], timeout: float) -> Outcome:
    """Run `work` (it returns "ok" or "aborted" and raises on failure) under `timeout`."""
    start = time.perf_counter()
    try:
        status = await asyncio.wait_for(work, timeout)
    except TimeoutError:
        return Outcome(op, "error", error="client timeout")
    except Exception as e:  # noqa: BLE001 - every failure is counted by kind
        return Outcome(op, "error", error=error_kind(e))
    return Outcome(op, status, latency_s=time.perf_counter() - start if status == "ok" else None)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (the benchmarks' convention), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return statistics.median(ordered) if q == 0.5 else ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the server under test --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`parrot-core serve` in a subprocess on a free loopback port, logging to `log_path`.
    PARROT_CORE_* variables are dropped so only `flags` configure it."""

    def __init__(self, flags: list[str], log_path: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARROT_CORE_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        self.cmd = [sys.executable, "-m", "parrot_core.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *flags]
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait_healthy(self, timeout: float) -> float:
        """Seconds until /health answered 200; raises if the process exits or time runs out."""
        start = time.monotonic()
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() - start < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(self.url + "/health").status_code == 200:
                        return time.monotonic() - start
                time.sleep(0.25)
        raise RuntimeError(f"the server was not healthy within {timeout} s:\n{self.log_tail()}")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mib(self) -> float | None:
        """VmRSS of the server process, None once it is gone."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def stop(self, grace: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


# -- metrics and the leak check ---------------------------------------------------------------
@dataclass
class KVState:
    blocks_total: int
    blocks_used: int
    blocks_cached: int
    contexts_live: int
    running: int
    waiting: int
    preemptions: int


async def read_metrics(http: httpx.AsyncClient) -> dict[str, float]:
    """The server's samples without the `parrot_core:` prefix, those read from each engine
    (label `engine`) summed over the engines."""
    r = await http.get("/metrics")
    r.raise_for_status()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if set(s.labels) <= {"model_name", "engine"}:
                name = s.name.removeprefix("parrot_core:")
                out[name] = out.get(name, 0.0) + s.value
    return out


async def kv_state(http: httpx.AsyncClient) -> KVState:
    m = await read_metrics(http)
    total, free, cached = int(m["kv_blocks_total"]), int(m["kv_blocks_free"]), int(m["kv_blocks_cached"])
    return KVState(
        blocks_total=total,
        blocks_used=total - free - cached,
        blocks_cached=cached,
        contexts_live=int(m["contexts_live"]),
        running=int(m["num_requests_running"]),
        waiting=int(m["num_requests_waiting"]),
        preemptions=int(m["num_preemptions_total"]),
    )


async def wait_idle(http: httpx.AsyncClient, timeout: float) -> tuple[bool, float]:
    """Poll until no engine request runs or waits in three reads in a row (0.5 s apart).
    Returns (idle, seconds waited)."""
    start, quiet = time.monotonic(), 0
    while time.monotonic() - start < timeout:
        s = await kv_state(http)
        quiet = quiet + 1 if s.running == 0 and s.waiting == 0 else 0
        if quiet >= 3:
            return True, time.monotonic() - start
        await asyncio.sleep(0.5)
    return False, time.monotonic() - start


async def flush(http: httpx.AsyncClient) -> int:
    r = await http.post("/flush_cache")
    r.raise_for_status()
    return int(r.json()["flushed_blocks"])


@dataclass
class LeakCheck:
    """KV state after the load (idle, cache flushed) against the baseline before it."""

    idle: bool
    idle_wait_s: float
    flushed_blocks: int
    baseline_blocks: int
    baseline_contexts: int
    blocks_used: int
    contexts_live: int

    @property
    def leaked_blocks(self) -> int:
        return max(0, self.blocks_used - self.baseline_blocks)

    @property
    def leaked_contexts(self) -> int:
        return max(0, self.contexts_live - self.baseline_contexts)

    @property
    def leak(self) -> bool:
        return self.leaked_blocks > 0 or self.leaked_contexts > 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"leaked_blocks": self.leaked_blocks, "leaked_contexts": self.leaked_contexts}


async def take_baseline(http: httpx.AsyncClient, idle_timeout: float) -> KVState:
    await wait_idle(http, idle_timeout)
    await flush(http)
    return await kv_state(http)


async def leak_check(http: httpx.AsyncClient, baseline: KVState, idle_timeout: float, settle: float) -> LeakCheck:
    """Wait for idle, flush, compare with `baseline`; a difference is re-read for up to
    `settle` seconds (aborts free their KV asynchronously) before it counts as a leak."""
    idle, waited = await wait_idle(http, idle_timeout)
    deadline = time.monotonic() + settle
    flushed = 0
    while True:
        flushed += await flush(http)
        s = await kv_state(http)
        clean = s.blocks_used <= baseline.blocks_used and s.contexts_live <= baseline.contexts_live
        if clean or time.monotonic() >= deadline:
            break
        await asyncio.sleep(1.0)
    return LeakCheck(idle, waited, flushed, baseline.blocks_used, baseline.contexts_live, s.blocks_used, s.contexts_live)


# -- client operations ------------------------------------------------------------------------
@dataclass
class Ctx:
    client: AsyncOpenAI
    http: httpx.AsyncClient
    model: str
    args: argparse.Namespace


def words(rng: random.Random, n: int) -> str:
    """`n` consecutive words of the text from a random start (wrapping around)."""
    start = rng.randrange(len(WORDS))
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


async def request(
    ctx: Ctx,
    api: str,
    prompt: str | list[int],
    *,
    max_tokens: int,
    stream: bool,
    temperature: float = 0.0,
    seed: int | None = None,
    ignore_eos: bool = False,
    read_chunks: int | None = None,
) -> str:
    """One completion ("completion") or chat ("chat") request. A stream with `read_chunks` is
    closed (the connection goes) after that many chunks, 0 meaning before the first one: returns
    "aborted" unless it had already finished. With `ignore_eos`, fewer than `max_tokens` tokens
    is an `IncompleteResponse`, as is a response or stream without a finish reason."""
    common: dict[str, Any] = dict(model=ctx.model, max_tokens=max_tokens, temperature=temperature, seed=seed, extra_body={"ignore_eos": ignore_eos})
    if api == "chat":
        create: Callable[..., Awaitable[Any]] = ctx.client.chat.completions.create
        common["messages"] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    else:
        create = ctx.client.completions.create
        common["prompt"] = prompt
    if not stream:
        r = await create(**common)
        if r.choices[0].finish_reason is None:
            raise IncompleteResponse("no finish_reason")
        produced = r.usage.completion_tokens
    else:
        s = await create(**common, stream=True, stream_options={"include_usage": True})
        chunks, finish, produced = 0, None, 0
        try:
            if read_chunks == 0:
                return "aborted"
            async for chunk in s:
                if chunk.usage is not None:
                    produced = chunk.usage.completion_tokens
                if chunk.choices:
                    chunks += 1
                    finish = chunk.choices[0].finish_reason or finish
                    if read_chunks is not None and chunks >= read_chunks and finish is None:
                        return "aborted"
        finally:
            await s.close()
        if finish is None:
            raise IncompleteResponse("stream ended without a finish_reason")
    if ignore_eos and produced != max_tokens:
        raise IncompleteResponse(f"{produced} of {max_tokens} tokens")
    return "ok"


async def cancel_after(work: Awaitable[str], delay: float) -> str:
    """Cancel `work` after `delay` seconds (its connection closes): "aborted" if it was."""
    try:
        return await asyncio.wait_for(work, delay)
    except TimeoutError:
        return "aborted"


STORM_MODES = {  # how a storm request ends, and its weight (plain requests have no stream to close)
    "complete": 1,  # runs to the end: the control group
    "cancel_early": 2,  # cancelled within 50 ms: before the first token, often before the headers
    "cancel_random": 3,  # cancelled after 0-4 s: while queued, prefilling or decoding
    "close_before_first": 2,  # stream closed once the headers came, before the first chunk
    "close_mid_stream": 4,  # stream closed after a random number of chunks
}


def storm_op(ctx: Ctx, rng: random.Random) -> tuple[str, Awaitable[str]]:
    """A random request (completion or chat, streaming or not) and a random way to end it."""
    api = rng.choice(["completion", "chat"])
    stream = rng.random() < 0.5
    modes = [m for m in STORM_MODES if stream or not m.startswith("close")]
    mode = rng.choices(modes, weights=[STORM_MODES[m] for m in modes])[0]
    max_tokens = rng.randint(8, 96)
    read_chunks = {"close_before_first": 0, "close_mid_stream": rng.randint(1, max_tokens - 1)}.get(mode)
    sampling = dict(temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(2**31), ignore_eos=True)
    work = request(ctx, api, words(rng, rng.randint(5, 60)), max_tokens=max_tokens, stream=stream, read_chunks=read_chunks, **sampling)
    if mode == "cancel_early":
        work = cancel_after(work, rng.uniform(0.0, 0.05))
    elif mode == "cancel_random":
        work = cancel_after(work, rng.uniform(0.0, 4.0))
    return f"{api}/{'stream' if stream else 'plain'}/{mode}", work


def pressure_op(ctx: Ctx, prompt: list[int], stream: bool) -> tuple[str, Awaitable[str]]:
    work = request(ctx, "completion", prompt, max_tokens=ctx.args.output_len, stream=stream, ignore_eos=True)
    return f"completion/{'stream' if stream else 'plain'}", work


async def api_call(ctx: Ctx, method: str, route: str, path: str, token: str | None = None, **kw: Any) -> dict[str, Any]:
    headers = {SESSION_HEADER: token} if token else {}
    r = await ctx.http.request(method, path, headers=headers, **kw)
    if r.status_code != 200:
        raise RouteError(route, r.status_code)
    return r.json()


async def program_session(ctx: Ctx, rng: random.Random, abort: bool) -> str:
    """A session of two calls sharing the system prompt (the second consumes the first's
    output); fetch both outputs, or (`abort`) give up on the fetch after a short wait or
    never fetch. The session is deleted either way."""
    s = await api_call(ctx, "POST", "POST session", "/v1/session")
    sid, token = s["session_id"], s["session_auth"]

    def output(name: str, max_tokens: int) -> dict[str, Any]:
        return {"name": name, "is_output": True, "sampling_config": {"max_tokens": max_tokens, "temperature": 0.0}}

    async def call(template: str, parameters: list[dict[str, Any]]) -> dict[str, str]:
        body = {"session_id": sid, "template": template, "parameters": parameters}
        return (await api_call(ctx, "POST", "POST semantic_call", "/v1/semantic_call", token, json=body))["outputs"]

    async def body() -> str:
        content = "What does " + words(rng, rng.randint(3, 12)) + " mean?"
        q = await api_call(ctx, "POST", "POST semantic_var", "/v1/semantic_var", token, json={"session_id": sid, "name": "question", "content": content})
        question = {"name": "question", "var_id": q["var_id"]}
        answer = (await call(T_ANSWER, [question, output("answer", rng.randint(4, 24))]))["answer"]
        second = await call(T_FOLLOWUP, [question, {"name": "answer", "var_id": answer}, output("word", 4)])
        params = {"session_id": sid, "criteria": "latency", "timeout": ctx.args.request_timeout}

        async def get(var_id: str) -> str:
            return (await api_call(ctx, "GET", "GET semantic_var", f"/v1/semantic_var/{var_id}", token, params=params))["content"]

        if abort:
            if rng.random() < 0.7:  # a client that stops waiting; otherwise it never fetches
                await cancel_after(get(second["word"]), rng.uniform(0.05, 1.5))
            return "aborted"
        await get(second["word"])
        await get(answer)
        return "ok"

    try:
        status = await body()
    except BaseException:
        with contextlib.suppress(Exception):
            await api_call(ctx, "DELETE", "DELETE session", f"/v1/session/{sid}", token)
        raise
    await api_call(ctx, "DELETE", "DELETE session", f"/v1/session/{sid}", token)
    return status


SOAK_WEIGHTS = {"completion": 3, "chat": 3, "completion/stream": 2, "chat/stream": 2, "abort": 1, "program": 2, "program/abort": 0.5}


def soak_op(ctx: Ctx, rng: random.Random) -> tuple[str, Awaitable[str]]:
    op = rng.choices(list(SOAK_WEIGHTS), weights=list(SOAK_WEIGHTS.values()))[0]
    if op.startswith("program"):
        return op, program_session(ctx, rng, abort=op == "program/abort")
    if op == "abort":
        name, work = storm_op(ctx, rng)
        return "abort/" + name, work
    api, _, stream = op.partition("/")
    prompt = words(rng, rng.randint(5, 40))
    if api == "completion" and rng.random() < 0.5:  # chats all share SYSTEM; half the completions do
        prompt = SYSTEM + " " + prompt
    kw = dict(max_tokens=rng.randint(4, 48), stream=bool(stream), temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(2**31))
    return op, request(ctx, api, prompt, **kw)


# -- scenarios --------------------------------------------------------------------------------
async def run_ops(ops: list[tuple[str, Awaitable[str]]], concurrency: int, timeout: float, desc: str) -> list[Outcome]:
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(ops), desc=desc, unit="req", leave=False)

    async def one(op: str, work: Awaitable[str]) -> Outcome:
        async with sem:
            out = await timed(op, work, timeout)
        bar.update(1)
        return out

    try:
        return await asyncio.gather(*(one(op, work) for op, work in ops))
    finally:
        bar.close()


async def abort_storm(ctx: Ctx) -> list[Outcome]:
    rng = random.Random(ctx.args.seed)
    ops = [storm_op(ctx, rng) for _ in range(ctx.args.requests)]
    return await run_ops(ops, ctx.args.concurrency, ctx.args.request_timeout, "abort storm")


async def kv_pressure(ctx: Ctx) -> list[Outcome]:
    args = ctx.args
    rng = random.Random(args.seed)
    prompts = []
    for _ in range(args.pressure_requests):  # distinct real text, cut to exactly prompt_len tokens
        r = await ctx.http.post("/tokenize", json={"prompt": words(rng, args.prompt_len * 2)})
        r.raise_for_status()
        tokens = r.json()["tokens"]
        if len(tokens) < args.prompt_len:
            raise RuntimeError(f"a {args.prompt_len * 2}-word text gave only {len(tokens)} tokens")
        prompts.append(tokens[: args.prompt_len])
    ops = [pressure_op(ctx, p, stream=i % 2 == 1) for i, p in enumerate(prompts)]
    return await run_ops(ops, len(ops), args.request_timeout, "kv pressure")


async def soak(ctx: Ctx) -> list[Outcome]:
    args = ctx.args
    deadline = time.monotonic() + args.duration
    bar = tqdm(total=round(args.duration), desc="soak", unit="s", leave=False)

    async def client(i: int) -> list[Outcome]:
        rng = random.Random(args.seed * 1000 + i)
        outs: list[Outcome] = []
        for _ in range(args.max_ops_per_client):
            if time.monotonic() >= deadline:
                break
            op, work = soak_op(ctx, rng)
            outs.append(await timed(op, work, args.request_timeout))
        return outs

    async def ticker() -> None:
        for _ in range(round(args.duration)):
            await asyncio.sleep(1)
            bar.update(1)

    tick = asyncio.create_task(ticker())
    try:
        per_client = await asyncio.gather(*(client(i) for i in range(args.clients)))
    finally:
        tick.cancel()
        bar.close()
    return [o for outs in per_client for o in outs]


async def soak_warmup(ctx: Ctx) -> None:
    """Pin the shared system prompt's constant prefix before the baseline (see the docstring)."""
    await program_session(ctx, random.Random(-1), abort=False)


RUNNERS: dict[str, Callable[[Ctx], Awaitable[list[Outcome]]]] = {"abort_storm": abort_storm, "kv_pressure": kv_pressure, "soak": soak}


@dataclass
class ScenarioResult:
    scenario: str
    server_cmd: list[str]
    wall_s: float
    requests: int
    ok: int
    aborted: int
    errors: dict[str, int]
    latency_p50_s: float | None
    latency_p99_s: float | None
    by_op: dict[str, dict[str, Any]]
    preemptions: int
    rss_start_mib: float | None
    rss_end_mib: float | None
    rss_samples: list[tuple[float, float]]
    probe_after_load: str
    leak: dict[str, Any] | None
    self_check_failures: int = 0  # the server's idle self-check (check_invariants) failed
    server_error_lines: int = 0
    server_exit_code: int | None = None
    server_died: bool = False  # it exited before it was stopped
    notes: list[str] = field(default_factory=list)

    @property
    def leaked(self) -> bool:
        return self.leak is not None and (self.leak["leaked_blocks"] > 0 or self.leak["leaked_contexts"] > 0)


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    lat = [o.latency_s for o in outcomes if o.latency_s is not None]
    by_op: dict[str, dict[str, Any]] = {}
    for op in sorted({o.op for o in outcomes}):
        mine = [o for o in outcomes if o.op == op]
        op_lat = [o.latency_s for o in mine if o.latency_s is not None]
        by_op[op] = {
            "count": len(mine),
            **Counter(o.status for o in mine),
            "p50_s": percentile(op_lat, 0.5),
            "p99_s": percentile(op_lat, 0.99),
        }
    return dict(
        requests=len(outcomes),
        ok=sum(o.status == "ok" for o in outcomes),
        aborted=sum(o.status == "aborted" for o in outcomes),
        errors=dict(Counter(o.error for o in outcomes if o.status == "error").most_common()),
        latency_p50_s=percentile(lat, 0.5),
        latency_p99_s=percentile(lat, 0.99),
        by_op=by_op,
    )


async def drive(name: str, server: ServerProcess, args: argparse.Namespace) -> ScenarioResult:
    notes: list[str] = []
    timeout = httpx.Timeout(args.request_timeout + 30, connect=10)
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout) as http, AsyncOpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=timeout
    ) as client:
        ctx = Ctx(client, http, (await client.models.list()).data[0].id, args)
        await request(ctx, "completion", "Hello", max_tokens=2, stream=False)  # first-request costs before RSS start
        if name == "soak":
            await soak_warmup(ctx)
        baseline = await take_baseline(http, args.idle_timeout)
        if baseline.blocks_used or baseline.contexts_live:
            notes.append(f"baseline (pinned constant prefixes): {baseline.blocks_used} blocks, {baseline.contexts_live} contexts")
        rss_start = server.rss_mib()
        samples: list[tuple[float, float]] = []
        t0 = time.monotonic()

        async def sample_rss() -> None:
            while True:  # cancelled when the load ends
                rss = server.rss_mib()
                if rss is not None:
                    samples.append((time.monotonic() - t0, rss))
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample_rss())
        try:
            outcomes = await RUNNERS[name](ctx)
        finally:
            sampler.cancel()
        wall = time.monotonic() - t0
        probe = await timed("probe", request(ctx, "completion", "The capital of France is", max_tokens=4, stream=False), args.request_timeout)
        leak: LeakCheck | None = None
        preemptions = 0
        try:
            leak = await leak_check(http, baseline, args.idle_timeout, args.settle)
            preemptions = (await kv_state(http)).preemptions - baseline.preemptions
            if not leak.idle:
                notes.append(f"the server was still busy after {args.idle_timeout} s")
        except httpx.HTTPError as e:
            notes.append(f"leak check failed: {error_kind(e)}")
    return ScenarioResult(
        scenario=name,
        server_cmd=server.cmd,
        wall_s=wall,
        **summarize(outcomes),
        preemptions=preemptions,
        rss_start_mib=rss_start,
        rss_end_mib=server.rss_mib(),
        rss_samples=samples,
        probe_after_load=probe.status if probe.status == "ok" else f"error: {probe.error}",
        leak=leak.as_dict() if leak else None,
        notes=notes,
    )


def run_scenario(name: str, args: argparse.Namespace) -> ScenarioResult:
    blocks = args.num_kv_blocks or DEFAULT_KV_BLOCKS[name]
    flags = ["--block-size", str(args.block_size), "--num-kv-blocks", str(blocks), "--log-stats-interval", str(args.log_stats_interval)]
    flags += shlex.split(args.server_args)
    if name == "kv_pressure":
        need = -(-(args.prompt_len + args.output_len) // args.block_size)
        if need > blocks:
            raise SystemExit(f"kv_pressure: one request needs {need} blocks, the pool has {blocks}: it could never run")
    os.makedirs(args.out, exist_ok=True)
    server = ServerProcess(flags, os.path.join(args.out, f"stress_{name}_server.log"))
    try:
        server.wait_healthy(args.startup_timeout)
        result = asyncio.run(drive(name, server, args))
    finally:
        died = not server.alive
        code = server.stop()
    log = server.log_text()
    result.self_check_failures = log.count("SELF-CHECK FAILED")
    result.server_error_lines = sum(" ERROR " in line for line in log.splitlines())
    result.server_exit_code = code
    result.server_died = died
    if died:
        result.notes.append(f"the server died during the run (exit code {code}); see {server.log_path}")
    return result


# -- report -----------------------------------------------------------------------------------
def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(results: list[ScenarioResult]) -> None:
    header = (
        f"{'scenario':12}{'reqs':>6}{'ok':>6}{'aborted':>8}{'errors':>7}{'p50 s':>8}{'p99 s':>8}{'preempt':>8}"
        f"{'RSS start':>10}{'RSS end':>9}{'blocks used':>12}{'ctx live':>9}{'leaked':>7}{'self-chk':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        leak = r.leak or {}
        print(
            f"{r.scenario:12}{r.requests:>6}{r.ok:>6}{r.aborted:>8}{sum(r.errors.values()):>7}{fmt(r.latency_p50_s, '.2f'):>8}"
            f"{fmt(r.latency_p99_s, '.2f'):>8}{r.preemptions:>8}{fmt(r.rss_start_mib, '.0f'):>7} MiB{fmt(r.rss_end_mib, '.0f'):>5} MiB"
            f"{fmt(leak.get('blocks_used'), 'd'):>12}{fmt(leak.get('contexts_live'), 'd'):>9}"
            f"{fmt(leak.get('leaked_blocks'), 'd'):>7}{r.self_check_failures:>9}"
        )
    for r in results:
        errors = ", ".join(f"{k} x{v}" for k, v in r.errors.items()) or "none"
        print(f"\n{r.scenario}: {r.requests} requests in {r.wall_s:.1f} s; errors by kind: {errors}")
        if r.rss_start_mib and r.rss_end_mib:
            print(f"  RSS {r.rss_start_mib:.0f} -> {r.rss_end_mib:.0f} MiB ({100 * (r.rss_end_mib / r.rss_start_mib - 1):+.1f}%)")
        if r.leak is None:
            print("  leak check: could not run")
        else:
            k = r.leak
            verdict = "LEAK" if r.leaked else "no leak"
            print(
                f"  leak check: {verdict}: {k['leaked_blocks']} blocks and {k['leaked_contexts']} contexts over the baseline"
                f" ({k['blocks_used']} blocks used, {k['contexts_live']} contexts live; baseline {k['baseline_blocks']} / {k['baseline_contexts']})"
            )
        print(f"  probe request after the load: {r.probe_after_load}; server log: {r.server_error_lines} ERROR lines, {r.self_check_failures} self-check failures")
        for note in r.notes:
            print(f"  note: {note}")


def plot(results: list[ScenarioResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        if r.rss_samples:
            xs, ys = zip(*r.rss_samples)
            axes[0].plot(xs, ys, label=r.scenario)
    axes[0].set_xlabel("seconds into the load")
    axes[0].set_title("server RSS (MiB)")
    axes[0].legend()
    names = [r.scenario for r in results]
    bottom = [0] * len(results)
    for label, values in (("ok", [r.ok for r in results]), ("aborted", [r.aborted for r in results]), ("error", [sum(r.errors.values()) for r in results])):
        axes[1].bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes[1].set_title("requests by outcome")
    axes[1].legend()
    fig.suptitle("parrot-core serve under stress (SmolLM2-135M, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    ap.add_argument("--requests", type=int, default=200, help="abort_storm: requests")
    ap.add_argument("--concurrency", type=int, default=48, help="abort_storm: requests in flight at once")
    ap.add_argument("--pressure-requests", type=int, default=16, help="kv_pressure: concurrent requests")
    ap.add_argument("--prompt-len", type=int, default=200, help="kv_pressure: prompt tokens per request")
    ap.add_argument("--output-len", type=int, default=100, help="kv_pressure: output tokens per request (EOS ignored)")
    ap.add_argument("--duration", type=float, default=300.0, help="soak: seconds of load")
    ap.add_argument("--clients", type=int, default=8, help="soak: concurrent client loops")
    ap.add_argument("--max-ops-per-client", type=int, default=10_000, help="soak: bound on each client loop")
    ap.add_argument("--num-kv-blocks", type=int, default=None, help=f"KV pool of every scenario's server; default {DEFAULT_KV_BLOCKS}")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--server-args", default="", help="more `parrot-core serve` flags, e.g. '--max-num-seqs 3'")
    ap.add_argument("--log-stats-interval", type=float, default=5.0, help="the server's stats line and idle self-check period")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="bound on any one client operation (s)")
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    ap.add_argument("--idle-timeout", type=float, default=120.0, help="leak check: how long to wait for the server to go idle")
    ap.add_argument("--settle", type=float, default=10.0, help="leak check: how long a difference may take to go away")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)

    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    results = [run_scenario(name, args) for name in names]
    print_table(results)

    stem = os.path.join(args.out, "stress" if args.scenario == "all" else f"stress_{args.scenario}")
    with open(stem + ".json", "w") as f:
        json.dump({"args": vars(args), "results": [asdict(r) | {"leaked": r.leaked} for r in results]}, f, indent=2)
    plot(results, stem + ".png")
    print(f"wrote {stem}.json and {stem}.png")
    if any(r.leak is None or r.server_died for r in results):
        return 2
    return 1 if any(r.leaked for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
