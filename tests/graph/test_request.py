import pytest

from parrot_core.errors import InvalidRequestError, TemplateError, UnknownVariableError
from parrot_core.graph import (
    GLOBAL_SCOPE,
    ConstantFill,
    Namespace,
    Parameter,
    PlaceholderFill,
    PlaceholderGen,
    PlaceholderChunk,
    RequestMetadata,
    TextChunk,
    parse_request,
    parse_template,
)


@pytest.fixture
def spaces():
    return Namespace("s1"), Namespace(GLOBAL_SCOPE)


def parse(template, params, spaces, **meta):
    session, constants = spaces
    return parse_request(template, params, session=session, constants=constants, metadata=RequestMetadata(**meta))


def test_template_chunks():
    assert parse_template("Hi {{ name }}, write {{out}}") == [
        TextChunk("Hi "),
        PlaceholderChunk("name"),
        TextChunk(", write "),
        PlaceholderChunk("out"),
    ]


@pytest.mark.parametrize(
    "template, message",
    [("a {{ 1x }} b", "not an identifier"), ("a {{x b", "unmatched '{{'"), ("a }} b", "unmatched '}}'")],
)
def test_malformed_templates(template, message):
    with pytest.raises(TemplateError, match=message):
        parse_template(template)


OUT = Parameter("out", is_output=True)


@pytest.mark.parametrize(
    "template, params, message",
    [
        ("A {{x}} {{out}}", [OUT], "has no parameter"),
        ("A {{out}}", [OUT, Parameter("y", value="v")], "not used"),
        ("A {{out}} B {{out}}", [OUT], "used twice"),
        ("A {{out}}{{o2}}", [OUT, Parameter("o2", is_output=True)], "directly follows"),
        ("A {{out}} trailing text", [OUT], "after its last output"),
        ("A {{x}}", [Parameter("x", value="v")], "no output"),
    ],
)
def test_malformed_requests(spaces, template, params, message):
    with pytest.raises(TemplateError, match=message):
        parse(template, params, spaces)


@pytest.mark.parametrize(
    "param, message",
    [
        (Parameter("x"), "exactly one of value or var_id"),
        (Parameter("x", value="a", var_id="s1:v:0"), "exactly one of value or var_id"),
        (Parameter("x", value="a", sampling={"max_tokens": 3}), "sampling"),
        (Parameter("out", is_output=True, value="a"), "cannot have a value"),
    ],
)
def test_contradictory_bindings(spaces, param, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse("A {{x}} {{out}}" if param.name == "x" else "A {{out}}", [param, OUT] if param.name == "x" else [param], spaces)


def test_unknown_var_id(spaces):
    with pytest.raises(UnknownVariableError, match="unknown variable"):
        parse("A {{x}} {{out}}", [Parameter("x", var_id="s1:v:99"), OUT], spaces)


def test_trailing_whitespace_is_formatting_not_text(spaces):
    req = parse("A {{out}}\n   ", [OUT], spaces)
    assert [type(n) for n in req.nodes] == [ConstantFill, PlaceholderGen]


def test_nodes_variables_and_leading_constant_prefix(spaces):
    session, constants = spaces
    req = parse("System. {{doc}} Summary: {{out}}", [Parameter("doc", value="D"), Parameter("out", is_output=True, sampling={"max_tokens": 8})], spaces)
    head, doc, mid, gen = req.nodes
    assert isinstance(head, ConstantFill) and head.sv.is_constant_prefix and head.sv.id.startswith("global:c:")
    assert isinstance(doc, PlaceholderFill) and doc.sv.get() == "D" and doc.sv.id.startswith("s1:c:")
    assert isinstance(mid, ConstantFill) and not mid.sv.is_constant_prefix and mid.sv.id.startswith("s1:c:")
    assert isinstance(gen, PlaceholderGen) and gen.sampling == {"max_tokens": 8} and not gen.sv.done
    assert req.outputs == {"out": gen.sv} and req.inputs == {"doc": doc.sv}
    # the same system prompt in another session is the same global variable
    other = parse_request("System. {{o}}", [Parameter("o", is_output=True)], session=Namespace("s2"), constants=constants)
    assert other.nodes[0].sv is head.sv


def test_cache_prefix_off_keeps_the_constant_in_the_session(spaces):
    req = parse("System. {{out}}", [OUT], spaces, cache_prefix=False)
    assert not req.nodes[0].sv.is_constant_prefix and req.nodes[0].sv.id.startswith("s1:")


def test_multi_output_chains_continue_from_the_previous_output(spaces):
    # Parrot mis-chained this exact template (chain 1 restarted before Gen b).
    req = parse(
        "S {{a}} then {{b}} more {{c}}",
        [Parameter("a", value="x"), Parameter("b", is_output=True), Parameter("c", is_output=True)],
        spaces,
    )
    first, second = req.chains
    assert [n.sv for n in first.fills] == [req.nodes[0].sv, req.nodes[1].sv, req.nodes[2].sv]
    assert first.gen.name == "b" and first.prev_chain is None
    assert [n.text for n in second.fills] == [" more "] and second.gen.name == "c"
    assert second.prev_chain is first
    assert all(n.chain is first for n in first.nodes) and all(n.chain is second for n in second.nodes)
    # every node belongs to exactly one chain, in order
    assert [n for c in req.chains for n in c.nodes] == req.nodes
