"""RR on a plain causal LM is a readout over layers: eval-gap's --eval_layers picks the layers RR may read, and the
report shows RR per layer (gap.md's table, the rr_vs_layer plot)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loopalign.scripts.args import GapEvalArguments

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_eval_gap_reads_only_the_chosen_layers_and_reports_rr_per_layer(tok, synthetic_rows, tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    datasets.Dataset.from_list(synthetic_rows).to_json(tmp_path / "rows.jsonl")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "loopalign", "eval-gap", "--model_name_or_path", str(tmp_path / "llama"),
            "--dataset", str(tmp_path / "rows.jsonl"), "--output_dir", str(tmp_path / "out"), "--eval_tp", "false",
            "--eval_n_boot", "50", "--eval_layers", "1-2"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    gap = json.loads((tmp_path / "out" / "gap.json").read_text())
    assert gap["heatmap"]["layers"] == ["1", "2"] and len(gap["heatmap"]["test"]) == 1
    assert set(gap["table"][0]["best_layer"].split(",")) <= {"1", "2"}
    assert gap["meta"]["fixed_layer"] == "2"  # the deepest chosen layer when none is named
    report = (tmp_path / "out" / "gap.md").read_text()
    assert "## RR per layer" in report and "| loop | 1 | 2 |" in report
    assert (tmp_path / "out" / "rr_vs_layer.png").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"eval_layers": "3-1"}, "eval_layers must be 0-based layer indices"),
        ({"eval_layers": "x"}, "eval_layers"),
        ({"eval_fixed_layer": -1}, "eval_fixed_layer must be a layer index"),
        ({"eval_layers": "1-2", "eval_fixed_layer": 3}, "eval_fixed_layer=3 is not among eval_layers"),
    ],
)
def test_bad_layer_options_fail_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        GapEvalArguments(**options)


def test_layer_options_reach_the_feature_and_readout_configs():
    config = GapEvalArguments(eval_layers="12-14,30").gap_config(loops=[1], batch_size=4, seed=0)
    assert config.features.layers == [12, 13, 14, 30] and config.readout.fixed_layer == 30
    config = GapEvalArguments(eval_layers="12-14", eval_fixed_layer=13).gap_config(loops=[1], batch_size=4, seed=0)
    assert config.readout.fixed_layer == 13
    assert GapEvalArguments().gap_config(loops=[1], batch_size=4, seed=0).features.layers is None
