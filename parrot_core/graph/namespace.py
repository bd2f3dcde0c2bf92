"""Variable namespaces: who owns a semantic variable and how its id is made.

Ids have the form `<scope>:<kind>:<key>`:
- kind `c`: a content id; key = sha256 of the text. The same text in the same scope is the same
  variable (so the same system prompt shares one variable, and one cached context, across
  sessions when the scope is the global constant-prefix namespace).
- kind `v`: a named id; key = a counter that only grows. Ids are never recycled.
The kind tag sits at a fixed place and a scope may not contain ':', so a content id can never
equal a named id (Parrot's collision: the text "0" resolving to the variable of seed 0).
"""

from __future__ import annotations

import hashlib
import itertools
import time
import weakref
from collections.abc import Callable, Iterator, MutableMapping

from parrot_core.errors import InvalidRequestError, UnknownVariableError
from parrot_core.graph.variable import SemanticVariable

GLOBAL_SCOPE = "global"


def content_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Namespace:
    """The variables of one scope (the global constant-prefix scope or one session).

    By default the namespace owns its variables: `remove` forgets one; dropping the namespace
    drops them all. That is what a session reached over HTTP needs, since its client names
    variables by id only. With `weak=True` it holds them by weak reference instead: a variable
    leaves the namespace (and is no longer listed or found) once nothing else holds it, no
    caller, graph node or running chain; `variable_for_content` then makes a new one for the
    same text, under the same content id. Named ids are never recycled in either mode.

    Tracks the last access time of each variable (for idle expiry of global constant
    prefixes) with an injectable clock.
    """

    def __init__(self, scope: str, clock: Callable[[], float] = time.monotonic, *, weak: bool = False) -> None:
        if not scope or ":" in scope:
            raise InvalidRequestError(f"a namespace scope must be non-empty and contain no ':'; got {scope!r}")
        self.scope = scope
        self.weak = weak
        self._clock = clock
        self._counter = itertools.count()
        self._vars: MutableMapping[str, SemanticVariable] = weakref.WeakValueDictionary() if weak else {}
        self._last_access: dict[str, float] = {}

    def __contains__(self, var_id: str) -> bool:
        return var_id in self._vars

    def __len__(self) -> int:
        return len(self._vars)

    def __iter__(self) -> Iterator[SemanticVariable]:
        return iter(list(self._vars.values()))

    def new_variable(self, name: str = "") -> SemanticVariable:
        """A fresh, unset variable with a named id never used before in this scope."""
        var = SemanticVariable(f"{self.scope}:v:{next(self._counter)}", name)
        self._add(var)
        return var

    def variable_for_content(self, text: str, *, is_constant_prefix: bool = False) -> SemanticVariable:
        """The variable holding exactly `text` in this scope, created and set on first use."""
        var_id = f"{self.scope}:c:{content_key(text)}"
        var = self._vars.get(var_id)
        if var is None:
            var = SemanticVariable(var_id, is_constant_prefix=is_constant_prefix)
            var.set(text)
            self._add(var)
        self.touch(var_id)
        return var

    def get(self, var_id: str) -> SemanticVariable:
        var = self._vars.get(var_id)
        if var is None:
            raise UnknownVariableError(f"no variable {var_id!r} in scope {self.scope!r}")
        self.touch(var_id)
        return var

    def touch(self, var_id: str) -> None:
        if var_id in self._vars:
            self._last_access[var_id] = self._clock()

    def remove(self, var_id: str) -> None:
        if self._vars.pop(var_id, None) is None:
            raise UnknownVariableError(f"no variable {var_id!r} in scope {self.scope!r}")
        del self._last_access[var_id]

    def expired(self, idle_seconds: float) -> list[str]:
        """Ids of variables not accessed for more than `idle_seconds`."""
        deadline = self._clock() - idle_seconds
        # a copy: in a weak namespace the collector may forget a variable during the loop
        return [var_id for var_id, t in self._last_access.copy().items() if t < deadline]

    def _add(self, var: SemanticVariable) -> None:
        self._vars[var.id] = var
        self._last_access[var.id] = self._clock()
        if self.weak:
            weakref.finalize(var, _forget_access, weakref.ref(self), var.id)


def _forget_access(namespace_ref: weakref.ref[Namespace], var_id: str) -> None:
    """A weak namespace's variable died: drop its access time, unless a new variable with the
    same content id took its place meanwhile."""
    namespace = namespace_ref()
    if namespace is not None and var_id not in namespace._vars:
        namespace._last_access.pop(var_id, None)
