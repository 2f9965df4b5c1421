"""eval-gap's data: statement families built for the model (their held-out entities; TP asks each entity's
question, none for numeric), your own CSV
through a column map, and a build rendered with another tokenizer refused."""

import csv
import json

import pytest

import loopalign.scripts.eval_gap as eval_gap
from loopalign.data.load import statement_splits


def _run(folder, out, *extra):
    argv = ["--model_name_or_path", str(folder), "--output_dir", str(out), "--eval_n_boot", "50",
            "--eval_folds", "3", *extra]  # fmt: skip
    assert eval_gap.main(argv) == 0
    return json.loads((out / "gap.json").read_text())


@pytest.mark.slow
def test_eval_gap_on_statement_families_reads_their_held_out_entities_without_tp(llama_folder, tok, tmp_path, capsys):
    gap = _run(llama_folder, tmp_path / "out", "--dataset", "statements:numeric", "--dataset_limit", "40")
    _, held_out = statement_splits("statements:numeric", tok, 40, eval_gap.STATEMENT_EVAL_FRACTION)
    assert sorted(gap["records"]["ids"]) == sorted(held_out["id"]) and gap["tp"] is None
    printed = capsys.readouterr().out  # numeric statements have no question to answer: said, not dropped silently
    assert f"statements without a question, not in TP: numeric {len(held_out)} records" in printed
    assert "TP: not measured" in printed


@pytest.mark.slow
def test_eval_gap_measures_tp_on_statements_by_asking_each_entitys_question(llama_folder, tok, tmp_path):
    """TP on statements: the model answers "What is the capital of X?" for each held-out entity (one question for the
    true and the false statement about it, and for the negated family's), scored against the records' gold."""
    gap = _run(llama_folder, tmp_path / "out", "--dataset", "statements:capital,negated_capital",
               "--dataset_limit", "40", "--tp_max_new_tokens", "4")  # fmt: skip
    _, held_out = statement_splits("statements:capital,negated_capital", tok, 40, eval_gap.STATEMENT_EVAL_FRACTION)
    entities = {json.loads(m)["entity"] for m in held_out["meta"]}
    (row,) = gap["tp"]  # a plain model: one loop
    assert row["loop"] == 1 and row["n"] == len(entities) and row["max_new_tokens"] == 4
    # named by the first record about each entity (the capital family's true statement comes first)
    assert sorted(row["task_ids"]) == sorted(f"capital/{e}/true" for e in entities)
    assert 0.0 <= row["accuracy"] <= 1.0 and len(row["texts"]) == len(entities)
    # compared with itself, TP enters the verdict rule with each question in its entity's bootstrap cluster
    _run(llama_folder, tmp_path / "again", "--dataset", "statements:capital,negated_capital", "--dataset_limit", "40",
         "--tp_max_new_tokens", "4", "--compare", str(tmp_path / "out"))  # fmt: skip
    comparison = json.loads((tmp_path / "again" / "compare.json").read_text())
    (tp,) = comparison["tp"]
    assert tp["n_tasks"] == len(entities) and tp["n_tp_only_clusters"] == 0 and tp["d_tp"] == 0.0
    assert comparison["tp_measured"]  # part (d) of the rule reads it


@pytest.mark.slow
def test_eval_gap_reads_your_own_csv_through_a_column_map(llama_folder, tmp_path):
    with open(tmp_path / "claims.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["claim", "truth", "thing"])
        for i in range(12):
            writer.writerow([f"{i} is smaller than {i + 5}.", 1, f"n{i}"])
            writer.writerow([f"{i} is larger than {i + 5}.", 0, f"n{i}"])
    gap = _run(llama_folder, tmp_path / "out", "--dataset", str(tmp_path / "claims.csv"),
               "--dataset_columns", "statement=claim,label=truth,cluster=thing")  # fmt: skip
    assert gap["meta"]["n_records"] == 24 and len(set(gap["records"]["clusters"])) == 12


def test_a_dataset_rendered_with_another_tokenizer_is_refused(llama_folder, tok, tmp_path):
    _, held_out = statement_splits("statements:numeric", tok, 40, 0.3)
    rows = held_out.map(lambda r: {"input_ids": [i + 1 for i in r["input_ids"]]})  # another vocabulary's ids
    rows.to_json(tmp_path / "rows.jsonl")
    with pytest.raises(ValueError, match="rendered with another tokenizer"):
        eval_gap.main(["--model_name_or_path", str(llama_folder), "--dataset", str(tmp_path / "rows.jsonl"),
                       "--output_dir", str(tmp_path / "out")])  # fmt: skip
