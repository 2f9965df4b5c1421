"""Every shipped grpo_introspection / eval_introspection YAML parses against its recipe's TrlParser dataclasses."""

import ast
import importlib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRPO = sorted((ROOT / "recipes" / "configs").glob("grpo_introspection_*.yaml"))
EVAL = sorted((ROOT / "recipes" / "configs").glob("eval_introspection_*.yaml"))


def _recipe(name):
    """The body of recipes/<name>.py: loopalign.scripts.<name>."""
    return importlib.import_module(f"loopalign.scripts.{name}")


def test_configs_exist():
    assert GRPO and EVAL


@pytest.mark.parametrize("path", GRPO, ids=[p.name for p in GRPO])
def test_grpo_config_parses(path):
    from trl import ModelConfig, TrlParser

    r = _recipe("grpo_introspection")
    classes = (r.IntrospectionScriptArguments, r.IntrospectionGRPOConfig, ModelConfig)
    script, train, model = TrlParser(classes).parse_args_and_config(args=["--config", str(path), "--use_cpu", "true"])
    raw = yaml.safe_load(path.read_text())
    known = {f for cls in classes for f in cls.__dataclass_fields__}
    assert not set(raw) - known, f"{path.name}: keys that are no field: {sorted(set(raw) - known)}"
    assert model.model_name_or_path == raw["model_name_or_path"]
    assert not train.use_vllm and set(train.introspection_rewards) <= {"detection", "identification",
                                                                        "false_positive", "format"}  # fmt: skip
    for key in ("mode", "train_strengths", "eval_strengths", "num_generations", "max_completion_length"):
        if key in raw:
            assert getattr(script if hasattr(script, key) else train, key) == raw[key]


@pytest.mark.parametrize("path", EVAL, ids=[p.name for p in EVAL])
def test_eval_config_parses(path):
    from trl import TrlParser

    r = _recipe("eval_introspection")
    (args,) = TrlParser((r.EvalIntrospectionArguments,)).parse_args_and_config(args=["--config", str(path)])
    raw = yaml.safe_load(path.read_text())
    assert not set(raw) - set(r.EvalIntrospectionArguments.__dataclass_fields__)
    cfg = r.intro_config(args, depth=4)
    loops = (4,) if raw.get("loop_counts") == "trained" else tuple(range(1, 9))  # the CPU default: the trained depth
    strengths = tuple(float(x) for x in str(raw.get("strengths", "1,2,4,8")).split(","))
    assert cfg.loop_counts == loops and cfg.strengths == strengths
    assert cfg.norm_matched == bool(raw.get("norm_matched", False))


def test_unknown_key_fails(tmp_path):
    from trl import ModelConfig, TrlParser

    r = _recipe("grpo_introspection")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: default\nuse_cpu: true\nintrospection_rewards: {vibes: 1.0}\n")
    classes = (r.IntrospectionScriptArguments, r.IntrospectionGRPOConfig, ModelConfig)
    with pytest.raises(ValueError, match="unknown reward"):
        TrlParser(classes).parse_args_and_config(args=["--config", str(bad)])


def test_concept_split_is_fixed_disjoint_and_used_by_the_grpo_recipe():
    """[introspection-v2] item 3: training and evaluation concepts are disjoint by default."""
    from trl import ModelConfig, TrlParser

    from loopalign.eval.introspection import split_concepts
    from loopalign.injection import CONCEPT_WORDS

    train, held = split_concepts(CONCEPT_WORDS, 0.25)
    assert not set(train) & set(held) and set(train) | set(held) == set(CONCEPT_WORDS) and len(held) == 12
    assert split_concepts(list(reversed(CONCEPT_WORDS)), 0.25)[1] == sorted(
        held, key=list(reversed(CONCEPT_WORDS)).index
    )
    # a word's side depends on the word set only, not on order; a small set still holds one out
    assert len(split_concepts(["Snow", "Bread"], 0.25)[1]) == 1
    with pytest.raises(ValueError, match="at least 2"):
        split_concepts(["Snow"])

    r = _recipe("grpo_introspection")
    classes = (r.IntrospectionScriptArguments, r.IntrospectionGRPOConfig, ModelConfig)

    import torch

    from loopalign.injection import ConceptVectors

    Vectors = ConceptVectors(
        {w: torch.zeros(2, 1, 8) for w in CONCEPT_WORDS[:8]}, {"num_loops": 2, "layers": [1], "hidden_size": 8}
    )

    script, _, _ = TrlParser(classes).parse_args_and_config(args=["--use_cpu", "true", "--eval_concepts", "4"])
    trained, evaluated = r.run_concepts(Vectors, script)
    assert evaluated and not set(trained) & set(evaluated) and len(trained) + len(evaluated) <= 8
    script, _, _ = TrlParser(classes).parse_args_and_config(args=["--use_cpu", "true", "--concept_split", "none"])
    trained, evaluated = r.run_concepts(Vectors, script)
    assert set(evaluated) <= set(trained)
    with pytest.raises(ValueError, match="concept_split"):
        TrlParser(classes).parse_args_and_config(args=["--use_cpu", "true", "--concept_split", "some"])


