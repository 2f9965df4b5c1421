"""recipes/sft_gap.py end to end (few steps): before/after evaluation, comparison and artefacts."""

import json

import pytest
import torch


@pytest.mark.slow
def test_recipe_writes_before_after_reports_and_the_verdict(tmp_path, capsys, sft_gap_script, parse_sft_gap):
    recipe = sft_gap_script
    argv = [
        "--model_name_or_path", "tiny", "--use_peft", "true", "--lora_r", "8",
        "--lora_target_modules", "q_proj", "v_proj", "down_proj",
        "--dataset", "synthetic", "--dataset_limit", "60", "--eval_loops", "1-4", "--eval_n_boot", "50",
        "--output_dir", str(tmp_path / "run"), "--max_steps", "3", "--per_device_train_batch_size", "8",
        "--learning_rate", "1e-3", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true",
        "--gradient_checkpointing", "false", "--disable_tqdm", "true",
    ]  # fmt: skip
    recipe.train_and_compare(*parse_sft_gap(argv))
    run = tmp_path / "run"
    for folder in ("before", "after"):
        assert (run / folder / "gap.json").exists() and (run / folder / "gap.md").exists()
        assert (run / folder / "sv_vs_loop.png").exists() and (run / folder / "rr_heatmap.svg").exists()
    comparison = json.loads((run / "compare.json").read_text())
    assert set(comparison) >= {"verdict", "passed", "outcome", "sv_caught_up", "gap_closed", "rr_preserved", "tp_kept"}
    assert "SV caught up" in comparison["verdict"] and comparison["verdict"].startswith("Verdict: ")
    # the after-evaluation read the before-evaluation's probes, frozen: part (c) measured drift
    after = json.loads((run / "after" / "gap.json").read_text())
    assert comparison["frozen_readout"] and "rr_frozen_prob" in after["records"]
    assert "frozen (the before probes on the after features)" in comparison["verdict"]
    assert (run / "final" / "adapter_model.safetensors").exists()
    # the adapters name their base ("tiny", not a from-config blank), so final/ loads by its path alone
    assert json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    from peft import PeftModel

    from loopalign.loading import load_model

    (tuned, _), (base, _) = load_model(str(run / "final"), device="cpu"), load_model("tiny", device="cpu")
    assert isinstance(tuned, PeftModel)
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        assert (tuned(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 0  # the trained adapters
    assert not (run / "final" / "loop_probes.safetensors").exists()  # the default objective has no probes
    assert len(comparison["tp"]) == 4  # TP before and after, per loop
    card = (run / "final" / "README.md").read_text()  # not PEFT's empty template
    assert "load_gap_model" in card and "SV caught up" in card
    printed = capsys.readouterr().out
    assert "Before / after gap SFT" in printed and "| loop |" in printed and "| loop | TP before" in printed
    assert printed.index("Verdict rule v2") < printed.index("| loop |")  # the rule, before any figure
    # a short console: the before table once, compactly; per-loop training details only in the logs
    assert "(full report: " in printed and "## SV metrics" not in printed
    assert "'sv/loop_4'" in printed and "'loss/loop_1'" not in printed
    # the wall time of each phase, in the order they ran; phases run one after the other, so they add up to at most the total
    timings = json.loads((run / "timings.json").read_text())
    phases = timings["phases"]
    assert list(phases)[:3] == ["load", "data", "before_eval"] and list(phases)[-2:] == ["train", "after_eval"]
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= timings["total"]
    assert phases["train"] > 0 and phases["before_eval"] > 0 and timings["world_size"] == 1
    assert "phase times (main process): load" in printed


@pytest.mark.slow
def test_a_full_fine_tune_run_ends_with_a_model_card_and_a_loadable_model(tmp_path, sft_gap_script, parse_sft_gap):
    """Without --use_peft the run trains every weight and final/ is the whole model: it gets a model card (there is
    no adapter_config.json to describe) and loads by its path as the trained model."""
    from loopalign.loading import load_model

    argv = [
        "--model_name_or_path", "tiny", "--dataset", "synthetic", "--dataset_limit", "40", "--eval_loops", "4",
        "--eval_n_boot", "20", "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--report_to", "none",
        "--save_strategy", "no", "--use_cpu", "true", "--disable_tqdm", "true", "--loss_weights", '{"lm": 1.0}',
    ]  # fmt: skip
    sft_gap_script.train_and_compare(*parse_sft_gap(argv))
    final = tmp_path / "run" / "final"
    assert not (final / "adapter_config.json").exists() and (final / "model.safetensors").exists()
    card = (final / "README.md").read_text()
    assert "full fine-tune" in card and "SV caught up" in card
    assert "- base model: `tiny`, a model loopalign builds" in card and "- max_steps: 2" in card  # no Hub id
    (tuned, _), (base, _) = load_model(str(final), device="cpu"), load_model("tiny", device="cpu")
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        assert (tuned(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-4  # the trained weights
