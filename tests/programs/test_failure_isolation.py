"""A failure fails exactly the work that needed what failed (design.md 3.3b, issue 9 defects
3 and 6): one session's failing or cancelled call never fails another session's call that
shares its system prompt, and a session holding only unfetched outputs still expires."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import pytest

from parrot_core.errors import EngineError, ParrotError

from .functions import review, write_code
from .test_programs import _SessionRuntime


def _on_loop(rt, coro):
    return asyncio.run_coroutine_threadsafe(coro, rt._loop).result(30)


async def _new_session(rt):
    return rt.core.create_session()


async def _new_variable(session):
    return session.new_variable("never set")


def _wait_until(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _two_sessions_share_a_system_prompt(rt, first_task: str):
    """Session A's call is filling the shared system prompt (held in the engine) while session
    B's call waits on that same context. Returns (A's output, B's pending get, A's session)."""
    a_session = _on_loop(rt, _new_session(rt))
    b_session = _on_loop(rt, _new_session(rt))
    pool = concurrent.futures.ThreadPoolExecutor(2)
    rt.engine.fills_open.clear()
    a = write_code.invoke(_SessionRuntime(rt, a_session), first_task)
    a_get = pool.submit(a.get, timeout=60)
    _wait_until(lambda: len(rt.engine.fills) == 1)  # A's fill of [system prompt + task] is in the engine
    hits = rt.contexts.cache_hits_total
    b = write_code.invoke(_SessionRuntime(rt, b_session), "a snake game")
    b_get = pool.submit(b.get, timeout=60)
    _wait_until(lambda: rt.contexts.cache_hits_total > hits)  # B hit A's system-prompt context and waits on it
    return a_get, b_get, a_session


def test_a_failed_fill_does_not_fail_another_sessions_call_on_the_shared_prompt(make_program_runtime):
    rt = make_program_runtime()
    with rt:
        rt.engine.fail_fill_containing = rt.tokenize(" poison")[0]
        a_get, b_get, _ = _two_sessions_share_a_system_prompt(rt, "a poison pill")
        rt.engine.fills_open.set()
        with pytest.raises(EngineError, match="injected"):
            a_get.result(60)
        assert isinstance(b_get.result(60), str)
        system = rt.tokenize("You are an expert engineer. Write Python code for")
        b_fill = rt.engine.fills[1][2]
        assert b_fill[: len(system)] == system  # B claimed the system prompt and filled it itself


def test_a_removed_session_does_not_fail_another_sessions_call_on_the_shared_prompt(make_program_runtime):
    rt = make_program_runtime()
    with rt:
        a_get, b_get, a_session = _two_sessions_share_a_system_prompt(rt, "a clock")
        _on_loop(rt, rt.core.remove_session(a_session.session_id))
        rt.engine.fills_open.set()
        with pytest.raises(ParrotError, match="session was removed"):
            a_get.result(60)
        assert isinstance(b_get.result(60), str)


def test_a_session_with_an_unfetched_output_expires(make_program_runtime):
    rt = make_program_runtime(session_timeout=0.05)
    with rt:
        session = _on_loop(rt, _new_session(rt))
        never = write_code.invoke(_SessionRuntime(rt, session), "never fetched")
        waiting_input = _on_loop(rt, _new_variable(session))
        stuck = review.invoke(_SessionRuntime(rt, session), waiting_input)
        stuck_get = concurrent.futures.ThreadPoolExecutor(1).submit(stuck.get, timeout=60)
        time.sleep(0.2)
        assert session.session_id in _on_loop(rt, rt.core.expire())
        with pytest.raises(ParrotError, match="session was removed"):
            never.get(timeout=5)
        with pytest.raises(ParrotError, match="session was removed"):
            stuck_get.result(10)
        assert session.session_id not in rt.core.sessions
        assert [c for c in rt.contexts.contexts.values() if c.session_id == session.session_id] == []


def test_removing_a_session_with_waiting_chains_leaves_no_unretrieved_errors(make_program_runtime, caplog):
    """A chain waiting on an upstream output is cancelled with its session; the upstream
    output then fails. The waiter's wrapper future must not log 'Future exception was never
    retrieved' (the mixed soak logged 28 such ERROR lines)."""
    import gc
    import logging

    rt = make_program_runtime()
    with rt:
        session = _on_loop(rt, _new_session(rt))
        proxy = _SessionRuntime(rt, session)
        rt.engine.fills_open.clear()
        first = write_code.invoke(proxy, "a clock")
        second = review.invoke(proxy, first)
        pending = concurrent.futures.ThreadPoolExecutor(1).submit(second.get, timeout=60)
        _wait_until(lambda: len(rt.engine.fills) == 1)  # the first call is filling; the second waits on it
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            _on_loop(rt, rt.core.remove_session(session.session_id))
            rt.engine.fills_open.set()
            with pytest.raises(ParrotError, match="session was removed"):
                pending.result(30)
            _on_loop(rt, asyncio.sleep(0.05))
            del first, second, proxy, session, pending  # the loop-side copies die with the variables
            gc.collect()
            _on_loop(rt, asyncio.sleep(0.05))
        assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
