"""recipes/eval_gap.py end to end on the tiny model: the report carries the shortcut controls, and
the CLI turns them off."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    args = ["--model", "tiny", "--loops", "1,2", "--n-problems", "12", "--split", "kfold", "--folds", "3"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "eval_gap.py"), *args, "--n-boot", "50", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "gap.json").read_text()), (out / "gap.md").read_text()


@pytest.mark.parametrize("flags", [(), ("--no-controls",), ("--author-field", "none")])
def test_eval_gap_recipe_reports_controls_unless_turned_off(tmp_path, flags):
    data, md = _run(tmp_path, *flags)
    if "--no-controls" in flags:
        assert data.get("controls") is None and "## Controls" not in md
        return
    controls = data["controls"]
    assert [row["loop"] for row in controls["noise"]["loops"]] == [1, 2]
    assert "## Controls" in md
    assert not controls["author"]["available"]  # synthetic records name no author
    off = "--author-field" in flags
    assert controls["author"]["reason"].startswith("off") == off, controls["author"]["reason"]


def test_compare_with_a_missing_folder_fails_before_the_evaluation(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "eval_gap.py"), "--model", "tiny", "--out", str(tmp_path / "o"),
         "--compare", str(tmp_path / "no_such_before")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "--compare" in done.stderr and "no gap.json there" in done.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("loops", ["--loops=-2", "--loops=abc", "--tp-loops=0"])
def test_bad_loops_fail_naming_the_option_before_the_model_loads(tmp_path, loops):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "eval_gap.py"), "--model", "tiny", loops, "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    option = loops.split("=")[0]
    assert done.returncode == 2 and f"{option} must be loop counts >= 1" in done.stderr, done.stderr[-500:]
