import collections
import json

import pytest

from loopalign.data.io import SourceError
from loopalign.data.schema import RecordError, meta_dict, validate_records
from loopalign.data.sources import (
    PKU_SAFERLHF,
    FieldMap,
    load_gsm8k,
    load_gsm8k_solutions,
    load_math,
    load_safety_pairs,
    load_safety_prompts,
    load_xstest_completions,
)
from loopalign.data.verifiers import verify_math


def test_gsm8k_problems(fixtures):
    res = load_gsm8k(str(fixtures / "gsm8k" / "test.jsonl"))
    lines = (fixtures / "gsm8k" / "test.jsonl").read_text().splitlines()
    assert len(res) == len(lines) == 6 and not res.rejected
    for p, line in zip(res.items, lines):
        assert p.gold == json.loads(line)["answer"].split("####")[-1].strip().replace(",", "")
        assert p.scenario == "math" and p.id.startswith("gsm8k-test-")
    assert res.items[0].gold == "18" and res.items[0].meta["last_op"] == ["9", "*", "2"]


def test_gsm8k_bad_rows_name_id_and_field(tmp_path, fixtures):
    rows = (fixtures / "gsm8k" / "test.jsonl").read_text().splitlines()[:2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "\n".join(rows + [json.dumps({"question": "Q?", "answer": "no final line"}), json.dumps({"answer": "#### 3"})])
    )
    with pytest.raises(RecordError) as e:
        load_gsm8k(str(bad))
    assert (e.value.row_id, e.value.field) == ("gsm8k-test-2", "answer")
    res = load_gsm8k(str(bad), skip_invalid=True)
    assert len(res) == 2
    assert [(r.row_id, r.field) for r in res.rejected] == [("gsm8k-test-2", "answer"), ("gsm8k-test-3", "question")]


def test_gsm8k_solutions_fixture(fixtures):
    res = load_gsm8k_solutions(str(fixtures / "gsm8k" / "example_model_solutions.jsonl"))
    rows = [json.loads(x) for x in (fixtures / "gsm8k" / "example_model_solutions.jsonl").read_text().splitlines()]
    assert len(res) == 4 * len(rows)
    validate_records(res.items)
    by_id = {r["id"]: r for r in res.items}
    rec = by_id["gsm8k-sol-0-175b_verification"]
    assert rec["label"] == int(rows[0]["175b_verification"]["is_correct"])
    assert rec["answer"] == rows[0]["175b_verification"]["solution"] and rec["gold"] == "18"
    assert meta_dict(rec)["model"] == "175b_verification"


def test_math_fixture(fixtures):
    res = load_math(str(fixtures / "math" / "math_sample.jsonl"))
    assert [p.gold for p in res.items] == ["0.75", "132", "1", r"\frac{x}{2}+1"]
    assert res.items[0].meta["level"] == "Level 1"


def test_xstest_completions_labels(fixtures):
    res = load_xstest_completions(fixtures / "xstest" / "model_completions")
    validate_records(res.items)
    seen = set()
    for r in res.items:
        m = meta_dict(r)
        unsafe = m["type"].startswith("contrast_")
        refused = m["final_label"] != "1_full_compliance"
        assert r["label"] == int(refused == unsafe), r["id"]
        assert r["gold"] == "" and r["scenario"] == "safety"
        seen.add((unsafe, m["final_label"], r["label"]))
    # partial refusal: inappropriate on a safe prompt, appropriate on an unsafe one
    assert (False, "3_partial_refusal", 0) in seen and (True, "3_partial_refusal", 1) in seen
    assert (True, "1_full_compliance", 0) in seen and (False, "1_full_compliance", 1) in seen
    assert {meta_dict(r)["model"] for r in res.items} == {"gpt4", "mistralinstruct"}


def test_xstest_prompts(fixtures):
    res = load_safety_prompts(str(fixtures / "xstest" / "xstest_prompts.csv"))
    labels = collections.Counter(p.meta["prompt_label"] for p in res.items)
    assert labels == {"safe": 3, "unsafe": 3}
    assert all(p.gold == "" and p.scenario == "safety" for p in res.items)
    assert all((p.meta["prompt_label"] == "unsafe") == p.meta["type"].startswith("contrast_") for p in res.items)


def test_safety_pairs_field_maps(fixtures):
    bt = load_safety_pairs(str(fixtures / "safety" / "beavertails_style.jsonl"), "beavertails")
    assert [r["label"] for r in bt.items] == [1, 0, 1]
    assert "category" in meta_dict(bt.items[1])
    pku = load_safety_pairs(str(fixtures / "safety" / "pku_saferlhf_style.jsonl"), PKU_SAFERLHF)
    assert [r["label"] for r in pku.items] == [1, 0, 1, 1]
    assert pku.items[1]["answer"].startswith("Put something")
    with pytest.raises(RecordError) as e:
        load_safety_pairs(
            str(fixtures / "safety" / "beavertails_style.jsonl"), FieldMap(responses=(("response", "safe"),))
        )
    assert e.value.field == "safe"
    with pytest.raises(ValueError, match="responses"):
        FieldMap(responses=(("only_one",),))


def test_hub_name_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="offline.*local"):
        load_gsm8k("openai/gsm8k")
    with pytest.raises(SourceError, match="not found"):
        load_gsm8k("./missing/test.jsonl")


def test_full_shared_files(shared):
    sol = load_gsm8k_solutions(str(shared / "gsm8k" / "example_model_solutions.jsonl"))
    assert len(sol) == 5276 and not sol.rejected
    assert all(r["parse_status"] == "ok" for r in sol.items)
    agree = sum(meta_dict(r)["verifier_label"] == r["label"] for r in sol.items)
    assert agree == 5276
    # cut-off chains of thought: the lenient reader takes an intermediate number for the answer and
    # marks some "correct"; the reader of sampled candidates never does
    for frac in (0.5, 0.8):
        cut = [(r["answer"][: int(len(r["answer"]) * frac)], r["gold"]) for r in sol.items]
        assert sum(verify_math(a, g, lenient=True).label for a, g in cut) > 100
        assert sum(verify_math(a, g, lenient="whole").label for a, g in cut) == 0
    xs = load_xstest_completions(shared / "xstest" / "model_completions")
    assert len(xs) == 2250 and not xs.rejected
    assert len({r["id"] for r in xs.items}) == 2250
    assert len(load_gsm8k(str(shared / "gsm8k" / "test.jsonl"))) == 1319
    assert len(load_safety_prompts(str(shared / "xstest" / "xstest_prompts.csv"))) == 450
