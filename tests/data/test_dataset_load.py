"""The one --dataset resolver (loopalign.data.load): every spec named the same way in eval-gap and sft-gap, the same
records for the same spec in both, and a spec that names nothing refused before any model loads, naming it."""

import logging

import datasets
import pytest

import loopalign.scripts.eval_gap as eval_gap
import loopalign.scripts.sft_gap as sft_gap
from loopalign.data.load import (
    DATASET_KINDS,
    DatasetRequest,
    dataset_kind,
    load_dataset_splits,
    split_by_task,
)
from loopalign.errors import ConfigError, DataError
from loopalign.trainers import GapSFTConfig


def _rows(n_tasks=6):
    return [
        {"id": f"t{t}-{k}", "task": f"t{t}", "label": k, "input_ids": [1, 2, 3], "prompt": "p"}
        for t in range(n_tasks)
        for k in (0, 1)
    ]


def test_every_spec_has_one_kind_and_a_spec_naming_nothing_fails_naming_it(tmp_path, fixtures_dir):
    build = tmp_path / "build"
    build.mkdir()
    (build / "metadata.json").write_text("{}")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(_rows()).save_to_disk(str(saved))
    records = tmp_path / "records.jsonl"
    records.write_text("{}\n")
    table = tmp_path / "mine.csv"
    table.write_text("claim,ok\nx,1\n")
    solutions = fixtures_dir / "data" / "gsm8k" / "example_model_solutions.jsonl"
    kinds = {
        "organism": dataset_kind("organism"),
        "synthetic": dataset_kind("synthetic"),
        "statements": dataset_kind("statements:numeric,capital"),
        "build": dataset_kind(str(build)),
        "saved": dataset_kind(str(saved)),
        "records": dataset_kind(str(records)),
        "table": dataset_kind(str(table), "statement=claim,label=ok"),
        "source": dataset_kind(f"gsm8k-solutions:{solutions}"),
    }
    assert kinds == {k: k for k in kinds} and set(kinds) == set(DATASET_KINDS)
    assert dataset_kind("statements") == "statements"
    for spec, columns, message in (
        ("openai/gsm8k", None, "is read through its source"),  # a bare hub name: say how to name it
        ("nosuch:thing", None, "unknown source 'nosuch'"),
        ("table:mine.csv", None, "--dataset mine.csv --dataset_columns MAP"),
        (str(tmp_path / "missing.jsonl"), None, "missing.jsonl' does not exist"),
        (str(table), None, "read your own .csv with --dataset_columns"),
        (str(tmp_path / "missing.csv"), "statement=claim,label=ok", "is not a file"),
    ):
        with pytest.raises(DataError, match=message):
            dataset_kind(spec, columns)
    with pytest.raises(ConfigError, match="eval_fraction"):
        DatasetRequest("synthetic", eval_fraction=1.0)
    with pytest.raises(ConfigError, match="dataset_limit"):
        DatasetRequest("synthetic", limit=0)


def test_the_task_split_keeps_every_answer_to_a_task_on_one_side_and_is_seeded():
    data = datasets.Dataset.from_list(_rows(10))
    train, held_out = split_by_task(data, 0.3, seed=1)
    assert not set(train["task"]) & set(held_out["task"]) and len(set(held_out["task"])) == 3
    assert split_by_task(data, 0.3, seed=1)[1]["id"] == held_out["id"]
    assert split_by_task(data, 0.3, seed=2)[1]["id"] != held_out["id"]
    with pytest.raises(DataError, match="one class"):
        split_by_task(data.filter(lambda r: r["label"] == 1), 0.3)


def test_the_organism_spec_needs_a_digit_task_organism(tok):
    with pytest.raises(ConfigError, match="needs a gap organism"):
        load_dataset_splits(DatasetRequest("organism"), tok, organism=None)


def _sft(tmp_path, seed=0, **script):
    args = sft_gap.GapScriptArguments(**script)
    training = GapSFTConfig(output_dir=str(tmp_path / "sft"), use_cpu=True, report_to=[], seed=seed)
    return args, training


@pytest.mark.slow
def test_statements_are_the_same_held_out_records_in_eval_gap_and_sft_gap(llama_folder, tok, tmp_path):
    evaluated, group_by = eval_gap.load_records(
        eval_gap.EvalGapScriptArguments(
            model_name_or_path=str(llama_folder), dataset="statements:numeric", dataset_limit=40
        ),
        tok,
    )
    args, training = _sft(tmp_path, dataset="statements:numeric", dataset_limit=40)
    train, held_out = sft_gap.load_datasets(args, str(llama_folder), tok, training)
    assert group_by == "task" and evaluated["id"] == held_out["id"] and not set(train["id"]) & set(held_out["id"])


@pytest.mark.slow
def test_a_source_spec_is_built_once_and_read_alike_by_eval_gap_and_sft_gap(tok, tmp_path, fixtures_dir, caplog):
    """SOURCE:PATH (sft-gap's build-on-the-fly spec) works in eval-gap too: with the same limit and seed, the same
    build and the same records."""
    spec = f"gsm8k-solutions:{fixtures_dir / 'data' / 'gsm8k' / 'example_model_solutions.jsonl'}"
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="loopalign")
    evaluated, _ = eval_gap.load_records(
        eval_gap.EvalGapScriptArguments(model_name_or_path="tiny", dataset=spec, data_seed=0, output_dir=str(out)),
        tok,
    )
    assert (out / "data" / "metadata.json").exists() and set(evaluated["source"]) == {"gsm8k-solutions"}
    caplog.clear()
    args, training = _sft(tmp_path, dataset=spec, dataset_limit=300)  # eval-gap's default limit; its data_seed 0
    training.output_dir = str(out)  # the same folder: the build there is reused, not made again
    train, held_out = sft_gap.load_datasets(args, "tiny", tok, training)
    assert "reusing the verification build" in caplog.text
    assert sorted([*train["id"], *held_out["id"]]) == sorted(evaluated["id"])


@pytest.mark.parametrize("command", ["eval-gap", "sft-gap"])
def test_a_dataset_that_names_nothing_stops_both_commands_before_the_model_loads(command, tmp_path, capsys):
    main = eval_gap.main if command == "eval-gap" else sft_gap.main
    argv = ["--model_name_or_path", "tiny", "--output_dir", str(tmp_path / "out")]
    for spec, message in (("nosuch:thing", "unknown source 'nosuch'"), ("no_such.jsonl", "does not exist")):
        with pytest.raises(SystemExit) as stop:
            main([*argv, "--dataset", spec])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
