"""A real 2-process CPU data-parallel run (accelerate launch, gloo): ranks' adapters stay identical."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_ranks(tmp_path, config: str, *overrides: str, family: str = "ouro") -> None:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "accelerate_configs" / config), *overrides,
        "--main_process_port", str(_free_port()),
        str(ROOT / "tests" / "trainers" / "ddp_gap_sft.py"), str(tmp_path), family,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "terminate called" not in done.stderr, done.stderr[-3000:]  # a rank aborted at exit (process group left)


def _assert_ranks_identical_and_trained(tmp_path, distributed_type: str = "MULTI_CPU", adapted: str = "q_proj") -> None:
    ran = {(tmp_path / f"rank{r}.type").read_text() for r in (0, 1)}
    assert ran == {distributed_type}, f"the launch ran {ran}, its config asks for {distributed_type}"
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert int(ranks[0].pop("__world_size")) == 2 and int(ranks[1].pop("__world_size")) == 2
    assert ranks[0].keys() == ranks[1].keys()
    assert any("lora_B" in k for k in ranks[0]) and any(k.startswith("loop_probes") for k in ranks[0])
    assert any(adapted in k for k in ranks[0] if "lora_B" in k), f"no adapter on {adapted}: not the family asked for"
    moved = [k for k in ranks[0] if "lora_B" in k and ranks[0][k].abs().sum() > 0]
    assert moved, "the adapters did not train"
    for k in ranks[0]:
        torch.testing.assert_close(ranks[0][k], ranks[1][k], atol=0, rtol=0, msg=k)


@pytest.mark.slow
def test_two_process_cpu_run_keeps_adapters_identical(tmp_path):
    _launch_two_ranks(tmp_path, "cpu_multi_process.yaml")
    _assert_ranks_identical_and_trained(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_zero_configs_train_on_two_cpu_ranks(tmp_path, config):
    """The shipped DeepSpeed configs, unchanged but for 2 processes and fp32 (DeepSpeed's CPU
    accelerator, gloo). Needs the ``deepspeed`` extra; on GPUs the same files run in bf16."""
    pytest.importorskip("deepspeed")
    _launch_two_ranks(tmp_path, config, "--num_processes", "2", "--mixed_precision", "no")
    _assert_ranks_identical_and_trained(tmp_path, "DEEPSPEED")


@pytest.mark.slow
def test_the_fsdp_config_launches_on_cpu_as_ddp(tmp_path):
    """accelerate runs FSDP on accelerators only: on 2 CPU ranks the shipped fsdp.yaml launches and trains as DDP
    (MULTI_CPU), said here so that nobody reads this test as an FSDP run. What FSDP itself needs from the model
    is checked below without a GPU. The model is a tiny Huginn (the other 2-rank runs train Ouro), so the second
    family's adapters and probes are seen to train and stay identical across ranks too."""
    _launch_two_ranks(tmp_path, "fsdp.yaml", "--num_processes", "2", "--mixed_precision", "no", family="huginn")
    _assert_ranks_identical_and_trained(tmp_path, "MULTI_CPU", adapted="Wqkv")


@pytest.mark.parametrize("family", ["ouro", "huginn"])
def test_fsdp_wrap_classes_name_every_decoder_block(family):
    """The class fsdp.yaml wraps (Ouro) and the one docs/families.md passes for Huginn resolve in the model as
    accelerate resolves them, and every decoder block is an instance (each its own FSDP unit), LoRA-wrapped too;
    ``_no_split_modules`` (accelerate's default when no class is named) names only classes the model has."""
    from accelerate.utils.dataclasses import get_module_class_from_name
    from peft import LoraConfig, get_peft_model

    from loopalign import OuroForCausalLM, tiny_config
    from loopalign.models.huginn import HuginnForCausalLM, tiny_huginn_config

    if family == "ouro":
        config = yaml.safe_load((ROOT / "accelerate_configs" / "fsdp.yaml").read_text())
        name = config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
        base = OuroForCausalLM(tiny_config(vocab_size=64))
        targets, n_blocks = ["q_proj"], base.config.num_hidden_layers
    else:
        name = "HuginnBlock"
        base = HuginnForCausalLM(tiny_huginn_config(vocab_size=64))
        c = base.config
        targets, n_blocks = ["Wqkv"], c.n_layers_in_prelude + c.n_layers_in_recurrent_block + c.n_layers_in_coda
    model = get_peft_model(base, LoraConfig(r=2, target_modules=targets))
    cls = get_module_class_from_name(model, name)
    assert cls is not None, f"{name} is not a module class of {family}"
    assert sum(isinstance(m, cls) for m in model.modules()) == n_blocks  # every block its own unit, no other module
    assert all(get_module_class_from_name(model, n) is not None for n in model._no_split_modules)


@pytest.mark.slow
def test_the_readme_cpu_launch_of_the_recipe_is_one_distributed_run(tmp_path):
    """`accelerate launch --config_file accelerate_configs/cpu_multi_process.yaml recipes/sft_gap.py`
    as the README writes it (no --use_cpu): one gloo group over 2 ranks, not two copies."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "accelerate_configs" / "cpu_multi_process.yaml"),
        "--main_process_port", str(_free_port()),
        str(ROOT / "recipes" / "sft_gap.py"),
        "--model_name_or_path", "tiny", "--dataset", "synthetic", "--dataset_limit", "24",
        "--lora_target_modules", "q_proj", "v_proj", "--eval_loops", "4", "--eval_n_boot", "20",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--output_dir", str(out),
        "--report_to", "none", "--disable_tqdm", "true", "--loss_weights", '{"lm": 1.0}',  # a random model: no replay
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "terminate called" not in done.stderr, done.stderr[-3000:]  # every rank ends its process group
    assert "2 processes, distributed" in done.stdout, done.stdout[-2000:]
    assert "parallel_mode" not in done.stderr  # transformers' warning about non-distributed copies
    assert (out / "compare.json").exists()
