"""GapSFTTrainer on a tiny Ouro with real PEFT LoRA and a real TRL trainer."""

import json
import os

import pytest
import torch
from peft import LoraConfig

from loopalign import OuroForCausalLM, tiny_config
from loopalign.trainers import GapSFTConfig, GapSFTTrainer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    base.update(kw)
    return GapSFTConfig(**base)


def _trainer(gap_dataset, tmp_path, **kw):
    ds, tok = gap_dataset
    torch.manual_seed(0)
    model = OuroForCausalLM(tiny_config(vocab_size=len(tok)))
    return GapSFTTrainer(
        model=model,
        args=_args(tmp_path, **kw),
        train_dataset=ds,
        processing_class=tok,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0),
    )


def test_gradients_reach_only_lora_and_probe_parameters(gap_dataset, tmp_path):
    weights = {"probe": 1.0, "consistency": 1.0, "rr_distill": 1.0, "gate": 0.5}
    trainer = _trainer(gap_dataset, tmp_path, loss_weights=weights)
    model = trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad, "nothing was trained"
    assert all("lora_" in n or n.startswith("loop_probes.") for n in with_grad), sorted(with_grad)[:5]
    assert any(n.startswith("loop_probes.") for n in with_grad)
    frozen = [n for n, p in model.named_parameters() if "lora_" not in n and "loop_probes" not in n]
    assert all(not model.get_parameter(n).requires_grad for n in frozen)


def test_short_run_lowers_the_loss_and_saves_probes(gap_dataset, tmp_path):
    trainer = _trainer(gap_dataset, tmp_path, max_steps=12, loss_weights={"probe": 0.0, "consistency": 0.0})
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 0.5, losses
    logged = trainer.state.log_history[0]
    for t in range(1, 5):
        assert f"loss/loop_{t}" in logged and f"sv/loop_{t}" in logged
    trainer.save_model(str(tmp_path / "final"))
    files = os.listdir(tmp_path / "final")
    assert "adapter_model.safetensors" in files and "gap_config.json" in files
    settings = json.loads((tmp_path / "final" / "gap_config.json").read_text())
    assert settings["num_loops"] == 4 and settings["loss_weights"]["probe"] == 0.0
    # readable by a teammate: the umask's modes (022 here), not transformers' 0600 for weights
    umask = os.umask(0)
    os.umask(umask)
    for name in files:
        mode = os.stat(tmp_path / "final" / name).st_mode & 0o777
        assert mode == 0o666 & ~umask, (name, oct(mode))


def test_lora_loops_keep_other_loops_at_the_base_model(gap_dataset, tmp_path):
    trainer = _trainer(gap_dataset, tmp_path, lora_loops="last", max_steps=3, loss_weights={"rr_distill": 1.0})
    trainer.train()
    logs = trainer.state.log_history
    distill = [h for h in logs if "rr_distill/loop_1" in h]
    assert distill and all(h["rr_distill/loop_1"] == 0.0 and h["rr_distill/loop_3"] == 0.0 for h in distill)
    assert any(h["rr_distill/loop_4"] > 0 for h in distill)


def test_resume_from_checkpoint_gives_the_same_losses(gap_dataset, tmp_path):
    probes = {"probe": 1.0, "consistency": 1.0}  # jointly trained probes: their state is resumed too
    full = _trainer(gap_dataset, tmp_path / "a", max_steps=6, loss_weights=probes)
    full.train()
    full_losses = [h["loss"] for h in full.state.log_history if "loss" in h]

    first = _trainer(gap_dataset, tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3, loss_weights=probes)
    first.train()
    ckpt = tmp_path / "b" / "out" / "checkpoint-3"
    assert (ckpt / "loop_probes.safetensors").exists()
    resumed = _trainer(
        gap_dataset, tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3, loss_weights=probes
    )
    resumed.train(resume_from_checkpoint=str(ckpt))
    resumed_losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert len(resumed_losses) == 6
    torch.testing.assert_close(torch.tensor(resumed_losses[3:]), torch.tensor(full_losses[3:]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(loss_weights={"lm": 1.0, "verdict": 2.0}), "unknown loss key\\(s\\) \\['verdict'\\]"),
        (dict(loss_weights='{"lm": -1}'), "must be a number >= 0"),
        (dict(loop_weighting="exp"), "loop_weighting must be one of"),
        (dict(lora_loops="first"), "not understood"),
        (dict(probe_position="start"), "probe_position must be one of"),
        (dict(loss_weights={"consistency": 1.0}), "'consistency' > 0 needs 'probe' > 0"),
        (dict(activation_checkpointing_kwargs={"policy": "most"}), "\\['policy'\\] must be one of"),
        (dict(packing=True), "packing=True is not supported"),
        (dict(padding_free=True), "padding_free=True is not supported"),
        (dict(compile_layers=True, torch_compile=True), "compile_layers or torch_compile, not both"),
    ],
)
def test_bad_configs_fail_at_construction(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **kw)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(probe_layer=3), "probe_layer=3 is out of range"),
        (dict(lora_loops=">=4"), "names loop 4, but the model runs 4 loops"),
        (dict(loop_weighting="list", loop_weights=[1.0, 1.0]), "loop_weights has 2 entries for num_loops=4"),
    ],
)
def test_configs_out_of_range_for_the_model_fail_before_training(gap_dataset, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        _trainer(gap_dataset, tmp_path, **kw)


def test_dataset_missing_the_verdict_position_fails_before_training(gap_dataset, tmp_path):
    ds, tok = gap_dataset
    with pytest.raises(ValueError, match="lacks column\\(s\\) \\['verdict_index'\\]"):
        GapSFTTrainer(
            model=OuroForCausalLM(tiny_config(vocab_size=len(tok))),
            args=_args(tmp_path),
            train_dataset=ds.remove_columns("verdict_index"),
            processing_class=tok,
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )
    bad = ds.map(lambda r, i: {"verdict_index": 999 if i == 5 else r["verdict_index"]}, with_indices=True)
    with pytest.raises(ValueError, match=f"record '{ds[5]['id']}': field 'verdict_index' 999 is outside"):
        GapSFTTrainer(
            model=OuroForCausalLM(tiny_config(vocab_size=len(tok))),
            args=_args(tmp_path),
            train_dataset=bad,
            processing_class=tok,
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )


def test_an_interrupted_checkpoint_save_leaves_no_partial_checkpoint(gap_dataset, tmp_path):
    class Crash(RuntimeError):
        pass

    probes = {"probe": 1.0}
    trainer = _trainer(gap_dataset, tmp_path, max_steps=4, save_strategy="steps", save_steps=2, loss_weights=probes)
    real = trainer._save_optimizer_and_scheduler

    def failing(output_dir):
        if trainer.state.global_step == 4:
            raise Crash("killed while writing the optimizer state")
        return real(output_dir)

    trainer._save_optimizer_and_scheduler = failing
    with pytest.raises(Crash):
        trainer.train()
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "loop_probes.safetensors").exists()
    assert not (out / "checkpoint-4").exists()  # the half-written one stayed in .staging
    from transformers.trainer_utils import get_last_checkpoint

    assert get_last_checkpoint(str(out)).endswith("checkpoint-2")
    resumed = _trainer(gap_dataset, tmp_path, max_steps=4, save_strategy="steps", save_steps=2, loss_weights=probes)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4 and (out / "checkpoint-4" / "adapter_model.safetensors").exists()
    assert not (out / ".staging").exists()  # the complete save cleared the half one and the folder


