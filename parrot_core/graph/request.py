"""Parsing a request (template + parameters) into nodes, variables and completion chains."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from parrot_core.errors import InvalidRequestError, TemplateError, UnknownVariableError
from parrot_core.graph.namespace import Namespace
from parrot_core.graph.nodes import (
    ChainNode,
    CompletionChain,
    ConstantFill,
    FillNode,
    PlaceholderFill,
    PlaceholderGen,
)
from parrot_core.graph.template import PlaceholderChunk, TextChunk, parse_template
from parrot_core.graph.variable import PerfCriteria, SemanticVariable

_request_ids = itertools.count()


@dataclass(frozen=True)
class Parameter:
    """One placeholder's binding. An input gives exactly one of `value` (literal text) or
    `var_id` (an existing variable). An output may give `var_id` to write a variable declared
    earlier (unset, without a producer); `sampling` holds its generation options."""

    name: str
    is_output: bool = False
    var_id: str | None = None
    value: str | None = None
    sampling: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class RequestMetadata:
    cache_prefix: bool = True  # leading constant text becomes a global, content-keyed prefix
    fuse_fill: bool = False  # consecutive Fills after a cache miss share one context
    criteria: PerfCriteria | None = None  # activate the outputs at submission time
    models: tuple[str, ...] = ()  # acceptable model names; empty = any


@dataclass(eq=False)
class RequestChain:
    request_id: str
    nodes: list[ChainNode]
    chains: list[CompletionChain]
    inputs: dict[str, SemanticVariable]
    outputs: dict[str, SemanticVariable]
    metadata: RequestMetadata = field(default_factory=RequestMetadata)


def parse_request(
    template: str,
    parameters: Sequence[Parameter],
    *,
    session: Namespace,
    constants: Namespace,
    metadata: RequestMetadata | None = None,
    literals: Mapping[str, str] | None = None,
) -> RequestChain:
    """Build a `RequestChain`. Validates everything before creating any variable, so a
    rejected request leaves both namespaces as they were (content variables aside).

    `literals` are placeholders filled with plain text (a Python value rendered into the
    template): they become part of the surrounding constant text.

    Raises `TemplateError` / `InvalidRequestError` for: a placeholder without a parameter, a
    parameter the template never uses, a duplicate parameter, an output used twice, two outputs
    with nothing between them, text after the last output, no output at all, and bindings
    that contradict each other. Unknown `var_id`s raise `UnknownVariableError`.
    """
    metadata = metadata or RequestMetadata()
    chunks, params = check_request(template, parameters, literals)

    bound = {name: _bind(p, session, constants) for name, p in params.items()}
    nodes: list[ChainNode] = []
    for i, chunk in enumerate(chunks):
        if isinstance(chunk, TextChunk):
            if i == 0 and metadata.cache_prefix:
                sv = constants.variable_for_content(chunk.text, is_constant_prefix=True)
            else:
                sv = session.variable_for_content(chunk.text)
            nodes.append(ConstantFill(sv, text=chunk.text))
        elif params[chunk.name].is_output:
            p = params[chunk.name]
            nodes.append(PlaceholderGen(bound[chunk.name], name=chunk.name, sampling=dict(p.sampling or {})))
        else:
            nodes.append(PlaceholderFill(bound[chunk.name], name=chunk.name))

    chains: list[CompletionChain] = []
    fills: list[FillNode] = []
    request_id = f"req-{next(_request_ids)}"
    for node in nodes:
        if isinstance(node, PlaceholderGen):
            chain = CompletionChain(fills, node, prev_chain=chains[-1] if chains else None)
            chains.append(chain)
            fills = []
        else:
            fills.append(node)
    request = RequestChain(
        request_id=request_id,
        nodes=nodes,
        chains=chains,
        inputs={n: bound[n] for n, p in params.items() if not p.is_output},
        outputs={n: bound[n] for n, p in params.items() if p.is_output},
        metadata=metadata,
    )
    for chain in chains:
        chain.request = request
    return request


def check_request(
    template: str, parameters: Sequence[Parameter], literals: Mapping[str, str] | None = None
) -> tuple[list, dict[str, Parameter]]:
    """Validate a template against its parameters without creating anything (used at
    decoration time too). Returns the chunks (literals rendered) and the parameters by name."""
    literals = dict(literals or {})
    params = _index_parameters(parameters)
    both = sorted(set(literals) & set(params))
    if both:
        raise InvalidRequestError(f"{', '.join(both)} given both as a parameter and as a literal")
    chunks = _render_literals(parse_template(template), literals)
    chunks = _strip_trailing_whitespace(chunks)
    _check_shape(chunks, params)
    return chunks, params


def _render_literals(chunks: list, literals: dict[str, str]) -> list:
    merged: list = []
    unused = set(literals)
    for chunk in chunks:
        if isinstance(chunk, PlaceholderChunk) and chunk.name in literals:
            unused.discard(chunk.name)
            chunk = TextChunk(str(literals[chunk.name]))
        if isinstance(chunk, TextChunk) and merged and isinstance(merged[-1], TextChunk):
            merged[-1] = TextChunk(merged[-1].text + chunk.text)
        elif not (isinstance(chunk, TextChunk) and not chunk.text):
            merged.append(chunk)
    if unused:
        raise TemplateError(f"literals not used by the template: {', '.join(sorted(unused))}")
    return merged


def _index_parameters(parameters: Sequence[Parameter]) -> dict[str, Parameter]:
    params: dict[str, Parameter] = {}
    for p in parameters:
        if p.name in params:
            raise InvalidRequestError(f"parameter {p.name!r} is given twice")
        if p.is_output:
            if p.value is not None:
                raise InvalidRequestError(f"output {p.name!r} cannot have a value")
        else:
            if p.sampling:
                raise InvalidRequestError(f"input {p.name!r} cannot have sampling options")
            if (p.value is None) == (p.var_id is None):
                raise InvalidRequestError(f"input {p.name!r} needs exactly one of value or var_id")
            if p.value is not None and not isinstance(p.value, str):
                raise InvalidRequestError(f"input {p.name!r} must be text, got {type(p.value).__name__}")
        params[p.name] = p
    return params


def _check_shape(chunks: list, params: dict[str, Parameter]) -> None:
    used: set[str] = set()
    seen_outputs: set[str] = set()
    previous_was_output = False
    for chunk in chunks:
        if isinstance(chunk, TextChunk):
            previous_was_output = False
            continue
        p = params.get(chunk.name)
        if p is None:
            raise TemplateError(f"placeholder {{{{{chunk.name}}}}} has no parameter")
        used.add(chunk.name)
        if p.is_output:
            if chunk.name in seen_outputs:
                raise TemplateError(f"output {{{{{chunk.name}}}}} is used twice")
            if previous_was_output:
                raise TemplateError(f"output {{{{{chunk.name}}}}} directly follows another output; put text or an input between them")
            seen_outputs.add(chunk.name)
        previous_was_output = p.is_output
    unused = sorted(set(params) - used)
    if unused:
        raise TemplateError(f"parameters not used by the template: {', '.join(unused)}")
    if not seen_outputs:
        raise TemplateError("the template has no output placeholder")
    last = chunks[-1]
    if not (isinstance(last, PlaceholderChunk) and params[last.name].is_output):
        raise TemplateError("the template has text or inputs after its last output; they would never be used")


def _strip_trailing_whitespace(chunks: list) -> list:
    """Whitespace after the last placeholder is formatting (a docstring's last line), not text."""
    while chunks and isinstance(chunks[-1], TextChunk) and not chunks[-1].text.strip():
        chunks = chunks[:-1]
    return chunks


def _bind(p: Parameter, session: Namespace, constants: Namespace) -> SemanticVariable:
    if p.value is not None:
        return session.variable_for_content(p.value)
    if p.var_id is None:
        return session.new_variable(p.name)
    if p.var_id in session:
        var = session.get(p.var_id)
    elif p.var_id in constants:
        var = constants.get(p.var_id)
    else:
        raise UnknownVariableError(f"parameter {p.name!r}: unknown variable {p.var_id!r}")
    if p.is_output and (var.done or var.producer is not None):
        raise InvalidRequestError(f"output {p.name!r}: variable {p.var_id!r} is already set or produced elsewhere")
    return var
