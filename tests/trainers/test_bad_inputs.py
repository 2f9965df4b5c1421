"""Bad recipe inputs fail before any expensive step, naming the option (issue [hardening]): a
table of (arguments, expected message) run through recipes/sft_gap.py on the tiny model; none of
them may reach the before-evaluation. And `--resume_from_checkpoint true` as the docs write it."""

import pytest

BASE = [
    "--model_name_or_path", "tiny", "--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj",
    "--dataset", "synthetic", "--dataset_limit", "24", "--eval_loops", "1-4", "--eval_n_boot", "20",
    "--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no",
    "--use_cpu", "true", "--gradient_checkpointing", "false", "--disable_tqdm", "true",
]  # fmt: skip

CASES = [
    (["--probe_layer", "-3"], "probe_layer=-3 is out of range"),
    (["--probe_layer", "7"], "probe_layer=7 is out of range"),
    (["--lora_loops", ">=9"], "lora_loops"),
    (["--loop_weighting", "list", "--loop_weights", "1", "1"], "loop_weights has 2 entries for num_loops=4"),
    (["--num_loops", "0"], "num_loops must be >= 1"),
    (["--max_length", "12"], "max_length=12 is shorter than the longest train record"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be >= 1"),
    (["--replay_batch_size", "0"], "replay_batch_size must be >= 1"),
    (["--learning_rate=-1e-3"], "learning_rate must be > 0"),
    (["--learning_rate", "0"], "learning_rate must be > 0"),
    (["--eval_loops", "0"], "eval_loops must be loop counts >= 1"),
    (["--eval_loops", "abc"], "eval_loops must be loop counts >= 1 (e.g. '1-8' or '1,2,4'), got 'abc'"),
    (["--eval_tp_loops", "1-x"], "eval_tp_loops must be loop counts >= 1"),
    (["--synthetic_levels", "x"], "synthetic_levels must be levels in 1..6"),
    (["--eval_fraction", "1.5"], "eval_fraction must be in (0, 1)"),
    (["--eval_n_boot", "0"], "eval_n_boot must be >= 1"),
    (["--replay_tasks", "0"], "replay_tasks must be >= 1"),
    (["--replay_questions", "no/such/questions.txt"], "replay_questions: no file 'no/such/questions.txt'"),
    (["--loss_weights", '{"lm": 1}', "--replay_questions", "general"], "replay_questions needs loss_weights.replay"),
    (["--loss_weights", '{"lm": 1, "consistensy": 1}'], "unknown loss key(s) ['consistensy']"),
    (["--use_peft", "false", "--loss_weights", '{"lm": 1, "rr_distill": 1}'], "rr_distill compare the model with"),
    (
        ["--use_peft", "false", "--loss_weights", '{"lm": 1, "replay": 1}', "--replay_kind", "kl"],
        "replay_kind='kl' compare the model with its base (the adapters switched off): they need --use_peft true",
    ),
    (["--replay_kind", "soft"], "replay_kind must be one of ('tokens', 'kl'), got 'soft'"),
    (["--loss_weights", '{"lm": -1}'], "loss_weights['lm'] must be a number >= 0"),
    (["--dataset", "missing/file.jsonl"], "missing/file.jsonl"),
    (["--load_in_4bit", "true"], "--load_in_4bit is not supported"),
    (["--push_to_hub", "true"], "--push_to_hub is not supported"),
    (["--resume_from_checkpoint", "true"], "--resume_from_checkpoint true: no checkpoint-N folder"),
    (["--resume_from_checkpoint", "no/such/checkpoint-4"], "no such checkpoint folder"),
    (["--save_steps", "20"], "--save_steps 20 with save_strategy 'no'"),
    (
        ["--loss_weights", '{"lm": 1, "replay": 1}', "--tp_max_new_tokens", "1"],
        "answers were cut off at max_new_tokens=1",
    ),
]


def test_the_organism_defaults_apply_to_local_models_only(sft_gap_script, parse_sft_gap):
    recipe = sft_gap_script
    assert recipe.cpu_default_applies([]) and recipe.cpu_default_applies(["--model_name_or_path", "tiny"])
    assert not recipe.cpu_default_applies(["--model_name_or_path", "ByteDance/Ouro-1.4B"])
    assert not recipe.cpu_default_applies(["--model_name_or_path=ByteDance/Ouro-1.4B", "--max_steps", "3"])
    assert not recipe.cpu_default_applies(["--config", "recipes/configs/sft_gap_cpu_default.yaml"])
    # the dashed spelling the parser also accepts names the same model, so it gets the same defaults
    for argv in (["--model-name-or-path", "ByteDance/Ouro-1.4B"], ["--model-name-or-path=ByteDance/Ouro-1.4B"]):
        assert not recipe.cpu_default_applies(argv)
        (_, training_args, model_args) = recipe.build_parser(argv).parse_args_and_config(args=argv)
        assert model_args.model_name_or_path == "ByteDance/Ouro-1.4B" and training_args.max_steps == -1
    assert recipe.cpu_default_applies(["--model-name-or-path", "tiny"])
    # an abbreviation the parser accepts names the model too: a hub model so named gets TRL's defaults
    argv = ["--model_name", "ByteDance/Ouro-1.4B", "--lora_r", "4"]
    assert recipe.cli_model(argv) == "ByteDance/Ouro-1.4B" and not recipe.cpu_default_applies(argv)
    (_, training_args, model_args) = recipe.build_parser(argv).parse_args_and_config(args=argv)
    assert model_args.model_name_or_path == "ByteDance/Ouro-1.4B" and training_args.max_steps == -1
    assert recipe.cli_model(["--model_name_or_path=a", "--model_name_or_path", "b"]) == "b"  # the last one given
    assert recipe.cli_model(["--model_name_or_path"]) is None  # no value: left to the recipe's parser to report


@pytest.mark.parametrize("extra,message", CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_bad_option_fails_before_the_evaluation_naming_it(tmp_path, extra, message, sft_gap_script, parse_sft_gap):
    recipe = sft_gap_script
    out = tmp_path / "run"
    with pytest.raises((ValueError, FileNotFoundError, SystemExit)) as err:
        recipe.train_and_compare(*parse_sft_gap([*BASE, "--output_dir", str(out), *extra]))
    assert message in str(err.value), str(err.value)
    assert not (out / "before").exists()  # nothing expensive ran


@pytest.mark.slow
def test_resume_from_checkpoint_true_continues_the_latest_checkpoint_and_reuses_the_before_eval(
    tmp_path, capsys, sft_gap_script, parse_sft_gap
):
    recipe = sft_gap_script
    out = tmp_path / "run"
    args = [*BASE, "--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2", "--eval_loops", "4"]
    recipe.train_and_compare(*parse_sft_gap([*args, "--max_steps", "2"]))
    assert (out / "checkpoint-2").is_dir() and (out / "before" / "gap.json").exists()
    stamp = (out / "before" / "gap.json").stat().st_mtime_ns
    capsys.readouterr()
    recipe.train_and_compare(*parse_sft_gap([*args, "--max_steps", "4", "--resume_from_checkpoint", "true"]))
    printed = capsys.readouterr().out
    assert "resuming: the before-evaluation" in printed
    assert (out / "before" / "gap.json").stat().st_mtime_ns == stamp  # reused, not recomputed
    assert (out / "checkpoint-4").is_dir() and (out / "compare.json").exists()
    assert recipe.resume_target("True") is True and recipe.resume_target("false") is None
    assert recipe.resume_target(str(out / "checkpoint-2")) == str(out / "checkpoint-2")


def test_wandb_without_a_key_goes_offline_and_sweep_runs_get_their_own_folder(
    tmp_path, monkeypatch, capsys, sft_gap_script, parse_sft_gap
):
    from loopalign.trainers import GapSFTConfig

    recipe = sft_gap_script
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_SWEEP_ID", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    args = GapSFTConfig(output_dir=str(tmp_path / "out"), report_to=["wandb"], use_cpu=True)
    recipe.prepare_reporting(args)
    assert __import__("os").environ["WANDB_MODE"] == "offline" and "offline" in capsys.readouterr().out
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "r42")
    recipe.prepare_reporting(args)
    assert args.output_dir == str(tmp_path / "out" / "sweep-sw1-r42")
    quiet = GapSFTConfig(output_dir=str(tmp_path / "q"), report_to=[], use_cpu=True)
    recipe.prepare_reporting(quiet)
    assert quiet.output_dir == str(tmp_path / "q")


def test_an_empty_dataset_file_fails_naming_it(tmp_path, sft_gap_script, parse_sft_gap):
    recipe = sft_gap_script
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="is empty: no records"):
        recipe.train_and_compare(*parse_sft_gap([*BASE, "--output_dir", str(out), "--dataset", str(empty)]))
    assert not (out / "before").exists()


