"""sft-gap by record family: families held out of training are evaluated whole, every family gets its own before /
after comparison (families.md / .json with the transfer summary), and general questions are answered before and
after. Bad family options fail before the model trains, naming the option and the families."""

import json
import math
import statistics
from pathlib import Path

import datasets
import pytest

from loopalign.errors import ConfigError
from loopalign.eval.families import record_families, record_family

ROOT = Path(__file__).resolve().parents[2]


def _with_families(rows, names="abc"):
    """Each task's records get one family of ``names`` (in meta), so a family holds whole tasks."""
    tasks = sorted(set(rows["task"]))
    family = {t: names[i % len(names)] for i, t in enumerate(tasks)}

    def add(row):
        meta = json.loads(row["meta"])
        meta["family"] = family[row["task"]]
        return {"meta": json.dumps(meta)}

    return rows.map(add)


def test_a_records_family_is_its_field_or_its_meta_key():
    assert record_family({"family": "x", "meta": '{"family": "y"}'}, "family") == "x"
    assert record_family({"meta": '{"family": "y"}'}, "family") == "y"
    assert record_family({"meta": "{}"}, "family") is None
    data = datasets.Dataset.from_list([{"id": "r1", "meta": "{}", "label": 1}])
    with pytest.raises(ValueError, match="record 'r1' has no 'family'"):
        record_families(data, "family")


def _argv(folder, rows_path, out, *extra):
    return ["--model_name_or_path", str(folder), "--dataset", str(rows_path), "--output_dir", str(out),
            "--max_steps", "2", "--per_device_train_batch_size", "8", "--eval_n_boot", "50", "--use_peft", "true",
            "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--report_to", "none",
            "--save_strategy", "no", "--use_cpu", "true", "--disable_tqdm", "true", "--eval_tp", "false",
            "--eval_fraction", "0.5", *extra]  # fmt: skip


