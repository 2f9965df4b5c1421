"""evaluate_gap on a tiny random Huginn: SV and RR per recurrence step, through the looped-model contract."""

import json

import pytest
import torch

from loopalign.data.candidates import controlled_candidates
from loopalign.data.prompts import render_records
from loopalign.data.sources.synthetic import generate_problems
from loopalign.eval import GapConfig, evaluate_gap
from loopalign.models.huginn import HuginnForCausalLM, tiny_huginn_config
from loopalign.tokenizer import local_tokenizer


@pytest.fixture(scope="module")
def tok():
    return local_tokenizer()


@pytest.fixture(scope="module")
def rows(tok):
    rows, rejected = render_records(controlled_candidates(generate_problems(24, seed=0, levels=(1, 2))), tok)
    assert not rejected
    return rows


def test_gap_per_step_of_a_tiny_huginn(tok, rows, tmp_path):
    torch.manual_seed(0)
    model = HuginnForCausalLM(
        tiny_huginn_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    ).eval()
    result = evaluate_gap(model, tok, rows, loops=[1, 2, 4], config=GapConfig(n_boot=20), out_dir=tmp_path / "gap")
    assert [row["loop"] for row in result.table] == [1, 2, 4]
    for row in result.table:
        assert 0.0 <= row["sv"] <= 100.0 and 0.0 <= row["rr"] <= 100.0
    assert result.meta["total_ut_steps"] == 4  # the config's mean_recurrence
    # SV differs between steps: each step's verdict is read from its own readout
    probs = result.records["sv_prob"]
    assert len(probs) == 3 and len(probs[0]) == len(rows) and probs[0] != probs[2]
    data = json.loads((tmp_path / "gap" / "gap.json").read_text())
    assert [r["loop"] for r in data["table"]] == [1, 2, 4]
    print(json.dumps([{k: r[k] for k in ("loop", "sv", "rr")} for r in result.table]))
