"""Gap SFT on plain (non-looped) causal LMs: a model with one loop, through the command line, with the readout
terms at a chosen layer, and the trained adapters reloaded by their folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from loopalign.trainers import GapSFTConfig

ROOT = Path(__file__).resolve().parents[2]


#: LoRA target modules of each tiny family (conftest's ``tiny_causal_lm``)
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


@pytest.fixture(scope="module")
def saved_rows(gap_dataset, tmp_path_factory):
    rows, _ = gap_dataset
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    rows.to_json(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, extra",
    [("llama", []), ("gpt2", []), ("llama", ["--lora_layers", "1-2", "--prefix_cache", "true"])],
    ids=["llama", "gpt2", "llama-top-layers-prefix-cache"],
)
def test_sft_gap_command_trains_a_plain_causal_lm_and_its_adapters_reload(
    family, extra, gap_dataset, saved_rows, tmp_path, tiny_causal_lm
):
    _, tok = gap_dataset
    torch.manual_seed(0)
    model, targets = tiny_causal_lm(family, 3), TARGETS[family]
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    weights = {"lm": 1.0, "rr_distill": 1.0, "rr_probe": 1.0, "probe_distill": 1.0}
    argv = [sys.executable, "-m", "loopalign", "sft-gap", "--model_name_or_path", str(tmp_path / "base"),
            "--dataset", str(saved_rows), "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--eval_n_boot", "50", "--use_peft", "true", "--lora_r", "4",
            "--lora_target_modules", *targets, "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true",
            "--disable_tqdm", "true", "--probe_layer", "1", "--loss_weights", json.dumps(weights), *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    comparison = json.loads((out / "compare.json").read_text())
    assert comparison["depth"] == 1 and [r["loop"] for r in comparison["rows"]] == [1]
    settings = json.loads((out / "final" / "gap_config.json").read_text())
    assert settings["num_loops"] == 1 and settings["probe_layer"] == 1
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == ([1, 2] if extra else None)
    # the adapters reload onto their base by the folder alone, and they changed the model
    from loopalign.loading import load_model

    (tuned, _), (base, _) = (
        load_model(str(out / "final"), device="cpu"),
        load_model(str(tmp_path / "base"), device="cpu"),
    )
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        assert (tuned(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_loops": 2}, "not a looped model"),
        ({"lora_loops": "last"}, "lora_loops='all'"),
        ({"loss_weights": {"gate": 1.0}}, "exit gate"),
        ({"loop_weighting": "ouro_entropy"}, "exit gate"),
        ({"probe_layer": 4}, "probe_layer=4 is out of range"),
    ],
)
def test_loop_options_a_plain_model_cannot_honour_are_refused_by_name(
    options, message, gap_dataset, tmp_path, tiny_causal_lm
):
    _, tok = gap_dataset
    config = tiny_causal_lm("llama", 3).config
    args = GapSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **options)
    with pytest.raises(ValueError, match=message):
        args.check_against_model(config)


def test_a_plain_model_trains_at_its_one_loop_with_a_mid_layer_readout(gap_dataset, tmp_path, tiny_causal_lm):
    """One step through the trainer: the readout terms read layer 1 of a 3-layer Llama, and the loss is finite."""
    from peft import LoraConfig

    from loopalign.trainers import GapSFTTrainer

    rows, tok = gap_dataset
    torch.manual_seed(0)
    model, targets = tiny_causal_lm("llama", 3), TARGETS["llama"]
    args = GapSFTConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1, per_device_train_batch_size=8,
        probe_layer=1, loss_weights={"lm": 1.0, "rr_probe": 1.0, "rr_distill": 1.0}, save_strategy="no",
        disable_tqdm=True,
    )  # fmt: skip
    trainer = GapSFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(list(rows)[:16]), processing_class=tok,
        peft_config=LoraConfig(r=4, target_modules=targets),
    )  # fmt: skip
    assert trainer.num_loops == 1 and trainer.probe_layer == 1 and len(trainer.base_probes) == 1
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))


def test_the_verdict_is_supervised_at_earlier_layers_through_the_logit_lens(gap_dataset, tmp_path, tiny_causal_lm):
    """layer_verdict: the Yes/No verdict read at layers 0 and 1 through the final norm and LM head is trained on the
    labels; its loss falls on a repeated batch, and the term needs both its layers and its weight."""
    from peft import LoraConfig

    from loopalign.models.contract import final_norm
    from loopalign.trainers import GapSFTTrainer

    rows, tok = gap_dataset
    torch.manual_seed(0)
    model, targets = tiny_causal_lm("llama", 3), TARGETS["llama"]
    assert final_norm(model) is model.model.norm
    args = GapSFTConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=12, per_device_train_batch_size=8,
        learning_rate=1e-2, verdict_layers="0,1", loss_weights={"lm": 0.0, "layer_verdict": 1.0},
        save_strategy="no", disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    train = datasets.Dataset.from_list(list(rows)[:8])  # one batch, seen 12 times
    trainer = GapSFTTrainer(
        model=model, args=args, train_dataset=train, processing_class=tok,
        peft_config=LoraConfig(r=4, target_modules=targets),
    )  # fmt: skip
    trainer.train()
    losses = [h["layer_verdict_loss"] for h in trainer.state.log_history if "layer_verdict_loss" in h]
    assert len(losses) == 12 and losses[-1] < losses[0], losses
    # the term reads layers 0 and 1 only: their adapters moved, the top layer's (above every read) got no gradient
    moved = {
        name.split(".layers.")[1].split(".")[0]: bool(p.abs().max() > 0)
        for name, p in trainer.model.named_parameters()
        if "lora_B" in name
    }
    assert moved == {"0": True, "1": True, "2": False}, moved
    assert any("layer_verdict/layer_1" in h for h in trainer.state.log_history)
    with pytest.raises(ValueError, match="verdict_layers and loss_weights.layer_verdict > 0 go together"):
        GapSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, verdict_layers="1")
    bad = GapSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, verdict_layers="3",
                       loss_weights={"layer_verdict": 1.0})  # fmt: skip
    with pytest.raises(ValueError, match="out of range"):
        bad.check_against_model(model.config)


def test_the_logit_lens_verdict_under_the_prefix_cache_equals_the_plain_path(gap_dataset, tmp_path, tiny_causal_lm):
    """layer_verdict with LoRA on the top layers: the loss of one batch is the same with and without the prefix cache
    (the lens reads a trained layer above the cached ones)."""
    from peft import LoraConfig

    from loopalign.trainers import GapSFTTrainer

    rows, tok = gap_dataset
    losses = []
    for cache in (False, True):
        torch.manual_seed(0)
        model, targets = tiny_causal_lm("llama", 3), TARGETS["llama"]
        args = GapSFTConfig(
            output_dir=str(tmp_path / str(cache)), report_to="none", use_cpu=True, max_steps=1,
            per_device_train_batch_size=8, verdict_layers="1", prefix_cache=cache,
            loss_weights={"lm": 1.0, "layer_verdict": 1.0}, save_strategy="no", disable_tqdm=True,
        )  # fmt: skip
        peft = LoraConfig(r=4, target_modules=targets, layers_to_transform=[1, 2], init_lora_weights=False)
        trainer = GapSFTTrainer(
            model=model, args=args, train_dataset=datasets.Dataset.from_list(list(rows)[:8]), processing_class=tok,
            peft_config=peft,
        )  # fmt: skip
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(8)]))
        trainer.model.train()
        for _ in range(2):  # the second pass reads the cache it filled
            loss = trainer.compute_loss(trainer.model, batch)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