@pytest.mark.slow
def test_held_out_families_are_never_trained_on_and_each_family_is_compared(
    gap_dataset, llama_folder, tmp_path, sft_gap_script, parse_sft_gap, capsys, benchmark_script
):
    rows = _with_families(gap_dataset[0], "ac")
    rows.to_json(tmp_path / "rows.jsonl")
    out = tmp_path / "run"
    argv = _argv(llama_folder, tmp_path / "rows.jsonl", out, "--heldout_families", "c", "--general_questions", "true",
                 "--eval_folds", "3")  # fmt: skip
    sft_gap_script.train_and_compare(*parse_sft_gap(argv))
    families = json.loads((out / "families.json").read_text())
    rows_by = {r["family"]: r for r in families["rows"]}
    assert set(rows_by) == {"a", "c"}
    assert rows_by["c"]["trained"] is False and rows_by["a"]["trained"]
    # the held-out family is evaluated on its held-out entities, is not in the pooled set, and is never trained on
    pooled = set(json.loads((out / "before" / "gap.json").read_text())["records"]["ids"])
    c_eval = set(json.loads((out / "before" / "families" / "c" / "gap.json").read_text())["records"]["ids"])
    c_ids = {r["id"] for r in rows if json.loads(r["meta"])["family"] == "c"}
    assert c_eval <= c_ids and not c_ids & pooled and rows_by["c"]["n_records"] == len(c_eval) > 0
    a_eval = set(json.loads((out / "before" / "families" / "a" / "gap.json").read_text())["records"]["ids"])
    assert a_eval == pooled  # the trained family's held-out entities are the pooled evaluation
    settings = json.loads((out / "final" / "gap_config.json").read_text())
    assert settings["num_loops"] == 1
    for family in "ac":
        assert (out / "before" / "families" / family / "gap.json").exists()
        assert (out / "after" / "families" / family / "gap.json").exists()
    r = rows_by["c"]
    if r["recovery_bal"] is not None:  # the recovery is the share of the base gap SV closed
        base = r["rr_bal_before"] - r["sv_bal_before"]
        assert r["recovery_bal"] == pytest.approx((r["sv_bal_after"] - r["sv_bal_before"]) / base)
    assert families["transfer"]["families"] == ["c"]
    for r in families["rows"]:  # the share SV answers Yes: a verdict that says one word shows as 0 or 1
        c_dir = out / "after" / "families" / r["family"] / "gap.json"
        decided = json.loads(c_dir.read_text())["records"]["sv_pred"][0]
        assert r["sv_yes_after"] == pytest.approx(sum(decided) / len(decided)) and 0 <= r["sv_yes_before"] <= 1
        records = json.loads(c_dir.read_text())["records"]  # where the cut lies, in log-odds of Yes
        odds = [math.log(p / (1 - p)) for p in records["sv_prob"][0]]
        true = [o for o, y in zip(odds, records["labels"]) if y == 1]
        false = [o for o, y in zip(odds, records["labels"]) if y == 0]
        assert r["sv_separation_after"] == pytest.approx(sum(true) / len(true) - sum(false) / len(false), abs=1e-4)
        assert r["sv_log_odds_after"] == pytest.approx(statistics.median(odds), abs=1e-4)
    assert "SV says Yes before → after" in (out / "families.md").read_text()
    assert "median log-odds before → after" in (out / "families.md").read_text()
    assert (out / "families.png").stat().st_size > 0 and (out / "families.svg").stat().st_size > 0  # the panels
    general = json.loads((out / "general.json").read_text())
    assert len(general["before"]["answers"]) == len(general["after"]["answers"]) == 10
    # the continuous measure beside the ten questions: the tuned model against itself with its adapters off
    drift = general["drift"]
    assert len(drift["kl"]) == len(drift["prompts"]) == 48 and drift["kl_mean"] > 0
    assert drift["kl_ci"][0] <= drift["kl_mean"] <= drift["kl_ci"][1] and 0 <= drift["top1_mean"] <= 1
    assert "KL(base || tuned)" in (out / "general.md").read_text()
    # measured again from the saved run (base + final/ adapters reloaded), it is the same drift
    copy = tmp_path / "docs_runs" / out.name
    copy.mkdir(parents=True)
    (copy / "general.json").write_text((out / "general.json").read_text())
    assert benchmark_script("general_drift").main([str(out), "--force", "--copy-to", str(copy.parent)]) == 0
    again = json.loads((copy / "general.json").read_text())["drift"]
    assert again["kl"] == pytest.approx(drift["kl"], rel=1e-3, abs=1e-6) and again["answers"] == drift["answers"]
    printed = capsys.readouterr().out
    assert "Before / after per family" in printed and "Transfer rule" in printed and "General questions" in printed
    # the docs' table and figure regenerate from the run's JSON
    table = benchmark_script("real_cure_table")
    argv = [str(out), "--figure", str(tmp_path / "fig.png"), "--out", str(tmp_path / "table.md"), "--cut"]
    assert table.main(argv) == 0
    text = (tmp_path / "table.md").read_text()
    share = 100 * rows_by["c"]["sv_yes_after"]
    assert "| run | a | c |" in text and f"| {share:.0f}% ({rows_by['c']['sv_log_odds_after']:+.1f}, " in text
    assert "| run |" in text and "labels: a" in text and "none: c" in text and (tmp_path / "fig.png").exists()
    # the goals at a glance: the labelled family's cell counts as met when SV after >= RR before - 2 points
    assert table.main([str(out), "--out", str(tmp_path / "goals.md"), "--goals"]) == 0
    goals = (tmp_path / "goals.md").read_text().splitlines()[2]
    a = rows_by["a"]
    met = int(a["sv_bal_after"] >= a["rr_bal_before"] - 0.02), int(a["sv_auroc_after"] >= a["rr_auroc_before"] - 0.02)
    assert goals.startswith(f"| run | 1 | {met[0]}/1; {met[1]}/1 | ") and goals.count(" | ") == 8
    assert goals.endswith(" | a (1/1) |" if a["outcome"] == "yes" else " | none |")  # the families whose verdict is yes
    with pytest.raises(FileNotFoundError, match="not an sft-gap run by family"):
        table.main([str(tmp_path)])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--heldout_families", "z"], r"heldout_families: \['z'\] are not families of the dataset"),
        (["--heldout_families", "a,b,c"], "leave no family of the dataset whose labels are trained on"),
        (["--heldout_families", " , "], "heldout_families must name families"),
        (["--transfer_goal", "0"], "transfer_goal must be in"),
        (["--lora_layers", "0-5"], "lora_layers: 5 is out of range"),
        (["--eval_by_family", "true"], "family 'a' has 3 evaluation tasks, fewer than eval_folds=5"),
    ],
)
def test_bad_family_and_lora_layer_options_fail_before_training(
    extra, message, gap_dataset, llama_folder, tmp_path, sft_gap_script, parse_sft_gap
):
    rows = _with_families(gap_dataset[0])
    rows.to_json(tmp_path / "rows.jsonl")
    with pytest.raises(ValueError, match=message):
        sft_gap_script.train_and_compare(
            *parse_sft_gap(_argv(llama_folder, tmp_path / "rows.jsonl", tmp_path / "o", *extra))
        )
    assert not (tmp_path / "o" / "before").exists()


