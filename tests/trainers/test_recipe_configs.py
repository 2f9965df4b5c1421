"""Every shipped sft_gap YAML parses against the recipe's dataclasses; sweeps name real fields."""

import itertools
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("sft_gap_*.yaml"))
SWEEPS = sorted((ROOT / "sweeps").glob("sft_gap*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_parses(path, sft_gap_script, parse_sft_gap):
    recipe = sft_gap_script
    # bf16 configs are for GPUs; --use_cpu lets the same file validate on a CPU machine
    script_args, training_args, model_args = parse_sft_gap(["--config", str(path), "--use_cpu", "true"])
    raw = yaml.safe_load(path.read_text())
    assert model_args.model_name_or_path == raw["model_name_or_path"]
    for key, value in raw.items():
        for obj in (script_args, training_args, model_args):
            if hasattr(obj, key) and key not in ("loss_weights", "report_to", "lr_scheduler_type", "save_strategy"):
                assert getattr(obj, key) == value, key
    assert set(training_args.loss_weights) == set(recipe.GapSFTConfig(output_dir="x", use_cpu=True).loss_weights)
    known = {f for cls in (recipe.GapScriptArguments, recipe.GapSFTConfig) for f in cls.__dataclass_fields__}
    known |= set(ModelConfig_fields())
    assert not set(raw) - known, f"{path.name}: keys that are no field: {sorted(set(raw) - known)}"


def ModelConfig_fields():
    from trl import ModelConfig

    return ModelConfig.__dataclass_fields__


def test_unknown_key_in_a_config_fails(tmp_path, sft_gap_script, parse_sft_gap):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: tiny\nloss_weights: {lm: 1.0, verdict: 1.0}\nuse_cpu: true\n")
    with pytest.raises(ValueError, match="unknown loss key"):
        parse_sft_gap(["--config", str(bad)])


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_sweep_parameters_are_real_fields_with_valid_values(path, parse_sft_gap):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["program"] == "recipes/sft_gap.py"
    params = sweep["parameters"]
    fixed = {k: v["value"] for k, v in params.items() if "value" in v}
    grid = {k: v["values"] for k, v in params.items() if "values" in v}
    ranges = {k: (v["min"], v["max"]) for k, v in params.items() if "min" in v}
    assert grid or ranges
    # every combination of listed values (and each range's ends) must build valid configs
    choices = {**grid, **{k: list(v) for k, v in ranges.items()}}
    keys = list(choices)
    for combo in itertools.product(*(choices[k] for k in keys)):
        argv = []
        for k, v in {**fixed, **dict(zip(keys, combo))}.items():
            argv += [f"--{k}", str(v) if not isinstance(v, dict) else json.dumps(v)]
        parsed = parse_sft_gap([*argv, "--use_cpu", "true"])
        for k, v in dict(zip(keys, combo)).items():
            obj = next((o for o in parsed if hasattr(o, k)), None)
            assert obj is not None, f"{path.name}: swept parameter {k!r} is no field of the recipe"
            got = getattr(obj, k)
            if k == "loss_weights":
                assert all(got[name] == w for name, w in json.loads(v).items())
            else:
                assert got == type(got)(v), k


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_sweeps_optimise_a_held_out_figure_and_sweep_nothing_that_is_a_no_op(path):
    sweep = yaml.safe_load(path.read_text())
    # the before/after comparison on held-out records (written to the run summary by the recipe),
    # not a training-batch figure that damaging RR could lower
    assert sweep["metric"]["name"].startswith("compare/") and not sweep["metric"]["name"].startswith("train/")
    params = sweep["parameters"]
    weightings = params.get("loop_weighting", {}).get("values") or [params.get("loop_weighting", {}).get("value")]
    if "entropy_beta" in params:  # only Ouro's entropy objective reads it
        assert "ouro_entropy" in weightings, "entropy_beta is swept but no run uses loop_weighting=ouro_entropy"
    if "probe_layer" in params or "probe_position" in params:  # only the probe-reading terms read them
        weights = [json.loads(w) for w in params.get("loss_weights", {}).get("values", [])]
        assert any(w.get(k, 0) > 0 for w in weights for k in ("probe", "rr_probe", "rr_distill")), path.name


# Every recipe that parses with TrlParser takes YAML: each shipped config named after one parses with it.
SCRIPTS = ("sft_gap", "eval_gap", "ouro_loops", "pretrain_organism", "ablate_gap")
OTHER_RECIPES = ("eval_introspection", "grpo_introspection")  # tested in tests/introspection/test_configs.py
ALL_CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[p.name for p in ALL_CONFIGS])
def test_every_shipped_config_is_named_after_its_recipe_and_parses_with_it(path):
    import importlib

    script = next((s for s in (*SCRIPTS, *OTHER_RECIPES) if path.stem.startswith(s + "_")), None)
    assert script is not None, f"{path.name}: not named after a recipe ({SCRIPTS + OTHER_RECIPES})"
    if script in OTHER_RECIPES:
        return
    module = importlib.import_module(f"loopalign.scripts.{script}")
    argv = ["--config", str(path), *(["--use_cpu", "true"] if script == "sft_gap" else [])]
    parsed = module.build_parser(argv).parse_args_and_config(args=argv)
    raw = yaml.safe_load(path.read_text())
    for key, value in raw.items():
        owner = next((o for o in parsed if hasattr(o, key)), None)
        assert owner is not None, f"{path.name}: {key!r} is no option of {script}"
        if isinstance(value, (str, int, float, bool)) and key not in (
            "lr_scheduler_type",
            "save_strategy",
            "report_to",
        ):
            assert getattr(owner, key) == value, key


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_recipe_takes_yaml_and_the_command_line_overrides_it(script, tmp_path):
    import importlib

    module = importlib.import_module(f"loopalign.scripts.{script}")
    option, in_yaml, on_cli = {
        "sft_gap": ("eval_fraction", 0.25, 0.4),
        "eval_gap": ("eval_n_boot", 200, 300),
        "ouro_loops": ("max_steps", 7, 9),
        "pretrain_organism": ("steps", 110, 130),
        "ablate_gap": ("jobs", 3, 4),
    }[script]
    config = tmp_path / "c.yaml"
    config.write_text(f"{option}: {in_yaml}\n" + ("use_cpu: true\noutput_dir: x\n" if script == "sft_gap" else ""))
    for argv, expected in (
        (["--config", str(config)], in_yaml),
        (["--config", str(config), f"--{option}", str(on_cli)], on_cli),
    ):
        parsed = module.build_parser(argv).parse_args_and_config(args=argv)
        assert getattr(next(o for o in parsed if hasattr(o, option)), option) == expected


def test_none_on_the_command_line_clears_what_the_yaml_set(tmp_path):
    """A run that drops a YAML's probe_distill must also clear its distill_center_field, which the config then
    refuses: ``--X none`` sets loopalign's optional options to None; inherited ones and other values are untouched."""
    from loopalign.scripts import sft_gap

    config = tmp_path / "c.yaml"
    config.write_text(
        "model_name_or_path: tiny\nuse_cpu: true\noutput_dir: x\ndistill_center_field: family\nprobe_layer: 2\n"
        "unlabeled_families: numeric\nloss_weights: {lm: 1.0, probe_distill: 1.0}\nreport_to: none\n"
    )

    def parse(*extra):
        argv = ["--config", str(config), *extra]
        return sft_gap.parse_or_exit(sft_gap.build_parser(argv), argv)

    script_args, training_args, _ = parse()
    assert (training_args.distill_center_field, training_args.probe_layer) == ("family", 2)
    with pytest.raises(SystemExit):  # without the clearing, the config refuses the combination (exit 2)
        parse("--loss_weights", '{"lm": 1.0}')
    script_args, training_args, _ = parse(
        "--loss_weights", '{"lm": 1.0}', "--distill_center_field", "none", "--probe_layer", "None",
        "--unlabeled_families", "NONE",
    )  # fmt: skip
    assert training_args.distill_center_field is None and training_args.probe_layer is None
    assert script_args.unlabeled_families is None and training_args.loss_weights["probe_distill"] == 0
    assert training_args.report_to == []  # transformers' own "none" (no reporting) is not turned into None
    with pytest.raises(SystemExit):  # an int option still refuses other words
        parse("--probe_layer", "nine")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["q_proj"], ["q_proj"]),  # TRL makes one name a string, which PEFT would read as a pattern matching nothing
        (["self_attn.q_proj"], ["self_attn.q_proj"]),
        (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
        (["all-linear"], "all-linear"),
        ([r".*\.q_proj"], r".*\.q_proj"),  # a pattern stays a pattern
    ],
)
def test_one_lora_target_module_stays_a_module_name(given, expected, tmp_path, parse_sft_gap):
    from peft import get_peft_model
    from trl import get_peft_config

    from loopalign import OuroForCausalLM, tiny_config

    argv = ["--model_name_or_path", "tiny", "--use_peft", "true", "--lora_target_modules", *given,
            "--output_dir", str(tmp_path), "--use_cpu", "true"]  # fmt: skip
    *_, model_args = parse_sft_gap(argv)
    assert model_args.lora_target_modules == expected
    yaml_file = tmp_path / "one.yaml"
    yaml_file.write_text(yaml.safe_dump({"model_name_or_path": "tiny", "lora_target_modules": given}))
    assert parse_sft_gap(["--config", str(yaml_file), "--use_cpu", "true"])[2].lora_target_modules == expected
    model = get_peft_model(OuroForCausalLM(tiny_config(vocab_size=64)), get_peft_config(model_args))
    assert any("lora_A" in n for n, _ in model.named_parameters())  # the adapters went somewhere


