import gc

import pytest

from parrot_core.errors import InvalidRequestError, UnknownVariableError
from parrot_core.graph import GLOBAL_SCOPE, ComputeGraph, Namespace, Parameter, parse_request


def test_same_content_same_variable_and_it_is_set():
    ns = Namespace(GLOBAL_SCOPE)
    a = ns.variable_for_content("You are helpful.", is_constant_prefix=True)
    b = ns.variable_for_content("You are helpful.", is_constant_prefix=True)
    assert a is b and a.get() == "You are helpful." and a.is_constant_prefix
    assert ns.variable_for_content("other") is not a


def test_named_ids_are_never_recycled():
    ns = Namespace("s1")
    ids = [ns.new_variable().id for _ in range(5)]
    ns.remove(ids[-1])
    ids.append(ns.new_variable().id)
    assert len(set(ids)) == len(ids)


def test_content_ids_cannot_collide_with_named_ids():
    # Parrot's bug: the text "0" resolved to the variable named by seed 0.
    ns = Namespace("s1")
    named = ns.new_variable("x")
    assert named.id == "s1:v:0"
    content = ns.variable_for_content("0")
    assert content is not named and content.id != named.id and not named.done
    for text in ["0", "v:0", "s1:v:0", ""]:
        assert ns.variable_for_content(text).id.startswith("s1:c:")


def test_scope_with_separator_is_rejected():
    with pytest.raises(InvalidRequestError):
        Namespace("a:b")
    with pytest.raises(InvalidRequestError):
        Namespace("")


def test_unknown_and_removed_ids_raise():
    ns = Namespace("s1")
    v = ns.new_variable()
    ns.remove(v.id)
    with pytest.raises(UnknownVariableError):
        ns.get(v.id)
    with pytest.raises(UnknownVariableError):
        ns.remove(v.id)


def test_expiry_uses_the_injected_clock_and_access_refreshes():
    now = [0.0]
    ns = Namespace(GLOBAL_SCOPE, clock=lambda: now[0])
    a = ns.variable_for_content("A")
    b = ns.variable_for_content("B")
    now[0] = 50.0
    ns.get(b.id)  # refresh B
    now[0] = 100.5
    assert ns.expired(100.0) == [a.id]


def _collect() -> None:
    gc.collect()  # variables and graph nodes refer to each other: cycles need the collector


def test_a_weak_namespace_forgets_a_variable_its_caller_dropped():
    now = [0.0]
    ns = Namespace("s1", clock=lambda: now[0], weak=True)
    dropped = ns.new_variable("dropped")
    kept = ns.new_variable("kept")
    text = ns.variable_for_content("an input text nobody holds any more")
    dropped_id, text_id = dropped.id, text.id
    del dropped, text
    _collect()
    assert dropped_id not in ns and text_id not in ns
    assert kept.id in ns and ns.get(kept.id) is kept and list(ns) == [kept] and len(ns) == 1
    with pytest.raises(UnknownVariableError):
        ns.get(dropped_id)
    now[0] = 10.0
    assert ns.expired(-1.0) == [kept.id]  # no access time is kept for a forgotten variable


def test_a_weak_namespace_keeps_what_a_graph_node_holds():
    ns, constants, graph = Namespace("s1", weak=True), Namespace(GLOBAL_SCOPE), ComputeGraph()
    request = parse_request(
        "Summarize {{doc}}: {{summary}}",
        [Parameter("doc", value="a long document"), Parameter("summary", is_output=True)],
        session=ns,
        constants=constants,
    )
    graph.insert(request)
    doc_id, summary_id = request.inputs["doc"].id, request.outputs["summary"].id
    del request
    _collect()
    assert doc_id in ns and summary_id in ns  # the graph's nodes still hold them
    graph.remove_request(graph.requests[next(iter(graph.requests))])
    _collect()
    assert doc_id not in ns and summary_id not in ns and len(ns) == 0


def test_a_weak_namespace_never_reuses_an_id_and_recreates_content_on_demand():
    ns = Namespace("s1", weak=True)
    ids = [ns.new_variable().id for _ in range(5)]  # each one is dropped at once
    _collect()
    assert len(set(ids)) == 5 and len(ns) == 0
    first_id = ns.variable_for_content("same text").id
    _collect()
    again = ns.variable_for_content("same text")  # a new variable, same content id, same value
    assert again.id == first_id and again.get() == "same text" and list(ns) == [again]
    assert ns.expired(-1.0) == [again.id]


def test_the_default_namespace_keeps_every_variable():
    # a remote client refers to variables by id only: the server's sessions must keep them
    ns = Namespace("s1")
    var_id = ns.new_variable().id
    text_id = ns.variable_for_content("text").id
    _collect()
    assert var_id in ns and text_id in ns and len(ns) == 2
