"""Your own data without Python: sft-gap reads a .csv / .jsonl of statements (or task/answer/label rows) through a
column map, renders it with the model's chat template, reports counts and rejected rows, and trains."""

import csv
import json

import pytest


def _statements(path, bad_row: bool = False):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["claim", "truth", "thing"])
        for i in range(40):
            writer.writerow([f"{i} is smaller than {i + 5}.", 1, f"n{i}"])
            writer.writerow([f"{i} is larger than {i + 5}.", 0, f"n{i}"])
        if bad_row:
            writer.writerow(["A claim with no label.", "maybe", "x"])


def _argv(folder, data, out, *extra):
    return ["--model_name_or_path", str(folder), "--dataset", str(data), "--output_dir", str(out),
            "--dataset_columns", "statement=claim,label=truth,cluster=thing", "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--eval_n_boot", "50", "--use_peft", "true", "--lora_r", "4",
            "--lora_target_modules", "q_proj", "v_proj", "--report_to", "none", "--save_strategy", "no",
            "--use_cpu", "true", "--disable_tqdm", "true", *extra]  # fmt: skip


@pytest.mark.slow
def test_sft_gap_trains_on_a_csv_of_statements_through_a_column_map(
    llama_folder, tmp_path, sft_gap_script, parse_sft_gap, capsys, caplog
):
    caplog.set_level("INFO", logger="loopalign")
    _statements(tmp_path / "claims.csv", bad_row=True)
    out = tmp_path / "run"
    argv = _argv(llama_folder, tmp_path / "claims.csv", out, "--skip_invalid_rows", "true")
    sft_gap_script.train_and_compare(*parse_sft_gap(argv))
    printed = capsys.readouterr().out
    assert "81 rows read, 80 kept, 1 rejected" in printed and "statement" in printed
    # statements of your own table name no family, so no question: TP is not measured, and the log says why
    assert "statements without a question, not in TP: (no family)" in caplog.text
    assert json.loads((out / "compare.json").read_text())["tp"] == []
    gap = json.loads((out / "before" / "gap.json").read_text())
    # the cluster column groups the bootstrap and the split: both claims about one number stay together
    clusters = gap["records"]["clusters"]
    assert len(clusters) == 2 * len(set(clusters))


def test_a_bad_row_or_map_fails_before_the_model_is_evaluated(llama_folder, tmp_path, sft_gap_script, parse_sft_gap):
    _statements(tmp_path / "claims.csv", bad_row=True)
    with pytest.raises(ValueError, match="label"):
        sft_gap_script.train_and_compare(*parse_sft_gap(_argv(llama_folder, tmp_path / "claims.csv", tmp_path / "o")))
    assert not (tmp_path / "o" / "before").exists()
    with pytest.raises(ValueError, match="nonsense"):
        parse_sft_gap(["--dataset_columns", "nonsense=x,label=y"])
    with pytest.raises(ValueError, match="dataset_scenario must be one of"):
        parse_sft_gap(["--dataset_scenario", "poetry"])
