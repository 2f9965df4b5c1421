"""GapSFTTrainer on a tiny Huginn: deep supervision over recurrence steps, probes at (step, layer) sites, LoRA on
its projections routed to chosen steps (real PEFT, real TRL trainer)."""

import datasets
import pytest
import torch
from peft import LoraConfig

from loopalign.models.huginn import HuginnForCausalLM, tiny_huginn_config
from loopalign.trainers import GapSFTConfig, GapSFTTrainer

TARGETS = ["Wqkv", "proj", "fc"]


@pytest.fixture(scope="module")
def gap_dataset():
    from loopalign.data.candidates import controlled_candidates
    from loopalign.data.prompts import render_records
    from loopalign.data.sources.synthetic import generate_problems
    from loopalign.tokenizer import local_tokenizer

    tok = local_tokenizer()
    rendered, rejected = render_records(controlled_candidates(generate_problems(24, seed=0, levels=(1,))), tok)
    assert not rejected
    return datasets.Dataset.from_list(rendered), tok


def _trainer(gap_dataset, tmp_path, **kw):
    ds, tok = gap_dataset
    torch.manual_seed(0)
    model = HuginnForCausalLM(tiny_huginn_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id))
    args = dict(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8, learning_rate=5e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
    )  # fmt: skip
    args.update(kw)
    return GapSFTTrainer(
        model=model,
        args=GapSFTConfig(**args),
        train_dataset=ds,
        processing_class=tok,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0),
    )


def test_deep_supervision_over_steps_trains_only_lora_and_probes(gap_dataset, tmp_path):
    trainer = _trainer(gap_dataset, tmp_path, loss_weights={"lm": 1.0, "probe": 1.0, "consistency": 1.0})
    assert trainer.num_loops == 4  # the config's mean_recurrence
    model = trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("core_block" in n and "lora_" in n for n in with_grad)
    assert any(n.startswith("loop_probes.") for n in with_grad)
    assert all("lora_" in n or n.startswith("loop_probes.") for n in with_grad), sorted(with_grad)[:5]


def test_training_moves_the_verdict_loss_with_lora_on_the_last_step(gap_dataset, tmp_path):
    trainer = _trainer(gap_dataset, tmp_path, lora_loops="last", max_steps=6, loss_weights={"lm": 1.0})
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss/loop_4" in h or "lm_loss" in h]
    assert logged, trainer.state.log_history[:2]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses
    # routed to the last step: earlier steps' readouts equal the base model's
    model = trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        tuned = model(input_ids=ids, attention_mask=mask, num_loops=4, output_loop_states=True, output_loop_logits=True)
        with model.disable_adapter():
            base = model(
                input_ids=ids, attention_mask=mask, num_loops=4, output_loop_states=True, output_loop_logits=True
            )
    for t in range(3):
        torch.testing.assert_close(tuned.loop_logits[t], base.loop_logits[t], atol=0, rtol=0)
    assert not torch.allclose(tuned.loop_logits[3], base.loop_logits[3], atol=1e-4)