@pytest.mark.slow
def test_probe_label_families_fit_the_target_probe_but_no_other_term(
    gap_dataset, llama_folder, tmp_path, sft_gap_script, parse_sft_gap
):
    """Unlabelled families train as text only through probe distillation: c is text only, and b's labels fit the
    probe_distill target probe (its targets out of fold) while b's records train without labels like c's; only c,
    whose labels nothing read, counts as transfer."""
    rows = _with_families(gap_dataset[0], "abc")
    rows.to_json(tmp_path / "rows.jsonl")
    out = tmp_path / "run"
    weights = json.dumps({"lm": 1.0, "probe_distill": 1.0})
    argv = _argv(llama_folder, tmp_path / "rows.jsonl", out, "--unlabeled_families", "c", "--probe_label_families",
                 "b", "--eval_folds", "3", "--loss_weights", weights, "--distill_folds", "2",
                 "--train_split_probe", "true")  # fmt: skip
    sft_gap_script.train_and_compare(*parse_sft_gap(argv))
    saved = json.loads((out / "families.json").read_text())
    kinds = {r["family"]: r["training"] for r in saved["rows"]}
    assert kinds == {"a": "labels", "b": "probe labels", "c": "text only"}
    assert saved["transfer"]["families"] == ["c"]
    eval_ids = set(json.loads((out / "before" / "gap.json").read_text())["records"]["ids"])
    train_of = {f: sum(json.loads(r["meta"])["family"] == f and r["id"] not in eval_ids for r in rows) for f in "abc"}
    targets = json.loads((out / "final" / "gap_config.json").read_text())["probe_targets"]
    # the target probe fitted on a's and b's labels; c's records are the only ones it scored without their label
    assert targets["n_labelled"] == train_of["a"] + train_of["b"] and targets["n_records"] == sum(train_of.values())
    check = json.loads((out / "probe_targets_check.json").read_text())
    assert set(check) == {"b", "c"} and check["b"]["n"] == train_of["b"] and check["c"]["n"] == train_of["c"] > 0
    assert all(0 <= check[f]["auroc"] <= 1 and 0 <= check[f]["taught_yes"] <= 1 for f in "bc")
    # the train-split yardstick reads the labels the verdict terms train on: a's, not b's or c's
    for when in ("before", "after"):
        assert (
            json.loads((out / when / "gap.json").read_text())["meta"]["train_split_readout"]["n_train"] == train_of["a"]
        )
    assert json.loads((out / "compare.json").read_text())["rows"][0]["rr_train_before"] is not None


