"""The benchmark scripts run and print their figures (nothing is timed here: figures live in
docs/performance.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_forward_benchmark_prints_every_case():
    rows = _run("ouro_forward.py", "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "0", "--lora")
    cases = [r["case"] for r in rows]
    assert cases == [
        "forward, full logits",
        "forward, eval path",
        "forward, eval path, LoRA (PEFT, unmerged)",
        "forward, eval path, LoRA merged",
        "forward+backward",
    ]
    assert all(r["tokens_per_s"] > 0 and r["tflops"] > 0 for r in rows)


@pytest.mark.parametrize("extra", [[], ["--checkpointing", "--policy", "save_matmuls"]])
def test_train_step_benchmark_runs_the_four_cases_side_by_side(extra):
    rows = _run("train_step.py", "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "1", *extra)
    assert [r["case"] for r in rows] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 for r in rows)
    assert "overhead_vs_case_3" in rows[3] and "speedup_vs_baseline" in rows[2]


def test_train_step_benchmark_rejects_unknown_cases():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--cases", "1,9"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode != 0 and "--cases takes numbers from [1, 2, 3, 4]" in done.stderr
