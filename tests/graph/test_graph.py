import pytest

from parrot_core.errors import GraphCycleError, InvalidRequestError
from parrot_core.graph import (
    GLOBAL_SCOPE,
    ComputeGraph,
    Namespace,
    NativeFuncNode,
    Parameter,
    PerfCriteria,
    parse_request,
)


class Program:
    """A session's namespaces and graph, with a helper to submit calls."""

    def __init__(self):
        self.session = Namespace("s1")
        self.constants = Namespace(GLOBAL_SCOPE)
        self.graph = ComputeGraph()

    def call(self, template, **params):
        parameters = []
        for name, value in params.items():
            if value == "OUT":
                parameters.append(Parameter(name, is_output=True))
            elif isinstance(value, str):
                parameters.append(Parameter(name, value=value))
            else:  # a semantic variable
                parameters.append(Parameter(name, var_id=value.id))
        req = parse_request(template, parameters, session=self.session, constants=self.constants)
        self.graph.insert(req)
        return req


def test_three_call_pipeline_activation_depth_and_criteria():
    p = Program()
    a = p.call("A {{x}} -> {{a}}", x="input", a="OUT")
    b = p.call("B {{a}} -> {{b}}", a=a.outputs["a"], b="OUT")
    c = p.call("C {{b}} -> {{c}}", b=b.outputs["b"], c="OUT")
    assert a.outputs["a"].consumers == [b.nodes[1]]  # the value flows to the next call
    assert not any(ch.is_activated for r in (a, b, c) for ch in r.chains)  # lazy until fetched
    p.graph.activate(c.outputs["c"], PerfCriteria.LATENCY)
    chains = [a.chains[0], b.chains[0], c.chains[0]]
    assert [ch.depth for ch in chains] == [1, 2, 3]
    assert all(ch.is_activated and ch.criteria is PerfCriteria.LATENCY for ch in chains)
    assert all(ch.activated.result() is PerfCriteria.LATENCY for ch in chains)


def test_depth_does_not_depend_on_activation_order():
    p = Program()
    a = p.call("A {{a}}", a="OUT")
    b = p.call("B {{a}} {{b}}", a=a.outputs["a"], b="OUT")
    c = p.call("C {{b}} {{c}}", b=b.outputs["b"], c="OUT")
    p.graph.activate(a.outputs["a"])
    p.graph.activate(c.outputs["c"])
    assert [r.chains[0].depth for r in (a, b, c)] == [1, 2, 3]


def test_map_reduce_forms_one_task_group_and_latency_upgrades_throughput():
    p = Program()
    maps = [p.call("Summarize {{chunk}}: {{s}}", chunk=f"chunk {i}", s="OUT") for i in range(4)]
    reduce_params = {f"s{i}": m.outputs["s"] for i, m in enumerate(maps)}
    template = "Combine " + " ".join(f"{{{{s{i}}}}}" for i in range(4)) + " into {{total}}"
    reduce = p.call(template, **reduce_params, total="OUT")
    p.graph.activate(maps[0].outputs["s"], PerfCriteria.THROUGHPUT)
    assert maps[0].chains[0].criteria is PerfCriteria.THROUGHPUT and maps[0].chains[0].group is None
    p.graph.activate(reduce.outputs["total"], PerfCriteria.LATENCY)
    groups = {id(m.chains[0].group) for m in maps}
    assert len(groups) == 1
    group = maps[0].chains[0].group
    assert group.consumer is reduce.chains[0] and set(map(id, group.members)) == {id(m.chains[0]) for m in maps}
    assert all(m.chains[0].criteria is PerfCriteria.LATENCY for m in maps)  # upgraded
    assert reduce.chains[0].depth == 2


def test_multi_output_activation_pulls_the_earlier_output():
    p = Program()
    r = p.call("S {{a}} then {{b}}", a="OUT", b="OUT")
    p.graph.activate(r.outputs["b"])
    first, second = r.chains
    assert first.is_activated and second.is_activated and (first.depth, second.depth) == (1, 2)


def test_cycle_through_predeclared_variable_is_rejected_and_changes_nothing():
    p = Program()
    v = p.session.new_variable("v")
    w_req = p.call("use {{v}} make {{w}}", v=v, w="OUT")
    w = w_req.outputs["w"]
    req = parse_request(
        "use {{w}} make {{v}}",
        [Parameter("w", var_id=w.id), Parameter("v", is_output=True, var_id=v.id)],
        session=p.session,
        constants=p.constants,
    )
    consumers_before = list(w.consumers)
    with pytest.raises(GraphCycleError, match="cyclic"):
        p.graph.insert(req)
    assert v.producer is None and w.consumers == consumers_before
    assert req.request_id not in p.graph.requests


def test_self_loop_is_a_cycle():
    p = Program()
    v = p.session.new_variable("v")
    req = parse_request(
        "{{v}} again {{v2}}",
        [Parameter("v", var_id=v.id), Parameter("v2", is_output=True, var_id=v.id)],
        session=p.session,
        constants=p.constants,
    )
    with pytest.raises(GraphCycleError):
        p.graph.insert(req)
    assert v.producer is None


def test_output_with_a_producer_already_is_rejected():
    p = Program()
    first = p.call("A {{o}}", o="OUT")
    with pytest.raises(InvalidRequestError):
        parse_request(
            "B {{o}}", [Parameter("o", is_output=True, var_id=first.outputs["o"].id)], session=p.session, constants=p.constants
        )


def test_native_function_node_links_and_activates():
    p = Program()
    a = p.call("A {{a}}", a="OUT")
    out = p.session.new_variable("loud")
    node = NativeFuncNode(func=str.upper, inputs={"text": a.outputs["a"]}, outputs={"loud": out})
    p.graph.insert_native(node)
    b = p.call("B {{loud}} {{b}}", loud=out, b="OUT")
    p.graph.activate(b.outputs["b"], PerfCriteria.LATENCY)
    assert node.activated.done() and node.depth == 2 and b.chains[0].depth == 3 and a.chains[0].depth == 1
    # a native function that would feed its own input is a cycle
    loop = NativeFuncNode(func=str.upper, inputs={"x": b.outputs["b"]}, outputs={"y": p.session.new_variable()})
    p.graph.insert_native(loop)  # fine: no cycle
    bad = NativeFuncNode(func=str.upper, inputs={"x": b.outputs["b"]}, outputs={"y": out})
    with pytest.raises(InvalidRequestError):
        p.graph.insert_native(bad)  # `out` already has a producer


def test_remove_request_drops_consumer_links():
    p = Program()
    a = p.call("A {{a}}", a="OUT")
    b = p.call("B {{a}} {{b}}", a=a.outputs["a"], b="OUT")
    assert a.outputs["a"].consumers
    p.graph.remove_request(b)
    assert a.outputs["a"].consumers == [] and b.request_id not in p.graph.requests


def test_constant_inputs_do_not_collect_consumers():
    # Parrot's global constant-prefix variables collected consumers from every session forever.
    p = Program()
    for _ in range(3):
        r = p.call("System prompt {{o}}", o="OUT")
    assert r.nodes[0].sv.consumers == []
