"""One engine under test for `benchmarks/vs_vllm.py`, in its own process (and, for vLLM, in its
own virtual environment): it loads the engine once, then runs the workloads it is sent.

Protocol: one JSON object per line. The worker writes {"ready": true} once loaded, then answers
each command on stdin with one line; everything else anybody prints (vLLM logs to stdout) goes
to stderr. Commands:
    {"op": "run", "conversations": [[turn ids, ...], ...], "max_tokens": n}
        Turn t of every conversation is sent together (one wave of concurrent requests); the
        prompt of turn t is the conversation so far (earlier turns and the engine's own replies)
        plus the new turn. Greedy, EOS ignored. Answer: {"seconds", "outputs" (ids per request,
        in wave order), "prompt_tokens", "cached_tokens"}.
    {"op": "quit"}

Only the standard library and the engine's own package are imported here, so the same file runs
in parrot-core's environment and in vLLM's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Protocol


class Runner(Protocol):
    def batch(self, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], int]]:
        """Greedy outputs of `prompts` run concurrently: (token ids, cached prompt tokens) each."""
        ...


class VLLMRunner:
    def __init__(self, args: argparse.Namespace) -> None:
        from vllm import LLM

        self.llm = LLM(
            model=args.model_dir,
            tokenizer=args.model_dir,
            dtype=args.dtype,
            enable_prefix_caching=True,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            seed=0,
        )

    def batch(self, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], int]]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids), int(o.num_cached_tokens or 0)) for o in outs]


class ParrotRunner:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        import parrot_core as P

        torch.set_num_threads(args.threads)
        self.rt = P.Runtime(
            args.gguf,
            dtype=getattr(torch, args.dtype),
            kv_cache_memory_gb=args.kv_gb,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
        )

    def batch(self, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], int]]:
        outs = self.rt.generate(prompts, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [(list(o.token_ids), o.cached_tokens) for o in outs]


def run_conversations(runner: Runner, conversations: list[list[list[int]]], max_tokens: int) -> dict[str, Any]:
    histories: list[list[int]] = [[] for _ in conversations]
    outputs: list[list[int]] = []
    prompt_tokens = cached_tokens = 0
    start = time.perf_counter()
    for turn in range(max(len(c) for c in conversations)):
        members = [i for i, c in enumerate(conversations) if turn < len(c)]
        prompts = [histories[i] + conversations[i][turn] for i in members]
        results = runner.batch(prompts, max_tokens)
        for i, prompt, (ids, cached) in zip(members, prompts, results, strict=True):
            histories[i] = prompt + ids
            outputs.append(ids)
            prompt_tokens += len(prompt)
            cached_tokens += cached
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "outputs": outputs, "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=["vllm", "parrot"], required=True)
    ap.add_argument("--model-dir", help="the Hugging Face directory (vLLM)")
    ap.add_argument("--gguf", default=None, help="the GGUF file (parrot-core; default: the bundled model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-gb", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=2048)
    args = ap.parse_args()
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the engine prints goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    runner: Runner = VLLMRunner(args) if args.engine == "vllm" else ParrotRunner(args)
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            break
        result = run_conversations(runner, command["conversations"], command["max_tokens"])
        protocol.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
