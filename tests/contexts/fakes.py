"""A recording fake engine for serve-layer tests (no model, no tensors)."""

from __future__ import annotations


class RecordingEngine:
    """Records every `free_context` call and fails if told to free an id twice."""

    def __init__(self) -> None:
        self.freed: list[int] = []

    def free_context(self, context_id: int) -> None:
        assert context_id not in self.freed, f"context {context_id} freed twice"
        self.freed.append(context_id)


def assert_children_freed_first(freed: list[int], contexts) -> None:
    order = {cid: i for i, cid in enumerate(freed)}
    for ctx in contexts:
        parent = ctx.parent_context
        if parent is not None and ctx.context_id in order and parent.context_id in order:
            assert order[ctx.context_id] < order[parent.context_id], f"{parent.context_id} freed before its child {ctx.context_id}"
