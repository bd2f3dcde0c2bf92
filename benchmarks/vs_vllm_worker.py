"""One engine under test for `benchmarks/vs_vllm.py`, in its own process (and, for vLLM, in its
own virtual environment): it loads the engine once, then runs the workloads it is sent.

Protocol: one JSON object per line. The worker writes {"ready": true} once loaded, then answers
each command on stdin with one line; everything else anybody prints (vLLM logs to stdout) goes
to stderr. Commands:
    {"op": "run", "conversations": [[turn ids, ...], ...], "max_tokens": n}
        Turn t of every conversation is sent together (one wave of concurrent requests); the
        prompt of turn t is the conversation so far (earlier turns and the engine's own replies)
        plus the new turn. Greedy, EOS ignored. Answer: {"seconds", "outputs" (ids per request,
        in wave order), "prompt_tokens", "cached_tokens"}; parrot-core's also
        "gemm_floor_seconds": what the run's linear-layer GEMMs alone take (`GemmFloor`).
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
from collections.abc import Callable
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

        self.floor = GemmFloor(self.rt.engine.model, lambda fn: self.rt.engine.call(fn, timeout=None))

    def batch(self, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], int]]:
        outs = self.rt.generate(prompts, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [(list(o.token_ids), o.cached_tokens) for o in outs]


class GemmFloor:
    """A lower bound on a run's time from its linear layers alone. It records the shape of
    every step of the model (rows through the layers, rows kept in the last one, rows of
    logits), then times those GEMMs by themselves, on the model's own prepacked weights, in the
    order a step runs them (each weight comes from memory, as in a step). Attention, norms,
    sampling and the scheduler are left out. The run cannot take less, and both engines run
    these same oneDNN GEMMs for the same tokens: `floor / vLLM's time` is the lowest ratio
    reachable without faster GEMMs, fewer tokens, or steps whose GEMM shapes run faster."""

    def __init__(self, model: Any, on_engine_thread: Callable[[Callable[[], float]], float]) -> None:
        self.model = model
        # the GEMMs are timed on the engine's step thread: torch ops on a second thread would
        # start a second OpenMP pool, and every later step would run 25-40% slower
        self._on_engine_thread = on_engine_thread
        self.steps: list[tuple[int, int]] = []  # (rows through the layers, rows kept in the last one)
        self.logits: list[int] = []  # rows of each lm-head call
        self._seconds: dict[tuple[str, int, int], float] = {}
        forward, compute_logits = model.forward, model.compute_logits

        def record_forward(batch: Any, kv: Any, output_rows: Any = None) -> Any:
            kept = batch.num_seqs if output_rows is None else len(output_rows)
            self.steps.append((int(batch.token_ids.shape[0]), kept))
            return forward(batch, kv, output_rows)

        def record_logits(hidden: Any) -> Any:
            self.logits.append(int(hidden.shape[0]))
            return compute_logits(hidden)

        model.forward, model.compute_logits = record_forward, record_logits

    def reset(self) -> None:
        self.steps.clear()
        self.logits.clear()

    def seconds(self) -> float:
        """The recorded steps' GEMM time, each distinct shape timed once (median of 3)."""
        return self._on_engine_thread(
            lambda: sum(self._time("layers", rows, kept) for rows, kept in self.steps)
            + sum(self._time("lm_head", rows, rows) for rows in self.logits)
        )

    def _time(self, kind: str, rows: int, kept: int) -> float:
        import statistics

        import torch

        key = (kind, rows, kept)
        if key not in self._seconds:
            m = self.model
            buffers: dict[tuple[str, int], Any] = {}

            def buffer(role: str, width: int) -> Any:  # one per role and width, reused by every layer, as in a step
                if (role, width) not in buffers:
                    buffers[role, width] = torch.randn(rows, width, dtype=m.dtype)
                return buffers[role, width]

            calls = []  # (linear, its input, its output)
            if kind == "lm_head":
                linears = [(m.lm_head, rows)]
            else:  # the last layer's attention output and MLP keep the sampled rows only
                last = len(m.layers) - 1
                linears = [
                    (linear, rows if i != last or linear is layer.wqkv else kept)
                    for i, layer in enumerate(m.layers)
                    for linear in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)
                ]
            for linear, n in linears:
                n_out, n_in = linear.weight.shape
                calls.append((linear, buffer("in", n_in)[:n], buffer("out", n_out)[:n]))

            def one_step() -> None:
                for linear, inp, dst in calls:
                    linear(inp, dst)

            with torch.inference_mode():
                one_step()  # warm-up: the GEMM's primitive for this batch size
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    one_step()
                    times.append(time.perf_counter() - start)
            self._seconds[key] = statistics.median(times)
        return self._seconds[key]


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
        floor = getattr(runner, "floor", None)
        if floor is not None:
            floor.reset()
        result = run_conversations(runner, command["conversations"], command["max_tokens"])
        if floor is not None:  # timed after the run, outside its time
            result["gemm_floor_seconds"] = floor.seconds()
        protocol.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