def test_the_embedded_defaults_are_the_shipped_default_config(sft_gap_script):
    """[architecture-2] item 5: `sft-gap` with no --config and `--config recipes/configs/sft_gap_cpu_default.yaml`
    parse to the same arguments, field for field (the recipes path links to the shipped CPU default)."""
    import dataclasses

    path = str(ROOT / "recipes" / "configs" / "sft_gap_cpu_default.yaml")
    embedded = sft_gap_script.build_parser([]).parse_args_and_config(args=[])
    shipped = sft_gap_script.build_parser(["--config", path]).parse_args_and_config(args=["--config", path])
    for a, b in zip(embedded, shipped):
        differ = {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}
        assert not differ, (type(a).__name__, sorted(differ))


def test_the_looped_labels_config_is_the_documented_hlv200_run(parse_sft_gap, sft_gap_script, tmp_path, monkeypatch):
    """recipes/configs/sft_gap_smollm2_healed_loops_labels_cpu.yaml resolves to every setting HLV200 ran with
    (docs/real-models.md; the run's resolved arguments kept in its run_args.json), so the config reproduces the
    documented figures; only the output folder is the user's."""
    config = ROOT / "recipes" / "configs" / "sft_gap_smollm2_healed_loops_labels_cpu.yaml"
    run = json.loads(
        (ROOT / "docs" / "figures" / "runs" / "HLV200_healed_loops_verdict_only_s0" / "run_args.json").read_text()
    )
    # The run read a statement build (README: `loopalign build-statements`) at a path relative to the working folder,
    # which a fresh clone has not built: parsing only asks that the path be a build (a folder with metadata.json), so
    # the test parses in a folder that has one there, not in whatever folder pytest was started from.
    monkeypatch.chdir(tmp_path)
    build = tmp_path / run["script"]["dataset"]
    build.mkdir(parents=True)
    (build / "metadata.json").write_text("{}")
    argv = [
        "--config",
        str(config),
        "--dataset",
        run["script"]["dataset"],
        "--output_dir",
        run["training"]["output_dir"],
    ]
    parsed = parse_sft_gap(argv)
    # where the run wrote and how it logged are no part of what it trained and measured
    ignore = {"logging_dir", "run_name"}
    # the replay settings are read only with loss_weights.replay > 0: the HL config's, which HLV200 overrode, are inert
    assert run["training"]["loss_weights"]["replay"] == parsed[1].loss_weights["replay"] == 0
    ignore |= {"replay_keep_cut", "replay_tasks", "replay_batch_size", "replay_kind"}
    # the parsed arguments as a run writes them to run_args.json
    written = json.loads(json.dumps(sft_gap_script.run_arguments(*parsed), default=str))
    differ = []
    for name, resolved in written.items():
        for key, value in run[name].items():
            if key not in ignore and resolved.get(key, "<no option>") != value:
                differ.append(
                    f"{name}.{key}: the config gives {resolved.get(key, '<no option>')!r}, HLV200 ran {value!r}"
                )
    assert not differ, "\n".join(differ)
