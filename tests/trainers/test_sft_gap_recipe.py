"""recipes/sft_gap.py end to end (few steps): before/after evaluation, comparison and artefacts."""

import json

import pytest


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
    assert set(comparison) >= {"verdict"} and "SV caught up" in comparison["verdict"]
    assert (run / "final" / "adapter_model.safetensors").exists()
    assert not (run / "final" / "loop_probes.safetensors").exists()  # the default objective has no probes
    assert len(comparison["tp"]) == 4  # TP before and after, per loop
    card = (run / "final" / "README.md").read_text()  # not PEFT's empty template
    assert "load_gap_model" in card and "SV caught up" in card
    printed = capsys.readouterr().out
    assert "Before / after gap SFT" in printed and "| loop |" in printed and "| loop | TP before" in printed
    # a short console: the before table once, compactly; per-loop training details only in the logs
    assert "(full report: " in printed and "## SV metrics" not in printed
    assert "'sv/loop_4'" in printed and "'loss/loop_1'" not in printed
