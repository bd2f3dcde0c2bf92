"""Nodes of a request and the completion chains they are cut into.

A request is a sequence of nodes in prompt order: `ConstantFill` (literal text),
`PlaceholderFill` (an input variable) and `PlaceholderGen` (an output variable). It is cut
after every Gen into `CompletionChain`s ("Fill ... Fill Gen"), the unit of scheduling. Chain k
of a request continues the KV of chain k-1 (`prev_chain`), so output k sees output k-1.
A `NativeFuncNode` is a whole Python function run in the caller's process as one DAG node.
"""

from __future__ import annotations

import concurrent.futures
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from parrot_core.graph.variable import PerfCriteria, SemanticVariable


class Node:
    """Base of every DAG node."""


@dataclass(eq=False)
class FillNode(Node):
    """A node whose variable's text is appended to the prompt."""

    sv: SemanticVariable
    chain: CompletionChain | None = field(default=None, repr=False)

    is_fill = True


@dataclass(eq=False)
class ConstantFill(FillNode):
    text: str = ""


@dataclass(eq=False)
class PlaceholderFill(FillNode):
    name: str = ""


@dataclass(eq=False)
class PlaceholderGen(Node):
    """An output: the engine generates the text of `sv`. `sampling` is kept as plain options
    (max_tokens, temperature, ...) and validated by the layer that runs it."""

    sv: SemanticVariable
    name: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)
    chain: CompletionChain | None = field(default=None, repr=False)

    is_fill = False


@dataclass(eq=False)
class NativeFuncNode(Node):
    """A Python function over semantic variables, run where the program runs."""

    func: Callable[..., Any]
    inputs: dict[str, SemanticVariable]
    outputs: dict[str, SemanticVariable]
    name: str = ""
    criteria: PerfCriteria | None = None
    depth: int = 0
    activated: concurrent.futures.Future[PerfCriteria] = field(default_factory=concurrent.futures.Future, repr=False)


ChainNode = FillNode | PlaceholderGen
_chain_ids = itertools.count()


@dataclass(eq=False)
class CompletionChain:
    """`Fill* Gen`: one scheduling unit. `fills` may be empty for chain k > 0 of a request."""

    fills: list[FillNode]
    gen: PlaceholderGen
    prev_chain: CompletionChain | None = None
    request: Any = field(default=None, repr=False)
    chain_id: int = field(default_factory=lambda: next(_chain_ids))
    criteria: PerfCriteria | None = None
    depth: int = 0  # longest path from a source chain, 1-based; 0 until activated
    group: TaskGroup | None = None  # the chains that feed the same consumer as this one
    activated: concurrent.futures.Future[PerfCriteria] = field(default_factory=concurrent.futures.Future, repr=False)

    def __post_init__(self) -> None:
        for node in self.nodes:
            node.chain = self

    @property
    def nodes(self) -> list[ChainNode]:
        return [*self.fills, self.gen]

    @property
    def is_activated(self) -> bool:
        return self.activated.done()


@dataclass(eq=False)
class TaskGroup:
    """All chains whose outputs feed one consumer chain; the scheduler places them together."""

    consumer: CompletionChain
    members: list[CompletionChain] = field(default_factory=list)
