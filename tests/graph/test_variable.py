import asyncio
import threading
import time

import pytest

from parrot_core.errors import InvalidRequestError, VariableAlreadySetError
from parrot_core.graph import PerfCriteria, SemanticVariable


def test_set_once_then_get():
    v = SemanticVariable("s:v:0")
    v.set("hello")
    assert v.get() == "hello" and v.is_ready and not v.is_failed
    with pytest.raises(VariableAlreadySetError):
        v.set("again")
    with pytest.raises(VariableAlreadySetError):
        v.fail(RuntimeError("late"))
    assert v.get() == "hello"


def test_failure_is_raised_by_get_and_is_final():
    v = SemanticVariable("s:v:0")
    v.fail(RuntimeError("engine broke"))
    assert v.is_failed and v.done
    with pytest.raises(RuntimeError, match="engine broke"):
        v.get()
    with pytest.raises(VariableAlreadySetError):
        v.set("too late")


def test_get_timeout_raises_instead_of_hanging():
    v = SemanticVariable("s:v:0")
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        v.get(timeout=0.05)
    assert time.monotonic() - start < 5


def test_get_from_another_thread_wakes_on_set():
    v = SemanticVariable("s:v:0")
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(v.get(timeout=5)))
    t.start()
    v.set("x")
    t.join(5)
    assert got == ["x"]


def test_aget_and_wait():
    async def main():
        v = SemanticVariable("s:v:0")
        asyncio.get_running_loop().call_later(0.01, v.set, "later")
        assert await v.aget(timeout=5) == "later"
        w = SemanticVariable("s:v:1")
        asyncio.get_running_loop().call_later(0.01, w.fail, ValueError("bad"))
        with pytest.raises(ValueError, match="bad"):
            await w.wait()

    asyncio.run(main())


def test_on_demand_is_called_with_parsed_criteria_before_waiting():
    v = SemanticVariable("s:v:0")
    calls = []

    def demand(var, criteria):
        calls.append((var.id, criteria))
        var.set("made on demand")

    v.on_demand = demand
    assert v.get("latency") == "made on demand"
    assert calls == [("s:v:0", PerfCriteria.LATENCY)]
    assert v.get() == "made on demand" and len(calls) == 1  # a ready variable demands nothing


def test_bad_criteria_and_bad_value_are_typed_errors():
    v = SemanticVariable("s:v:0")
    with pytest.raises(InvalidRequestError, match="unknown criteria"):
        v.get("fastest", timeout=0)
    with pytest.raises(TypeError):
        v.set(42)  # type: ignore[arg-type]
    assert not v.done
