"""The DAG of one session: requests linked through semantic variables, and activation.

Edges: a chain's output variable feeds the Fill nodes (and native functions) that read it;
chain k-1 of a request feeds chain k (it continues that KV). The graph stays acyclic:
inserting a request or native function that would close a cycle raises `GraphCycleError`
and changes nothing.

Activation is demand-driven. Fetching a variable activates its producer and, walking
backwards, everything the producer needs, with the fetcher's criteria (LATENCY outranks
THROUGHPUT: a later LATENCY fetch upgrades chains first activated for THROUGHPUT). Depth is
the longest path from a source, 1-based. The chains that feed one consumer chain form a
`TaskGroup` (the map stage of a map-reduce), which the scheduler places together.

Every walk (activation, cycle detection) is iterative, with an explicit stack: a program of any
depth works, whatever Python's recursion limit.
"""

from __future__ import annotations

from collections.abc import Iterator

from parrot_core.errors import GraphCycleError, InvalidRequestError
from parrot_core.graph.nodes import CompletionChain, FillNode, NativeFuncNode, PlaceholderGen, TaskGroup
from parrot_core.graph.request import RequestChain
from parrot_core.graph.variable import PerfCriteria, SemanticVariable

Producer = CompletionChain | NativeFuncNode


def _rank(criteria: PerfCriteria | None) -> int:
    return {None: 0, PerfCriteria.THROUGHPUT: 1, PerfCriteria.LATENCY: 2}[criteria]


