"""A real 2-process CPU data-parallel run (accelerate launch, gloo): ranks' adapters stay identical."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_ranks(tmp_path, config: str, *overrides: str) -> None:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "accelerate_configs" / config), *overrides,
        "--main_process_port", str(_free_port()),
        str(ROOT / "tests" / "trainers" / "ddp_gap_sft.py"), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _assert_ranks_identical_and_trained(tmp_path) -> None:
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert int(ranks[0].pop("__world_size")) == 2 and int(ranks[1].pop("__world_size")) == 2
    assert ranks[0].keys() == ranks[1].keys()
    assert any("lora_B" in k for k in ranks[0]) and any(k.startswith("loop_probes") for k in ranks[0])
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
    _assert_ranks_identical_and_trained(tmp_path)


@pytest.mark.slow
def test_fsdp_config_trains_on_two_cpu_ranks(tmp_path):
    _launch_two_ranks(tmp_path, "fsdp.yaml", "--num_processes", "2", "--mixed_precision", "no")
    _assert_ranks_identical_and_trained(tmp_path)


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
    assert "2 processes, distributed" in done.stdout, done.stdout[-2000:]
    assert "parallel_mode" not in done.stderr  # transformers' warning about non-distributed copies
    assert (out / "compare.json").exists()