def test_unlabeled_families_need_probe_distillation(gap_dataset, llama_folder, tmp_path, sft_gap_script, parse_sft_gap):
    rows = _with_families(gap_dataset[0], "ac")
    rows.to_json(tmp_path / "rows.jsonl")
    argv = _argv(llama_folder, tmp_path / "rows.jsonl", tmp_path / "o", "--unlabeled_families", "c")
    with pytest.raises(ValueError, match="unlabeled_families needs loss_weights.probe_distill > 0"):
        sft_gap_script.train_and_compare(*parse_sft_gap(argv))
    with pytest.raises(ValueError, match=r"families \['c'\] are in both"):
        parse_sft_gap(argv + ["--heldout_families", "c"])
    with pytest.raises(ValueError, match=r"\['c'\] are in both unlabeled_families and probe_label_families"):
        parse_sft_gap(argv + ["--probe_label_families", "c"])
    only_probe = _argv(llama_folder, tmp_path / "rows.jsonl", tmp_path / "o", "--probe_label_families", "c")
    with pytest.raises(ValueError, match="probe_label_families needs loss_weights.probe_distill > 0"):
        sft_gap_script.train_and_compare(*parse_sft_gap(only_probe))
    script_args = parse_sft_gap(argv + ["--unlabeled_families", "none"])[0]  # 'none' clears a YAML's families
    assert script_args.unlabeled_family_names() == [] and not script_args.by_family()


@pytest.mark.slow
def test_statements_are_built_for_the_run_split_by_entity_and_compared_per_family(
    llama_folder, tmp_path, sft_gap_script, parse_sft_gap
):
    """--dataset statements:FAMILIES builds true/false statements with the run's tokenizer, holds out the same
    entities in every family, and with a family held out compares each family on its own."""
    out = tmp_path / "run"
    argv = ["--model_name_or_path", str(llama_folder), "--dataset", "statements:numeric,capital",
            "--dataset_limit", "60", "--eval_fraction", "0.4", "--output_dir", str(out), "--max_steps", "1",
            "--per_device_train_batch_size", "8", "--eval_n_boot", "50", "--use_peft", "true", "--lora_r", "4",
            "--lora_target_modules", "q_proj", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true",
            "--disable_tqdm", "true", "--eval_folds", "3", "--heldout_families", "capital"]  # fmt: skip
    sft_gap_script.train_and_compare(*parse_sft_gap(argv))
    before = json.loads((out / "before" / "families" / "capital" / "gap.json").read_text())
    ids = before["records"]["ids"]
    assert ids and all(i.startswith("capital/") for i in ids)
    numeric = json.loads((out / "before" / "families" / "numeric" / "gap.json").read_text())["records"]["ids"]
    assert numeric and all(i.startswith("numeric/") for i in numeric)
    families = json.loads((out / "families.json").read_text())
    assert {r["family"]: r["training"] for r in families["rows"]} == {"capital": "none", "numeric": "labels"}
    with pytest.raises(ValueError, match="families: unknown"):
        sft_gap_script.train_and_compare(*parse_sft_gap([*argv[:2], "--dataset", "statements:planets", *argv[4:]]))


@pytest.mark.parametrize("option", ["--heldout_families", "--unlabeled_families", "--probe_label_families"])
def test_a_misspelt_statement_family_fails_at_parse_before_the_model_loads(option, parse_sft_gap, tmp_path):
    """Statements' families are known from the spec or the build's metadata: a typo is a ConfigError naming the
    option and the families there are, raised while the arguments are parsed (no model, no data built)."""
    with pytest.raises(ConfigError, match=rf"{option[2:]}: \['capitol'\] are not families of the dataset"):
        parse_sft_gap(["--dataset", "statements:capital,negated_capital", option, "capitol"])
    build = tmp_path / "statements_build"
    build.mkdir()
    counts = {"family": {"capital": {}, "numeric": {}}, "total": 0}
    (build / "metadata.json").write_text(json.dumps({"builder": "data_builders.statements", "counts": counts}))
    with pytest.raises(ConfigError, match=r"\['capitol'\] are not families .*\['capital', 'numeric'\]"):
        parse_sft_gap(["--dataset", str(build), option, "capitol"])
    parsed = parse_sft_gap(["--dataset", str(build), option, "numeric"])  # a family the build has
    assert parsed[0].dataset == str(build)


def test_the_cli_says_a_misspelt_family_in_one_line_with_exit_status_2(capsys):
    from loopalign_cli import main

    with pytest.raises(SystemExit) as stop:
        main(["sft-gap", "--dataset", "statements", "--heldout_families", "capitol", "--output_dir", "unused"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "error: heldout_families: ['capitol'] are not families of the dataset 'statements'" in err
    assert "Traceback" not in err
