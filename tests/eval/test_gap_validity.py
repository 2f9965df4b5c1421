"""Gap measurements that cannot manufacture or hide a gap: the verdict rule at the trained depth,
threshold-free / balance-robust figures, calibrated SV and task-cluster bootstrap intervals."""

import warnings

import numpy as np
import pytest
from datasets import Dataset

from loopalign.eval import (
    CompareConfig,
    GapConfig,
    GapResult,
    ReadoutConfig,
    UnbalancedLabelsWarning,
    bootstrap_ci,
    calibrate_scores,
    cluster_members,
    compare,
    evaluate_gap,
    gap_table,
    make_splits,
    resolve_metric,
)
from loopalign.eval.metrics import auroc, balanced_accuracy

# ---------------------------------------------------------------------------------------------------------------------
# synthetic results


def _scores(y, acc, rng):
    """P(yes)-like scores [N] whose 0.5 rule is right on about ``acc`` of the records."""
    right = rng.random(len(y)) < acc
    pred = np.where(right, y, 1 - y)
    return np.clip(np.where(pred == 1, 0.5, -0.5) * rng.uniform(0.2, 1.0, len(y)) + 0.5, 0.01, 0.99)


def _result(y, sv_prob, rr_prob, tasks=None, depth=4, metric="accuracy", n_boot=200, seed=0, ids=None, frozen=None):
    """A GapResult from arrays: y [N], sv_prob / rr_prob [T, N] (loops 1..T); frozen [T, N]: the before
    probes' posteriors on these features (default: RR's own, i.e. no drift)."""
    sv_prob, rr_prob = np.atleast_2d(sv_prob), np.atleast_2d(rr_prob)
    n_loops, n = sv_prob.shape
    loops = list(range(1, n_loops + 1))
    sv_pred = (sv_prob > 0.5).astype(np.int64)
    table = gap_table(y, sv_prob, sv_pred, rr_prob, loops, metric=metric, n_boot=n_boot, seed=seed, clusters=tasks)
    return GapResult(
        loops=loops,
        metric=metric,
        table=table,
        sv=[],
        sv_eval=[],
        rr=[],
        rr_fixed=[],
        heatmap={},
        records={
            "ids": ids or [f"r{i}" for i in range(n)],
            "labels": np.asarray(y).tolist(),
            "eval": [True] * n,
            "sv_prob": sv_prob.tolist(),
            "sv_pred": sv_pred.tolist(),
            "rr_prob": rr_prob.tolist(),
            "clusters": tasks,
            "rr_frozen_prob": (rr_prob if frozen is None else np.atleast_2d(frozen)).tolist(),
        },
        meta={} if depth is None else {"total_ut_steps": depth},
    )


def _near(rr_row, y, k, rng):
    """RR's posterior [N] with the decision flipped on k records RR gets right and k it gets wrong: SV
    that says what RR reads, as accurate, but not identical (an identical copy has zero-width intervals)."""
    right = (rr_row > 0.5) == (y == 1)
    flip = np.concatenate(
        [rng.choice(np.flatnonzero(right), k, replace=False), rng.choice(np.flatnonzero(~right), k, replace=False)]
    )
    out = rr_row.copy()
    out[flip] = 1 - out[flip]
    return out


def _organism_like(n_tasks=200, n_loops=6, sv_acc=0.6, rr_acc=0.85, seed=0):
    """Two answers per task (one right, one wrong), SV weak and RR strong at every loop: a real gap."""
    rng = np.random.default_rng(seed)
    y = np.tile([1, 0], n_tasks)
    tasks = [f"t{i // 2}" for i in range(2 * n_tasks)]
    sv = np.stack([_scores(y, sv_acc, rng) for _ in range(n_loops)])
    rr = np.stack([_scores(y, rr_acc, rng) for _ in range(n_loops)])
    return y, tasks, sv, rr, rng


# ---------------------------------------------------------------------------------------------------------------------
# the verdict rule (v2; the table of cases is tests/eval/test_verdict_rule.py)


def test_untrained_model_compared_to_itself_does_not_pass():
    y, tasks, sv, rr, _ = _organism_like()
    before = _result(y, sv, rr, tasks)
    assert before.table[3]["gap_lo"] > 0  # a real gap at the trained depth
    comp = compare(before, _result(y, sv, rr, tasks), CompareConfig(n_boot=200))
    assert comp.paired and comp.loops == [4] and comp.depth == 4
    assert not comp.sv_improved and not comp.gap_closed and not comp.sv_caught_up and not comp.passed
    assert comp.rr_preserved and comp.summary["d_sv"] == 0.0
    assert comp.verdict.startswith("Verdict: no") and "(a) SV caught up" in comp.verdict
    assert comp.clusters["n_clusters"] == 200 and comp.clusters["n_without_task"] == 0


