"""evaluate_gap on a plain (non-looped) transformers causal LM: SV and RR at its single loop."""

import pytest
import torch

from loopalign.eval import GapConfig, evaluate_gap


@pytest.fixture(scope="module")
def llama(tiny_causal_lm):
    torch.manual_seed(0)
    return tiny_causal_lm("llama", 2).eval()


def test_gap_of_a_plain_causal_lm_is_one_loop(llama, tok, synthetic_rows, tmp_path):
    result = evaluate_gap(llama, tok, synthetic_rows, loops=[1], config=GapConfig(), out_dir=tmp_path / "gap")
    assert [row["loop"] for row in result.table] == [1]
    row = result.table[0]
    assert 0.0 <= row["sv"] <= 100.0 and 0.0 <= row["rr"] <= 100.0
    assert result.meta["total_ut_steps"] == 1 and (tmp_path / "gap" / "gap.json").exists()


def test_more_than_one_loop_of_a_plain_model_is_refused(llama, tok, synthetic_rows):
    with pytest.raises(ValueError, match="not a looped model: it runs one loop, asked for 2"):
        evaluate_gap(llama, tok, synthetic_rows, loops=[1, 2])


def test_the_eval_gap_command_on_a_saved_plain_causal_lm(llama, tok, synthetic_rows, tmp_path):
    """The acceptance run of the non-looped baseline: `python recipes/eval_gap.py` on a folder holding a tiny
    Llama (SV and RR at its one loop; the default loops follow the model's depth)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import datasets

    root = Path(__file__).resolve().parents[2]
    llama.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    datasets.Dataset.from_list(synthetic_rows).to_json(tmp_path / "rows.jsonl")
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(root / "recipes" / "eval_gap.py"), "--model_name_or_path", str(tmp_path / "llama"),
            "--dataset", str(tmp_path / "rows.jsonl"), "--output_dir", str(tmp_path / "out"), "--eval_tp", "false",
            "--eval_n_boot", "100"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    gap = json.loads((tmp_path / "out" / "gap.json").read_text())
    assert [row["loop"] for row in gap["table"]] == [1]
    assert gap["meta"]["total_ut_steps"] == 1
