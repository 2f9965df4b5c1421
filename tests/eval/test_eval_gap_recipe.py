"""recipes/eval_gap.py end to end on the tiny model: the report carries the shortcut controls, and
the CLI turns them off; bad options fail before the model loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _eval_gap(*argv) -> int:
    """``recipes/eval_gap.py ARGV`` in this process (its ``main`` on the argv; an interpreter start-up saved per
    run; tests/test_cli.py runs the command line itself). -> the exit status, also when the parser exits."""
    from loopalign.scripts import eval_gap

    try:
        return eval_gap.main(list(argv))
    except SystemExit as stop:
        return stop.code


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    args = ["--model_name_or_path", "tiny", "--eval_loops", "1,2", "--dataset_limit", "12", "--eval_folds", "3"]
    assert _eval_gap(*args, "--no_eval_tp", "--eval_n_boot", "50", "--output_dir", str(out), *extra) == 0
    return json.loads((out / "gap.json").read_text()), (out / "gap.md").read_text()


@pytest.mark.parametrize("flags", [(), ("--no-controls",), ("--author-field", "none")])
def test_eval_gap_recipe_reports_controls_unless_turned_off(tmp_path, flags):
    data, md = _run(tmp_path, *flags)
    if "--no-controls" in flags:
        assert data.get("controls") is None and "## Controls" not in md
        return
    controls = data["controls"]
    assert [row["loop"] for row in controls["noise"]["loops"]] == [1, 2]
    assert "## Controls" in md
    assert not controls["author"]["available"]  # synthetic records name no author
    off = "--author-field" in flags
    assert controls["author"]["reason"].startswith("off") == off, controls["author"]["reason"]


def test_compare_with_a_missing_folder_fails_before_the_evaluation(tmp_path, capsys):
    code = _eval_gap("--model_name_or_path", "tiny", "--output_dir", str(tmp_path / "o"), "--compare",
                     str(tmp_path / "no_such_before"))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--compare" in err and "no gap.json there" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "loops,option",
    [("--eval_loops=-2", "eval_loops"), ("--eval_loops=abc", "eval_loops"), ("--eval_tp_loops=0", "eval_tp_loops")],
)  # fmt: skip
def test_bad_loops_fail_naming_the_option_before_the_model_loads(tmp_path, loops, option, capsys):
    code = _eval_gap("--model_name_or_path", "tiny", loops, "--output_dir", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert code == 2 and f"{option} must be loop counts >= 1" in err, err[-500:]
    assert not (tmp_path / "o").exists()


def test_compare_prints_the_rule_first_and_reads_the_before_probes_frozen(tmp_path):
    """eval-gap --compare BEFORE: the rule is printed before any figure, and the evaluation applies BEFORE's
    probes, frozen, so part (c) of the verdict measures drift (here none: the same model)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    base = ["--model_name_or_path", "tiny", "--eval_loops", "4", "--dataset_limit", "12", "--eval_folds", "3",
            "--eval_n_boot", "30", "--no_controls", "--no_eval_tp"]  # fmt: skip
    outs = []
    for name, extra in (("before", []), ("after", ["--compare", str(tmp_path / "before")])):
        done = subprocess.run(
            [sys.executable, str(ROOT / "recipes" / "eval_gap.py"), *base, "--output_dir", str(tmp_path / name),
             *extra],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        outs.append(done.stdout)
    printed = outs[1]
    assert printed.index("Verdict rule v2") < printed.index("| loop |") < printed.index("Verdict: ")
    comparison = json.loads((tmp_path / "after" / "compare.json").read_text())
    assert comparison["frozen_readout"] and comparison["summary"]["rr_drift"] == 0.0
    assert "rr_frozen_prob" in json.loads((tmp_path / "after" / "gap.json").read_text())["records"]


def test_each_model_gets_its_own_default_output_folder(tmp_path):
    """eval-gap without --output_dir writes to outputs/eval_gap_<model>: a second model never overwrites the first."""
    from loopalign.scripts.eval_gap import default_output_dir

    (tmp_path / "run-a" / "final").mkdir(parents=True)
    (tmp_path / "run-b" / "final").mkdir(parents=True)
    gguf = tmp_path / "models" / "small.Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"")
    assert default_output_dir("organism") == "outputs/eval_gap_organism"
    assert default_output_dir("ByteDance/Ouro-1.4B") == "outputs/eval_gap_ByteDance--Ouro-1.4B"
    assert default_output_dir(str(tmp_path / "run-a" / "final")) == "outputs/eval_gap_run-a-final"
    assert default_output_dir(str(tmp_path / "run-a" / "final")) != default_output_dir(
        str(tmp_path / "run-b" / "final")
    )
    assert default_output_dir(str(gguf)) == "outputs/eval_gap_models-small.Q4"
    assert default_output_dir("org/name with spaces") == "outputs/eval_gap_org--name_with_spaces"


def test_device_and_reporting_take_sft_gaps_spelling_too(tmp_path, capsys):
    """[ecosystem] one vocabulary: eval-gap and eval-introspection take sft-gap's (TRL's) --use_cpu and a --report_to
    list beside --device (both at odds fail before the model loads, naming both); eval-gap takes sft-gap's
    --verdict_yes / --verdict_no."""
    from loopalign.scripts.eval_gap import EvalGapScriptArguments
    from loopalign.scripts.eval_introspection import EvalIntrospectionArguments

    for cls in (EvalGapScriptArguments, EvalIntrospectionArguments):
        model = {"model_name_or_path": "tiny"}
        assert cls(**model, use_cpu=True).device == "cpu"
        assert cls(**model, device="cuda:1").device == "cuda:1"
        assert cls(**model, report_to="wandb").report_to == ["wandb"]  # one name, as YAML gives it
        assert cls(**model, report_to=["none"]).report_to == [] == cls(**model).report_to
    # sft-gap's verdict options; the one-option spelling stays, the two at once fail
    assert EvalGapScriptArguments(model_name_or_path="tiny", verdict_yes="Ja", verdict_no="Nein").verdict() == (
        "Ja",
        "Nein",
    )
    assert EvalGapScriptArguments(model_name_or_path="tiny", verdict_tokens="Ja,Nein").verdict() == ("Ja", "Nein")
    with pytest.raises(ValueError, match="verdict_yes / verdict_no or as verdict_tokens, not both"):
        EvalGapScriptArguments(model_name_or_path="tiny", verdict_yes="Ja", verdict_tokens="Ja,Nein")
    code = _eval_gap("--model_name_or_path", "tiny", "--use_cpu", "true", "--device", "cuda",
                     "--output_dir", str(tmp_path / "o"))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "use_cpu=true and device='cuda'" in err and not (tmp_path / "o").exists()
    code = _eval_gap("--model_name_or_path", "tiny", "--report_to", "wandb", "tensorboard",
                     "--output_dir", str(tmp_path / "o"))  # fmt: skip
    assert code == 2 and "report_to: 'tensorboard' is not one of wandb" in capsys.readouterr().err


def test_retrofit_loops_a_plain_lm_whose_first_loop_is_the_source(tmp_path, llama_folder, capsys):
    """--retrofit A-B ([real-loops]): eval-gap loops a plain Llama (layers [A, B) the recurrent block, the 'sum'
    adapter) and measures it per loop; one loop is the source model, so its SV equals the plain model's."""
    common = ["--model_name_or_path", str(llama_folder), "--dataset", "synthetic", "--dataset_limit", "12",
              "--eval_folds", "3", "--no_eval_tp", "--eval_n_boot", "50", "--no-controls"]  # fmt: skip
    assert _eval_gap(*common, "--eval_loops", "1", "--output_dir", str(tmp_path / "plain")) == 0
    assert _eval_gap(*common, "--retrofit", "1-2", "--eval_loops", "1,2,3", "--output_dir", str(tmp_path / "r")) == 0
    plain = json.loads((tmp_path / "plain" / "gap.json").read_text())
    looped = json.loads((tmp_path / "r" / "gap.json").read_text())
    assert looped["loops"] == [1, 2, 3] and "retrofitted" in capsys.readouterr().out
    assert looped["sv"][0]["auroc"] == pytest.approx(plain["sv"][0]["auroc"], abs=1e-6)
    assert looped["sv"][0]["balanced_accuracy"] == pytest.approx(plain["sv"][0]["balanced_accuracy"], abs=1e-6)
    code = _eval_gap(*common, "--retrofit", "3-1", "--output_dir", str(tmp_path / "bad"))  # before the model loads
    assert code == 2 and "retrofit must be a layer range 'A-B'" in capsys.readouterr().err
    from loopalign.errors import ConfigError

    with pytest.raises(ConfigError, match="--retrofit 1-9: the model has 2 layers"):  # before any evaluation
        _eval_gap(*common, "--retrofit", "1-9", "--output_dir", str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
