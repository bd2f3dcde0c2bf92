"""What the context manager needs to know about a task: its nodes as variable ids."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parrot_core.contexts.context import Context


@dataclass(frozen=True)
class NodeSpec:
    """One node of a chain: the id of its variable, whether it is a Fill (else a Gen), and
    whether the variable is a global constant prefix."""

    var_id: str
    is_fill: bool = True
    is_constant_prefix: bool = False


@dataclass(eq=False)
class ContextTask:
    """A completion chain placed on an engine, as the context manager sees it.

    `parent_context`: for chain k > 0 of a multi-output request, the context of output k-1;
    the chain's first context forks from it (the caller keeps it alive during the call).
    `contexts` is filled by `set_task_contexts`: one entry per node, in node order (a fused
    context appears once per node it covers).
    """

    task_id: Hashable
    engine_id: Hashable
    nodes: Sequence[NodeSpec]
    session_id: str | None = None
    parent_context: Context | None = None
    fuse_fill: bool = False
    contexts: list[Context] = field(default_factory=list)