def test_sv_rising_to_rr_passes():
    y, tasks, sv, rr, rng = _organism_like()
    sv_after = np.stack([_near(r, y, 3, rng) for r in rr])  # SV says what RR reads
    comp = compare(_result(y, sv, rr, tasks), _result(y, sv_after, rr, tasks), CompareConfig(n_boot=200))
    assert comp.sv_improved and comp.gap_closed and comp.sv_caught_up and comp.rr_preserved and comp.passed
    assert comp.summary["gap_after_hi"] <= 0.02 and comp.summary["sv_reach_lo"] > -0.02
    assert comp.verdict.startswith("Verdict: yes") and "(c) RR preserved, both ways: yes" in comp.verdict
    md = comp.markdown()
    assert md.startswith("# Before / after") and "Verdict rule" in md and "4 (verdict)" in md


def test_a_small_but_real_after_gap_is_not_closed():
    """A 4-point gap after: its upper bound is above the 2-point margin, so it is not closed."""
    rng = np.random.default_rng(1)
    n = 4000
    y = np.tile([1, 0], n // 2)
    tasks = [f"t{i // 2}" for i in range(n)]
    rr = np.where(y == 1, 0.9, 0.1)[None].repeat(4, 0)  # RR right everywhere
    sv_before = np.stack([_scores(y, 0.6, rng) for _ in range(4)])
    sv_after = rr.copy()
    flip = rng.choice(n, int(0.04 * n), replace=False)
    sv_after[:, flip] = 1 - sv_after[:, flip]  # SV after: wrong on 4% of records
    comp = compare(_result(y, sv_before, rr, tasks), _result(y, sv_after, rr, tasks), CompareConfig(n_boot=200))
    assert comp.summary["gap_after"] == pytest.approx(0.04)
    assert comp.sv_improved and comp.summary["gap_after_lo"] > 0 and comp.summary["gap_after_hi"] > 0.02
    assert not comp.gap_closed and not comp.sv_caught_up and not comp.passed


def test_extrapolated_loops_never_enter_the_verdict():
    y, tasks, sv, rr, rng = _organism_like(n_tasks=100)
    # SV improves only past the trained depth (to RR there): no
    sv_after = sv.copy()
    sv_after[4:] = rr[4:]
    comp = compare(_result(y, sv, rr, tasks), _result(y, sv_after, rr, tasks), CompareConfig(n_boot=100))
    assert [r["loop"] for r in comp.rows] == [1, 2, 3, 4] and [r["loop"] for r in comp.extrapolation] == [5, 6]
    assert all(r["extrapolation"] and not r["in_verdict"] for r in comp.extrapolation)
    assert comp.extrapolation[0]["d_sv_lo"] > 0 and not comp.sv_caught_up and not comp.passed
    assert "Extrapolation: loops past the trained depth 4" in comp.markdown()
    # SV improves at the trained depth and collapses past it: yes
    sv_after = sv.copy()
    sv_after[3] = _near(rr[3], y, 1, rng)
    sv_after[4:] = 1 - sv_after[4:]
    comp = compare(_result(y, sv, rr, tasks), _result(y, sv_after, rr, tasks), CompareConfig(n_boot=100))
    assert comp.sv_caught_up and comp.passed and comp.extrapolation[0]["d_sv_hi"] < 0
    # a list of loops may not reach past the depth; the depth comes from meta, else 4
    with pytest.raises(ValueError, match="past the trained depth"):
        compare(_result(y, sv, rr, tasks), _result(y, sv, rr, tasks), CompareConfig(loops=[3, 5], n_boot=10))
    shallow = compare(_result(y, sv, rr, tasks, depth=2), _result(y, sv, rr, tasks, depth=2), CompareConfig(n_boot=10))
    assert shallow.loops == [2] and [r["loop"] for r in shallow.extrapolation] == [3, 4, 5, 6]
    unknown = compare(_result(y, sv, rr, depth=None), _result(y, sv, rr, depth=None), CompareConfig(n_boot=10))
    assert unknown.loops == [4] and unknown.depth == 4
    assert compare(_result(y, sv, rr), _result(y, sv, rr), CompareConfig(loops=6, n_boot=10)).loops == [6]


# ---------------------------------------------------------------------------------------------------------------------
# item 1: threshold-free, balance-robust and calibrated figures


def test_unbalanced_labels_manufacture_an_accuracy_gap_that_balanced_metrics_do_not():
    rng = np.random.default_rng(0)
    n = 600
    y = (rng.random(n) < 0.8).astype(np.int64)
    sv = rng.uniform(0.3, 0.7, (1, n))  # SV: noise around 0.5
    rr = np.clip(0.8 + 0.05 * rng.standard_normal((1, n)), 0, 1)  # RR: a noise probe that learnt the prior
    row = gap_table(y, sv, (sv > 0.5).astype(np.int64), rr, [1], n_boot=300, sv_cal_prob=rr.copy())[0]
    assert row["gap_lo"] > 0.2  # accuracy: a "significant" gap from the label prior alone
    assert row["rr_balanced_accuracy"] == 0.5  # the prior-only probe says "yes" to all
    assert row["gap_balanced_accuracy_lo"] < 0 < row["gap_balanced_accuracy_hi"]
    assert abs(row["gap_balanced_accuracy"]) < 0.06 and abs(row["gap_auroc"]) < 0.1
    assert row["gap_auroc"] == pytest.approx(row["rr_auroc"] - row["sv_auroc"])
    assert row["sv_auroc"] == pytest.approx(auroc(y, sv[0]))
    assert row["rr_balanced_accuracy"] == pytest.approx(balanced_accuracy(y, (rr[0] > 0.5).astype(int)))
    assert row["gap_cal"] == pytest.approx(0.0)  # SV with RR's own threshold closes this fake gap
    assert resolve_metric("auto", 0.2)[0] == "balanced_accuracy" and resolve_metric("auto", 0.45)[0] == "accuracy"
    assert resolve_metric("auroc", 0.2)[0] == "auroc"


def test_sv_threshold_is_fitted_on_rr_splits_out_of_fold():
    """calibrate_scores fits a cut on each split's train + validation records and scores only its test
    records (RR's splits: every record once under k-fold, the held-out ones under holdout)."""
    rng = np.random.default_rng(0)
    n_tasks = 60
    y = np.tile([1, 0], n_tasks)
    score = (1.5 * y + rng.standard_normal(2 * n_tasks) + 3.0).astype(np.float32)  # informative, shifted up
    scores = np.stack([score, score[::-1].copy()])
    ids, groups = [f"r{i}" for i in range(2 * n_tasks)], [f"t{i // 2}" for i in range(2 * n_tasks)]
    for split in ("kfold", "holdout"):
        cfg = ReadoutConfig(split=split, folds=4)
        splits = make_splits(ids, y, groups, cfg)
        cal = calibrate_scores(scores, y, splits, cfg)
        scored = np.concatenate([test for _, _, test in splits])
        assert np.isnan(cal[0]).sum() == 2 * n_tasks - len(np.unique(scored))
        for train, val, test in splits:  # the cut comes from the fitting records only
            moved = scores.copy()
            moved[:, test] += 100.0  # test scores far above: all "yes" whatever the cut fitted elsewhere
            assert (calibrate_scores(moved, y, [(train, val, test)], cfg)[:, test] > 0.5).all()
    # the fixed 0.5 rule on sigmoid(score) says "yes" to nearly all; the fitted cut does not
    raw = 1 / (1 + np.exp(-score))
    cal = calibrate_scores(scores[:1], y, make_splits(ids, y, groups, ReadoutConfig(split="kfold")))
    assert balanced_accuracy(y, (raw > 0.5).astype(int)) < 0.55
    assert balanced_accuracy(y, (cal[0] > 0.5).astype(int)) > 0.7
    assert auroc(y, cal[0]) == pytest.approx(auroc(y, raw), abs=0.05)


def test_calibrated_sv_is_not_worse_than_raw_on_a_biased_score():
    """The organism's case: biased items say P(yes) = 1 to both answers; elsewhere the score is
    informative around 0. A likelihood fit puts its cut among the P(yes) = 1 mass and scores 50%;
    the fitted cut keeps SV's own rule, or a better one."""
    rng = np.random.default_rng(1)
    n_tasks = 200
    y = np.tile([1, 0], n_tasks)
    biased = np.repeat(rng.random(n_tasks) < 0.35, 2)
    score = np.where(biased, 12.0, 1.2 * (2 * y - 1) + rng.standard_normal(2 * n_tasks))
    ids, groups = [f"r{i}" for i in range(2 * n_tasks)], [f"t{i // 2}" for i in range(2 * n_tasks)]
    for split in ("kfold", "holdout"):
        cfg = ReadoutConfig(split=split, folds=5)
        splits = make_splits(ids, y, groups, cfg)
        cal = calibrate_scores(score[None], y, splits, cfg)[0]
        ok = ~np.isnan(cal)
        raw_acc = ((score[ok] > 0) == (y[ok] == 1)).mean()
        cal_acc = ((cal[ok] > 0.5) == (y[ok] == 1)).mean()
        assert raw_acc > 0.6 and cal_acc >= raw_acc - 0.03, (split, raw_acc, cal_acc)


# ---------------------------------------------------------------------------------------------------------------------
# item 2: cluster bootstrap over tasks


def test_cluster_members_and_fallback():
    members = cluster_members(["a", None, "b", "a", None])
    assert [m.tolist() for m in members] == [[0, 3], [1], [2], [4]]


def test_cluster_bootstrap_covers_with_correlated_answers_where_record_bootstrap_does_not():
    """Tasks with 8 answers that share a task effect: the record bootstrap's interval is too narrow."""
    rng = np.random.default_rng(0)
    n_tasks, per, sims, truth = 40, 8, 150, 0.5
    tasks = np.repeat(np.arange(n_tasks), per).tolist()
    hits = {"records": 0, "tasks": 0}
    for s in range(sims):
        p_task = np.clip(truth + 0.3 * rng.standard_normal(n_tasks), 0, 1)
        x = (rng.random(n_tasks * per) < np.repeat(p_task, per)).astype(float)
        for name, cl in (("records", None), ("tasks", tasks)):
            _, lo, hi = bootstrap_ci(lambda idx, x=x: x[idx].mean(), len(x), n_boot=200, seed=s, clusters=cl)
            hits[name] += lo <= truth <= hi
    assert hits["tasks"] / sims >= 0.88, hits
    assert hits["records"] / sims <= 0.8, hits


def test_compare_resamples_the_same_tasks_in_both_results():
    """Changes that move whole tasks together: the paired task bootstrap is wider than a record one,
    and records without a task fall back to their own cluster, as the report says."""
    y, tasks, sv, rr, rng = _organism_like(n_tasks=100, n_loops=4)
    task_ids = np.repeat(np.arange(100), 2)
    moved = rng.random(100) < 0.5
    sv_after = sv.copy()
    sv_after[:, moved[task_ids]] = np.where(y == 1, 0.9, 0.1)[moved[task_ids]]  # right on half of the tasks
    b, a = _result(y, sv, rr, tasks), _result(y, sv_after, rr, tasks)
    by_task = compare(b, a, CompareConfig(n_boot=300))
    b.records["clusters"] = a.records["clusters"] = None
    by_record = compare(b, a, CompareConfig(n_boot=300))
    width = {k: c.summary["d_sv_hi"] - c.summary["d_sv_lo"] for k, c in (("t", by_task), ("r", by_record))}
    assert by_task.summary["d_sv"] == pytest.approx(by_record.summary["d_sv"])
    assert width["t"] > 1.15 * width["r"], width
    assert by_task.clusters == {"n_clusters": 100, "n_records": 200, "n_without_task": 0}
    assert by_record.clusters == {"n_clusters": 200, "n_records": 200, "n_without_task": 200}
    assert "200 of 200 records have no task id" in by_record.markdown()


# ---------------------------------------------------------------------------------------------------------------------
# end to end on the tiny model


def _tiny_config(**kw):
    return GapConfig(
        loops=[1, 2],
        verdict_tokens=("Yes", "No"),
        n_boot=30,
        readout=ReadoutConfig(l2_grid=(1e-2, 1.0), split="kfold", folds=3),
        **kw,
    )


def test_evaluate_gap_reports_robust_figures_clusters_and_depth(tiny_model, tok, synthetic_rows):
    rows = [dict(r) for r in synthetic_rows]
    for r in rows[:4]:
        r["task"] = None  # no task id: clusters of their own
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnbalancedLabelsWarning)  # balanced: no warning
        res = evaluate_gap(tiny_model, tok, Dataset.from_list(rows), config=_tiny_config())
    assert res.metric == "accuracy" and res.meta["total_ut_steps"] == 4
    assert res.meta["clusters"] == {"field": "task", "n_clusters": 22 + 4, "n_records": 48, "n_without_task": 4}
    assert res.clusters()[:4] == [None] * 4 and res.clusters()[4] == rows[4]["task"]
    y = np.asarray(res.records["labels"])
    for ti, row in enumerate(res.table):
        for m in ("accuracy", "balanced_accuracy", "auroc"):
            for kind in ("sv", "sv_cal", "rr", "gap", "gap_cal"):
                name = f"{kind}_{m}"
                assert row[name + "_lo"] - 1e-9 <= row[name] <= row[name + "_hi"] + 1e-9, name
        assert row["sv"] == row["sv_accuracy"] and row["gap"] == pytest.approx(row["rr"] - row["sv"])
        assert row["gap_cal"] == pytest.approx(row["rr"] - row["sv_cal"])
        assert row["sv_auroc"] == pytest.approx(auroc(y, np.asarray(res.records["sv_prob"][ti])))
    md = res.markdown()
    assert "### balanced accuracy" in md and "### AUROC" in md and "SV calibrated" in md
    assert "cluster bootstrap over tasks" in md and "4 records have no task id" in md
    again = GapResult.from_json(res.to_json())
    comp = compare(again, res, CompareConfig(n_boot=20))
    assert comp.loops == [2] and "trained depth 4 was not evaluated" in comp.verdict and not comp.sv_caught_up


