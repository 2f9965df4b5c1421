import json

import pytest

from loopalign.data.schema import RecordError, make_record, validate_record, validate_records, validate_trial


def good(**kw):
    row = {
        "id": "r1",
        "task": "Ann has 3 apples. Ann gets 4 more. How many apples does Ann have now?",
        "gold": "7",
        "answer": "7",
        "label": 1,
        "source": "synthetic",
        "meta": "{}",
        "scenario": "math",
        "parse_status": "ok",
    }
    row.update(kw)
    return row


def test_valid_record_passes_and_make_record_encodes_meta():
    assert validate_record(good()) == good()
    rec = make_record("x", "t?", "", "resp", 0, "s", "safety", "na", {"b": 1, "a": [2]})
    assert json.loads(rec["meta"]) == {"a": [2], "b": 1}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"label": 2}, "label"),
        ({"label": True}, "label"),
        ({"label": "1"}, "label"),
        ({"scenario": "code"}, "scenario"),
        ({"meta": "{not json"}, "meta"),
        ({"meta": "[1, 2]"}, "meta"),
        ({"gold": ""}, "gold"),
        ({"answer": "  "}, "answer"),
        ({"parse_status": "maybe"}, "parse_status"),
        ({"extra": 1}, "extra"),
    ],
)
def test_bad_field_is_named(change, field):
    with pytest.raises(RecordError) as e:
        validate_record(good(**change))
    assert e.value.field == field and e.value.row_id == "r1"
    assert "'r1'" in str(e.value) and field in str(e.value)


def test_missing_field_is_named():
    row = good()
    del row["source"]
    with pytest.raises(RecordError, match="'source'.*missing"):
        validate_record(row)


def test_safety_allows_empty_gold():
    validate_record(good(scenario="safety", gold="", parse_status="na"))


def test_duplicate_ids_and_skip_invalid():
    rows = [good(), good(id="r2"), good(), good(id="r3", label=5)]
    with pytest.raises(RecordError, match="duplicate"):
        validate_records(rows)
    res = validate_records(rows, skip_invalid=True)
    assert [r["id"] for r in res.rows] == ["r1", "r2"]
    assert [(r.row_id, r.field) for r in res.rejected] == [("r1", "id"), ("r3", "label")]


def test_rendered_index_checks():
    row = good(prompt="p", input_ids=[5, 6, 7, 8], verdict_index=3, answer_end_index=1, probe_indices=[1, 3])
    validate_record(row)
    with pytest.raises(RecordError) as e:
        validate_record({**row, "verdict_index": 2})
    assert e.value.field == "verdict_index"
    with pytest.raises(RecordError) as e:
        validate_record({**row, "probe_indices": [3, 1]})
    assert e.value.field == "probe_indices"
    with pytest.raises(RecordError) as e:
        validate_record({**row, "answer_end_index": 3})
    assert e.value.field == "answer_end_index"


def test_trial_validation():
    trial = {
        "id": "t",
        "concept": "Dust",
        "extraction_loop": 1,
        "injection_loop": 3,
        "layer": 0,
        "strength": 2.0,
        "injected": True,
        "trial_type": "injection",
        "prompt": "p",
        "input_ids": [1, 2, 3],
        "injection_start": 1,
        "num_loops": 4,
    }
    validate_trial(trial)
    for change, field in [
        ({"injected": False}, "injected"),
        ({"injection_loop": 4}, "injection_loop"),
        ({"injection_start": 3}, "injection_start"),
        ({"concept": ""}, "concept"),
        ({"trial_type": "other"}, "trial_type"),
    ]:
        with pytest.raises(RecordError) as e:
            validate_trial({**trial, **change})
        assert e.value.field == field
