"""lm-evaluation-harness's `local-completions` model scoring a small multiple-choice task
through `parrot-core serve` (log-likelihood: completions with `echo` + `logprobs`).

Run with the project's Python; lm-eval lives in its own virtualenv (it is not a dependency):

    python3 -m venv /tmp/lmeval-venv && /tmp/lmeval-venv/bin/pip install "lm-eval[api]" transformers
    python benchmarks/lm_eval/run.py --lm-eval /tmp/lmeval-venv/bin/lm_eval

What it does: exports the default model's tokenizer from its GGUF (lm-eval needs a tokenizer
to find where each choice starts; our server has no `/tokenizer_info`, so lm-eval's `remote`
backend cannot be used), checks that it tokenizes the task's texts as the server does, starts
the server on a free loopback port, runs `lm_eval --model local-completions` on the task in
`parrot_mini_mc.yaml` (`mini_mc.jsonl`, 20 questions, 78 choices), prints acc / acc_norm, the
requests the server saw and the wall time, and stops the server. Writes lm-eval's results, the
server log and a summary JSON to benchmarks/results/lm_eval/. Exit code: lm-eval's, or 1 if the
tokenizers disagree.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/, for stress.py's ServerProcess
sys.path.insert(0, ROOT)

from stress import ServerProcess  # noqa: E402

from parrot_core.engines.builtin.default_model import DEFAULT_MODEL_NAME, default_model_path  # noqa: E402

TASK = "parrot_mini_mc"
DATA = os.path.join(HERE, "mini_mc.jsonl")


def export_tokenizer(out_dir: str) -> Any:
    """Save the default GGUF's tokenizer as a Hugging Face tokenizer directory; returns it."""
    import transformers

    path = default_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tok.save_pretrained(out_dir)
    return tok


def task_texts() -> list[str]:
    """Every context and context + choice string lm-eval will tokenize for the task."""
    texts = []
    with open(DATA) as f:
        for line in f:
            doc = json.loads(line)
            ctx = f"Question: {doc['question']}\nAnswer:"
            texts += [ctx] + [f"{ctx} {c}" for c in doc["choices"]]
    return texts


def tokenizer_mismatches(tok: Any, url: str) -> list[str]:
    """The task texts the exported tokenizer splits differently from the server's /tokenize."""
    bad = []
    with httpx.Client(timeout=30.0) as http:
        for text in task_texts():
            r = http.post(url + "/tokenize", json={"prompt": text})
            r.raise_for_status()
            if r.json()["tokens"] != tok(text, add_special_tokens=False).input_ids:
                bad.append(text)
    return bad


def metric_sums(url: str) -> dict[str, float]:
    """parrot_core:* counters from /metrics, summed over labels."""
    sums: dict[str, float] = {}
    text = httpx.get(url + "/metrics", timeout=10.0).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_total"):
                sums[s.name] = sums.get(s.name, 0.0) + s.value
    return sums


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lm-eval", default=os.environ.get("LM_EVAL") or shutil.which("lm_eval"), help="the lm_eval executable")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per completions request")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "lm_eval"))
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    args = ap.parse_args()
    if not args.lm_eval:
        ap.error("lm_eval not found: pass --lm-eval or set LM_EVAL")
    os.makedirs(args.out, exist_ok=True)

    tok_dir = os.path.join(args.out, "tokenizer")
    tok = export_tokenizer(tok_dir)
    server = ServerProcess(["--log-stats-interval", "0"], os.path.join(args.out, "server.log"))
    try:
        server.wait_healthy(args.startup_timeout)
        bad = tokenizer_mismatches(tok, server.url)
        if bad:
            print(f"the exported tokenizer disagrees with the server's on {len(bad)} texts, e.g. {bad[0]!r}")
            return 1
        before = metric_sums(server.url)
        model_args = ",".join(
            [
                f"model={DEFAULT_MODEL_NAME}",
                f"base_url={server.url}/v1/completions",
                "tokenizer_backend=huggingface",
                f"tokenizer={tok_dir}",
                "num_concurrent=1",
                "max_retries=1",
            ]
        )
        cmd = [args.lm_eval, "--model", "local-completions", "--model_args", model_args, "--tasks", TASK]
        cmd += ["--include_path", HERE, "--batch_size", str(args.batch_size), "--output_path", args.out, "--log_samples"]
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        print("+", " ".join(cmd), flush=True)
        start = time.monotonic()
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode  # the YAML's data path is relative to ROOT
        wall = time.monotonic() - start
        after = metric_sums(server.url)
    finally:
        server.stop()
    if rc != 0:
        print(f"lm_eval exited with {rc}; server log: {server.log_path}\n{server.log_tail()}")
        return rc

    result_files = sorted(glob.glob(os.path.join(args.out, "**", "results_*.json"), recursive=True), key=os.path.getmtime)
    results = json.load(open(result_files[-1]))["results"][TASK]
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    summary = {
        "task": TASK,
        "acc": results["acc,none"],
        "acc_stderr": results["acc_stderr,none"],
        "acc_norm": results["acc_norm,none"],
        "acc_norm_stderr": results["acc_norm_stderr,none"],
        "loglikelihood_requests": int(delta.get("parrot_core:request_success_total", 0)),
        "prompt_tokens": int(delta.get("parrot_core:prompt_tokens_total", 0)),
        "batch_size": args.batch_size,
        "lm_eval_wall_s": round(wall, 2),
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
