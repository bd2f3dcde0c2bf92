"""One request path (issue 9 defect 1): plain generates, the context API and program calls are
all placed by the global scheduler, which counts only running work, so a program call never
waits on KV that is merely cached or held, and every finish wakes what waits."""

from __future__ import annotations

import concurrent.futures

from .functions import review, write_code


def test_program_calls_run_beside_generates_and_held_contexts_on_a_small_pool(make_program_runtime):
    rt = make_program_runtime(num_kv_blocks=40)  # 640 token slots
    with rt:
        held = rt.new_context()
        held.fill("word " * 600)  # 600 tokens held by the caller: a cache, not running work
        pool = concurrent.futures.ThreadPoolExecutor(4)
        gens = [pool.submit(rt.generate, f"question {i} " + "x " * 150, max_tokens=20, temperature=0.0) for i in range(3)]
        out = review(write_code("a snake game"))
        assert isinstance(out.get(timeout=60), str)
        assert all(g.result(60).finish_reason in ("stop", "length") for g in gens)
        assert len(held.generate(max_tokens=5, temperature=0.0, ignore_eos=True).token_ids) == 5  # recomputed if evicted
        held.free()
        assert rt.core.scheduler.queue == []
        assert all(not slot.pending_tokens for slot in rt.core.scheduler.engines.values())