class ComputeGraph:
    def __init__(self) -> None:
        self.requests: dict[str, RequestChain] = {}
        self.natives: list[NativeFuncNode] = []

    # -- building ------------------------------------------------------------------------
    def insert(self, request: RequestChain) -> None:
        for chain in request.chains:
            if chain.gen.sv.producer is not None or chain.gen.sv.done:
                raise InvalidRequestError(f"variable {chain.gen.sv.id!r} already has a value or a producer")
        self._link_request(request)
        try:
            self._check_acyclic(list(request.chains))
        except GraphCycleError:
            self._unlink_request(request)
            raise
        self.requests[request.request_id] = request

    def insert_native(self, node: NativeFuncNode) -> None:
        for sv in node.outputs.values():
            if sv.producer is not None or sv.done:
                raise InvalidRequestError(f"variable {sv.id!r} already has a value or a producer")
        self._link_native(node)
        try:
            self._check_acyclic([node])
        except GraphCycleError:
            self._unlink_native(node)
            raise
        self.natives.append(node)

    def remove_request(self, request: RequestChain) -> None:
        """Forget a finished request's consumer links (its outputs keep their values)."""
        self.requests.pop(request.request_id, None)
        for node in request.nodes:
            if isinstance(node, FillNode) and node in node.sv.consumers:
                node.sv.consumers.remove(node)

    def remove_native(self, node: NativeFuncNode) -> None:
        """Forget a finished native function's consumer links (its outputs keep their values)."""
        if node in self.natives:
            self.natives.remove(node)
        for sv in node.inputs.values():
            if node in sv.consumers:
                sv.consumers.remove(node)

    def _link_request(self, request: RequestChain) -> None:
        for node in request.nodes:
            if isinstance(node, PlaceholderGen):
                node.sv.producer = node
            elif not node.sv.done:  # a value that is already there needs no consumer edge
                node.sv.consumers.append(node)

    def _unlink_request(self, request: RequestChain) -> None:
        for node in request.nodes:
            if isinstance(node, PlaceholderGen):
                node.sv.producer = None
            elif node in node.sv.consumers:
                node.sv.consumers.remove(node)

    def _link_native(self, node: NativeFuncNode) -> None:
        for sv in node.outputs.values():
            sv.producer = node
        for sv in node.inputs.values():
            if not sv.done:
                sv.consumers.append(node)

    def _unlink_native(self, node: NativeFuncNode) -> None:
        for sv in node.outputs.values():
            sv.producer = None
        for sv in node.inputs.values():
            if node in sv.consumers:
                sv.consumers.remove(node)

    # -- structure -----------------------------------------------------------------------
    @staticmethod
    def upstream(item: Producer) -> Iterator[Producer]:
        """What must run before `item`: producers of its inputs, and the previous chain."""
        if isinstance(item, CompletionChain):
            if item.prev_chain is not None:
                yield item.prev_chain
            svs = [f.sv for f in item.fills]
        else:
            svs = list(item.inputs.values())
        for sv in svs:
            producer = _producer_of(sv)
            if producer is not None:
                yield producer

    @staticmethod
    def downstream(item: Producer) -> Iterator[Producer]:
        if isinstance(item, CompletionChain):
            outputs = [item.gen.sv]
            nxt = [c for c in item.request.chains if c.prev_chain is item] if item.request else []
            yield from nxt
        else:
            outputs = list(item.outputs.values())
        for sv in outputs:
            for consumer in sv.consumers:
                yield consumer.chain if isinstance(consumer, FillNode) else consumer

    def _check_acyclic(self, start: list[Producer]) -> None:
        """Raise `GraphCycleError` if a path downstream of `start` comes back to an item on it.

        An iterative depth-first walk (an explicit stack of downstream iterators), so the
        depth of the graph is not bounded by Python's recursion limit.
        """
        on_path: set[int] = set()
        finished: set[int] = set()
        for root in start:
            if id(root) in finished:
                continue
            on_path.add(id(root))
            stack: list[tuple[Producer, Iterator[Producer]]] = [(root, self.downstream(root))]
            while stack:
                item, successors = stack[-1]
                nxt = next(successors, None)
                if nxt is None:
                    stack.pop()
                    on_path.discard(id(item))
                    finished.add(id(item))
                elif id(nxt) in on_path:
                    raise GraphCycleError("this call would make the variable graph cyclic (an output feeds its own inputs)")
                elif id(nxt) not in finished:
                    on_path.add(id(nxt))
                    stack.append((nxt, self.downstream(nxt)))

    # -- activation ----------------------------------------------------------------------
    def activate(self, sv: SemanticVariable, criteria: PerfCriteria | None = None) -> None:
        """Activate whatever produces `sv` (and, backwards, what that needs)."""
        producer = _producer_of(sv)
        if producer is not None:
            self._activate(producer, criteria or PerfCriteria.THROUGHPUT)

    def _activate(self, root: Producer, criteria: PerfCriteria) -> None:
        """Activate `root` and, first, every upstream item not yet activated with `criteria`
        or stronger (those are settled: their depth and criteria stand).

        Post-order over the upstream DAG with an explicit stack, so any depth works: an item
        is finished once all its upstream items are, which gives its depth (1 + the deepest
        upstream item) and, for a chain fed by several chains, its task group.
        """
        if _settled(root, criteria):
            return
        root.criteria = criteria
        ups = _unique(self.upstream(root))
        stack: list[tuple[Producer, list[Producer], Iterator[Producer]]] = [(root, ups, iter(ups))]
        while stack:
            item, ups, pending = stack[-1]
            up = next(pending, None)
            if up is not None:
                if not _settled(up, criteria):
                    up.criteria = criteria
                    up_ups = _unique(self.upstream(up))
                    stack.append((up, up_ups, iter(up_ups)))
                continue
            stack.pop()
            _finish(item, ups, criteria)


def _settled(item: Producer, criteria: PerfCriteria) -> bool:
    return item.activated.done() and _rank(item.criteria) >= _rank(criteria)


def _unique(items: Iterator[Producer]) -> list[Producer]:
    """`items` in order, each once (a call may read one variable twice, or two outputs of one
    native function): a chain that reads one chain's output twice is fed by one chain, not two."""
    return list({id(item): item for item in items}.values())


def _finish(item: Producer, ups: list[Producer], criteria: PerfCriteria) -> None:
    """Set `item`'s depth, task group and activation once every item in `ups` is finished."""
    item.depth = max(item.depth, 1 + max((up.depth for up in ups), default=0))
    if isinstance(item, CompletionChain):
        feeders = [up for up in ups if isinstance(up, CompletionChain) and up is not item.prev_chain]
        if len(feeders) > 1:
            group = TaskGroup(consumer=item)
            for member in feeders:
                if member.group is None:
                    member.group = group
                    group.members.append(member)
    if not item.activated.done():
        item.activated.set_result(criteria)


def _producer_of(sv: SemanticVariable) -> Producer | None:
    if sv.producer is None or sv.done:
        return None
    if isinstance(sv.producer, PlaceholderGen):
        return sv.producer.chain
    return sv.producer  # type: ignore[return-value]
