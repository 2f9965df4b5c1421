"""The benchmark scripts run and print their figures (nothing is timed here: figures live in
docs/performance.md)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [
        json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"')
    ]  # json.dumps, not a logged dict's repr


def test_forward_benchmark_prints_every_case():
    rows = _run("ouro_forward.py", "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "0", "--lora")
    cases = [r["case"] for r in rows]
    assert cases == [
        "forward, full logits",
        "forward, eval path",
        "forward, eval path, LoRA (PEFT, unmerged)",
        "forward, eval path, LoRA merged",
        "forward+backward",
    ]
    # every case row prints its figures as finite numbers; no assertion reads their size (a timing: on a loaded
    # machine tflops, rounded to 3 decimals, printed 0.000)
    for r in rows:
        figures = [r["tokens_per_s"], r["peak_mem_gib"], r["tflops"]]
        assert all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in figures), r


def test_recipe_step_benchmark_times_the_recipes_own_steps():
    """benchmarks/recipe_step.py builds the trainer as sft-gap does from the recipe's options and times the steps
    after --skip: the figures are present and finite (not a speed)."""
    (row,) = _run(
        "recipe_step.py",
        "--steps",
        "3",
        "--skip",
        "1",
        "--model_name_or_path",
        "tiny",
        "--dataset",
        "synthetic",
        "--dataset_limit",
        "16",
        "--per_device_train_batch_size",
        "4",
        "--loss_weights",
        '{"lm": 1.0, "rr_distill": 1.0}',
        "--base_cache",
        "true",
    )
    assert row["steps_timed"] == "2..3" and row["threads"] == 1 and row["bf16"] is False
    assert math.isfinite(row["seconds_per_step"]) and row["seconds_per_step"] >= 0
    assert row["train_records"] > 0 and row["replay_records"] == 0
    assert "--base_cache" in row["argv"] and "--output_dir" not in row["argv"]


def test_forward_benchmark_times_compiled_layers_on_the_plain_and_the_merged_model():
    args = ["--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "1", "--lora", "--no-backward"]
    rows = _run("ouro_forward.py", *args, "--compile", "--compile-backend", "aot_eager")
    cases = [r["case"] for r in rows]
    assert cases == [
        "forward, full logits",
        "forward, eval path",
        "forward, eval path, compiled layers",
        "forward, eval path, LoRA (PEFT, unmerged)",
        "forward, eval path, LoRA merged",
        "forward, eval path, LoRA merged, compiled layers",
    ]


def _run_lines(script, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra,cases",
    [
        (["--dtype", "bf16"], [1, 2, 3, 4, 5]),
        (["--checkpointing", "--policy", "save_matmuls", "--cases", "4"], [4]),  # one case alone: no baseline
    ],
)
def test_train_step_benchmark_runs_the_cases_side_by_side_under_one_autocast(extra, cases):
    lines = _run_lines("train_step.py", "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "1", *extra)
    rows = [json.loads(line) for line in lines if line.startswith('{"')]  # json.dumps, not a logged dict's repr
    assert [r["case"] for r in rows] == cases
    assert all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] >= 0 for r in rows)  # a timing: not its size
    assert all(r["peak_mem_gib"] > 0 for r in rows)
    # the same precision in every case: what the first LoRA layer saw, measured in each process
    bf16 = "--dtype" in extra
    assert {(r["autocast"], r["activation_dtype"], r["adapter_dtype"]) for r in rows} == {
        (bf16, "bfloat16" if bf16 else "float32", "float32")
    }
    assert any(line.startswith("model FLOPs: 3 x [T*L*(2*P_layer") for line in lines)
    assert any(line.startswith("save_matmuls would keep") for line in lines)
    if cases == [1, 2, 3, 4, 5]:
        assert "overhead_vs_case_3" in rows[3] and all("speedup_vs_baseline" in r for r in rows[1:])
        assert "lighter than the reference" in rows[4]["note"]
    else:  # run alone, case 4 has neither the baseline nor case 3 to be compared with
        assert "speedup_vs_baseline" not in rows[0] and "overhead_vs_case_3" not in rows[0]


def test_reference_case_computes_the_reference_loss(benchmark_script):
    """Case 1's loss (T full-logit readouts, mixed by exit probabilities) is the public reference's
    ``labels=`` loss, which loopalign computes as ``exit="expected"`` with one readout."""
    import torch

    train_step = benchmark_script("train_step")
    reference_loss, save_matmuls_gib = train_step.reference_loss, train_step.save_matmuls_gib

    from loopalign import OuroConfig, OuroForCausalLM, tiny_config

    torch.manual_seed(0)
    model = OuroForCausalLM(tiny_config())
    batch = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=batch, labels=batch, exit="expected", use_cache=False).loss
    torch.testing.assert_close(reference_loss(model, batch), expected, atol=1e-5, rtol=1e-5)
    # the estimate for save_matmuls at the 1.4B shape, batch 4 x 2048 in bf16: about 66 GiB
    assert 60 < save_matmuls_gib(OuroConfig(), 4 * 2048, 16, 2) < 72


def test_train_step_benchmark_rejects_unknown_cases(monkeypatch, capsys, benchmark_script):
    """Its main on the argv, in this process (the script's own start-up is the tests above)."""
    train_step = benchmark_script("train_step")
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--cases", "1,9"])
    with pytest.raises(SystemExit) as exit_info:
        train_step.main()
    assert exit_info.value.code != 0 and "--cases takes numbers from [1, 2, 3, 4, 5]" in capsys.readouterr().err


def test_random_model_folder_loads_as_the_shape_and_is_refused_twice(tmp_path):
    """benchmarks/random_model.py writes a model folder the recipes load by path (the 1.4B-shape end-to-end run on a
    GPU uses it); a second write into it is refused without --force, and --force replaces it."""
    from loopalign.loading import load_pretrained, load_tokenizer

    out = tmp_path / "random-tiny"
    (info,) = _run("random_model.py", "--shape", "tiny", "--out", str(out))
    model, tok = load_pretrained(str(out)), load_tokenizer(str(out))
    assert type(model).__name__ == "OuroForCausalLM" and info["parameters"] == sum(
        p.numel() for p in model.parameters()
    )
    assert model.config.vocab_size >= len(tok) and model.config.total_ut_steps == 4
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "random_model.py"), "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode != 0 and "--force" in done.stderr
    (again,) = _run("random_model.py", "--shape", "tiny", "--seed", "1", "--out", str(out), "--force")
    assert json.loads((out / "random_model.json").read_text())["seed"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no build folder left behind


def test_verdict_table_reads_each_part_and_the_outcome_from_a_runs_compare_json(tmp_path, benchmark_script):
    """benchmarks/verdict_table.py: one row per run, from its compare.json (docs/organism.md's cure tables)."""
    verdict_table = benchmark_script("verdict_table")
    run = ROOT / "docs" / "figures" / "runs" / "cure_organism_operands6_s0"
    comparison = json.loads((run / "compare.json").read_text())
    row = verdict_table.run_row(str(run)).split(" | ")
    s = comparison["summary"]
    assert row[1] == f"{100 * s['sv_before']:.1f} → {100 * s['sv_after']:.1f}"
    assert row[-1].rstrip(" |") == comparison["outcome"]
    passed = {p["part"]: p["passed"] for p in comparison["parts"]}
    assert [cell.rsplit(": ", 1)[-1] for cell in row[3:7]] == [{True: "yes", False: "no"}[passed[k]] for k in "abcd"]
    # a run whose saved outcome differs reads differently: the table prints what the run printed
    edited = dict(comparison, outcome="saturated: not measurable")
    (tmp_path / "compare.json").write_text(json.dumps(edited))
    assert verdict_table.run_row(str(tmp_path)).endswith("| saturated: not measurable |")
    assert verdict_table.main([str(run), str(tmp_path)]) == 0


def test_verdict_table_per_loop_gives_a_row_per_loop_marking_the_verdict_depth_and_extrapolation(benchmark_script):
    """benchmarks/verdict_table.py --per-loop: one run's compare.json rows and extrapolation rows, in loop order."""
    verdict_table = benchmark_script("verdict_table")
    run = ROOT / "docs" / "figures" / "runs" / "cure_organism_v3_avx512_seed1"
    comparison = json.loads((run / "compare.json").read_text())
    rows = verdict_table.per_loop_table(str(run)).splitlines()[2:]
    loops = [*comparison["rows"], *comparison["extrapolation"]]
    assert len(rows) == len(loops) == 6
    for line, r in zip(rows, loops):
        mark = " (verdict)" if r["in_verdict"] else " (extrapolation)" if r["extrapolation"] else ""
        assert line.startswith(f"| {r['loop']}{mark} | {100 * r['sv_before']:.1f} → {100 * r['sv_after']:.1f} |")
    assert sum("(verdict)" in line for line in rows) == 1
    with pytest.raises(SystemExit, match="one run"):
        verdict_table.main(["--per-loop", str(run), str(run)])
    # docs/real-models.md's per-loop table of the cure on the healed looped SmolLM2 (HL100) is what it prints
    hl100 = verdict_table.per_loop_table(str(ROOT / "docs" / "figures" / "runs" / "HL100_healed_loops_s0"))
    doc = (ROOT / "docs" / "real-models.md").read_text().splitlines()
    for line in hl100.splitlines():
        assert line in doc, f"docs/real-models.md lacks the row {line!r}"


def test_verdict_table_figure_redraws_a_runs_before_after_figure_from_its_kept_json(tmp_path, benchmark_script):
    """benchmarks/verdict_table.py --per-loop RUN --figure PATH: SV and RR per loop before (dashed) and after (solid),
    from the run's kept before/ and after/ gap.json, the trained depth from its compare.json; the docs' figure of
    HLV200 is drawn this way."""
    verdict_table = benchmark_script("verdict_table")
    run = ROOT / "docs" / "figures" / "runs" / "HLV200_healed_loops_verdict_only_s0"
    comparison = json.loads((run / "compare.json").read_text())
    after = json.loads((run / "after" / "gap.json").read_text())
    fig = verdict_table.before_after(str(run))
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    sv_after, rr_before = lines["SV after"], lines["RR before"]
    assert sv_after.get_linestyle() == "-" and rr_before.get_linestyle() == "--"
    by_loop = dict(zip(sv_after.get_xdata(), sv_after.get_ydata()))
    for r in comparison["rows"]:  # the per-loop SV after the run, as compare.json holds it
        assert by_loop[r["loop"]] == pytest.approx(100 * r["sv_after"])
    assert sorted(by_loop) == sorted(r["loop"] for r in after["table"])
    depth_lines = [line for line in fig.axes[0].get_lines() if list(line.get_xdata()) == [comparison["depth"]] * 2]
    assert depth_lines, "the trained depth is marked"
    out = tmp_path / "figure.png"
    assert verdict_table.main(["--per-loop", str(run), "--figure", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="with --per-loop"):
        verdict_table.main([str(run), "--figure", str(out)])
    assert "figures/HLV200_healed_loops_before_after.png" in (ROOT / "docs" / "real-models.md").read_text()


def test_verdict_table_families_sets_each_runs_dsv_per_family_against_the_first_runs(tmp_path, benchmark_script):
    """benchmarks/verdict_table.py --families: a row per family, each run's dSV with its interval from its
    families.json, and whether a later run's interval lies wholly below or above the first run's."""
    verdict_table = benchmark_script("verdict_table")
    runs = ROOT / "docs" / "figures" / "runs"
    reference, other = runs / "HLV200_healed_loops_verdict_only_s0", runs / "HL100_healed_loops_s0"
    rows = {
        line.split(" | ")[0].lstrip("| "): line
        for line in verdict_table.families_table([str(reference), str(other)]).splitlines()[2:8]
    }
    ref = {r["family"]: r for r in json.loads((reference / "families.json").read_text())["rows"]}
    oth = {r["family"]: r for r in json.loads((other / "families.json").read_text())["rows"]}
    assert sorted(rows) == sorted(ref)
    for family, line in rows.items():
        a, b = ref[family], oth[family]
        expected = (
            "below"
            if b["d_sv_bal_hi"] < a["d_sv_bal_lo"]
            else "above"
            if b["d_sv_bal_lo"] > a["d_sv_bal_hi"]
            else "overlaps"
        )
        assert line.endswith(f"| {expected} |"), line
        assert f"{100 * a['d_sv_bal']:+.1f} [{100 * a['d_sv_bal_lo']:+.1f}, {100 * a['d_sv_bal_hi']:+.1f}]" in line
    # HL100's flat verdict against HLV200's learned one: below on the labelled families, both at 0 on numeric
    assert rows["capital"].endswith("| below |") and rows["numeric"].endswith("| overlaps |")
    assert verdict_table.families_table([str(other), str(reference)]).splitlines()[2].endswith("| above |")
    # a run with other families is refused, naming both
    odd = tmp_path / "odd"
    odd.mkdir()
    data = json.loads((other / "families.json").read_text())
    data["rows"] = data["rows"][:-1]
    (odd / "families.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="odd has the families"):
        verdict_table.families_table([str(reference), str(odd)])
    with pytest.raises(SystemExit, match="two or more runs"):
        verdict_table.main(["--families", str(reference)])


def test_the_hl100_against_mn_ranking_table_in_the_docs_is_the_runs_families_json():
    """docs/real-models.md sets HL100's SV AUROC per labelled family beside MN's (the plain model, same length): each
    cell is the runs' families.json, before -> after."""
    runs = ROOT / "docs" / "figures" / "runs"
    doc = (ROOT / "docs" / "real-models.md").read_text().splitlines()
    rows = {}
    for run in ("MN_four_families_s0", "HL100_healed_loops_s0"):
        for r in json.loads((runs / run / "families.json").read_text())["rows"]:
            if r["training"] == "labels":
                cell = f"{100 * r['sv_auroc_before']:.1f} → {100 * r['sv_auroc_after']:.1f}"
                rows.setdefault(r["family"], []).append(cell)
    names = {"capital": "capital", "city_country": "city → country", "continent": "continent",
             "negated_city": "negated city"}  # fmt: skip
    assert sorted(rows) == sorted(names)
    for family, cells in rows.items():
        line = f"| {names[family]} | {cells[0]} | {cells[1]} |"
        assert line in doc, f"docs/real-models.md lacks the row {line!r}"


def test_the_real_model_goals_table_in_the_docs_is_what_its_command_prints(tmp_path, benchmark_script):
    """docs/real-models.md "At a glance": its table is regenerated, line for line, by the command written above it
    from the run JSON kept in docs/figures/runs (a run added, removed or re-run without the table: this fails)."""
    import re

    doc = (ROOT / "docs" / "real-models.md").read_text()
    section = doc.split("### At a glance", 1)[1].split("\n### ", 1)[0]
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    assert "real_cure_table.py --goals" in command
    runs = command.split("--goals", 1)[1].split()
    assert len(runs) >= 10 and all((ROOT / "docs" / "figures" / "runs" / r / "families.json").exists() for r in runs)
    table = benchmark_script("real_cure_table")
    out = tmp_path / "goals.md"
    runs_dir = ROOT / "docs" / "figures" / "runs"
    assert table.main([str(runs_dir / r) for r in runs] + ["--goals", "--out", str(out)]) == 0
    printed = [line for line in out.read_text().splitlines() if line.startswith("|")]
    in_doc = [line for line in section.splitlines() if line.startswith("|")]
    assert printed == in_doc


def test_the_grader_table_in_the_docs_is_what_its_command_prints(benchmark_script, caplog):
    """docs/introspection.md's per-class table of the grader is what benchmarks/grader_table.py prints (the current
    grader's column; the old grader's needs the git history, so the doc's extra column is not checked here)."""
    import logging

    script = benchmark_script("grader_table")
    with caplog.at_level(logging.INFO, logger="grader_table"):
        assert script.main([]) == 0
    printed = [line for line in caplog.text.splitlines() if line.startswith("| ") and "class" not in line]
    doc = (Path(__file__).resolve().parents[1] / "docs" / "introspection.md").read_text().splitlines()
    assert printed and printed[-1].startswith(f"| all | {len(script.rows())} |")
    for row in printed:  # "| class | rows | current |" opens a doc line that adds the old grader's column
        assert any(line.startswith(row) for line in doc), f"docs/introspection.md lacks the row {row!r}"


def test_the_introspection_baseline_in_the_docs_is_what_its_command_prints(tmp_path, benchmark_script):
    """docs/introspection.md's SmolLM2 baseline table and both rules' figures are what
    benchmarks/introspection_table.py prints from the run's kept JSON and trials."""
    run = ROOT / "docs" / "figures" / "runs" / "introspection_smollm2_baseline"
    out = tmp_path / "table.md"
    assert benchmark_script("introspection_table").main([str(run), "--concept-words", "50", "--out", str(out)]) == 0
    printed = out.read_text().splitlines()
    doc = (ROOT / "docs" / "introspection.md").read_text()
    table = [line for line in printed if line.startswith("|")]
    assert len(table) == 9 + 6  # the baseline table, then the layer sweep (four layers)
    for line in table:
        assert line in doc.splitlines(), f"docs/introspection.md lacks the row {line!r}"
    # the rules' figures, each an estimate with its interval, appear in the doc's prose as printed
    figures = [f for line in printed if not line.startswith("|") for f in re.findall(r"−?\d+\.\d \[[^\]]+\]", line)]
    assert len(figures) == 3
    for figure in figures:
        assert figure in doc, f"docs/introspection.md lacks {figure!r}"
    with pytest.raises(SystemExit, match="no introspection.json"):
        benchmark_script("introspection_table").main([str(tmp_path), "--concept-words", "50"])


def test_the_nameable_control_and_nameability_tables_in_the_docs_are_what_their_commands_print(
    tmp_path, benchmark_script
):
    """docs/introspection.md's positive-control tables (one row per run, the concept-specific rule's parts from the
    kept trials: the nameable organism's runs, and the CPU default's seeds) and its nameability table (from the kept
    JSON) are what the benchmark scripts print."""
    runs = ROOT / "docs" / "figures" / "runs"
    doc = (ROOT / "docs" / "introspection.md").read_text().splitlines()
    out = tmp_path / "control.md"
    folders = [str(runs / f"nameable_control_{r}") for r in ("v1", "v2", "s0", "s1", "s2")]
    args = [*folders, "--concept-words", "50", "--num-loops", "4", "--injection-loop", "3", "--out", str(out)]
    assert benchmark_script("introspection_table").main(args) == 0
    printed = out.read_text().splitlines()
    assert len(printed) == 2 + 5 and printed[2].startswith("| nameable_control_v1 |")
    for line in printed:
        assert line in doc, f"docs/introspection.md lacks the row {line!r}"
    # the follow-ups on the AVX2 build: the recipe as is, twice the random negatives, GRPO from the SFT model
    out = tmp_path / "followups.md"
    names = ["nameable_control_avx2_s0", *(f"nameable_control_r40_s{s}" for s in (0, 1, 2)),
             "nameable_grpo_from_sft_s0", "nameable_grpo_from_sft_balanced_s0", "nameable_wide128_control_s0"]  # fmt: skip
    args = [*(str(runs / n) for n in names), "--concept-words", "50", "--num-loops", "4", "--injection-loop", "3"]
    assert benchmark_script("introspection_table").main([*args, "--out", str(out)]) == 0
    printed = out.read_text().splitlines()
    assert len(printed) == 2 + 7 and [line.split(" | ")[0] for line in printed[2:]] == [f"| {n}" for n in names]
    for line in printed:
        assert line in doc, f"docs/introspection.md lacks the row {line!r}"
    # the CPU default positive control (the introspection organism, same recipe), seeds 0-2
    out = tmp_path / "default.md"
    folders = [str(runs / f"introspection_default_s{s}") for s in (0, 1, 2)]
    args = [*folders, "--concept-words", "50", "--num-loops", "4", "--injection-loop", "3", "--out", str(out)]
    assert benchmark_script("introspection_table").main(args) == 0
    printed = out.read_text().splitlines()
    assert len(printed) == 2 + 3 and printed[2].startswith("| introspection_default_s0 |")
    for line in printed:
        assert line in doc, f"docs/introspection.md lacks the row {line!r}"
    for name in ("nameability.json", "nameability_earlier_versions.json"):
        lines = benchmark_script("nameability").table_lines(json.loads((runs / "nameable_organism" / name).read_text()))
        for line in lines[2:]:
            assert line in doc, f"docs/introspection.md lacks the row {line!r}"
    with pytest.raises(SystemExit, match="no introspection.json"):
        benchmark_script("introspection_table").main([folders[0], str(tmp_path), "--concept-words", "50"])


def test_training_sv_reads_each_runs_verdict_depth_and_names_the_plateau_exit(tmp_path, benchmark_script):
    """benchmarks/training_sv.py: the logged training-batch SV at each run's verdict depth, a column per run, and the
    first logged step at or above the threshold (docs/real-models.md's labels-only runs)."""
    training_sv = benchmark_script("training_sv")
    runs = []
    for name, depth, values in (("looped", 4, [0.5, 0.55, 0.7]), ("plain", 1, [0.45, 0.5])):
        run = tmp_path / name
        run.mkdir()
        (run / "compare.json").write_text(json.dumps({"depth": depth}))
        history = [{"step": 10 * (i + 1), f"sv/loop_{depth}": v, "sv/loop_9": 0.99} for i, v in enumerate(values)]
        (run / "log_history.json").write_text(json.dumps([*history, {"step": 30, "train_runtime": 1.0}]))
        runs.append(str(run))
    lines = training_sv.table(runs).splitlines()
    assert lines[0] == "| step | looped (loop 4) | plain (loop 1) |"
    assert lines[2:5] == ["| 10 | 50.0 | 45.0 |", "| 20 | 55.0 | 50.0 |", "| 30 | 70.0 | – |"]
    assert lines[-1] == "| plateau exit (≥ 65) | step 30 | not by step 20 |"
    assert training_sv.table(runs, 0.8).splitlines()[-1].endswith("| not by step 30 | not by step 20 |")
    (tmp_path / "plain" / "log_history.json").write_text(json.dumps([{"step": 10, "loss": 1.0}]))
    with pytest.raises(ValueError, match="no sv/loop_1"):
        training_sv.table(runs)
    with pytest.raises(SystemExit):  # a folder without the run's files fails before reading anything
        training_sv.main([str(tmp_path)])


def test_the_labels_only_tables_in_the_docs_are_the_runs_json(benchmark_script):
    """docs/real-models.md's labels-only runs (PV200, HLV200): the training-SV table and the per-loop verdict table
    are what the scripts print from the kept run JSON."""
    runs = ROOT / "docs" / "figures" / "runs"
    plain, looped = runs / "PV200_plain_verdict_only_s0", runs / "HLV200_healed_loops_verdict_only_s0"
    doc = (ROOT / "docs" / "real-models.md").read_text().splitlines()
    printed = benchmark_script("training_sv").table([str(plain), str(looped)]).splitlines()
    printed += benchmark_script("verdict_table").per_loop_table(str(looped)).splitlines()[2:]
    # the same run's adapters at step 100 (checkpoint-100, re-evaluated by eval-gap against its before/)
    printed += benchmark_script("verdict_table").per_loop_table(str(looped / "after_step100")).splitlines()[2:]
    # HLDR200 (distillation and rr_distill added back): its per-loop table and its per-family table against HLV200
    distill = runs / "HLDR200_healed_loops_distill_rr_s0"
    printed += benchmark_script("verdict_table").per_loop_table(str(distill)).splitlines()[2:]
    printed += benchmark_script("verdict_table").families_table([str(looped), str(distill)]).splitlines()
    printed += benchmark_script("training_sv").table([str(looped), str(distill)]).splitlines()[-5:]
    for line in filter(None, printed):
        assert line in doc, f"docs/real-models.md lacks the row {line!r}"


def test_loop_table_prints_the_docs_tables_before_and_after_healing_and_draws_tp_sv_rr(tmp_path, benchmark_script):
    """benchmarks/loop_table.py: docs/real-models.md's per-loop tables of the retrofitted SmolLM2 untrained and healed
    (SV, RR, gap, valid verdicts, TP) are what it prints from the kept gap.json; --before/--figure draws TP, SV and RR
    per loop, before dashed and after solid, TP as the gap.json holds it."""
    loop_table = benchmark_script("loop_table")
    runs = ROOT / "docs" / "figures" / "runs"
    doc = (ROOT / "docs" / "real-models.md").read_text().splitlines()
    for name in ("retrofit_12_18_untrained_tp", "healed_12_18_gap_tp"):
        gap = json.loads((runs / name / "gap.json").read_text())
        rows = loop_table.loop_table(str(runs / name)).splitlines()
        assert len(rows) == 2 + len(gap["table"]) == 8
        tp = {r["loop"]: r for r in gap["tp"]}
        for line, row in zip(rows[2:], gap["table"]):
            assert line.startswith(f"| {row['loop']} | {100 * row['sv']:.1f} [")
            assert line.endswith(f" {100 * tp[row['loop']]['accuracy']:.1f} ({tp[row['loop']]['truncated']}/114) |")
        for line in rows:
            assert line in doc, f"docs/real-models.md lacks the row {line!r}"
    before, after = runs / "retrofit_12_18_untrained_tp", runs / "healed_12_18_gap_tp"
    out = tmp_path / "healing.png"
    assert loop_table.main([str(after), "--before", str(before), "--figure", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from loopalign.eval.gap import GapResult
    from loopalign.eval.report import before_after_figure

    fig = before_after_figure(GapResult.from_json(str(before)), GapResult.from_json(str(after)), 4)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert lines["TP before"].get_linestyle() == "--" and lines["TP after"].get_linestyle() == "-"
    healed_tp = {r["loop"]: 100 * r["accuracy"] for r in json.loads((after / "gap.json").read_text())["tp"]}
    assert dict(zip(lines["TP after"].get_xdata(), lines["TP after"].get_ydata())) == pytest.approx(healed_tp)
    with pytest.raises(SystemExit):
        loop_table.main([str(after), "--figure", str(out)])  # --figure without --before
    assert "figures/healing_12_18_tp_sv_rr.png" in "\n".join(doc)
    # HLDR200's TP at its trained depth (one loop evaluated) is the row it prints, and the 139 questions are the
    # ones HLV200's before-evaluation asked (the paired count in the docs reads both)
    hldr = runs / "HLDR200_healed_loops_distill_rr_s0_tp_loop4"
    for line in loop_table.loop_table(str(hldr)).splitlines():
        assert line in doc, f"docs/real-models.md lacks the row {line!r}"
    before = json.loads((runs / "HLV200_healed_loops_verdict_only_s0_tp" / "before" / "gap.json").read_text())
    (asked,) = json.loads((hldr / "gap.json").read_text())["tp"]
    (at_4,) = [r for r in before["tp"] if r["loop"] == 4]
    assert sorted(asked["task_ids"]) == sorted(at_4["task_ids"]) and asked["n"] == 139
    right_before = {k for k, c in zip(at_4["task_ids"], at_4["correct"]) if c == 1}
    right_after = {k for k, c in zip(asked["task_ids"], asked["correct"]) if c == 1}
    lost, gained = len(right_before - right_after), len(right_after - right_before)
    assert f"{lost} answered right before are wrong after and\n{gained} the other way" in "\n".join(doc)
    assert f"({len(right_before)} → {len(right_after)} right)" in "\n".join(doc)


def test_verdict_table_per_loop_adds_tp_where_both_results_measured_it(benchmark_script):
    """benchmarks/verdict_table.py --per-loop on HLV200 re-evaluated with TP: each row ends with TP before → after and
    dTP from compare.json's tp rows; docs/real-models.md's table is what it prints, and the figure drawn from the
    same folder has the TP lines (after solid, at compare.json's TP after)."""
    verdict_table = benchmark_script("verdict_table")
    run = ROOT / "docs" / "figures" / "runs" / "HLV200_healed_loops_verdict_only_s0_tp"
    comparison = json.loads((run / "compare.json").read_text())
    tp = {r["loop"]: r for r in comparison["tp"]}
    printed = verdict_table.per_loop_table(str(run)).splitlines()
    assert printed[0].endswith("| TP before → after | dTP |")
    for line, r in zip(printed[2:], [*comparison["rows"], *comparison["extrapolation"]]):
        t = tp[r["loop"]]
        cells = f"| {100 * t['tp_before']:.1f} → {100 * t['tp_after']:.1f} | {100 * t['d_tp']:+.1f} ["
        assert cells in line and line.endswith("] |")
    doc = (ROOT / "docs" / "real-models.md").read_text().splitlines()
    for line in printed:
        assert line in doc, f"docs/real-models.md lacks the row {line!r}"
    lines = {line.get_label(): line for line in verdict_table.before_after(str(run)).axes[0].get_lines()}
    tp_after = dict(zip(lines["TP after"].get_xdata(), lines["TP after"].get_ydata()))
    assert tp_after == pytest.approx({k: 100 * t["tp_after"] for k, t in tp.items()})
    # a run without TP keeps the table it had
    plain = verdict_table.per_loop_table(str(ROOT / "docs" / "figures" / "runs" / "HL100_healed_loops_s0"))
    assert "TP" not in plain.splitlines()[0]
