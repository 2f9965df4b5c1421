"""[introspection-v2] item 4 and the layer sweep: rate grids (injection loop x strength, layer x loop) with n and
Wilson intervals, detection-vs-strength curves, before/after figures, all computed from real graded trials."""

import copy

import pytest

from loopalign.eval.introspection import IntrospectionConfig, evaluate_introspection, summarize
from loopalign.eval.metrics import wilson_interval


@pytest.fixture(scope="module")
def result(tiny, tok):
    model, vectors = tiny
    cfg = IntrospectionConfig(
        loop_counts=(2,), extraction_loops=(1,), layers=(0, 1), strengths=(1.0, 4.0), concepts=("Dust", "Satellites"),
        n_controls=3, random_vectors=True, n_random=2, max_new_tokens=3, batch_size=64,
    )  # fmt: skip
    return evaluate_introspection(model, tok, vectors, cfg)


def _manual(records, metric, **where):
    rows = [r for r in records if r["trial_type"] == "injection" and all(r[k] == v for k, v in where.items())]
    g = [r["grade"] for r in rows]
    k = sum((x["detected"] and not x["incoherent"]) if metric == "detection" else x["success"] for x in g)
    return k, len(g)


def test_grids_are_the_rates_of_the_graded_trials(result):
    g = result.summary["grids"]["2"]
    ls, ll = g["loop_strength"], g["layer_loop"]
    assert ls["rows"] == [0, 1] and ls["cols"] == [1.0, 4.0] and ll["rows"] == [0, 1] and ll["cols"] == [0, 1]
    for i, loop in enumerate(ls["rows"]):
        for j, s in enumerate(ls["cols"]):
            for metric in ("detection", "identification"):
                k, n = _manual(result.records, metric, injection_loop=loop, strength=s)
                cell = ls[metric][i][j]
                assert n == 2 * 2 and cell["n"] == n and cell["rate"] == k / n  # 2 concepts x 2 layers
                assert (cell["lo"], cell["hi"]) == pytest.approx(wilson_interval(k, n, 0.05))
    for i, layer in enumerate(ll["rows"]):
        for j, loop in enumerate(ll["cols"]):
            k, n = _manual(result.records, "detection", layer=layer, injection_loop=loop)
            assert ll["detection"][i][j]["n"] == n == 2 * 2 and ll["detection"][i][j]["rate"] == k / n
    rand = g["random_loop_strength"]["detection"]
    assert all(c["n"] == 2 * 2 for row in rand for c in row)  # n_random x layers per (loop, strength)
    assert g["false_positive"]["n"] == 3


def test_grids_tables_and_figures_change_when_the_results_do(result, tmp_path):
    before_md = result.markdown()
    assert (
        "Detection by injection loop x strength" in before_md
        and "Identification by layer x injection loop" in before_md
    )
    assert "n=4" in before_md
    records = copy.deepcopy(result.records)
    for r in records:  # every injected trial at loop 1, strength 4 becomes a coherent, correct report
        if r["trial_type"] == "injection" and r["injection_loop"] == 1 and r["strength"] == 4.0:
            r["grade"].update(detected=True, identified=True, incoherent=False, success=True)
    changed = summarize(records)["grids"]["2"]
    cell = changed["loop_strength"]["identification"][1][1]
    assert cell["rate"] == 1.0 and cell["lo"] == pytest.approx(wilson_interval(4, 4, 0.05)[0])
    assert changed["loop_strength"] != result.summary["grids"]["2"]["loop_strength"]
    assert changed["layer_loop"]["detection"][0][1]["rate"] >= 0.5  # half of layer 0's loop-1 trials are s=4
    from loopalign.eval.introspection import IntrospectionResult

    after = IntrospectionResult(records, summarize(records), result.config, result.meta)
    assert after.markdown() != before_md
    paths = after.save(str(tmp_path / "after"))
    for name in ("rate_heatmaps.png", "rate_heatmaps.svg", "detection_vs_strength.png", "detection_vs_strength.svg"):
        assert name in paths and (tmp_path / "after" / name).stat().st_size > 0
    result.save(str(tmp_path / "before"))
    svg = lambda d, n: (tmp_path / d / n).read_text()  # noqa: E731
    assert svg("before", "rate_heatmaps.svg") != svg("after", "rate_heatmaps.svg")
    assert svg("before", "detection_vs_strength.svg") != svg("after", "detection_vs_strength.svg")
    from loopalign.eval.introspection.report import plot_comparison

    both = plot_comparison(result, after, str(tmp_path / "cmp"))
    assert {"before_after_heatmaps.png", "before_after_curves.png"} <= set(both)
    from loopalign.eval.introspection import compare_introspection

    same, moved = compare_introspection(result, result), compare_introspection(result, after)
    assert "Per strength, N = 2" in moved and "det − FP before" in moved and same != moved
    row = next(x for x in moved.splitlines() if x.startswith("| 1 | 4 |"))
    assert "100.0 [" in row.split("|")[6]  # identification after, at loop 1 strength 4


def test_layer_sweep_option_extracts_and_injects_at_every_layer(tmp_path):
    from loopalign.scripts import eval_introspection as script

    out = tmp_path / "sweep"
    args = script.parse_args(["--model_name_or_path", "tiny", "--device", "cpu", "--layer_sweep", "true",
                              "--n_concepts", "2", "--loop_counts", "2", "--extraction_loops", "all", "--strengths", "4", "--n_controls", "1",
                              "--max_new_tokens", "2", "--lindsey_checks", "true", "--output_dir", str(out)])  # fmt: skip
    summary = script.run(args)["summary"]
    assert summary["grids"]["2"]["layer_loop"]["rows"] == [0, 1]  # the tiny model's two layers
    assert {c["layer"] for c in summary["cells"]} == {0, 1}
    assert (out / "rate_heatmaps.png").exists() and "layer x injection loop" in (out / "introspection.md").read_text()
    assert "| prefill | accepts | 4 |" in (out / "checks.md").read_text()
    with pytest.raises(ValueError, match="layer_sweep"):
        script.vector_layers(script.parse_args(["--layer_sweep", "true", "--vector_layers", "1"]), None)


