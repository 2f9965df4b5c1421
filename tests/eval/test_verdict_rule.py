"""The before/after verdict, rule v2 (docs/concepts.md "The verdict"): table-driven cases built from
synthetic GapResults, each judged part by part, and the frozen readout that part (c) reads."""

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
from datasets import Dataset

from loopalign.eval import (
    CompareConfig,
    GapConfig,
    GapResult,
    ReadoutConfig,
    compare,
    evaluate_gap,
    gap_table,
    load_frozen_probes,
)
from loopalign.eval.verdict import tp_deltas

# ---------------------------------------------------------------------------------------------------------------------
# synthetic results: one loop (the trained depth), tasks of `per` records, every figure derived from RR before's
# right/wrong mask so that how much two figures share is set, not left to chance


def _right(n, acc, rng):
    """A right/wrong mask [n] with exactly round(acc * n) right."""
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, int(round(acc * n)), replace=False)] = True
    return mask


def _flip(mask, down, up, rng):
    """``mask`` with ``down`` right records made wrong and ``up`` wrong ones made right."""
    out = mask.copy()
    out[rng.choice(np.flatnonzero(mask), down, replace=False)] = False
    out[rng.choice(np.flatnonzero(~mask), up, replace=False)] = True
    return out


def _prob(y, right, magnitude):
    """P(label 1) [n] whose 0.5 rule is right where ``right``; confidence ``magnitude`` [n] in (0, 0.5)."""
    pred = np.where(right, y, 1 - y)
    return np.where(pred == 1, 0.5 + magnitude, 0.5 - magnitude)


def _result(y, tasks, sv, rr, frozen=None, tp=None):
    """A GapResult at one loop (the trained depth, 1) from P(yes) / RR posteriors [n]; TP: per-task 0/1 or None."""
    sv, rr = np.asarray(sv)[None], np.asarray(rr)[None]
    sv_pred = (sv > 0.5).astype(np.int64)
    n = len(y)
    ids = [f"r{i}" for i in range(n)]
    records = {
        "ids": ids,
        "labels": y.tolist(),
        "eval": [True] * n,
        "sv_prob": sv.tolist(),
        "sv_pred": sv_pred.tolist(),
        "rr_prob": rr.tolist(),
        "clusters": tasks,
    }
    if frozen is not None:
        records["rr_frozen_prob"] = np.asarray(frozen)[None].tolist()
    tp_rows = None
    if tp is not None:
        first = {}
        for i, t in enumerate(tasks):
            first.setdefault(t, ids[i])
        tp_rows = [
            {"loop": 1, "accuracy": float(np.mean(tp)), "n": len(tp), "task_ids": list(first.values()),
             "correct": [int(c) for c in tp]}
        ]  # fmt: skip
    return GapResult(
        loops=[1],
        metric="accuracy",
        table=gap_table(y, sv, sv_pred, rr, [1], n_boot=20, clusters=tasks),
        sv=[],
        sv_eval=[],
        rr=[],
        rr_fixed=[],
        heatmap={},
        records=records,
        tp=tp_rows,
        meta={"total_ut_steps": 1},
    )


@dataclass
class Case:
    """Accuracies (right/wrong masks) of SV and RR before, and after as flips of RR before's mask."""

    name: str
    expect: dict  # Comparison attribute -> value
    n_tasks: int = 300
    per: int = 2
    rr_before: float = 0.85
    sv_before: float = 0.60
    sv_after: tuple[int, int] = (3, 3)  # (down, up) flips of RR before's mask
    rr_after: tuple[int, int] = (0, 0)
    frozen: tuple[int, int] | None = (0, 0)  # None: the after result has no frozen readout (an old result)
    all_right_after: bool = False  # SV after and RR after right everywhere (the ceiling)
    mirror_after: bool = False  # RR after right exactly where SV after is (a readout that copies the verdict)
    tp_before: float | None = 0.9
    tp_after: float | None = 0.9
    text: list[str] = field(default_factory=list)  # phrases the verdict must print