def test_unbalanced_labels_warn_loudly_and_switch_the_headline(tiny_model, tok, synthetic_rows):
    rows = [r for r in synthetic_rows if r["label"] == 1] + [r for r in synthetic_rows if r["label"] == 0][:8]
    with pytest.warns(UnbalancedLabelsWarning, match="UNBALANCED LABELS"):
        res = evaluate_gap(tiny_model, tok, Dataset.from_list(rows), config=_tiny_config())
    assert res.metric == "balanced_accuracy" and res.meta["label_balance"]["unbalanced"]
    assert res.meta["label_balance"]["minority_share"] == pytest.approx(8 / 32)
    assert res.table[0]["sv"] == res.table[0]["sv_balanced_accuracy"]
    md = res.markdown()
    assert "**WARNING** UNBALANCED LABELS" in md
    # the accuracy table is prior-driven here: left out of gap.md (kept in gap.json), beside the balanced headline
    assert "### accuracy" not in md and "Accuracy is left out" in md and "### balanced accuracy" in md
    assert "sv_accuracy" in res.table[0] and "prior-driven" not in md.split("Accuracy is left out")[0]
    with pytest.warns(UnbalancedLabelsWarning):
        chosen = evaluate_gap(tiny_model, tok, Dataset.from_list(rows), config=_tiny_config(metric="accuracy"))
    assert chosen.metric == "accuracy" and "accuracy (as configured)" in chosen.markdown()
    assert "is **prior-driven** on these unbalanced labels" in chosen.markdown()
    # raising the bar makes balanced data count as unbalanced; the field is validated
    with pytest.raises(ValueError, match="min_minority_share"):
        GapConfig(min_minority_share=0.7)


