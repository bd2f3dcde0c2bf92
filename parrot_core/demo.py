"""`parrot-core demo`: one shared system prompt, several questions, and what sharing saved.

The answers come from the forkable context API: the system prompt is filled once into a root
context and every question forks it. The same questions are then sent as plain prompts to an
engine with prefix caching off (every prompt computed in full), on the same weights.
"""

from __future__ import annotations

import threading
import time

from parrot_core.engines.builtin.config import EngineConfig
from parrot_core.engines.builtin.engine import BuiltinEngine
from parrot_core.frontend.runtime import GenerateOutput, Runtime

SYSTEM = """You are the help desk of the Lakeside Public Library. Answer in one short sentence, using only these facts.
Opening hours: Monday to Friday 9 am to 8 pm, Saturday 10 am to 5 pm, closed on Sunday.
Borrowing: an adult card holder may borrow up to 12 items at once. Books are lent for 3 weeks, films for 1 week.
Renewals: items can be renewed twice online, unless another reader has reserved them.
Late fees: 20 cents per day for books and 1 dollar per day for films, capped at 10 dollars per item.
Library cards are free for residents; visitors pay 15 dollars per year.
The library has 24 public computers, free Wi-Fi (network name LakesideGuest, no password) and printing at 10 cents a page.
Children's story time is every Wednesday at 10:30 am in the reading garden.
The library is at 42 Harbor Road, next to the ferry terminal. Parking is free for two hours.
Lost cards are replaced at the front desk for 2 dollars. Donations of books in good condition are welcome on Saturdays."""

QUESTIONS = [
    "When is the library open on Saturday?",
    "How many items can I borrow at once?",
    "What is the late fee for a film?",
    "What is the name of the Wi-Fi network?",
    "When is children's story time?",
    "How much does a card cost for a visitor?",
]
MAX_TOKENS = 40


def _chat(rt: Runtime, question: str) -> tuple[str, str]:
    """The chat-template text of the shared system turn, and of one question's turn."""
    head = rt.apply_chat_template([{"role": "system", "content": SYSTEM}], add_generation_prompt=False)
    full = rt.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
    assert full.startswith(head)
    return head, full[len(head) :]


def _in_threads(jobs: list) -> list:
    """Run blocking calls concurrently so the engine batches them."""
    results: list = [None] * len(jobs)

    def run(i: int) -> None:
        results[i] = jobs[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run_demo(model: str | None = None) -> None:
    start = time.perf_counter()
    rt = Runtime(model, kv_cache_memory_gb=0.25)
    print(f"parrot-core demo: {rt.engine.model_name}, loaded in {time.perf_counter() - start:.1f} s\n")
    head, _ = _chat(rt, "")
    turns = [_chat(rt, q)[1] for q in QUESTIONS]
    prompt_tokens = sum(len(rt.tokenize(head)) + len(rt.tokenize(t)) for t in turns)
    print(f"System prompt: {len(rt.tokenize(head))} tokens, shared by {len(QUESTIONS)} questions.\n")

    # 1. Shared: fill the system prompt once, fork one context per question.
    before = rt.stats()["prompt_tokens_computed"]
    t0 = time.perf_counter()
    with rt.new_context() as root:
        root.fill(head)

        def ask(turn: str) -> GenerateOutput:
            with root.fork() as child:
                child.fill(turn)
                return child.generate(max_tokens=MAX_TOKENS, temperature=0.0)

        answers = _in_threads([lambda t=t: ask(t) for t in turns])
    shared_time = time.perf_counter() - t0
    shared_computed = rt.stats()["prompt_tokens_computed"] - before
    for q, a in zip(QUESTIONS, answers):
        print(f"Q: {q}\nA: {a.text.strip()}\n")
    rt.check_invariants()

    # 2. Unshared: the same prompts, prefix caching off, on the same weights. The first runtime
    # is closed first: two engine threads at once would share the cores (see BuiltinEngine._run).
    model, tokenizer, model_name = rt.engine.model, rt.engine.tokenizer, rt.engine.model_name
    rt.close()
    off_engine = BuiltinEngine(model, tokenizer, EngineConfig(enable_prefix_caching=False, kv_cache_memory_gb=0.25), model_name)
    with Runtime(engine=off_engine) as off:
        t0 = time.perf_counter()
        baseline = off.generate([head + t for t in turns], max_tokens=MAX_TOKENS, temperature=0.0)
        off_time = time.perf_counter() - t0
        off_computed = off.stats()["prompt_tokens_computed"]
    same = sum(a.token_ids == b.token_ids for a, b in zip(answers, baseline))

    print("What sharing saved")
    print(f"  {'':28}{'forked contexts':>18}{'no sharing':>14}")
    print(f"  {'prompt tokens':28}{prompt_tokens:>18,}{prompt_tokens:>14,}")
    print(f"  {'prompt tokens computed':28}{shared_computed:>18,}{off_computed:>14,}")
    print(f"  {'computed per prompt token':28}{shared_computed / prompt_tokens:>18.2f}{off_computed / prompt_tokens:>14.2f}")
    print(f"  {'wall time (s)':28}{shared_time:>18.1f}{off_time:>14.1f}")
    print(f"\n  {same} of {len(QUESTIONS)} answers are token-for-token identical with and without sharing.")
