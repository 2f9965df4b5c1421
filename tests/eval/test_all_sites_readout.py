"""The stronger yardstick beside RR ([verdict-v2] item 2): one probe per loop over every extracted layer x probe
position, on RR's own splits. It reads what no single site holds, it scores the records RR scores, and compare()
sets SV after against it (and against the train-split probe, tests/eval/test_train_split_readout.py) without changing
the verdict's parts."""

import numpy as np
import pytest

from loopalign.eval import GapResult, ReadoutConfig, compare, gap_table
from loopalign.eval.metrics import auroc
from loopalign.eval.readout import fit_all_sites_readout, fit_readout, resolve_select_by
from loopalign.eval.verdict import YARDSTICKS
from loopalign.probes import ProbeFitConfig

CFG = ReadoutConfig(split="kfold", folds=4, l2_grid=(1e-3, 1e-1), fixed_layer=1, fit=ProbeFitConfig(device="cpu"))


def _split_signal_features(make, n_tasks=120, per=2, hidden=6, seed=0):
    """Two layers x two positions; the label is the sign of (layer 0, position 0, dim 0) + (layer 1, position 1,
    dim 0): each site alone holds half of the signal, buried under the other half as noise."""
    rng = np.random.default_rng(seed)
    n = n_tasks * per
    a, b = rng.normal(size=n), rng.normal(size=n)
    states = rng.normal(size=(1, 2, n, 2, hidden)) * 0.1  # [T, L', N, K, H]
    states[0, 0, :, 0, 0] = a
    states[0, 1, :, 1, 0] = b
    return make(states, (a + b > 0).astype(np.int64), per=per)


def test_the_all_sites_probe_reads_what_no_single_site_holds_on_rrs_records(one_loop_features):
    feats = _split_signal_features(one_loop_features)
    config = resolve_select_by(CFG, "auroc")
    readout = fit_readout(feats, config, "auroc")
    every = fit_all_sites_readout(feats, readout.splits, config)
    ev = readout.eval_index
    assert np.array_equal(np.flatnonzero(~np.isnan(every[0])), ev)  # the same records as RR
    y = feats.labels[ev]
    rr_auc, every_auc = auroc(y, readout.prob[0, ev]), auroc(y, every[0, ev])
    assert every_auc > 0.97 and every_auc > rr_auc + 0.05, (every_auc, rr_auc)  # each site alone: about 0.85
    with pytest.raises(ValueError, match="resolve select_by"):
        fit_all_sites_readout(feats, readout.splits, CFG)


def _result(y, tasks, sv, rr, yardstick=None, posteriors=None):
    sv, rr = np.asarray(sv)[None], np.asarray(rr)[None]
    sv_pred = (sv > 0.5).astype(np.int64)
    records = {"ids": [f"r{i}" for i in range(len(y))], "labels": y.tolist(), "eval": [True] * len(y),
               "sv_prob": sv.tolist(), "sv_pred": sv_pred.tolist(), "rr_prob": rr.tolist(), "clusters": tasks}  # fmt: skip
    if yardstick is not None:
        records[YARDSTICKS[yardstick]] = np.asarray(posteriors)[None].tolist()
    return GapResult(loops=[1], metric="accuracy", table=gap_table(y, sv, sv_pred, rr, [1], n_boot=20, clusters=tasks),
                     sv=[], sv_eval=[], rr=[], rr_fixed=[], heatmap={}, records=records, meta={"total_ut_steps": 1})  # fmt: skip


@pytest.mark.parametrize("yardstick, words", [("all", "every layer RR may read"), ("train", "training split")])
def test_compare_sets_sv_after_against_each_yardstick_beside_rr(yardstick, words):
    """SV after matches RR before (70%) but sits below the yardstick (90%: the all-sites probe, or the probe fitted on
    the training split): the verdict's parts are those of the same comparison without it, and part (f)'s line, the
    rows and compare.md carry SV after minus it."""
    rng = np.random.default_rng(0)
    n = 600
    y = np.tile([1, 0], n // 2)
    tasks = [f"t{i // 2}" for i in range(n)]

    def prob(acc):
        right = np.zeros(n, dtype=bool)
        right[rng.choice(n, int(acc * n), replace=False)] = True
        return np.where(right == (y == 1), 0.8, 0.2)

    sv_b, rr, stick, sv_a = prob(0.5), prob(0.7), prob(0.9), prob(0.7)
    plain = compare(_result(y, tasks, sv_b, rr), _result(y, tasks, sv_a, rr))
    with_it = compare(_result(y, tasks, sv_b, rr, yardstick, stick), _result(y, tasks, sv_a, rr))
    assert [p["passed"] for p in with_it.parts] == [p["passed"] for p in plain.parts]
    (row,) = with_it.rows
    k = yardstick
    assert row[f"rr_{k}_before"] == pytest.approx(0.9) and row[f"sv_reach_{k}_hi"] < 0 < row[f"sv_reach_{k}"] + 0.3
    assert np.isnan(plain.rows[0][f"rr_{k}_before"])
    assert all(np.isnan(row[f"rr_{other}_before"]) for other in YARDSTICKS if other != k)
    f_line = next(p["line"] for p in with_it.parts if p["part"] == "f")
    assert "stronger yardstick" in f_line and "stronger yardstick" not in plain.parts[-1]["line"]
    assert words in with_it.markdown() and words not in plain.markdown()
