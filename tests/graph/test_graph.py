import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_a_diamond_dag_gets_the_depths_criteria_and_groups_derived_by_hand():
    #      a
    #     / \
    #    b   c
    #    |   |
    #    |   c2
    #     \ /
    #      d
    #      |
    #      e1 -> e2 (one request, two outputs; e2 also reads a)
    p = Program()
    a = p.call("A {{x}} {{a}}", x="in", a="OUT")
    b = p.call("B {{a}} {{b}}", a=a.outputs["a"], b="OUT")
    c = p.call("C {{a}} {{c}}", a=a.outputs["a"], c="OUT")
    c2 = p.call("C2 {{c}} {{c2}}", c=c.outputs["c"], c2="OUT")
    d = p.call("D {{b}} and {{c2}} {{d}}", b=b.outputs["b"], c2=c2.outputs["c2"], d="OUT")
    e = p.call("E {{d}} {{e1}} then {{a}} {{e2}}", d=d.outputs["d"], e1="OUT", a=a.outputs["a"], e2="OUT")
    ca, cb, cc, cc2, cd = (r.chains[0] for r in (a, b, c, c2, d))
    ce1, ce2 = e.chains

    p.graph.activate(c.outputs["c"])  # THROUGHPUT by default: only c and what it needs
    assert [(ch.is_activated, ch.criteria, ch.depth) for ch in (ca, cc)] == [
        (True, PerfCriteria.THROUGHPUT, 1),
        (True, PerfCriteria.THROUGHPUT, 2),
    ]
    assert not any(ch.is_activated for ch in (cb, cc2, cd, ce1, ce2))

    p.graph.activate(e.outputs["e2"], PerfCriteria.LATENCY)
    everything = [ca, cb, cc, cc2, cd, ce1, ce2]
    # longest path from a source, 1-based: a=1, b=c=2, c2=3, d=4, e1=5, e2=6 (via e1, not via a)
    assert [ch.depth for ch in everything] == [1, 2, 2, 3, 4, 5, 6]
    assert all(ch.criteria is PerfCriteria.LATENCY for ch in everything)  # a and c upgraded
    # the future keeps the criteria of the first activation
    t, lat = PerfCriteria.THROUGHPUT, PerfCriteria.LATENCY
    assert [ch.activated.result() for ch in everything] == [t, lat, t, lat, lat, lat, lat]
    # d is the only chain fed by two chains: b and c2 form its group; e2's previous chain is not a feeder
    assert cb.group is not None and cb.group is cc2.group and cb.group.consumer is cd
    assert set(map(id, cb.group.members)) == {id(cb), id(cc2)}
    assert all(ch.group is None for ch in (ca, cc, cd, ce1, ce2))

    p.graph.activate(d.outputs["d"], PerfCriteria.THROUGHPUT)  # a weaker fetch downgrades nothing
    assert all(ch.criteria is PerfCriteria.LATENCY for ch in everything)
    assert [ch.depth for ch in everything] == [1, 2, 2, 3, 4, 5, 6]


def test_a_chain_of_5000_calls_activates_without_recursion():
    # Activation used to recurse once per upstream hop: past ~1000 calls it raised RecursionError.
    n = 5000
    p = Program()
    calls = [p.call("Step {{x}} {{y}}", x="start", y="OUT")]
    for _ in range(n - 1):
        calls.append(p.call("Step {{x}} {{y}}", x=calls[-1].outputs["y"], y="OUT"))
    p.graph.activate(calls[-1].outputs["y"], PerfCriteria.LATENCY)
    chains = [r.chains[0] for r in calls]
    assert [ch.depth for ch in chains] == list(range(1, n + 1))
    assert all(ch.is_activated and ch.criteria is PerfCriteria.LATENCY for ch in chains)
    assert all(ch.group is None for ch in chains)


def test_cycle_detection_walks_a_chain_of_5000_calls_without_recursion():
    n = 5000
    p = Program()
    head = p.session.new_variable("head")  # declared now, produced last
    calls = [p.call("Step {{x}} {{y}}", x=head, y="OUT")]
    for _ in range(n - 1):
        calls.append(p.call("Step {{x}} {{y}}", x=calls[-1].outputs["y"], y="OUT"))
    tail = calls[-1].outputs["y"]
    closing = parse_request(
        "use {{t}} make {{h}}",
        [Parameter("t", var_id=tail.id), Parameter("h", is_output=True, var_id=head.id)],
        session=p.session,
        constants=p.constants,
    )
    with pytest.raises(GraphCycleError):  # the cycle closes 5000 hops downstream
        p.graph.insert(closing)
    assert head.producer is None and tail.consumers == []
    source = parse_request(
        "make {{h}}", [Parameter("h", is_output=True, var_id=head.id)], session=p.session, constants=p.constants
    )
    p.graph.insert(source)  # walks the same 5000 hops and finds no cycle
    p.graph.activate(tail)
    assert [r.chains[0].depth for r in [source, *calls]] == list(range(1, n + 2))
    assert all(r.chains[0].criteria is PerfCriteria.THROUGHPUT for r in [source, *calls])


@st.composite
def dags(draw):
    """Calls in insertion order; call i reads the outputs of some earlier calls (by index)."""
    n = draw(st.integers(1, 12))
    reads = [sorted(draw(st.sets(st.integers(0, i - 1), max_size=3))) if i else [] for i in range(n)]
    fetches = draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(list(PerfCriteria))), min_size=1, max_size=4))
    return reads, fetches


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(dags())
def test_activation_matches_longest_paths_and_ancestors_on_random_dags(dag):
    reads, fetches = dag
    p = Program()
    calls = []
    for i, inputs in enumerate(reads):
        template = f"call {i} " + " ".join(f"{{{{in{j}}}}}" for j in inputs) + " {{out}}"
        calls.append(p.call(template, **{f"in{j}": calls[j].outputs["out"] for j in inputs}, out="OUT"))
    # expected, from the index lists alone: longest path from a source, and what each fetch needs
    longest = []
    for inputs in reads:
        longest.append(1 + max((longest[j] for j in inputs), default=0))
    expected: dict[int, PerfCriteria] = {}
    for target, criteria in fetches:
        p.graph.activate(calls[target].outputs["out"], criteria)
        needed, todo = set(), [target]
        while todo:
            i = todo.pop()
            if i not in needed:
                needed.add(i)
                todo.extend(reads[i])
        for i in needed:
            if expected.get(i) is not PerfCriteria.LATENCY:
                expected[i] = criteria
        chains = [r.chains[0] for r in calls]
        assert {i for i, ch in enumerate(chains) if ch.is_activated} == set(expected)
        assert {i: ch.criteria for i, ch in enumerate(chains) if ch.is_activated} == expected
        assert [ch.depth for ch in chains] == [longest[i] if i in expected else 0 for i in range(len(chains))]
        for i, ch in enumerate(chains):  # a group is the chains that feed one consumer
            if ch.group is not None:
                consumer = calls.index(ch.group.consumer.request)
                assert len(reads[consumer]) > 1 and i in reads[consumer]


def test_a_chain_reading_one_output_twice_is_fed_by_one_chain_not_a_group():
    p = Program()
    a = p.call("A {{a}}", a="OUT")
    b = p.call("B {{x}} and again {{y}} {{b}}", x=a.outputs["a"], y=a.outputs["a"], b="OUT")
    p.graph.activate(b.outputs["b"])
    assert a.chains[0].group is None and (a.chains[0].depth, b.chains[0].depth) == (1, 2)
