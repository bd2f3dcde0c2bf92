"""`PrefixAffinity` against a reference that keeps every prompt sent to every engine and
derives each engine's affinity as the longest common prefix, in whole chunks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from parrot_core.serve.affinity import PrefixAffinity

CHUNK = 2
prompts = st.lists(st.integers(0, 2), min_size=0, max_size=9)
ops = st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), prompts), max_size=12)


def whole_chunk_lcp(x: list[int], y: list[int]) -> int:
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return n - n % CHUNK


def recorded(sent: list[tuple[str, list[int]]]) -> PrefixAffinity:
    affinity = PrefixAffinity(chunk_tokens=CHUNK)
    for engine, prompt in sent:
        affinity.record(engine, affinity.keys(prompt))
    return affinity


@settings(max_examples=300, deadline=None)
@given(ops, prompts)
def test_match_is_each_engines_longest_shared_whole_chunk_prefix(sent, query):
    affinity = recorded(sent)
    expected = {}
    for engine, prompt in sent:
        n = whole_chunk_lcp(prompt, query)
        if n:
            expected[engine] = max(expected.get(engine, 0), n)
    assert affinity.match(affinity.keys(query)) == expected


@settings(max_examples=100, deadline=None)
@given(ops, prompts)
def test_a_forgotten_engine_has_no_affinity_and_the_others_keep_theirs(sent, query):
    affinity = recorded(sent)
    before = affinity.match(affinity.keys(query))
    affinity.forget_engine("a")
    assert affinity.match(affinity.keys(query)) == {e: n for e, n in before.items() if e != "a"}


def test_memory_is_bounded_least_recently_used_first():
    affinity = PrefixAffinity(chunk_tokens=1, max_keys=4)
    affinity.record("a", affinity.keys([1, 2, 3]))
    affinity.record("b", affinity.keys([9, 9]))
    assert len(affinity) == 4
    # [1] was used least recently and is forgotten first, so the chain breaks at its start
    assert affinity.match(affinity.keys([1, 2, 3])) == {}
    assert affinity.match(affinity.keys([9, 9])) == {"b": 2}
