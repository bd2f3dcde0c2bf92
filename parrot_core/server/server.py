"""Running the app: `serve(settings)` loads the model while uvicorn already answers (so
`/health` is 503 until it is loaded), logs a stats line every `log_stats_interval` seconds and,
while no request is in flight, checks the runtime's invariants (an ERROR log on violation).

Shutdown drains (SIGTERM or SIGINT, or `Server.begin_shutdown()`): new requests get 503 at
once, requests in flight get `shutdown_grace_seconds` to finish, then the rest are aborted
(a 503, or in a stream an error event and `data: [DONE]`), and only then does uvicorn stop.
A second signal ends the grace period at once. After a drained shutdown the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from types import FrameType

import torch
import uvicorn
from fastapi import FastAPI

from parrot_core.frontend.runtime import Runtime
from parrot_core.server.app import ServeState, create_app
from parrot_core.server.http_errors import APIError
from parrot_core.server.program_api import forget_removed_sessions
from parrot_core.server.engine_specs import build_engines
from parrot_core.server.settings import ServeSettings

log = logging.getLogger("parrot_core.server")

SESSION_SWEEP_S = 10.0  # at most this long between forgetting the tokens of expired sessions
ABORTED_WAIT_S = 10.0  # how long aborted requests get to end their responses


def build_runtime(settings: ServeSettings) -> Runtime:
    """The Runtime the settings describe: its `--engine` engines (the builtin engine over
    `settings.model`, the default model unless given, by default). `--threads` sets torch's
    thread count for the whole process first (every thread's ops use it)."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    engines = build_engines(settings.engine_specs(), settings)
    return Runtime(
        engines=engines,
        session_timeout=settings.session_timeout,
        balance_abs_threshold=settings.balance_abs_threshold,
        balance_rel_threshold=settings.balance_rel_threshold,
    )


class StatsLogger:
    """One log line per `tick()`: throughput since the last tick, running/waiting requests,
    KV usage and prefix-cache hit rate; repeated idle lines are skipped. When nothing is in
    flight, `tick()` also runs `runtime.check_invariants()` and logs a violation at ERROR.
    `tick()` blocks (it reads the runtime from its loop): call it from a worker thread."""

    def __init__(self, state: ServeState, clock: Callable[[], float] = time.monotonic) -> None:
        self.state = state
        self._clock = clock
        self._last: dict[str, float] | None = None
        self._last_time = clock()
        self._logged_idle = False
        self.violations = 0

    def tick(self) -> None:
        snap = self.state.snapshot()
        if snap is None:
            return
        now = self._clock()
        last = self._last or {k: 0.0 for k in snap}
        elapsed = max(now - self._last_time, 1e-9)
        self._last, self._last_time = snap, now

        def grew(key: str) -> float:
            return max(snap[key] - last.get(key, 0.0), 0.0)

        prompt, generated = grew("prompt_tokens_computed"), grew("generation_tokens")
        queries, hits = grew("prefix_cache_queries"), grew("prefix_cache_hits")
        idle = not (prompt or generated or snap["num_running"] or snap["num_waiting"] or self.state.in_flight)
        if not (idle and self._logged_idle):
            log.info(
                "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d reqs,"
                " Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%% (all-time %.1f%%),"
                " Contexts: %d",
                prompt / elapsed,
                generated / elapsed,
                snap["num_running"],
                snap["num_waiting"],
                100 * snap["kv_cache_usage_perc"],
                100 * hits / queries if queries else 0.0,
                100 * snap["prefix_cache_hit_rate"],
                snap["contexts_live"],
            )
        self._logged_idle = idle
        if idle:
            self.self_check()

    def self_check(self) -> bool:
        """Check the runtime's invariants if no request is in flight; False on a violation.
        A result is discarded if a request started meanwhile (it may have raced the check)."""
        rt = self.state.runtime
        if rt is None or rt.closed or self.state.in_flight:
            return True
        started = self.state.requests_started
        try:
            rt.check_invariants()
        except Exception as e:  # noqa: BLE001 - any failure of the check is worth a loud line
            if self.state.requests_started != started or self.state.in_flight or rt.closed:
                return True
            self.violations += 1
            log.error("SELF-CHECK FAILED: the runtime's bookkeeping is inconsistent: %r", e, exc_info=e)
            return False
        return True

    async def run(self, interval: float) -> None:
        """Tick every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.tick)
            except Exception:  # the logger must never take the server down
                log.exception("stats logging failed")


class _DrainingUvicorn(uvicorn.Server):
    """uvicorn whose SIGINT/SIGTERM call `on_signal` (which drains, then stops it) instead of
    stopping at once, and which does not re-raise the signal once it has stopped. A signal
    after the drain, while uvicorn closes its connections, forces the exit as uvicorn's does."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = True
        else:
            self._on_signal()


class Server:
    """uvicorn over `app` plus its stats logger and session sweeper; once uvicorn has stopped,
    the chat sessions the app holds are closed (their KV freed). `run()` is a coroutine;
    `start_in_thread()` runs it in a daemon thread and returns once the port is bound (for
    tests and embedding). `begin_shutdown()` drains then stops; `stop()` stops at once."""

    def __init__(self, app: FastAPI, settings: ServeSettings, log_level: str = "info") -> None:
        self.app = app
        self.settings = settings
        self.state: ServeState = app.state.serve
        self.stats = StatsLogger(self.state)
        # uvicorn's own graceful timeout only backs up the drain, which ends every request first
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level=log_level, lifespan="off", timeout_graceful_shutdown=10
        )
        self.uvicorn = _DrainingUvicorn(config, self.begin_shutdown)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None
        self._grace_cut = False  # a second shutdown request ends the grace period

    @property
    def port(self) -> int:
        """The bound port (useful with `port=0`)."""
        return self.uvicorn.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    async def run(self, load: Callable[[], Runtime] | None = None) -> None:
        """Serve until `stop()`. With `load`, the runtime is built in a thread meanwhile (a
        failure stops the server and is re-raised)."""
        self._loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(self._sweep_sessions())]
        if self.settings.log_stats_interval > 0:
            tasks.append(asyncio.create_task(self.stats.run(self.settings.log_stats_interval)))
        failure: list[BaseException] = []
        if load is not None:

            async def load_runtime() -> None:
                try:
                    self.state.attach(await asyncio.to_thread(load))
                    log.info("model %r loaded; serving it as %r", self.state.runtime.engine.model_name, self.state.served_model_name)
                except BaseException as e:  # noqa: BLE001 - reported after shutdown
                    failure.append(e)
                    log.error("could not load the model: %s", e)
                    self.stop()

            tasks.append(asyncio.create_task(load_runtime()))
        try:
            await self.uvicorn.serve()
        finally:
            if self._drain is not None:
                tasks.append(self._drain)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:  # the runtime outlives the server (its owner closes it): free the KV we hold
                await self.app.state.chat_sessions.close_all()
            except Exception:
                log.exception("closing the chat sessions failed")
            rt = self.state.runtime
            try:  # and the suspended generations callers left behind
                if rt is not None and not rt.closed:
                    await asyncio.to_thread(rt.clear_suspended)
            except Exception:
                log.exception("discarding the suspended generations failed")
        if failure:
            raise failure[0]

    def stop(self) -> None:
        """Stop at once (requests in flight are cut off); see `begin_shutdown`."""
        self.uvicorn.should_exit = True

    def begin_shutdown(self) -> None:
        """Drain, then stop; returns at once, from any thread (or a signal handler). New
        requests get 503, requests in flight get `shutdown_grace_seconds` to finish, then the
        rest are aborted. Called again while draining, it ends the grace period now."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self.stop()
            return
        loop.call_soon_threadsafe(self._shutdown_requested)

    def _shutdown_requested(self) -> None:
        if self._drain is None:
            self._drain = asyncio.create_task(self._drain_then_stop())
        else:
            self._grace_cut = True

    async def _drain_then_stop(self) -> None:
        state, grace = self.state, self.settings.shutdown_grace_seconds
        state.draining = True
        log.info("shutting down: new requests get 503; %d sequence(s) in flight get up to %g s to finish", state.in_flight, grace)
        try:
            if not await self._until_idle(grace):
                error = APIError(503, "the server is shutting down: this request was aborted when the shutdown grace period ended")
                aborted = state.abort_all(error)
                log.warning("shutting down: aborted %d request(s) still running when the grace period ended", aborted)
                if not await self._until_idle(ABORTED_WAIT_S, stoppable=False):
                    log.error("shutting down: %d sequence(s) still in flight after being aborted", state.in_flight)
        finally:
            self.uvicorn.should_exit = True

    async def _until_idle(self, timeout: float, stoppable: bool = True) -> bool:
        """Wait until no request is in flight (True), or `timeout` or, if `stoppable`, a
        second shutdown request (False)."""
        deadline = time.monotonic() + timeout
        while self.state.busy:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (stoppable and self._grace_cut):
                return False
            await asyncio.sleep(min(0.05, remaining))
        return True

    async def _sweep_sessions(self) -> None:
        """Until cancelled: forget the tokens of program sessions the core expired, and close
        the chat sessions (and prompt_cache_key sessions) idle for `session_timeout`."""
        while True:
            rt = self.state.runtime
            timeouts = [t for t in (rt.core.session_timeout if rt is not None else None, self.settings.session_timeout) if t]
            await asyncio.sleep(max(0.1, min(SESSION_SWEEP_S, min(timeouts) / 2)) if timeouts else SESSION_SWEEP_S)
            try:
                await forget_removed_sessions(self.app)
                if rt is not None and not rt.closed:
                    self.app.state.chat_sessions.expire_idle(self.settings.session_timeout)
            except Exception:  # the sweeper must never take the server down
                log.exception("expiring idle sessions failed")

    def start_in_thread(self, timeout: float = 30) -> Server:
        self._thread = threading.Thread(target=lambda: asyncio.run(self.run()), name="parrot-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop_thread(self, timeout: float = 30) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout)


def serve(settings: ServeSettings | None = None) -> None:
    """Serve until interrupted: bind first, then load the model (settings default: env)."""
    settings = settings or ServeSettings.from_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(None, settings)
    server = Server(app, settings)
    log.info("parrot-core serving on http://%s:%d (loading the model...)", settings.host, settings.port)
    try:
        asyncio.run(server.run(load=lambda: build_runtime(settings)))
    finally:
        rt = server.state.runtime
        if rt is not None:
            with contextlib.suppress(Exception):
                rt.close()
