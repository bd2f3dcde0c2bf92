"""Semantic variables: write-once futures that link LLM calls into a DAG."""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from parrot_core.errors import VariableAlreadySetError

if TYPE_CHECKING:
    from parrot_core.graph.nodes import Node


class PerfCriteria(str, enum.Enum):
    """What the fetcher of a variable cares about. LATENCY outranks THROUGHPUT."""

    LATENCY = "latency"
    THROUGHPUT = "throughput"

    @classmethod
    def parse(cls, value: "PerfCriteria | str | None") -> "PerfCriteria | None":
        if value is None or isinstance(value, PerfCriteria):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            from parrot_core.errors import InvalidRequestError

            choices = ", ".join(c.value for c in cls)
            raise InvalidRequestError(f"unknown criteria {value!r}; expected one of: {choices}") from None


T = TypeVar("T")


async def shielded(future: concurrent.futures.Future[T]) -> T:
    """Await a thread-safe future from a loop; cancelling the awaiting task leaves the future
    alone (a bare `wrap_future` would cancel it). The loop-side copy's outcome is always
    retrieved, so a waiter that was cancelled leaves no 'exception was never retrieved' error
    behind when the future later fails."""
    inner = asyncio.wrap_future(future)
    inner.add_done_callback(lambda f: f.cancelled() or f.exception())
    return await asyncio.shield(inner)


class SemanticVariable:
    """A write-once value that can also fail.

    Contract:
    - `set(value)` or `fail(error)` happens at most once; a second attempt raises
      `VariableAlreadySetError` and changes nothing.
    - `get(timeout=...)` blocks (any thread) until the variable is set and returns the value,
      or raises the error it failed with, or `TimeoutError`. `await aget()` is the async form.
      Nothing waits forever on a variable whose producer failed: the failure is the value.
    - `on_demand`, if set by whoever owns the graph, is called by `get`/`aget` before waiting;
      that is how fetching a variable activates the calls that produce it.
    - Graph links: at most one `producer` (a Gen node or a native function node); consumers
      are the Fill / native nodes that read it.
    """

    def __init__(self, var_id: str, name: str = "", *, is_constant_prefix: bool = False) -> None:
        self.id = var_id
        self.name = name
        self.is_constant_prefix = is_constant_prefix
        self.producer: Node | None = None
        self.consumers: list[Node] = []
        self.on_demand: Callable[[SemanticVariable, PerfCriteria | None], None] | None = None
        self._future: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "failed" if self.is_failed else "ready" if self.is_ready else "pending"
        return f"SemanticVariable({self.id!r}, name={self.name!r}, {state})"

    # -- writing -------------------------------------------------------------------------
    def set(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a semantic variable holds text; got {type(value).__name__}")
        with self._lock:
            if self._future.done():
                raise VariableAlreadySetError(f"variable {self.id!r} is already {self._state_word()}")
            self._future.set_result(value)

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self._future.done():
                raise VariableAlreadySetError(f"variable {self.id!r} is already {self._state_word()}")
            self._future.set_exception(error)

    def _state_word(self) -> str:
        return "failed" if self._future.exception() is not None else "set"

    # -- reading -------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._future.done()

    @property
    def is_ready(self) -> bool:
        return self._future.done() and self._future.exception() is None

    @property
    def is_failed(self) -> bool:
        return self._future.done() and self._future.exception() is not None

    @property
    def error(self) -> BaseException | None:
        return self._future.exception() if self._future.done() else None

    def get(self, criteria: PerfCriteria | str | None = None, timeout: float | None = None) -> str:
        self._demand(criteria)
        try:
            return self._future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"variable {self.id!r} was not ready within {timeout} s") from None

    async def aget(self, criteria: PerfCriteria | str | None = None, timeout: float | None = None) -> str:
        self._demand(criteria)
        return await asyncio.wait_for(self.wait(), timeout)

    async def wait(self) -> str:
        """Await the value without activating anything (used inside the graph executor).
        Cancelling the wait never cancels the variable."""
        return await shielded(self._future)

    def add_done_callback(self, fn: Callable[[SemanticVariable], None]) -> None:
        self._future.add_done_callback(lambda _f: fn(self))

    def _demand(self, criteria: PerfCriteria | str | None) -> None:
        parsed = PerfCriteria.parse(criteria)
        if self.on_demand is not None and not self._future.done():
            self.on_demand(self, parsed)
