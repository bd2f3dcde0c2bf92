"""Every example runs on the real default model and prints what it promises."""

from __future__ import annotations

import os
import runpy

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(240)]
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def run_example(name: str, capsys) -> str:
    runpy.run_path(os.path.join(EXAMPLES, f"{name}.py"), run_name="__main__")
    return capsys.readouterr().out


def test_hello_world(capsys):
    out = run_example("hello_world", capsys)
    alice = next(line for line in out.splitlines() if line.startswith("Alice:"))
    bob = next(line for line in out.splitlines() if line.startswith("Bob:"))
    assert len(alice) > len("Alice: ") and len(bob) > len("Bob: ")
    assert "context forks:" in out


def test_few_shot_labels_every_review(capsys):
    out = run_example("few_shot", capsys)
    labels = [line.split()[0] for line in out.splitlines()[:4]]
    assert all(label in ("positive", "negative") for label in labels), out
    assert labels == ["positive", "negative", "positive", "negative"]  # greedy, and easy reviews
    reused = int(out.split("reused ")[1].split()[0])
    assert reused >= 3  # the examples prefix was filled once, then reused by the other calls


def test_chain_summary(capsys):
    out = run_example("chain_summary", capsys)
    assert out.startswith("Summary of 4 chunks:") and len(out.splitlines()[1]) > 10


def test_map_reduce(capsys):
    out = run_example("map_reduce", capsys)
    assert out.startswith("Overview:") and out.count("  part ") == 4


def test_best_of_n(capsys):
    out = run_example("best_of_n", capsys)
    assert [line[:2] for line in out.splitlines()[:3]] == ["1.", "2.", "3."]
    assert "Judge picks tip" in out