def _build(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = case.n_tasks * case.per
    y = np.tile([1, 0], n // 2)
    tasks = [f"t{i // case.per}" for i in range(n)]
    magnitude = rng.uniform(0.05, 0.45, n)  # shared by every score: AUROC moves with the masks only
    rr_b = _right(n, case.rr_before, rng)
    sv_b = _right(n, case.sv_before, rng)
    if case.all_right_after:
        sv_a = rr_a = np.ones(n, dtype=bool)
    else:
        sv_a, rr_a = _flip(rr_b, *case.sv_after, rng), _flip(rr_b, *case.rr_after, rng)
        if case.mirror_after:
            rr_a = sv_a.copy()
    frozen = None if case.frozen is None else _prob(y, _flip(rr_b, *case.frozen, rng), magnitude)
    tp_b = tp_a = None
    if case.tp_before is not None:
        tp_b = _right(case.n_tasks, case.tp_before, rng)
        tp_a = tp_b if case.tp_after == case.tp_before else _right(case.n_tasks, case.tp_after, rng)
    before = _result(y, tasks, _prob(y, sv_b, magnitude), _prob(y, rr_b, magnitude), tp=tp_b)
    after = _result(y, tasks, _prob(y, sv_a, magnitude), _prob(y, rr_a, magnitude), frozen=frozen, tp=tp_a)
    return before, after


YES = dict(sv_caught_up=True, gap_closed=True, rr_preserved=True, tp_kept=True, saturated=False, passed=True)

CASES = [
    Case("clean positive: SV verbalises what RR read, RR and TP hold", dict(YES, sv_past_base_readout=False,
         outcome="yes", frozen_readout=True, tp_measured=True), text=["Verdict: yes"]),
    # a remaining gap of ~+12 points on 10 clusters: the old rule ("the gap CI touches 0") passed it
    Case("small evaluation", dict(gap_closed=False, passed=False, outcome="no"), n_tasks=10, per=8,
         sv_after=(20, 10), tp_before=None),
    # +8.8 points, CI clear of 0 on both sides: the old gap_tolerance 0.05 (on the lower bound) passed it
    Case("tolerance", dict(gap_closed=False, passed=False), n_tasks=120, rr_before=0.9, sv_after=(40, 19)),
    # SV after above RR before (+4.3), RR after rose further (+8.5): SV reached the base readout
    Case("moving target", dict(sv_caught_up=True, gap_closed=False, rr_preserved=True, passed=False),
         rr_before=0.82, sv_after=(0, 26), rr_after=(0, 51), text=["the readout changed"]),
    Case("TP at 0 after", dict(YES, tp_kept=False, passed=False), tp_after=0.0, text=["dTP at loop 1"]),
    Case("TP not measured: not blocking", dict(YES, tp_measured=False), tp_before=None, text=["TP not measured"]),
    # the refitted RR holds, the probe fitted before training falls from 85% to 52% on the tuned features
    Case("frozen-probe drift", dict(YES, rr_preserved=False, passed=False), frozen=(200, 0)),
    Case("frozen readout absent (an old result)", dict(YES, rr_preserved=False, frozen_readout=False, passed=False),
         frozen=None, text=["frozen readout absent"]),
    Case("saturation: both at 100%", dict(saturated=True, passed=False, outcome="saturated: not measurable",
         sv_caught_up=True), all_right_after=True, text=["saturated: not measurable", "cannot be yes"]),
    # at the ceiling, but the probes fitted before training fall on the tuned features: saturation cannot hide a
    # measured failure, so the verdict is no (rule v2 as first written said "saturated")
    Case("saturation with frozen-probe drift", dict(saturated=True, rr_preserved=False, passed=False, outcome="no"),
         all_right_after=True, frozen=(200, 0), text=["cannot be yes (it is no: (c) failed as measured)"]),
    # not at a ceiling (RR before 70%, SV after about 85%): the refitted readout after training makes the verdict's
    # decisions on every record, so (b)'s interval has zero width; the other parts are measured and pass
    Case("readout copies the verdict", dict(saturated=True, gap_closed=True, passed=False,
         outcome="saturated: not measurable"), rr_before=0.70, sv_after=(0, 90), rr_after=(0, 90),
         mirror_after=True, text=["zero-width interval: gap_after"]),
    # SV after well above RR before, RR held: every part passes and f is flagged (a flag, not a block)
    Case("flag f: SV past the base readout", dict(YES, sv_past_base_readout=True), rr_before=0.70,
         sv_after=(0, 90), text=["(f) SV went past what the base readout knew: flagged"]),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_case_is_judged_correctly(case):
    before, after = _build(case)
    comp = compare(before, after, CompareConfig(n_boot=300))
    for key, value in case.expect.items():
        assert getattr(comp, key) == value, (key, comp.verdict)
    assert comp.passed == (comp.outcome == "yes")
    lines = comp.verdict.splitlines()
    assert lines[0].startswith(f"Verdict: {comp.outcome}")
    assert [p["part"] for p in comp.parts] == list("abcdef") and all(p["line"] in lines for p in comp.parts)
    for phrase in case.text:
        assert phrase in comp.verdict, comp.verdict
    data = json.loads(comp.to_json())
    for key in ("sv_caught_up", "gap_closed", "rr_preserved", "tp_kept", "saturated", "sv_past_base_readout"):
        assert isinstance(data[key], bool)
    assert data["passed"] == comp.passed and data["outcome"] == comp.outcome


def test_the_cases_are_the_situations_they_name():
    """The figures behind the table: what each case was built to be."""
    s = {c.name: compare(*_build(c), CompareConfig(n_boot=300)).summary for c in CASES}
    small = s["small evaluation"]
    assert 0.10 <= small["gap_after"] <= 0.14 and small["gap_after_lo"] <= 0 < 0.2 < small["gap_after_hi"]
    tol = s["tolerance"]
    assert 0.08 <= tol["gap_after"] <= 0.095 and 0 < tol["gap_after_lo"] < 0.05 < tol["gap_after_hi"]
    mt = s["moving target"]
    assert mt["sv_after"] > mt["rr_before"] and mt["rr_after"] > mt["sv_after"] and mt["d_rr_lo"] > 0.02
    drift = s["frozen-probe drift"]
    assert drift["d_rr"] == 0 and drift["rr_drift"] < -0.3 and drift["rr_frozen_after"] < 0.55
    sat = s["saturation: both at 100%"]
    assert sat["sv_after"] == sat["rr_after"] == 1.0 and sat["gap_after_lo"] == sat["gap_after_hi"] == 0.0
    sat_drift = s["saturation with frozen-probe drift"]
    assert sat_drift["sv_after"] == sat_drift["rr_after"] == 1.0 and sat_drift["rr_drift"] < -0.3
    copy = s["readout copies the verdict"]
    assert 0.8 < copy["sv_after"] == copy["rr_after"] < 0.95 and copy["gap_after_lo"] == copy["gap_after_hi"] == 0.0
    assert copy["sv_reach_lo"] > 0.02  # SV after went past RR before, so (a) passes as measured


def test_a_smaller_evaluation_does_not_pass_more_easily():
    """The same SV and RR accuracies, 10 clusters or 300: the gap's upper bound only gets higher with fewer."""
    rng = np.random.default_rng(3)
    hi = {}
    for n_tasks in (10, 300):
        case = Case("n", {}, n_tasks=n_tasks, per=8, sv_after=(int(0.05 * n_tasks * 8), 0), tp_before=None)
        comp = compare(*_build(case, seed=int(rng.integers(100))), CompareConfig(n_boot=300))
        assert not comp.gap_closed and not comp.passed
        hi[n_tasks] = comp.summary["gap_after_hi"]
    assert hi[10] > hi[300] > 0.02


def test_the_delta_is_a_config_field_and_the_v1_fields_are_gone():
    wide = compare(*_build(CASES[3]), CompareConfig(n_boot=100, delta=0.10))
    assert wide.gap_closed  # the moving target's +4 gap is within a 10-point margin
    assert "10 points" in CompareConfig(delta=0.10).rule()
    with pytest.raises(TypeError, match="gap_tolerance"):
        CompareConfig(gap_tolerance=0.05)
    with pytest.raises(ValueError, match="CompareConfig.delta"):
        CompareConfig(delta=-0.01)


def test_dtp_resamples_the_gaps_clusters():
    """TP tasks that move together inside a cluster: resampled as the gap's clusters, dTP's interval is wider
    than when every task is its own cluster; the estimate is the same."""
    rng = np.random.default_rng(0)
    n_clusters, tasks_per = 40, 4
    n = n_clusters * tasks_per * 2
    y = np.tile([1, 0], n // 2)
    task = [f"t{i // 2}" for i in range(n)]
    cluster = [f"c{i // (2 * tasks_per)}" for i in range(n)]
    magnitude = rng.uniform(0.05, 0.45, n)
    right = _right(n, 0.8, rng)
    tp_b = np.ones(n_clusters * tasks_per, dtype=bool)
    tp_a = np.repeat(rng.random(n_clusters) < 0.7, tasks_per)  # whole clusters lose TP together

    def results(clusters):
        b = _result(y, clusters, _prob(y, right, magnitude), _prob(y, right, magnitude), tp=tp_b)
        a = _result(y, clusters, _prob(y, right, magnitude), _prob(y, right, magnitude), frozen=None, tp=tp_a)
        for r in (b, a):  # TP names its tasks by their first record, whatever the bootstrap cluster
            r.tp[0]["task_ids"] = [f"r{2 * k}" for k in range(n_clusters * tasks_per)]
        return b, a

    by_cluster = compare(*results(cluster), CompareConfig(n_boot=400)).tp[0]
    by_task = compare(*results(task), CompareConfig(n_boot=400)).tp[0]
    assert by_cluster["d_tp"] == pytest.approx(by_task["d_tp"]) and by_cluster["n_tasks"] == 160
    width = {k: r["d_tp_hi"] - r["d_tp_lo"] for k, r in (("cluster", by_cluster), ("task", by_task))}
    assert width["cluster"] > 1.4 * width["task"], width
    alone = tp_deltas(*results(cluster), CompareConfig(n_boot=400))[0]  # standalone: the same clusters
    assert (
        alone["d_tp"] == pytest.approx(by_cluster["d_tp"]) and alone["d_tp_hi"] - alone["d_tp_lo"] > 1.4 * width["task"]
    )


def test_unbalanced_labels_mark_accuracy_as_prior_driven():
    rng = np.random.default_rng(0)
    n = 400
    y = (rng.random(n) < 0.85).astype(np.int64)
    tasks = [f"t{i}" for i in range(n)]
    magnitude = rng.uniform(0.05, 0.45, n)
    rr = _prob(y, _right(n, 0.9, rng), magnitude)
    b = _result(y, tasks, _prob(y, _right(n, 0.6, rng), magnitude), rr)
    comp = compare(b, _result(y, tasks, rr, rr, frozen=rr), CompareConfig(n_boot=50))
    assert any("prior-driven" in note for note in comp.notes)
    assert "prior-driven" in comp.markdown() and "prior-driven" in comp.verdict
    balanced = compare(*_build(CASES[0]), CompareConfig(n_boot=50))
    assert not balanced.notes and "prior-driven" not in balanced.markdown()


def test_the_markdown_states_the_rule_before_any_figure():
    comp = compare(*_build(CASES[3]), CompareConfig(n_boot=100))
    md = comp.markdown()
    rule_at, verdict_at = md.index("Verdict rule v2"), md.index("**Verdict: no")
    assert rule_at < verdict_at < md.index("| loop |")
    assert not any(ch.isdigit() for ch in md[:rule_at].replace("# Before / after", ""))
    for part in "abcdef":
        assert f"- ({part}) " in md
    assert "RR frozen − RR before" in md and "AUROC (SV by P(yes)" in md


# ---------------------------------------------------------------------------------------------------------------------
# the frozen readout on real models: the before-evaluation's probes applied to the after features


def _config(**kw):
    kw.setdefault("readout", ReadoutConfig(l2_grid=(1e-2, 1.0), split="kfold", folds=3))
    return GapConfig(loops=[1, 2], n_boot=20, controls=False, **kw)


def test_frozen_probes_score_the_after_features_with_the_before_probes(tiny_model, tok, synthetic_rows, tmp_path):
    import copy

    import torch

    data = Dataset.from_list(list(synthetic_rows))
    before = evaluate_gap(tiny_model, tok, data, config=_config(), out_dir=str(tmp_path / "before"))
    probes = load_frozen_probes(str(tmp_path / "before"))
    assert sorted(probes) == [f"loop{t}_fold{f}" for t in (1, 2) for f in range(3)]
    assert sum(len(p.meta["test_ids"]) for k, p in probes.items() if k.startswith("loop1_")) == len(synthetic_rows)
    # the same model: the frozen probes give exactly RR's out-of-fold posteriors
    same = evaluate_gap(tiny_model, tok, data, config=_config(), frozen_probes=str(tmp_path / "before"))
    np.testing.assert_allclose(same.frozen_rr(), np.asarray(before.records["rr_prob"]), atol=1e-6)
    comp = compare(before, same, CompareConfig(n_boot=50))
    assert comp.frozen_readout and comp.summary["rr_drift"] == 0.0
    # another model: the frozen probes read its features (they differ), the refitted ones are fitted anew
    moved = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.5 * torch.randn_like(p) * p.abs().mean())
    after = evaluate_gap(moved, tok, data, config=_config(), frozen_probes=probes)
    assert not np.allclose(after.frozen_rr(), np.asarray(before.records["rr_prob"]))
    assert np.isfinite(after.frozen_rr()).all() and after.meta["frozen_readout"] == {"n_probes": 6}
    again = GapResult.from_json(after.to_json())
    np.testing.assert_allclose(again.frozen_rr(), after.frozen_rr())
    assert "frozen" in compare(before, again, CompareConfig(n_boot=50)).parts[2]["line"]


def test_frozen_probes_that_are_missing_fail_before_model_work(tiny_model, tok, synthetic_rows, tmp_path):
    data = Dataset.from_list(list(synthetic_rows))
    assert load_frozen_probes(str(tmp_path), required=False) is None
    with pytest.raises(FileNotFoundError, match="probe file"):
        evaluate_gap(None, tok, data, config=_config(), frozen_probes=str(tmp_path))  # no model is touched
    from loopalign.probes import LinearProbe, save_probes

    plain = LinearProbe(torch_zeros(4), torch_zeros(()), torch_zeros(4), torch_zeros(4) + 1, meta={"l2": 1.0})
    save_probes({"loop1_best": plain}, str(tmp_path / "probes"))  # probes from before frozen readouts existed
    with pytest.raises(ValueError, match="before frozen readouts existed"):
        evaluate_gap(None, tok, data, config=_config(), frozen_probes=str(tmp_path))
    assert load_frozen_probes(str(tmp_path), required=False) is None


def torch_zeros(shape):
    import torch

    return torch.zeros(shape)


def test_probe_selection_follows_the_headline_metric(tiny_model, tok, synthetic_rows):
    rows = [r for r in synthetic_rows if r["label"] == 1] + [r for r in synthetic_rows if r["label"] == 0][:8]
    with pytest.warns(UserWarning):
        res = evaluate_gap(tiny_model, tok, Dataset.from_list(rows), config=_config())
    assert res.metric == "balanced_accuracy" and res.meta["select_by"] == "balanced_accuracy"
    balanced = evaluate_gap(tiny_model, tok, Dataset.from_list(list(synthetic_rows)), config=_config(metric="auroc"))
    assert balanced.meta["select_by"] == "auroc"
    chosen = evaluate_gap(
        tiny_model,
        tok,
        Dataset.from_list(list(synthetic_rows)),
        config=_config(readout=ReadoutConfig(l2_grid=(1e-2, 1.0), split="kfold", folds=3, select_by="log_loss")),
    )
    assert chosen.meta["select_by"] == "log_loss"  # an explicit criterion is kept
