import numpy as np
import pytest
import torch

from loopalign.eval.features import Features
from loopalign.eval.metrics import (
    accuracy,
    auroc,
    balanced_accuracy,
    bootstrap_ci,
    expected_calibration_error,
    f1_score,
)
from loopalign.eval.verbal import sv_metrics


def test_hard_metrics_hand_computed():
    y = np.array([1, 1, 0, 0, 1])
    pred = np.array([1, 0, 1, 0, 1])
    assert accuracy(y, pred) == pytest.approx(3 / 5)
    assert balanced_accuracy(y, pred) == pytest.approx(0.5 * (2 / 3 + 1 / 2))
    assert f1_score(y, pred) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert f1_score([1, 0], [0, 0]) == 0.0
    assert np.isnan(balanced_accuracy([1, 1], [1, 0]))


def test_auroc_with_ties():
    assert auroc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(3.5 / 4)
    assert auroc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5)
    assert auroc([0, 0, 1], [0.9, 0.8, 0.1]) == pytest.approx(0.0)
    # brute force over all pairs on random data with many ties
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 5, 200).astype(float)
    pos, neg = s[y == 1], s[y == 0]
    brute = ((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean()
    assert auroc(y, s) == pytest.approx(brute)
    assert np.isnan(auroc([1, 1], [0.2, 0.3]))


def test_ece_hand_computed():
    prob = np.array([0.92, 0.92, 0.25, 0.65])
    y = np.array([1, 0, 0, 0])
    # bins of width 0.1 on confidence: {0.92, 0.92} acc 0.5; {0.75} acc 1; {0.65} acc 0
    expected = 0.5 * abs(0.5 - 0.92) + 0.25 * abs(1 - 0.75) + 0.25 * abs(0 - 0.65)
    assert expected_calibration_error(y, prob, n_bins=5) == pytest.approx(expected)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="same length"):
        accuracy([1, 0], [1])
    with pytest.raises(ValueError, match="0/1"):
        accuracy([2, 0], [1, 0])


def test_sv_metrics_hand_computed():
    p_yes = torch.tensor([[0.9, 0.2, 0.6, 0.4], [0.8, 0.7, 0.1, 0.3]])  # [T=2, N=4]
    logp = torch.stack([p_yes.log() - 1.0, (1 - p_yes).log() - 1.0], dim=-1)  # yes/no mass e^-1
    valid = torch.tensor([[True, False, True, True], [True, True, True, True]])
    feats = Features(
        ids=list("abcd"),
        labels=np.array([1, 0, 0, 1]),
        groups=list("abcd"),
        loops=[1, 2],
        layers=[0],
        num_layers=1,
        states=None,
        verdict_logp=logp,
        verdict_valid=valid,
        exit_probs=torch.zeros(4, 2),
    )
    rows = sv_metrics(feats)
    # loop 1: preds [1,0,1,0] vs [1,0,0,1] -> acc 0.5, auroc: pos {0.9,0.4} vs neg {0.2,0.6} -> 2/4... (0.9>0.2,0.9>0.6,0.4>0.2) = 3/4
    assert rows[0]["accuracy"] == pytest.approx(0.5)
    assert rows[0]["auroc"] == pytest.approx(0.75)
    assert rows[0]["f1"] == pytest.approx(0.5)
    assert rows[0]["yes_no_mass"] == pytest.approx(np.exp(-1.0), rel=1e-5)
    assert rows[0]["valid_rate"] == pytest.approx(0.75)
    # loop 2: preds [1,1,0,0] -> acc 0.5, bal acc 0.5, auroc pos {0.8,0.3} vs neg {0.7,0.1} -> 3/4
    assert rows[1]["accuracy"] == pytest.approx(0.5)
    assert rows[1]["balanced_accuracy"] == pytest.approx(0.5)
    assert rows[1]["auroc"] == pytest.approx(0.75)
    strict = sv_metrics(feats, decision="strict")
    # loop 1 record b (right, but its argmax is neither verdict token) counts as wrong
    assert strict[0]["accuracy"] == pytest.approx(0.25)
    assert strict[1]["accuracy"] == pytest.approx(0.5)


def test_bootstrap_coverage_nominal():
    rng = np.random.default_rng(1)
    truth, n, hits = 0.7, 150, 0
    sims = 200
    for s in range(sims):
        x = (rng.random(n) < truth).astype(float)
        _, lo, hi = bootstrap_ci(lambda idx, x=x: x[idx].mean(), n, n_boot=300, seed=s)
        hits += lo <= truth <= hi
    assert 0.88 <= hits / sims <= 0.99


def test_bootstrap_vector_statistic_and_errors():
    x = np.arange(10.0)
    est, lo, hi = bootstrap_ci(lambda idx: np.array([x[idx].mean(), x[idx].max()]), 10, n_boot=50)
    assert est.shape == lo.shape == hi.shape == (2,)
    assert est[0] == pytest.approx(4.5) and (lo <= est).all() and (est <= hi + 1e-9).all()
    with pytest.raises(ValueError, match="at least one record"):
        bootstrap_ci(lambda idx: 0.0, 0)


def test_wilson_interval_does_not_collapse_at_zero_or_all():
    from loopalign.eval.metrics import wilson_interval

    lo, hi = wilson_interval(0, 16)
    assert lo == 0.0 and 0.19 < hi < 0.20  # 0/16: [0, 19.4%], where a percentile bootstrap gives [0, 0]
    lo, hi = wilson_interval(16, 16)
    assert hi == 1.0 and 0.80 < lo < 0.81
    lo, hi = wilson_interval(5, 10)
    assert lo < 0.5 < hi and abs((0.5 - lo) - (hi - 0.5)) < 1e-12
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
