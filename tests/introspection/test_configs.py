"""Every shipped grpo_introspection / eval_introspection YAML parses against its recipe's TrlParser dataclasses."""

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRPO = sorted((ROOT / "recipes" / "configs").glob("grpo_introspection_*.yaml"))
EVAL = sorted((ROOT / "recipes" / "configs").glob("eval_introspection_*.yaml"))


def _recipe(name):
    key = f"{name}_recipe"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "recipes" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


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
    cfg = r.intro_config(args)
    assert cfg.loop_counts == tuple(range(1, 9)) and cfg.strengths == (1.0, 2.0, 4.0, 8.0)


def test_unknown_key_fails(tmp_path):
    from trl import ModelConfig, TrlParser

    r = _recipe("grpo_introspection")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: default\nuse_cpu: true\nintrospection_rewards: {vibes: 1.0}\n")
    classes = (r.IntrospectionScriptArguments, r.IntrospectionGRPOConfig, ModelConfig)
    with pytest.raises(ValueError, match="unknown reward"):
        TrlParser(classes).parse_args_and_config(args=["--config", str(bad)])
