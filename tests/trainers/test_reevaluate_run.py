"""[ecosystem] item 2: a run folder is complete and re-evaluable. sft-gap keeps its held-out records, the train-split
probe's records, its evaluation settings, every argument and the loss history; `loopalign eval-gap
--model_name_or_path RUN/final` picks them up by itself and reproduces after/ cell for cell."""

import json

import numpy as np

from loopalign.eval import GapResult


def test_eval_gap_of_a_runs_final_folder_reproduces_its_after_evaluation(
    gap_dataset, llama_folder, tmp_path, sft_gap_script, parse_sft_gap, capsys
):
    from loopalign.scripts.eval_gap import main as eval_gap

    rows_path = tmp_path / "rows.jsonl"
    gap_dataset[0].to_json(rows_path)
    out = tmp_path / "run"
    argv = ["--model_name_or_path", str(llama_folder), "--dataset", str(rows_path), "--output_dir", str(out),
            "--max_steps", "2", "--per_device_train_batch_size", "8", "--eval_n_boot", "50", "--use_peft", "true",
            "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--report_to", "none", "--save_strategy",
            "no", "--use_cpu", "true", "--disable_tqdm", "true", "--eval_tp", "false", "--eval_fraction", "0.5",
            "--eval_folds", "3", "--train_split_probe", "true", "--seed", "3"]  # fmt: skip
    sft_gap_script.train_and_compare(*parse_sft_gap(argv))
    printed = capsys.readouterr().out
    assert f"loopalign eval-gap --model_name_or_path {out / 'final'}" in printed
    for name in ("heldout.jsonl", "train_split.jsonl", "eval_args.json", "run_args.json", "log_history.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "run_args.json").read_text())["training"]["seed"] == 3
    assert (out / "before_after.png").stat().st_size > 0 and (out / "before_after.svg").exists()  # the run at a glance
    assert any(k.endswith("loss") for entry in json.loads((out / "log_history.json").read_text()) for k in entry)

    again = tmp_path / "again"
    assert eval_gap(["--model_name_or_path", str(out / "final"), "--output_dir", str(again), "--device", "cpu"]) == 0
    after, redo = GapResult.from_json(out / "after"), GapResult.from_json(again)
    assert redo.records["ids"] == after.records["ids"] and redo.meta["n_records"] == after.meta["n_records"]
    assert redo.table == after.table  # every cell: SV, RR, gap, CIs, yardsticks
    for key in ("sv_prob", "rr_prob", "rr_train_prob"):
        np.testing.assert_array_equal(np.array(redo.records[key], float), np.array(after.records[key], float))