def test_no_empty_staging_folder_is_left_after_training(gap_dataset, tmp_path):
    """Issue [hardening]: checkpoints are staged in output_dir/.staging/ and renamed into place; a run that
    saved them must not leave an empty .staging/ behind (a stale half checkpoint there goes too)."""
    out = tmp_path / "out"
    (out / ".staging" / "checkpoint-9").mkdir(parents=True)  # left by an interrupted save of an earlier run
    (out / ".staging" / "checkpoint-9" / "adapter_model.safetensors").write_bytes(b"half")
    trainer = _trainer(gap_dataset, tmp_path, max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=1)
    trainer.train()
    assert not (out / ".staging").exists(), os.listdir(out / ".staging")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-4"]
    assert (out / "checkpoint-4" / "adapter_model.safetensors").exists()


def test_speed_options_train_the_same_as_the_plain_path(gap_dataset, tmp_path):
    """Selective checkpointing, compiled layers and length grouping change speed, not the losses."""
    plain = _trainer(gap_dataset, tmp_path / "plain", max_steps=3, gradient_checkpointing=False)
    plain.train()
    fast = _trainer(
        gap_dataset,
        tmp_path / "fast",
        max_steps=3,
        gradient_checkpointing=True,
        activation_checkpointing_kwargs={"policy": "save_matmuls"},
        compile_layers=True,
        compile_layers_backend="aot_eager",
    )
    layers = fast.model.base_model.model.model.layers
    assert all(layer.compiled_compute is not None for layer in layers)
    fast.train()
    assert all(layer.gradient_checkpointing for layer in layers)
    assert "context_fn" in layers[0]._gradient_checkpointing_func.keywords
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, fast)]
    assert len(losses[0]) == 3
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)


def test_completion_only_loss_false_labels_the_prompt_too(gap_dataset, tmp_path):
    completion = _trainer(gap_dataset, tmp_path / "a", max_steps=1)
    whole = _trainer(gap_dataset, tmp_path / "b", max_steps=1, completion_only_loss=False)
    a, b = completion.train_dataset[0], whole.train_dataset[0]
    assert a["input_ids"] == b["input_ids"]
    assert sum(x != -100 for x in a["labels"]) == 2  # verdict and end of turn
    assert b["labels"] == b["input_ids"]
    batch = whole.data_collator([whole.train_dataset[i] for i in range(4)])
    assert whole.compute_loss(whole.model.train(), batch).isfinite()


def test_group_by_length_batches_similar_lengths(gap_dataset, tmp_path):
    trainer = _trainer(gap_dataset, tmp_path, per_device_train_batch_size=4, train_sampling_strategy="group_by_length")
    batches = [b["attention_mask"] for b in trainer.get_train_dataloader()]
    padding = sum(int((m == 0).sum()) for m in batches)
    ungrouped = _trainer(gap_dataset, tmp_path / "u", per_device_train_batch_size=4)
    padding_random = sum(int((b["attention_mask"] == 0).sum()) for b in ungrouped.get_train_dataloader())
    assert padding < padding_random


def test_untrained_loops_are_scored_only_on_logging_steps(gap_dataset, tmp_path):
    trainer = _trainer(gap_dataset, tmp_path, max_steps=4, logging_steps=2, loop_weighting="last")
    model = trainer.model.train()
    assert not trainer._logs_this_step(model)  # step 1 of 4: not logged
    trainer.state.global_step = 1
    assert trainer._logs_this_step(model)
    assert trainer._logs_this_step(model.eval())
    trainer.model.train()
    trainer.state.global_step = 0
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert all(h[f"loss/loop_{t}"] > 0 for t in range(1, 5)), h