@pytest.mark.parametrize("name", ["eval_introspection", "grpo_introspection"])
def test_recipes_are_thin_and_import_no_sibling(name):
    """[architecture] a recipe is a docstring, ``from loopalign.scripts.<name> import main`` and the guard:
    no sys.path edits, no other recipe, no private names."""
    tree = ast.parse((ROOT / "recipes" / f"{name}.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    froms = [(n.module, [a.name for a in n.names]) for n in imports if isinstance(n, ast.ImportFrom)]
    assert (f"loopalign.scripts.{name}", ["main"]) in froms
    assert all(m in ("sys",) for n in imports if isinstance(n, ast.Import) for m in [a.name for a in n.names])
    assert len(froms) == 1 and "sys.path" not in (ROOT / "recipes" / f"{name}.py").read_text()
    assert callable(_recipe(name).main)


def test_scripts_main_parses_argv_and_rejects_bad_options(capsys):
    """main(argv) parses with TrlParser: a bad option fails naming it before any model is loaded (a bad value ends
    the GRPO recipe with its usage line and the message, exit status 2, as the gap recipes do)."""
    with pytest.raises(SystemExit) as exited:
        _recipe("grpo_introspection").main(["--use_cpu", "true", "--concept_split", "some"])
    assert exited.value.code == 2 and "concept_split must be 'held_out' or 'none'" in capsys.readouterr().err
    for bad, message in ((["--no_such_option", "1"], "no_such_option"), (["--held_out_share", "2"], "held_out_share")):
        with pytest.raises(SystemExit) as exited:  # eval-introspection ends the same way: usage, message, status 2
            _recipe("eval_introspection").main(bad)
        assert exited.value.code == 2 and message in capsys.readouterr().err
    script, train, model = _recipe("grpo_introspection").parse_args(["--mode", "grpo", "--max_steps", "7"])
    assert script.mode == "grpo" and train.max_steps == 7
    (args,) = [_recipe("eval_introspection").parse_args(["--n_concepts", "3"])]
    assert args.n_concepts == 3 and args.output_dir == "outputs/eval_introspection_default"


def test_the_cpu_defaults_are_the_positive_control():
    """[introspection-v2] item 5: with no arguments both recipes run on the introspection organism, the GRPO recipe
    trains target reports on the train concepts and evaluates the held-out ones with every control."""
    from loopalign.organism.introspection import INTROSPECTION_ORGANISM

    script, train, model = _recipe("grpo_introspection").parse_args([])
    assert model.model_name_or_path == INTROSPECTION_ORGANISM and script.mode == "sft" and not model.use_peft
    assert script.concept_split == "held_out" and script.n_concepts == 50 and train.use_cpu
    assert script.eval_random_vectors and script.eval_control_questions and script.eval_checks
    assert script.eval_extraction_loops == "last" and script.eval_injection_loops == "all"
    assert not train.gradient_checkpointing
    # [introspection-v3] item 4: norm-matched strengths by default, training with negatives
    assert train.norm_matched and script.random_fraction > 0 and script.question_fraction > 0
    (args,) = [_recipe("eval_introspection").parse_args([])]
    assert args.model_name_or_path == INTROSPECTION_ORGANISM and args.concept_split == "held_out"
    assert args.random_vectors and args.control_questions and args.n_concepts == 50 and args.norm_matched
    # a config file replaces the embedded defaults (the 1.4B configs keep their own model and settings)
    cfg = ROOT / "recipes" / "configs" / "grpo_introspection_ouro_1.4b.yaml"
    script, train, model = _recipe("grpo_introspection").parse_args(["--config", str(cfg), "--use_cpu", "true"])
    assert model.model_name_or_path == "ByteDance/Ouro-1.4B" and script.mode == "grpo" and model.use_peft


def test_the_cpu_default_yaml_is_the_embedded_default():
    r = _recipe("grpo_introspection")
    path = ROOT / "recipes" / "configs" / "grpo_introspection_cpu_default.yaml"
    from_file = r.parse_args(["--config", str(path)])
    embedded = r.parse_args([])
    for a, b in zip(from_file, embedded):
        fields = [f for f in type(a).__dataclass_fields__ if not f.startswith("_")]
        assert {f: getattr(a, f) for f in fields if getattr(a, f) != getattr(b, f)} == {}, type(a).__name__


def test_the_mode_choice_lives_in_the_library():
    """[architecture] one parsed GRPO config -> the trainer of the chosen mode; the SFT config keeps its fields."""
    from loopalign.trainers.introspection import IntrospectionSFTConfig, make_introspection_trainer, sft_config_from

    _, train, _ = _recipe("grpo_introspection").parse_args(["--learning_rate", "0.01", "--max_steps", "3"])
    train.concept_vectors = "vectors.safetensors"
    sft = sft_config_from(train)
    assert isinstance(sft, IntrospectionSFTConfig)
    assert (sft.learning_rate, sft.max_steps, sft.per_device_train_batch_size, sft.output_dir) == (
        0.01, 3, train.per_device_train_batch_size, train.output_dir)  # fmt: skip
    assert sft.concept_vectors == "vectors.safetensors" and not sft.remove_unused_columns
    with pytest.raises(ValueError, match="mode"):
        make_introspection_trainer("ppo", None, train, None)


@pytest.mark.parametrize(
    "command, argv, message",
    [
        ("eval_introspection", ["--strengths", "abc"], "strengths must be comma-separated numbers"),
        ("grpo_introspection", ["--train_strengths", "0,2"], "train_strengths must be numbers > 0"),
        ("grpo_introspection", ["--eval_strengths", "2,x"], "eval_strengths must be comma-separated numbers"),
    ],
)
def test_bad_strengths_fail_at_parse_time_naming_the_option(command, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _recipe(command).parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
