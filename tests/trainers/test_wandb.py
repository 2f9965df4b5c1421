"""A real W&B run in offline mode: per-loop training metrics and the gap plots are logged."""

import glob

import pytest
import torch
from peft import LoraConfig

from loopalign import OuroForCausalLM, tiny_config
from loopalign.eval import CompareConfig, compare, evaluate_gap, log_comparison_wandb
from loopalign.trainers import GapSFTConfig, GapSFTTrainer


@pytest.mark.slow
def test_offline_wandb_run_gets_per_loop_metrics_and_plots(gap_dataset, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    ds, tok = gap_dataset
    torch.manual_seed(0)
    args = GapSFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8, logging_steps=1,
        report_to=["wandb"], run_name="gap-sft-test", save_strategy="no", use_cpu=True, disable_tqdm=True,
        loss_weights={"lm": 1.0, "probe": 1.0},  # the probes give the probe_acc / probe_gap metrics
    )  # fmt: skip
    trainer = GapSFTTrainer(
        model=OuroForCausalLM(tiny_config(vocab_size=len(tok))), args=args, train_dataset=ds,
        processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )  # fmt: skip
    trainer.train()
    run = wandb.run
    assert run is not None and run.settings.mode == "offline"
    try:
        summary = dict(run.summary)
        for t in range(1, 5):
            for name in ("loss", "sv", "probe_acc", "probe_gap"):
                assert f"train/{name}/loop_{t}" in summary, (name, t)
        result = evaluate_gap(trainer.model, tok, ds.select(range(24)), loops="1-4", config=None)
        result.log_wandb(run=run, prefix="gap_after/")
        assert "gap_after/sv" in dict(run.summary) or any(k.startswith("gap_after/") for k in run.summary.keys())
        # the before/after verdict reaches the run's summary (not only the last loop's figures)
        base = evaluate_gap(trainer.model.get_base_model(), tok, ds.select(range(24)), loops="1-4", config=None)
        written = log_comparison_wandb(compare(base, result, CompareConfig(loops=4)), run)
        summary = dict(run.summary)
        parts = ("sv_caught_up", "gap_closed", "rr_preserved", "tp_kept", "saturated", "sv_past_base_readout", "passed")
        figures = ("depth", "outcome", "d_sv", "d_sv_lo", "sv_reach_lo", "sv_reach_auroc_lo", "gap_after_hi", "d_rr_lo")
        for key in [f"compare/{k}" for k in (*parts, *figures)]:
            assert key in summary and summary[key] == written[key], key
        assert summary["compare/depth"] == 4 and all(isinstance(summary[f"compare/{k}"], bool) for k in parts)
        assert summary["compare/outcome"] in ("yes", "no", "saturated: not measurable")
        run_dir = run.dir
    finally:
        wandb.finish()
    images = glob.glob(f"{run_dir}/media/images/**/*.png", recursive=True)
    assert images, "no plot was logged as an image"