def test_positive_control_verdict_reads_the_rule_off_the_summary(result):
    from loopalign.eval.introspection import RESULT_RULE, positive_control_verdict

    v = positive_control_verdict(result.summary, 1, 2, 50)
    row = next(r for r in result.summary["by_injection_loop"] if r["injection_loop"] == 1)
    assert v["detection_minus_fp"] == row["detection_minus_fp"] and v["identification"] == row["identification"]
    assert v["chance_identification"] == 0.02 and v["rule"] == RESULT_RULE and v["random_detection"]["n"] == 8
    records = copy.deepcopy(result.records)
    for r in records:  # a perfect reporter: every injected trial a coherent, correct report; controls silent
        if r["trial_type"] == "injection":
            r["grade"].update(detected=True, identified=True, incoherent=False, success=True)
        elif r["trial_type"] == "control":
            r["grade"].update(detected=False)
    perfect = positive_control_verdict(summarize(records), 1, 2, 50)
    assert perfect["holds"]  # a perfect reporter clears the bar
    assert perfect["detection_holds"] and perfect["identification_holds"]
    from loopalign.eval.introspection import naming_rate

    for r in records:
        r["response"] = "I think of satellites." if r["concept"] == "Dust" else "Nothing comes to mind."
    rate = naming_rate(records, ["Satellites"], 1, 2)  # half the loop-1 injection trials are Dust's
    assert rate["n"] == 8 and rate["rate"] == 0.5 and naming_rate(records, ["Bread"], 1, 2)["rate"] == 0.0
    with pytest.raises(ValueError, match="injection loop 7"):
        positive_control_verdict(result.summary, 7, 2, 50)


def test_grpo_recipe_body_runs_sft_mode_and_writes_the_side_by_side_report(tmp_path):
    """The recipe body end to end on the random tiny model (SFT mode, a few steps): before/after reports, compare.md
    with the result rule and verdicts, the before/after figures, the checks."""
    from loopalign.scripts import grpo_introspection as script

    out = tmp_path / "run"
    script.main(["--model_name_or_path", "tiny", "--n_concepts", "4", "--max_steps", "2", "--train_rows", "16",
                 "--per_device_train_batch_size", "4", "--eval_strengths", "4", "--eval_n_controls", "2",
                 "--eval_n_random", "1", "--eval_n_control_questions", "1", "--eval_max_new_tokens", "2",
                 "--logging_steps", "1", "--output_dir", str(out)])  # fmt: skip
    compare = (out / "compare.md").read_text()
    assert (
        "Result rule:" in compare and "| before (N = 4, inj loop 3) |" in compare and "Per strength, N = 4" in compare
    )
    # the concept-specific rule too (random-vector claims and control-question drift subtracted), before and after
    assert "Result rule (concept-specific):" in compare and compare.count("| specific detection |") == 1
    specific = compare.split("Result rule (concept-specific):")[1]
    assert (
        "| before (N = 4, inj loop 3, ext 3, layers pooled) |" in specific
        and "| after (N = 4, inj loop 3, ext 3," in specific
    )
    for name in ("before_after_heatmaps.png", "before_after_curves.png", "after/checks.md", "before/introspection.md",
                 "after/rate_heatmaps.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    for name in ("compare.md", "after/checks.md", "after/introspection.md"):
        assert not _ragged_table_rows((out / name).read_text()), name


def _ragged_table_rows(markdown: str) -> list[str]:
    """Rows of the markdown tables in ``markdown`` whose cell count differs from their table's header."""
    bad, width = [], None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            width = None
            continue
        cells = len(line.strip().strip("|").split("|"))
        if width is None:
            width = cells
        elif cells != width:
            bad.append(line)
    return bad


def test_random_vector_and_control_question_tables_have_strength_and_n(result):
    """[introspection-v3] item 5: the random-vector table had no strength column, the control-question table mixed
    the uninjected row in and had no n."""
    from loopalign.eval.introspection import IntrospectionResult

    records = copy.deepcopy(result.records)
    grade = {"detected": False, "identified": False, "incoherent": False, "success": False, "answer": "no"}
    site = dict(num_loops=2, extraction_loop=1, injection_loop=1, layer=0, concept="Dust", injected=True)
    records += [{"trial_type": "control_question", "strength": 4.0, **site, "grade": dict(grade)} for _ in range(3)]
    records += [
        {"trial_type": "control_question", "num_loops": 2, "extraction_loop": -1, "injection_loop": -1, "layer": -1,
         "strength": 0.0, "concept": "", "injected": False, "grade": {**grade, "detected": True, "answer": "yes"}}
        for _ in range(2)
    ]  # fmt: skip
    md = IntrospectionResult(records, summarize(records), result.config, result.meta).markdown()
    random_rows = [x for x in md.split("## Random norm-matched vectors")[1].split("\n\n")[1].splitlines()[2:]]
    assert {row.split("|")[5].strip() for row in random_rows} == {"1", "4"}  # both strengths, one row each
    assert all(row.split("|")[-2].strip() == "2" for row in random_rows)  # n_random per (site, strength)
    questions = md.split("## 'No'-answer control questions")[1]
    assert "| 2 | no (uninjected) | – | – | – | – | 100.0 [" in questions and questions.count("| 3 |") == 1
    assert "| 2 | yes | 1 | 1 | 0 | 4 | 0.0 [" in questions
