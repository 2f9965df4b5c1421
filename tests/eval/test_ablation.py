"""Ablation tables (two-level bootstrap over seeds and task clusters) and the steering baseline, on
real gap evaluations of a tiny model written as sft_gap run folders."""

import copy
import json

import numpy as np
import pytest
from datasets import Dataset

from loopalign.eval import CompareConfig, GapConfig, ReadoutConfig, compare, evaluate_gap
from loopalign.eval.ablation import ablation_markdown, ablation_rows, load_run, plot_ablation, steering_rows
from loopalign.eval.steering import steered_sv


@pytest.fixture(scope="module")
def before(tiny_model, tok, synthetic_rows):
    config = GapConfig(
        loops=[1, 2], n_boot=20, readout=ReadoutConfig(l2_grid=(1e-2,), split="kfold", folds=3), controls=False
    )
    return evaluate_gap(tiny_model, tok, Dataset.from_list(synthetic_rows), config=config)


def _perfect_sv(result):
    """The same result with SV right on every record (P(Yes) 0.9 / 0.1 by label)."""
    out = copy.deepcopy(result)
    y = out.records["labels"]
    out.records["sv_prob"] = [[0.9 if v else 0.1 for v in y] for _ in out.loops]
    out.records["sv_pred"] = [list(y) for _ in out.loops]
    return out


def _write_run(path, before, after):
    for name, res in (("before", before), ("after", after)):
        (path / name).mkdir(parents=True)
        (path / name / "gap.json").write_text(res.to_json())
    (path / "compare.json").write_text(compare(before, after, CompareConfig(loops=2)).to_json())
    return path


def test_an_unchanged_model_shows_no_change_and_a_cured_one_the_full_gain(before, tmp_path):
    same = [load_run(_write_run(tmp_path / f"same{s}", before, before)) for s in range(3)]
    cured = [load_run(_write_run(tmp_path / f"cured{s}", before, _perfect_sv(before))) for s in range(3)]
    rows = ablation_rows({"same": same, "cured": cured}, n_boot=50)
    at2 = {r["variant"]: r for r in rows if r["loop"] == 2}
    same2, cured2 = at2["same"], at2["cured"]
    assert same2["n_seeds"] == 3 and same2["n_records"] == 3 * len(same[0].y)
    assert same2["d_sv"] == same2["d_sv_lo"] == same2["d_sv_hi"] == 0.0 and same2["d_rr"] == 0.0
    _, y, ev, _, sv_pred, _ = before.arrays()
    sv_before = np.mean(sv_pred[1][ev] == y[ev])
    assert cured2["sv_after"] == 1.0 and cured2["d_sv"] == pytest.approx(1.0 - sv_before)
    assert cured2["d_sv_lo"] <= cured2["d_sv"] <= cured2["d_sv_hi"] and cured2["d_sv_lo"] > 0
    assert cured2["sv_auroc_after"] == 1.0 and cured2["d_rr"] == 0.0
    text = ablation_markdown(rows, depth=2)
    assert "| cured | 3 |" in text and "Loop 2 (the trained depth)" in text
    plot_ablation(rows, 2, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 1000 and not list(tmp_path.glob("*.tmp.png"))


def test_unfinished_runs_and_mismatched_labels_fail_clearly(before, tmp_path):
    run = _write_run(tmp_path / "r", before, before)
    (run / "compare.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing compare.json"):
        load_run(run)
    flipped = copy.deepcopy(before)
    flipped.records["labels"] = [1 - v for v in flipped.records["labels"]]
    with pytest.raises(ValueError, match="different labels"):
        load_run(_write_run(tmp_path / "f", before, flipped))


def test_steering_adds_the_probe_to_the_verdict(before, tmp_path):
    rows = steered_sv(before, alpha=1.0, n_boot=30)
    _, y, ev, sv_prob, _, rr_prob = before.arrays()
    for t, row in enumerate(rows):
        sv, rr = (np.clip(p[t][ev], 1e-6, 1 - 1e-6) for p in (sv_prob, rr_prob))
        score = np.log(sv / (1 - sv)) + np.log(rr / (1 - rr))
        assert row["steered"] == pytest.approx(np.mean((score > 0) == y[ev]))
        assert row["steered_lo"] <= row["steered"] <= row["steered_hi"]
    # alpha 0 is SV itself; a huge alpha is the probe's decision
    assert [r["steered"] for r in steered_sv(before, alpha=0.0, n_boot=5)] == pytest.approx([r["sv"] for r in rows])
    assert [r["steered"] for r in steered_sv(before, alpha=1e6, n_boot=5)] == pytest.approx([r["rr"] for r in rows])
    with pytest.raises(ValueError, match="alpha"):
        steered_sv(before, alpha=-1)
    runs = [load_run(_write_run(tmp_path / f"s{s}", before, before)) for s in range(2)]
    (r2,) = [r for r in steering_rows(runs, n_boot=20) if r["loop"] == 2]
    assert r2["sv_after"] == pytest.approx(rows[1]["steered"]) and r2["d_rr"] == 0.0
    json.dumps(r2)  # JSON-serialisable


def test_the_rule_table_counts_each_part_and_the_transfer_per_variant(before, tmp_path):
    """rule_rows reads each run's own compare.json parts and, for runs by family, families.json's transfer."""
    from loopalign.eval.ablation import RULE_PARTS, rule_markdown, rule_rows

    same = [load_run(_write_run(tmp_path / f"same{s}", before, before)) for s in range(2)]
    cured_paths = [_write_run(tmp_path / f"cured{s}", before, _perfect_sv(before)) for s in range(3)]
    for s, path in enumerate(cured_paths):
        transfer = {"families": ["eggs"], "reached": s == 0, "mean_recovery_bal": 0.2 * s, "mean_recovery_auroc": None}
        (path / "families.json").write_text(json.dumps({"rows": [], "transfer": transfer}))
    cured = [load_run(p) for p in cured_paths]
    rows = {r["variant"]: r for r in rule_rows({"same": same, "cured": cured})}
    for name, runs in (("same", same), ("cured", cured)):
        want = {p: sum(r.parts[p] for r in runs) for p in RULE_PARTS}
        assert rows[name]["parts"] == want and rows[name]["n_judged"] == len(runs)
        assert sum(rows[name]["outcomes"].values()) == len(runs)
    assert rows["same"]["transfer"] is None
    assert rows["cured"]["transfer"]["reached"] == 1 and rows["cured"]["transfer"]["n"] == 3
    assert rows["cured"]["transfer"]["mean_recovery_bal"] == pytest.approx(0.2)
    text = "\n".join(rule_markdown(list(rows.values())))
    assert (
        f"| same | 2 | {rows['same']['parts']['a']}/2 |" in text and "1/3 (held out: eggs; mean recovery 20%)" in text
    )
