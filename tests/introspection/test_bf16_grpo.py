"""IntrospectionGRPOTrainer under bf16 mixed precision (CPU autocast; CPU bf16 is slow but exact in kind, so
tiny shapes): a real GRPO step with injected rollouts runs for a bf16-loaded model and for a float32 model with
``bf16=True``, trains the LoRA weights, and its log-probabilities and loss on the very batch of a float32 run
match that run's within bf16 tolerances.

How the comparison works: a float32 run (``bf16=False``) trains one step and its generation batch (completions,
advantages, injection spec, reference log-probs) is kept. The bf16 run generates its own rollouts for real (bf16
generation with the injection hooks on), then trains on the float32 batch instead, so its loss forward sees the
same tokens. At step 0 the policy is the base model (LoRA B = 0), so the float32 reference log-probs of that batch
are the float32 policy's: the bf16 policy's log-probs are compared with them token by token.

Tolerances, from what this setup measures (CPU, torch 2.13): the per-token log-probs (-7.3 to -6.6, a near-uniform
tiny model) differ by at most 3.5e-3 (bf16 model) / 2.7e-3 (float32 model under autocast) from float32, so
``LOGP_ATOL`` = 1.5e-2. It discriminates: the same log-probs without the injection differ by ~0.25, shifted by one
token by ~0.5 (the fixture checks the first). The step-0 loss is beta x KL ~ 1e-7 and the entropy ~ln V in both
precisions (measured relative difference 1.5e-6), so those two are loose sanity checks, not the discriminating one.
"""

import copy
import math

import pytest
import torch

# on a kernel path forced below the hardware's, attention runs on torch's math backend (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("bf16_attention")

#: max |log p_bf16 - log p_fp32| over the scored completion tokens (measured 3.5e-3 and 2.7e-3)
LOGP_ATOL = 1.5e-2
#: relative difference of the logged mean token entropy (measured 1.5e-6)
ENTROPY_RTOL = 1e-3
#: |loss_bf16 - loss_fp32| on the same batch (the step-0 loss is beta x KL ~ 1e-7 in both)
LOSS_ATOL = 1e-4


def completion_chars(prompts, completions, **kwargs):
    """A reward that varies between completions (the tiny random model earns the same introspection rewards on
    every rollout, which would give zero advantages and no gradient)."""
    from loopalign.rewards.introspection import completion_text

    return [len(completion_text(c)) / 10.0 for c in completions]


def _trainer(tok, vectors, tmp_path, model_dtype, bf16):
    from peft import LoraConfig

    from loopalign import OuroForCausalLM, tiny_config
    from loopalign.rewards.introspection import make_reward_funcs
    from loopalign.trainers import IntrospectionGRPOConfig, IntrospectionGRPOTrainer, introspection_dataset

    torch.manual_seed(0)
    model = OuroForCausalLM(tiny_config(vocab_size=len(tok))).to(model_dtype)
    ds = introspection_dataset(tok, vectors, layers=[1], injection_loops=[3], extraction_loops=[3], n_rows=4)
    funcs, weights = make_reward_funcs({"detection": 1.0, "false_positive": 1.0})
    args = IntrospectionGRPOConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=6, learning_rate=1e-2, beta=0.04, logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", seed=0, bf16=bf16, reward_weights=[*weights, 1.0], disable_tqdm=True,
    )  # fmt: skip
    return IntrospectionGRPOTrainer(
        model=model, args=args, train_dataset=ds, concept_vectors=vectors, processing_class=tok,
        reward_funcs=[*funcs, completion_chars],
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )  # fmt: skip


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def _record(trainer) -> dict:
    """Wrap the instance's generation and log-prob methods to keep what they return / receive."""
    seen = {"generated": [], "logps": [], "loss_inputs": []}
    generate, logps, compute_loss = (
        trainer._generate_and_score_completions,
        trainer._get_per_token_logps_and_entropies,
        trainer._compute_loss,
    )

    def gen(inputs):
        out = generate(inputs)
        seen["generated"].append(out)
        return seen.pop("replay", None) or out

    def lp(*args, **kwargs):
        out = logps(*args, **kwargs)
        if trainer._active_spec is not None and kwargs.get("compute_entropy"):
            seen["logps"].append(out[0].detach().float())
        return out

    def loss(model, inputs):
        seen["loss_inputs"].append(inputs)
        return compute_loss(model, inputs)

    trainer._generate_and_score_completions = gen
    trainer._get_per_token_logps_and_entropies = lp
    trainer._compute_loss = loss
    return seen


