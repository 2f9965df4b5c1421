"""Shortcut controls (issue [eval-validity] item 4): question-only, author and noise probes next to RR."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset

from loopalign.eval import (
    Features,
    GapConfig,
    GapResult,
    ProbeFitConfig,
    ReadoutConfig,
    evaluate_controls,
    evaluate_gap,
    fit_readout,
    record_authors,
)
from loopalign.eval.controls import author_control
from loopalign.eval.report import controls_markdown

CFG = ReadoutConfig(split="kfold", folds=4, l2_grid=(1e-2, 1.0), fit=ProbeFitConfig(device="cpu"))


def _features(x: np.ndarray, y: np.ndarray, tasks: list) -> Features:
    """x [T, N, H] (one layer, one probe position per loop) -> Features."""
    n_loops, n, _ = x.shape
    return Features(
        ids=[f"r{i}" for i in range(n)],
        labels=np.asarray(y, dtype=np.int64),
        groups=[t if t is not None else f"r{i}" for i, t in enumerate(tasks)],
        loops=list(range(1, n_loops + 1)),
        layers=[1],
        num_layers=1,
        states=torch.as_tensor(x, dtype=torch.float32)[:, None, :, None, :],  # [T, L'=1, N, K=1, H]
        verdict_logp=torch.zeros(n_loops, n, 2),
        verdict_valid=torch.ones(n_loops, n, dtype=torch.bool),
        exit_probs=torch.zeros(n, n_loops),
    )


def _controls(x, y, tasks, authors=None, field=None):
    feats = _features(x, y, tasks)
    readout = fit_readout(feats, CFG)
    controls, _ = evaluate_controls(feats, readout, list(tasks), CFG, "accuracy", authors, field)
    return controls


def test_noise_control_stays_at_chance_on_balanced_labels():
    rng = np.random.default_rng(0)
    n_tasks, per = 150, 2
    y = np.tile([1, 0], n_tasks)
    tasks = [f"t{i // per}" for i in range(n_tasks * per)]
    x = rng.standard_normal((2, len(y), 16))
    x[..., 0] += 2.0 * y  # RR has something real to read
    c = _controls(x, y, tasks)
    assert c["noise"]["dim"] == 16
    for row in c["noise"]["loops"]:
        assert row["n"] == len(y)
        for m in ("metric", "accuracy", "balanced_accuracy", "auroc"):
            assert abs(row[m] - 0.5) < 0.1, (m, row)
        assert row["rr"] > 0.75
    assert all(r["share_noise"] is not None and r["share_noise"] < 0.4 for r in c["summary"])
    assert not any(r["flags"] for r in c["summary"])


def test_question_only_matches_rr_when_the_label_is_a_function_of_the_task():
    rng = np.random.default_rng(1)
    n_tasks, per, h = 120, 3, 8
    emb = rng.standard_normal((n_tasks, h))
    y_task = (emb @ rng.standard_normal(h) > 0).astype(np.int64)
    task_of = np.repeat(np.arange(n_tasks), per)
    y = y_task[task_of]  # every answer to a task has the task's label
    x = (emb[task_of] + 0.2 * rng.standard_normal((n_tasks * per, h)))[None]
    c = _controls(x, y, [f"t{t}" for t in task_of])
    q = c["question_only"]
    assert q["available"] and q["n_without_others"] == 0
    row = q["loops"][0]
    assert row["n"] == len(y) and row["rr"] > 0.85
    assert abs(row["metric"] - row["rr"]) < 0.05 and row["auroc"] > 0.9
    s = c["summary"][0]
    assert s["best"] == "question-only" and s["best_share"] > 0.9
    assert any("RR may read the question, not the answer" in f for f in s["flags"])
    md = "\n".join(controls_markdown(c, "accuracy"))
    assert "## Controls" in md and "RR may read the question, not the answer" in md and "**FLAG**" in md


@pytest.mark.parametrize("design", ["one_right_one_wrong", "independent_labels"])
def test_question_only_is_at_chance_when_features_carry_the_answer_not_the_task(design):
    rng = np.random.default_rng(2)
    if design == "one_right_one_wrong":  # the controlled-candidates design: gold + one wrong answer per task
        n_tasks, per = 150, 2
        y = np.tile([1, 0], n_tasks)
    else:
        n_tasks, per = 100, 3
        y = rng.integers(0, 2, n_tasks * per)
    x = rng.standard_normal((1, len(y), 8))
    x[0, :, 0] += 3.0 * y  # correctness only, nothing about the task
    tasks = [f"t{i // per}" for i in range(len(y))]
    c = _controls(x, y, tasks)
    row = c["question_only"]["loops"][0]
    assert row["rr"] > 0.85
    # with one right and one wrong answer per task the other answer gives this one away: an
    # answer-blind control must not turn that into a "question" signal (it lands at or below chance)
    assert row["metric"] < 0.6 and row["auroc"] < 0.6, row
    if design == "independent_labels":
        assert abs(row["metric"] - 0.5) < 0.1 and abs(row["auroc"] - 0.5) < 0.1, row
    s = c["summary"][0]
    assert s["share_question_only"] < 0.25 and not s["flags"]


def test_records_without_other_answers_get_no_question_only_score():
    rng = np.random.default_rng(3)
    y = np.tile([1, 0], 100)
    tasks = [f"t{i // 2}" for i in range(200)]
    for i in range(0, 40, 2):  # 20 tasks keep one record only
        tasks[i] = None
    x = rng.standard_normal((1, 200, 4))
    c = _controls(x, y, tasks)
    assert c["question_only"]["n_without_others"] == 40
    assert c["question_only"]["loops"][0]["n"] == 160
    c = _controls(x, y, [None] * 200)
    assert not c["question_only"]["available"] and "more than one record" in c["question_only"]["reason"]
    assert "Question-only control not available" in "\n".join(controls_markdown(c, "accuracy"))


def test_author_identity_that_predicts_the_label_gives_a_high_author_control():
    rng = np.random.default_rng(4)
    n = 300
    authors = rng.choice(["model-a", "model-b"], n)
    y = (rng.random(n) < np.where(authors == "model-a", 0.9, 0.1)).astype(np.int64)
    tasks = [f"t{i // 3}" for i in range(n)]
    x = rng.standard_normal((1, n, 8))
    x[0, :, 0] += 2.0 * (authors == "model-a")  # RR reads the author, not the answer
    rows = [{"id": f"r{i}", "meta": json.dumps({"model": str(a)})} for i, a in enumerate(authors)]
    field, found = record_authors(rows)
    assert field == "model" and found == list(authors)
    c = _controls(x, y, tasks, found, field)
    a = c["author"]
    assert a["available"] and a["field"] == "model" and a["n_authors"] == 2 and a["n"] == n
    assert a["metric"] > 0.8 and a["auroc"] > 0.8
    s = c["summary"][0]
    assert s["share_author"] > 0.9 and any("RR may read the author" in f for f in s["flags"])
    # without the field: reported as not available
    assert record_authors([{"id": "r0", "meta": "{}"}]) == (None, None)
    assert record_authors(rows, None) == (None, None)
    c = _controls(x, y, tasks)
    assert not c["author"]["available"] and "share_author" not in c["summary"][0] and "off" in c["author"]["reason"]
    assert "Author control not available" in "\n".join(controls_markdown(c, "accuracy"))
    # a top-level field beats meta, an explicit field name is honoured; a missing value is its own group
    rows = [{"policy": "p1"}, {"meta": json.dumps({"policy": "p2"})}, {}]
    assert record_authors(rows) == ("policy", ["p1", "p2", None])
    assert record_authors([{"author": "x", "policy": "y"}], "policy") == ("policy", ["y"])
    one = author_control(
        ["a", None] * 10,
        np.tile([1, 0], 10),
        [(np.arange(8), np.arange(8, 12), np.arange(12, 20))],
        np.arange(12, 20),
        "accuracy",
    )
    assert one["n_missing"] == 4 and one["n_authors"] == 2 and one["metric"] == 1.0


def test_evaluate_gap_writes_controls_to_json_and_markdown(tiny_model, tok, synthetic_rows, tmp_path):
    rows = [dict(r, author="gold-writer" if r["label"] else "perturber") for r in synthetic_rows]
    cfg = GapConfig(
        loops=[1, 2],
        verdict_tokens=("Yes", "No"),
        n_boot=30,
        readout=ReadoutConfig(l2_grid=(1e-2, 1.0), split="kfold", folds=3),
    )
    res = evaluate_gap(tiny_model, tok, Dataset.from_list(rows), config=cfg, out_dir=str(tmp_path))
    c = res.controls
    assert record_authors(Dataset.from_list(synthetic_rows)) == (None, None)  # gold + perturbations: no author
    assert [r["loop"] for r in c["question_only"]["loops"]] == [1, 2] == [r["loop"] for r in c["noise"]["loops"]]
    assert c["question_only"]["available"] and c["question_only"]["loops"][0]["n"] == 48
    assert c["author"]["field"] == "author" and c["author"]["metric"] == 1.0  # the author gives the label away
    assert all(any("RR may read the author" in f for f in r["flags"]) or r["rr"] <= 0.52 for r in c["summary"])
    assert res.meta["seconds_controls"] > 0 and len(res.records["control_question_only_prob"]) == 2
    data = json.loads((tmp_path / "gap.json").read_text())
    assert data["controls"]["author"]["metric"] == 1.0 and len(data["controls"]["summary"]) == 2
    md = (tmp_path / "gap.md").read_text()
    assert "## Controls" in md and "- loop 1:" in md and "- loop 2:" in md and "field `author`" in md
    again = GapResult.from_json(str(tmp_path))
    assert again.controls == data["controls"] and again.markdown() == md
    # a gap.json written before controls existed still loads and renders (no Controls section)
    del data["controls"]
    old = GapResult.from_json(json.dumps(data))
    assert old.controls is None and "## Controls" not in old.markdown()
    # off: nothing computed
    cfg.controls = False
    off = evaluate_gap(tiny_model, tok, Dataset.from_list(rows), config=cfg)
    assert off.controls is None and "## Controls" not in off.markdown()


@pytest.mark.parametrize("which", ["gsm8k-solutions", "xstest"])
def test_noise_probe_on_the_shipped_labels_is_flagged_unbalanced_and_at_chance_balanced(shared, which):
    """On the real label distributions (GSM8K model solutions: 2,001 right / 3,275 wrong; XSTest
    completions: 1,819 / 431) a probe on pure noise reaches the majority rate in accuracy, which
    the balance check flags while balanced accuracy and AUROC stay at chance; on the balanced
    build the noise probe is at chance in every figure."""
    from loopalign.data.candidates import balance_labels
    from loopalign.data.sources import load_gsm8k_solutions, load_xstest_completions
    from loopalign.eval.metrics import label_balance

    if which == "gsm8k-solutions":
        items = load_gsm8k_solutions(str(shared / "gsm8k" / "example_model_solutions.jsonl")).items
    else:
        items = load_xstest_completions(shared / "xstest" / "model_completions").items
    for records, balanced in ((items, False), (balance_labels(items, seed=0), True)):
        y = np.array([r["label"] for r in records])
        tasks = [r["task"] for r in records]
        x = np.random.default_rng(0).standard_normal((1, len(y), 8))
        (row,) = _controls(x, y, tasks)["noise"]["loops"]
        majority = max(y.mean(), 1 - y.mean())
        assert abs(row["balanced_accuracy"] - 0.5) < 0.05 and abs(row["auroc"] - 0.5) < 0.06, row
        if balanced:
            assert label_balance(y)["minority_share"] == 0.5
            assert abs(row["accuracy"] - 0.5) < 0.05, row
        else:
            assert label_balance(y)["minority_share"] < 0.4  # what evaluate_gap warns about
            assert row["accuracy"] > 0.5 + 0.8 * (majority - 0.5), (row, majority)  # a gap made of nothing
