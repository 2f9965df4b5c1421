"""The train-split probe ([verdict-v2] item 2): a stronger yardstick beside RR, fitted on labelled records the
evaluation never scores (the fine-tune's training split), its layer and L2 chosen by cross-validation there, applied
to every evaluated record; evaluate_gap reports it per loop (compare() sets SV after against it:
tests/eval/test_all_sites_readout.py)."""

import numpy as np
import pytest
import torch

from loopalign.data.candidates import controlled_candidates
from loopalign.data.prompts import render_records
from loopalign.data.sources.synthetic import generate_problems
from loopalign.eval import GapConfig, GapResult, ReadoutConfig, evaluate_gap
from loopalign.eval.metrics import auroc
from loopalign.eval.readout import fit_train_split_readout, resolve_select_by
from loopalign.probes import ProbeFitConfig

CFG = resolve_select_by(
    ReadoutConfig(split="kfold", folds=4, l2_grid=(1e-3, 1e-1), fit=ProbeFitConfig(device="cpu")), "auroc"
)


def _features(make, n_tasks, prefix, seed, hidden=6):
    """Two layers, one position: the label is the sign of layer 1's first dimension; layer 0 is noise."""
    rng = np.random.default_rng(seed)
    n = 2 * n_tasks
    signal = rng.normal(size=n)
    states = rng.normal(size=(1, 2, n, 1, hidden))
    states[0, 1, :, 0, 0] = signal
    return make(states, (signal > 0).astype(np.int64), prefix=prefix)


def test_the_train_split_probe_picks_its_layer_on_the_training_records_and_scores_every_evaluated_one(
    one_loop_features,
):
    train, evaluated = _features(one_loop_features, 80, "train", 0), _features(one_loop_features, 40, "eval", 1)
    prob, chosen = fit_train_split_readout(train, evaluated, CFG)
    assert prob.shape == (1, 80) and not np.isnan(prob).any()  # every evaluated record, no folds of them
    assert chosen == [{"loop": 1, "layer": "1", "l2": chosen[0]["l2"], "n_train": 160}]
    assert auroc(evaluated.labels, prob[0]) > 0.97
    with pytest.raises(ValueError, match="records are in both the training split and the evaluation"):
        fit_train_split_readout(train, train, CFG)
    with pytest.raises(ValueError, match="resolve select_by"):
        fit_train_split_readout(train, evaluated, ReadoutConfig(split="kfold", folds=4))


@pytest.fixture(scope="module")
def llama(tiny_causal_lm):
    torch.manual_seed(0)
    return tiny_causal_lm("llama", 2).eval()


def test_evaluate_gap_fits_the_train_split_probe_on_the_records_it_is_given(llama, tok, synthetic_rows, tmp_path):
    train_rows, rejected = render_records(controlled_candidates(generate_problems(40, seed=7, levels=(1, 2))), tok)
    train_rows = [dict(r, id=f"train-{r['id']}") for r in train_rows]
    assert not rejected
    config = GapConfig(n_boot=20, controls=False, train_split_records=30)
    with pytest.raises(ValueError, match="is also in the evaluated dataset"):  # checked before any model work
        evaluate_gap(None, tok, synthetic_rows, loops=[1], config=config, probe_train_dataset=synthetic_rows[:8])
    result = evaluate_gap(
        llama, tok, synthetic_rows, loops=[1], config=config, out_dir=tmp_path / "gap", probe_train_dataset=train_rows
    )
    (row,) = result.table
    assert 0.0 <= row["rr_train_split"] <= 1.0 and 0.0 <= row["rr_train_split_auroc"] <= 1.0
    readout = result.meta["train_split_readout"]
    assert 30 <= readout["n_train"] < len(train_rows)  # whole tasks up to train_split_records
    assert readout["per_loop"][0]["loop"] == 1
    scored = np.array(result.records["rr_train_prob"], dtype=float)
    assert scored.shape == (1, len(synthetic_rows)) and np.isfinite(scored).all()
    assert "RR train split" in (tmp_path / "gap" / "gap.md").read_text()
    assert GapResult.from_json(tmp_path / "gap").train_split_rr().shape == (1, len(synthetic_rows))


def test_eval_gap_refuses_train_without_statements_before_loading_anything(capsys):
    """--probe_train_dataset train names the statements' training entities only (the option's file form runs in
    tests/trainers/test_reevaluate_run.py, where eval-gap reads a run's train_split.jsonl through it)."""
    from loopalign.scripts.eval_gap import main

    with pytest.raises(SystemExit) as exited:
        main(["--model_name_or_path", "tiny", "--dataset", "synthetic", "--probe_train_dataset", "train"])
    assert exited.value.code == 2 and "probe_train_dataset='train'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["--model_name_or_path", "tiny", "--dataset", "synthetic", "--probe_train_dataset", "no/such.jsonl"])
    assert exited.value.code == 2 and "does not exist" in capsys.readouterr().err