def _step_log(trainer) -> dict:
    logs = [h for h in trainer.state.log_history if "loss" in h and "reward" in h]
    assert len(logs) == 1, trainer.state.log_history
    return logs[0]


@pytest.fixture(scope="module")
def fp32_step(tok, tiny, tmp_path_factory):
    """One float32 GRPO step: its generation batch, the loss-forward log-probs and the step's log."""
    _, vectors = tiny
    trainer = _trainer(tok, vectors, tmp_path_factory.mktemp("fp32"), torch.float32, bf16=False)
    seen = _record(trainer)
    trainer.train()
    (batch,) = seen["generated"]
    assert batch["advantages"].abs().sum() > 0, "the rewards gave zero advantages: no policy gradient"
    (inputs,) = seen["loss_inputs"]
    (logps,) = seen["logps"]
    mask = inputs["completion_mask"].bool()
    # step 0: the float32 policy is the base model, so its log-probs are the reference's (same forward, same hooks)
    ref = inputs["ref_per_token_logps"].float()
    torch.testing.assert_close(logps[mask], ref[mask], atol=1e-5, rtol=1e-5)
    # the tolerance discriminates: the base model's log-probs of the same tokens without the injection are far off
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad(), trainer.model.disable_adapter():
        plain, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attention, inputs["completion_ids"].shape[1]
        )
    assert (plain[mask] - ref[mask]).abs().max() > 5 * LOGP_ATOL
    return copy.deepcopy(batch), _step_log(trainer)


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float32], ids=["bf16_model", "fp32_model"])
def test_grpo_step_under_bf16_matches_fp32(tok, tiny, tmp_path, fp32_step, model_dtype):
    _, vectors = tiny
    fp32_batch, fp32_log = fp32_step
    trainer = _trainer(tok, vectors, tmp_path, model_dtype, bf16=True)
    assert trainer.args.bf16 and trainer.accelerator.mixed_precision == "bf16"
    seen = _record(trainer)
    seen["replay"] = copy.deepcopy(fp32_batch)
    before = _lora(trainer)
    trainer.train()

    # the bf16 rollout (generation and reference log-probs with the injection hooks) ran for real
    (own,) = seen["generated"]
    ref = own["ref_per_token_logps"]
    assert ref.dtype == torch.float32 and torch.isfinite(ref[own["completion_mask"].bool()]).all()
    assert own["completion_ids"].shape == fp32_batch["completion_ids"].shape

    log = _step_log(trainer)
    assert math.isfinite(log["loss"]) and math.isfinite(log["grad_norm"]) and log["grad_norm"] > 0
    after = _lora(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before), "no LoRA weight changed"
    assert all(torch.isfinite(p).all() for p in after.values())

    # the loss forward ran on the float32 batch: compare its bf16 log-probs with the float32 ones, token by token
    (inputs,) = seen["loss_inputs"]
    (logps,) = seen["logps"]
    mask = inputs["completion_mask"].bool()
    fp32_logps = inputs["ref_per_token_logps"].float()
    diff = (logps[mask] - fp32_logps[mask]).abs().max().item()
    assert diff <= LOGP_ATOL, diff
    assert log["entropy"] == pytest.approx(fp32_log["entropy"], rel=ENTROPY_RTOL)
    assert log["loss"] == pytest.approx(fp32_log["loss"], abs=LOSS_ATOL)
