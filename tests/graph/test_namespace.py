import pytest

from parrot_core.errors import InvalidRequestError, UnknownVariableError
from parrot_core.graph import GLOBAL_SCOPE, Namespace


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
