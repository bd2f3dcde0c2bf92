"""A deep program end to end: 1,000 semantic calls, each reading the previous call's output.

Activation used to recurse once per upstream hop, so fetching the last output of a chain of
600+ calls raised `RecursionError` inside a loop callback, which was swallowed, and `get()`
without a timeout blocked forever.
"""

from __future__ import annotations

import pytest

import parrot_core as P

pytestmark = pytest.mark.timeout(180)

DEPTH = 1000
STEP_OUT = P.Output(max_tokens=1, temperature=0.0, ignore_eos=True)


@P.semantic_function()
def step(previous: P.Input, following: STEP_OUT):
    """After {{previous}} comes {{following}}"""


def test_a_chain_of_1000_calls_completes_and_leaves_nothing_behind(make_program_runtime):
    rt = make_program_runtime()
    with rt:
        outputs = [step("start")]
        for _ in range(DEPTH - 1):
            outputs.append(step(outputs[-1]))
        assert not any(out.done for out in outputs)  # nothing runs before a fetch
        last = outputs[-1].get(P.LATENCY, timeout=150)  # a hang fails here instead of blocking
        assert isinstance(last, str)
        assert all(out.is_ready for out in outputs)  # every upstream call ran, in the same fetch
        # the data flowed: call i generated what the model generates after call i-1's output
        for i in (1, DEPTH // 2, DEPTH - 1):
            prompt = rt.tokenize("After ") + rt.tokenize(outputs[i - 1].get()) + rt.tokenize(" comes ")
            assert rt.generate(prompt, max_tokens=1, temperature=0.0, ignore_eos=True).text == outputs[i].get()
        assert rt.session.graph.requests == {}  # finished requests left the graph
        # before close: the rules hold and only pinned constant prefixes stay alive
        rt.check_invariants()
        live = [c for c in rt.contexts.contexts.values() if not c.pinned]
        assert live == [], live
