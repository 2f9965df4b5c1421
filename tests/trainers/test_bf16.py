"""GapSFTTrainer under bf16 mixed precision, on CPU (CPU bf16 autocast is slow but computes what a GPU would, in
kind; hence tiny shapes).

Two setups a GPU user gets: a model loaded in bf16 with ``bf16=True`` (every 1.4B recipe), and a float32 model
with ``bf16=True`` (autocast). Both run a real ``train()`` with every loss term on (lm, gate, probe, consistency,
rr_probe with base probes fit before training, rr_distill) under uniform and Ouro-entropy loop weighting, and
are compared with the same run in float32 (same seed, same data).

Tolerances, from what this setup measures (CPU, torch 2.13), relative to the float32 run:

- first step, total loss: measured <= 9.4e-4 -> ``TOTAL_RTOL`` 5e-3;
- first step, lm / gate / consistency / probe terms and the per-loop LM losses: measured <= 3e-4 ->
  ``TERM_RTOL`` 2e-3. The per-loop LM losses of neighbouring loops differ by 4e-3 to 1.5e-2 relative, so a loss
  read from the wrong loop fails; so does the cross-entropy's logsumexp taken in bf16 instead of float32 (tried);
- first step, rr_probe: measured 2.2e-2 (bf16 model) -> ``RR_PROBE_RTOL`` 5e-2. The frozen base probes are fit on
  the bf16 features themselves (an L2-light logistic fit amplifies the rounding of the features);
- first step, rr_distill: exactly 0 in both (LoRA B starts at 0, so the tuned and base forwards agree bit for bit);
- second step (after one bf16 update; the probes are no longer zero), lm / probe / consistency terms: measured
  <= 1.6e-3 -> ``STEP2_RTOL`` 2e-2 (the updates themselves differ by bf16 rounding).

That the probes and RR terms run in float32 under autocast, bit for bit, is checked on the objectives
(tests/test_objectives_bf16.py): at these sizes their bf16 rounding would stay inside the tolerances above.
"""

import math

import pytest
import torch
from peft import LoraConfig

from loopalign import OuroForCausalLM, tiny_config
from loopalign.trainers import GapSFTConfig, GapSFTTrainer

# on a kernel path forced below the hardware's, attention runs on torch's math backend (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("bf16_attention")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_TERMS = {"lm": 1.0, "probe": 1.0, "consistency": 1.0, "rr_probe": 1.0, "rr_distill": 1.0, "gate": 0.5}
TERMS = [f"{k}_loss" for k in ALL_TERMS]

TOTAL_RTOL = 5e-3
TERM_RTOL = 2e-3
RR_PROBE_RTOL = 5e-2
STEP2_RTOL = 2e-2


def _train(gap_dataset, tmp_path, model_dtype, bf16, loop_weighting):
    """Two optimizer steps; returns (trainer, per-step logs, trainable weights before, after)."""
    ds, tok = gap_dataset
    torch.manual_seed(0)
    model = OuroForCausalLM(tiny_config(vocab_size=len(tok))).to(model_dtype)
    args = GapSFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8, learning_rate=5e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
        bf16=bf16, loss_weights=ALL_TERMS, loop_weighting=loop_weighting,
    )  # fmt: skip
    trainer = GapSFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0),
    )

    def trainable():
        return {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    before = trainable()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "lm_loss" in h]
    assert len(logs) == 2, trainer.state.log_history
    return trainer, logs, before, trainable()


@pytest.fixture(scope="module")
def fp32_logs(gap_dataset, tmp_path_factory):
    """The float32 runs (bf16=False), one per loop weighting."""
    runs = {}
    for weighting in ("uniform", "ouro_entropy"):
        _, logs, _, _ = _train(gap_dataset, tmp_path_factory.mktemp(weighting), torch.float32, False, weighting)
        runs[weighting] = logs
    return runs


@pytest.mark.parametrize("loop_weighting", ["uniform", "ouro_entropy"])
@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float32], ids=["bf16_model", "fp32_model"])
def test_gap_sft_trains_under_bf16_like_fp32(gap_dataset, tmp_path, fp32_logs, model_dtype, loop_weighting):
    trainer, logs, before, after = _train(gap_dataset, tmp_path, model_dtype, True, loop_weighting)
    assert trainer.accelerator.mixed_precision == "bf16"
    lm_head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings()
    assert lm_head.weight.dtype == model_dtype  # the bf16 model stayed bf16

    # every term is there and finite, on both steps
    for log in logs:
        for key in ["loss", "grad_norm", *TERMS]:
            assert key in log and math.isfinite(log[key]), (key, log)
    # the LoRA weights and the probes were trained, and stayed finite
    lora = [n for n in before if "lora_" in n]
    assert lora and any(not torch.equal(before[n], after[n]) for n in lora), "no LoRA weight changed"
    assert any(not torch.equal(before[n], after[n]) for n in before if "loop_probes" in n), "the probes did not move"
    assert all(torch.isfinite(p).all() for p in after.values())

    ref, got = fp32_logs[loop_weighting][0], logs[0]
    assert got["loss"] == pytest.approx(ref["loss"], rel=TOTAL_RTOL)
    for key in ("lm_loss", "gate_loss", "consistency_loss", "probe_loss"):
        assert got[key] == pytest.approx(ref[key], rel=TERM_RTOL), key
    for t in range(1, trainer.num_loops + 1):
        assert got[f"loss/loop_{t}"] == pytest.approx(ref[f"loss/loop_{t}"], rel=TERM_RTOL), t
    assert got["rr_probe_loss"] == pytest.approx(ref["rr_probe_loss"], rel=RR_PROBE_RTOL)
    assert got["rr_distill_loss"] == 0.0 and ref["rr_distill_loss"] == 0.0

    ref2, got2 = fp32_logs[loop_weighting][1], logs[1]
    for key in ("lm_loss", "probe_loss", "consistency_loss"):
        assert got2[key] == pytest.approx(ref2[key], rel=STEP2_RTOL), key
    assert got2["rr_distill_loss"] > 0


def test_verdict_readout_of_a_bf16_model_without_the_lm_term(gap_dataset, tmp_path):
    """No LM term and no logging step: no loop is scored, so the verdict readout (loop_logits on the float32
    states accelerate hands back, through the bf16 head) is the first head matmul: it used to crash there."""
    ds, tok = gap_dataset
    torch.manual_seed(0)
    model = OuroForCausalLM(tiny_config(vocab_size=len(tok))).to(torch.bfloat16)
    args = GapSFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8, learning_rate=5e-3,
        logging_steps=10, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, bf16=True,
        loss_weights={"lm": 0.0, "probe": 1.0, "consistency": 1.0},
    )  # fmt: skip
    trainer = GapSFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tok,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0),
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert any(not torch.equal(p, trainer.model.get_parameter(n)) for n, p in before.items())