def test_a_second_run_into_a_busy_output_folder_fails_at_once(tmp_path, sft_gap_script, parse_sft_gap):
    import subprocess
    import sys
    import time

    from loopalign.io import FolderLockedError

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom loopalign.io import folder_lock\n"
         "with folder_lock(sys.argv[1], 'another sft_gap run'):\n    print('held', flush=True)\n    time.sleep(60)\n",
         str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        recipe = sft_gap_script
        start = time.monotonic()
        with pytest.raises(FolderLockedError, match="another sft_gap run"):
            recipe.train_and_compare(*parse_sft_gap([*BASE, "--output_dir", str(out)]))
        assert time.monotonic() - start < 30 and not (out / "before").exists()
    finally:
        holder.kill()
        holder.wait()


def test_the_hub_note_is_printed_for_hub_models_only(tmp_path):
    """Run as a script (the __main__ block): a local model gets the organism's defaults silently, a hub
    name without --config gets the note (then fails offline, which is not what is tested)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "recipes" / "sft_gap.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    note = "without --config: TRL's defaults apply"
    local = subprocess.run(
        [sys.executable, str(script), "--model_name_or_path", "tiny", "--probe_layer=-3", "--output_dir",
         str(tmp_path / "a")], capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert local.returncode != 0 and "probe_layer=-3 is out of range" in local.stderr and note not in local.stdout
    hub = subprocess.run(
        [sys.executable, str(script), "--model_name_or_path", "ByteDance/Ouro-1.4B", "--output_dir",
         str(tmp_path / "b")], capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert f"ByteDance/Ouro-1.4B {note}" in hub.stdout