def test_vectorised_table_metrics_match_the_metric_functions():
    from loopalign.eval.gap import _metric_rows, metric_value

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    prob = rng.random((3, 50))
    pred = (prob > 0.5).astype(np.int64)
    pred[0, :4] = -1  # strict: no valid verdict counts as wrong
    names = ["accuracy", "balanced_accuracy", "auroc", "f1"]
    ref = [[metric_value(m, y, prob[t], pred[t]) for t in range(3)] for m in names]
    np.testing.assert_allclose(_metric_rows(names, y, prob, pred), ref)
    assert np.isnan(_metric_rows(["balanced_accuracy"], np.ones(5, int), prob[:, :5], pred[:, :5])).all()


def test_strict_sv_scores_a_model_that_does_not_say_yes_or_no_as_wrong(tiny_model, tok, synthetic_rows):
    """The study's scoring (a verdict that is neither Yes nor No is wrong): a random model rarely
    puts Yes or No first, so strict SV sits near 0 where the forced choice sits near 50, and the
    generated verdicts agree; the default (forced) cannot go far below chance."""
    rows = Dataset.from_list(list(synthetic_rows))
    forced = evaluate_gap(tiny_model, tok, rows, config=_tiny_config(sampled_verdict=True))
    strict = evaluate_gap(tiny_model, tok, rows, config=_tiny_config(sv_decision="strict", sampled_verdict=True))
    for f, s, sampled in zip(forced.sv, strict.sv, strict.sv_sampled):
        assert s["valid_rate"] < 0.2  # the argmax is rarely a verdict token
        assert s["accuracy"] <= s["valid_rate"] + 1e-9 < 0.2 < 0.3 < f["accuracy"]
        assert sampled["accuracy"] <= 1 - sampled["unparseable"] / sampled["n"] + 1e-9  # unparseable = wrong
    assert strict.config["sv_decision"] == "strict" and "SV decision: strict" in strict.markdown()
