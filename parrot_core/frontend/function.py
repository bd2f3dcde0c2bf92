"""Semantic functions, native functions and variables: the program-writing API.

    @P.semantic_function()
    def summarize(doc: P.Input, summary: P.Output(max_tokens=64)):
        \"\"\"You are a concise assistant.
        Document: {{doc}}
        Summary: {{summary}}\"\"\"

The docstring (dedented) is the template. Parameters annotated `P.Input` take text or a
semantic variable; `P.Output` / `P.Output(max_tokens=..., temperature=..., stop=...)` are
outputs; any other parameter is a Python value rendered into the template as text. Malformed
templates fail at decoration time. A call returns at once: the output variable (a tuple for
several, in declaration order), bound to the current `Runtime` (the innermost `with` block)
unless `fn.invoke(runtime, ...)` names one.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from parrot_core.errors import InvalidRequestError, TemplateError
from parrot_core.graph import Parameter, PerfCriteria, RequestMetadata, SemanticVariable, check_request
from parrot_core.serve.executor import output_sampling

class Input:
    """Annotation of a text input: pass a `str` or a `SemanticVariable`."""


class Output:
    """Annotation of an output: `P.Output`, or `P.Output(max_tokens=..., temperature=...,
    top_p=..., top_k=..., seed=..., stop=..., stop_token_ids=..., ignore_eos=...)`; with
    `json_schema=` (or `json_object=True`, `regex=`, `choice=[...]`, `grammar=`) the value is
    generated under that constraint, e.g. valid JSON of the schema."""

    def __init__(self, **sampling: Any) -> None:
        output_sampling(sampling)  # validate now: a bad option fails at decoration time
        self.sampling = sampling


@dataclass(frozen=True)
class _Param:
    name: str
    kind: str  # "input" | "output" | "value"
    sampling: dict[str, Any] | None = None


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    """The signature with string annotations (`from __future__ import annotations`) evaluated."""
    try:
        return inspect.signature(fn, eval_str=True)
    except NameError as e:
        raise TemplateError(f"{fn.__name__}: cannot evaluate a parameter annotation ({e})") from None


def _classify(fn: Callable[..., Any]) -> list[_Param]:
    params = []
    for name, p in _signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TemplateError(f"{fn.__name__}: *args / **kwargs parameters are not supported")
        ann = p.annotation
        if ann is Input:
            params.append(_Param(name, "input"))
        elif ann is Output:
            params.append(_Param(name, "output", {}))
        elif isinstance(ann, Output):
            params.append(_Param(name, "output", dict(ann.sampling)))
        else:
            params.append(_Param(name, "value"))
    return params


class SemanticFunction:
    def __init__(self, fn: Callable[..., Any], metadata: RequestMetadata) -> None:
        if not fn.__doc__ or not fn.__doc__.strip():
            raise TemplateError(f"semantic function {fn.__name__} needs a docstring: it is the prompt template")
        self.name = fn.__name__
        self.template = inspect.cleandoc(fn.__doc__)
        self.params = _classify(fn)
        self.metadata = metadata
        self._signature = _signature(fn)
        functools.update_wrapper(self, fn)
        # Validate now, with stand-in values: a malformed template fails at decoration time.
        check_request(
            self.template,
            [Parameter(p.name, is_output=p.kind == "output", value=None if p.kind == "output" else "x") for p in self.params if p.kind != "value"],
            {p.name: "x" for p in self.params if p.kind == "value"},
        )

    def __repr__(self) -> str:
        return f"<semantic function {self.name}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from parrot_core.frontend.runtime import current_runtime

        return self.invoke(current_runtime(), *args, **kwargs)

    def invoke(self, runtime: Any, *args: Any, **kwargs: Any) -> Any:
        """Call on an explicit runtime (a `Runtime` or a remote client)."""
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        parameters: list[Parameter] = []
        literals: dict[str, str] = {}
        for p in self.params:
            value = bound.get(p.name)
            if p.kind == "value":
                if p.name not in bound:
                    raise InvalidRequestError(f"{self.name}() missing argument {p.name!r}")
                literals[p.name] = str(value)
            elif p.kind == "input":
                if isinstance(value, SemanticVariable) or hasattr(value, "var_id"):
                    parameters.append(Parameter(p.name, var_id=_var_id(value)))
                elif isinstance(value, str):
                    parameters.append(Parameter(p.name, value=value))
                else:
                    raise InvalidRequestError(
                        f"{self.name}(): input {p.name!r} must be text or a semantic variable, got {type(value).__name__}"
                    )
            else:
                var_id = _var_id(value) if value is not None else None
                parameters.append(Parameter(p.name, is_output=True, var_id=var_id, sampling=p.sampling))
        outputs = runtime.submit_call(self.template, parameters, literals, self.metadata)
        ordered = [outputs[p.name] for p in self.params if p.kind == "output"]
        return ordered[0] if len(ordered) == 1 else tuple(ordered)


class NativeFunction:
    """A Python function run as one DAG node, in the caller's process, when its outputs are
    demanded and its inputs are ready. It receives its inputs as ready variables and its
    outputs as variables to `set`; an exception fails every output it did not set."""

    def __init__(self, fn: Callable[..., Any], criteria: PerfCriteria | None) -> None:
        self.fn = fn
        self.name = fn.__name__
        self.params = _classify(fn)
        self.criteria = criteria
        self._signature = _signature(fn)
        if not any(p.kind == "output" for p in self.params):
            raise TemplateError(f"native function {self.name} has no P.Output parameter")
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from parrot_core.frontend.runtime import current_runtime

        return self.invoke(current_runtime(), *args, **kwargs)

    def invoke(self, runtime: Any, *args: Any, **kwargs: Any) -> Any:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        inputs: dict[str, Any] = {}
        values: dict[str, Any] = {}
        outputs: list[str] = []
        for p in self.params:
            if p.kind == "input":
                value = bound.get(p.name)
                if not isinstance(value, (str, SemanticVariable)) and not hasattr(value, "var_id"):
                    raise InvalidRequestError(f"{self.name}(): input {p.name!r} must be text or a semantic variable")
                inputs[p.name] = value
            elif p.kind == "output":
                outputs.append(p.name)
            else:
                values[p.name] = bound.get(p.name)
        func = functools.partial(self.fn, **values) if values else self.fn
        result = runtime.submit_native(func, self.name, inputs, outputs, self.criteria)
        ordered = [result[name] for name in outputs]
        return ordered[0] if len(ordered) == 1 else tuple(ordered)


def semantic_function(
    *, cache_prefix: bool = True, criteria: PerfCriteria | str | None = None, models: list[str] | None = None, fuse_fill: bool = False
) -> Callable[[Callable[..., Any]], SemanticFunction]:
    metadata = RequestMetadata(
        cache_prefix=cache_prefix, fuse_fill=fuse_fill, criteria=PerfCriteria.parse(criteria), models=tuple(models or ())
    )
    return lambda fn: SemanticFunction(fn, metadata)


def native_function(*, criteria: PerfCriteria | str | None = None) -> Callable[[Callable[..., Any]], NativeFunction]:
    return lambda fn: NativeFunction(fn, PerfCriteria.parse(criteria))


def variable(name: str = "", content: str | None = None) -> SemanticVariable:
    """A new variable in the current runtime's session, optionally set at once."""
    from parrot_core.frontend.runtime import current_runtime

    return current_runtime().variable(name, content)


def _var_id(value: Any) -> str:
    if isinstance(value, SemanticVariable):
        return value.id
    if hasattr(value, "var_id"):
        return value.var_id
    raise InvalidRequestError(f"expected a semantic variable, got {type(value).__name__}")
