"""A user's own .jsonl / .csv file through a column map (loopalign.data.sources.table), in memory and as a build."""

import json

import pytest

from data_builders import verification
from loopalign.data.io import SourceError, load_build
from loopalign.data.load import load_rendered
from loopalign.data.schema import RecordError, meta_dict
from loopalign.data.sources.table import ColumnMap, load_table, parse_column_map
from loopalign.data.verification import table_verification_records

CSV = (
    "qid,question,response,reference,verdict,topic,annotator\n"
    "q1,What is 2 + 3?,5,5,yes,sums,ann\n"
    'q2,What is 2 + 3?,"It is 6, I think",5,No,sums,bob\n'
    "q3,What is 7 x 6?,42,42,TRUE,products,ann\n"
    "q4,What is 7 x 6?,48,42,0,products,ann\n"
)
MATH = "id=qid,task=question,answer=response,gold=reference,label=verdict,cluster=topic"


@pytest.fixture
def csv_file(tmp_path):
    path = tmp_path / "my rows.csv"
    path.write_text(CSV, encoding="utf-8")
    return path


@pytest.fixture
def statements_file(tmp_path):
    rows = [
        {"claim": "Paris is a city in France.", "truth": True, "subject": "Paris"},
        {"claim": "Paris is a city in Peru.", "truth": False, "subject": "Paris"},
        {"claim": "Lima is a city in Peru.", "truth": 1, "subject": "Lima", "note": "kept in meta"},
        {"claim": "Lima is a city in Spain.", "truth": "false", "subject": "Lima"},
    ]
    path = tmp_path / "claims.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_csv_of_task_answer_label_rows_becomes_math_records(csv_file):
    result = load_table(csv_file, MATH)
    assert result.n_read == 4 and not result.rejected
    rows = result.items
    assert [r["id"] for r in rows] == ["q1", "q2", "q3", "q4"]
    assert [r["label"] for r in rows] == [1, 0, 1, 0]
    assert {r["scenario"] for r in rows} == {"math"} and rows[1]["answer"] == "It is 6, I think"
    assert rows[0]["gold"] == "5" and rows[0]["source"] == "my rows.csv"
    assert meta_dict(rows[1]) == {"annotator": "bob", "cluster": "sums", "row": 2}  # nothing the file holds is lost


def test_a_jsonl_of_statements_clusters_by_its_cluster_column(statements_file):
    rows = load_table(statements_file, "statement=claim,label=truth,cluster=subject").items
    assert [r["label"] for r in rows] == [1, 0, 1, 0]
    assert [r["task"] for r in rows] == ["Paris", "Paris", "Lima", "Lima"]  # the cluster every consumer groups by
    assert {r["scenario"] for r in rows} == {"statement"} and rows[0]["answer"] == "Paris is a city in France."
    assert meta_dict(rows[2])["note"] == "kept in meta" and rows[0]["id"] == "claims:1"
    alone = load_table(statements_file, "statement=claim,label=truth").items  # no cluster: each claim its own
    assert [r["task"] for r in alone] == [r["answer"] for r in alone]


def test_rendered_in_memory_with_a_report(csv_file, statements_file, tok):
    rendered, report = table_verification_records(
        tok, str(statements_file), "statement=claim,label=truth,cluster=subject"
    )
    assert report["read"] == report["kept"] == 4 and report["rejected"] == 0 and report["scenario"] == "statement"
    for r in rendered:
        assert r["verdict_index"] == len(r["input_ids"]) - 1
        assert tok.decode(r["input_ids"][: r["answer_end_index"] + 1]).endswith(r["answer"])
        assert "Is the statement true?" in r["prompt"]
    math, _ = table_verification_records(tok, str(csv_file), MATH)
    assert all("Proposed answer" in r["prompt"] for r in math)


def test_a_bad_row_is_named_or_skipped_and_counted(tmp_path, tok):
    path = tmp_path / "rows.csv"
    path.write_text(CSV + "q5,What is 1 + 1?,2,2,maybe,sums,ann\nq6,What is 1 + 1?,,2,1,sums,ann\n")
    with pytest.raises(RecordError) as err:
        load_table(path, MATH)
    assert err.value.row_id == "q5" and err.value.field == "verdict" and "maybe" in str(err.value)
    result = load_table(path, MATH, skip_invalid=True)
    assert len(result.items) == 4 and result.n_read == 6
    assert sorted((r.row_id, r.field) for r in result.rejected) == [("q5", "verdict"), ("q6", "response")]
    _, report = table_verification_records(tok, str(path), MATH, skip_invalid=True)
    assert report["read"] == 6 and report["kept"] == 4 and report["rejected"] == 2
    assert report["rejected_by_reason"] == {
        "response: empty": 1,
        "verdict: label must be one of 1/0, true/false, yes/no, correct/incorrect": 1,
    }


@pytest.mark.parametrize(
    "columns,scenario,message",
    [
        ("task=question,answer=response,label=verdict", None, "gold=COLUMN"),
        ("task=question,answer=response,label=verdict,gold=nope", None, "has no column 'nope'"),
        ("task=question,answer=response", None, "label"),
        ("task=question,answer=response,label=verdict,colour=x", None, "unknown field 'colour'"),
        ("task=question,answer,label=verdict", None, "FIELD=COLUMN"),
        ("statement=question,label=verdict", "math", "statement"),
        ("statement=question,answer=response,label=verdict", None, "takes no task, answer or gold"),
        ("task=question,task=response,label=verdict", None, "mapped twice"),
    ],
)
def test_a_bad_column_map_fails_before_any_row(csv_file, columns, scenario, message):
    with pytest.raises(ValueError, match="columns|scenario") as err:
        load_table(csv_file, columns, scenario)
    assert message in str(err.value)


def test_safety_rows_need_no_gold_and_other_files_are_refused(csv_file, tmp_path):
    rows = load_table(csv_file, "task=question,answer=response,label=verdict", "safety").items
    assert {r["scenario"] for r in rows} == {"safety"} and {r["gold"] for r in rows} == {""}
    other = tmp_path / "rows.parquet"
    other.write_bytes(b"")
    with pytest.raises(SourceError, match=r"\.jsonl or \.csv"):
        load_table(other, "statement=a,label=b")
    assert parse_column_map({"statement": "a", "label": "b"}) == ColumnMap(statement="a", label="b")


def test_the_builder_writes_a_build_that_the_evaluation_reads(csv_file, tmp_path, capsys):
    out = tmp_path / "build"
    argv = ["--source", "table", "--path", str(csv_file), "--columns", MATH, "--render", "--out", str(out)]
    assert verification.main(argv) == 0
    ds, meta = load_build(out)
    assert len(ds) == 4 and meta["counts"]["label=1"] == 2 and meta["settings"]["columns"] == MATH
    assert len(load_rendered(str(out))) == 4
    # a bad combination is a usage error (exit status 2) of the command's parser, before any row is read
    bad_map = ["--source", "table", "--path", str(csv_file), "--columns", "task=question", "--out", str(tmp_path / "y")]
    for argv, fragment in (
        (["--source", "table", "--path", str(csv_file), "--out", str(tmp_path / "x")], "--columns"),
        (bad_map, "--columns"),
        (["--source", "synthetic", "--columns", MATH, "--out", str(tmp_path / "z")], "--source table"),
    ):
        with pytest.raises(SystemExit) as stop:
            verification.main(argv)
        assert stop.value.code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
