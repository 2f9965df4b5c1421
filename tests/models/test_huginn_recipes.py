"""recipes/eval_gap.py and recipes/sft_gap.py from the command line on a saved tiny Huginn and on a saved tiny
retrofitted Llama (folders with the local tokenizer)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loopalign.models.huginn import HuginnForCausalLM, tiny_huginn_config
from loopalign.models.retrofit import RetrofitConfig, retrofit_recurrence
from loopalign.tokenizer import local_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _save_huginn(path, tok):
    torch.manual_seed(0)
    config = tiny_huginn_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    HuginnForCausalLM(config).save_pretrained(path)


def _save_retrofit(path, tok):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )  # fmt: skip
    )
    spec = RetrofitConfig(prelude=(0, 1), recurrent=(2, 4), coda=(5, 6), mean_recurrence=4, init_scale=0.0)
    retrofit_recurrence(llama, spec).save_pretrained(path)


def _run(recipe, *args):
    """The recipe's command, run as ``recipes/<recipe>`` runs it (its ``main`` on the argv), in this process: the
    command-line entry itself is tests/test_cli.py's (an interpreter start-up per run saved here)."""
    import importlib

    module = importlib.import_module(f"loopalign.scripts.{recipe.removesuffix('.py')}")
    assert module.main(list(args)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("save", [_save_huginn, _save_retrofit], ids=["huginn", "retrofit"])
def test_eval_gap_and_sft_gap_from_the_command_line(save, tmp_path):
    tok = local_tokenizer()
    model_dir = tmp_path / "model"
    save(model_dir, tok)
    tok.save_pretrained(model_dir)
    common = ["--model_name_or_path", str(model_dir), "--dataset", "synthetic", "--eval_loops", "1,2,4"]
    common += ["--eval_n_boot", "20", "--no_eval_tp", "--no_controls", "--report_to", "none"]
    _run("eval_gap.py", *common, "--dataset_limit", "24", "--eval_folds", "3", "--output_dir", str(tmp_path / "eval"))
    gap = json.loads((tmp_path / "eval" / "gap.json").read_text())
    assert [row["loop"] for row in gap["table"]] == [1, 2, 4] and gap["meta"]["total_ut_steps"] == 4
    _run(
        "sft_gap.py", *common, "--dataset_limit", "24", "--max_steps", "2", "--use_peft", "true",
        "--lora_target_modules", "Wqkv", "proj", "fc", "--output_dir", str(tmp_path / "sft"),
    )  # fmt: skip
    final = tmp_path / "sft" / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"Wqkv", "proj", "fc"}
    assert (tmp_path / "sft" / "before" / "gap.json").exists() and (tmp_path / "sft" / "after" / "gap.json").exists()
