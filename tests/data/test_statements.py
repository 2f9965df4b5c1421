"""The statement scenario and the true/false statement families (loopalign.data.sources.statements)."""

import copy
import json
import re
from collections import Counter, defaultdict

import pytest

from loopalign.data.prompts import PromptTemplate, load_template, render_record, render_records
from loopalign.data.schema import RecordError, make_record, meta_dict, validate_record
from loopalign.data.sources import Problem
from loopalign.data.sources.statements import (
    FAMILIES,
    check_statement_options,
    entity_split,
    family_entities,
    select_statements,
    statement_counts,
    statement_question,
    statement_records,
    statement_tasks,
)


@pytest.fixture(scope="module")
def records():
    return statement_records(list(FAMILIES), per_family=120, seed=0)


def _by_family(rows):
    out = defaultdict(list)
    for r in rows:
        out[meta_dict(r)["family"]].append(r)
    return out


def test_every_family_every_split_and_every_entity_is_balanced(records):
    families = _by_family(records)
    assert sorted(families) == sorted(FAMILIES)
    for name, rows in families.items():
        assert len(rows) == 120, name
        for split in ("train", "eval"):
            labels = Counter(r["label"] for r in rows if meta_dict(r)["split"] == split)
            assert labels[0] == labels[1] > 0, (name, split, labels)
        per_entity = defaultdict(list)
        for r in rows:
            per_entity[r["task"]].append(r["label"])
        assert all(sorted(labels) == [0, 1] for labels in per_entity.values()), name
    assert statement_counts(records)["family"]["capital"]["train"]["1"] == sum(
        r["label"] for r in select_statements(records, ["capital"], "train")
    )


def test_no_entity_is_in_both_splits_in_any_family(records):
    split_of = defaultdict(set)
    for r in records:
        m = meta_dict(r)
        split_of[(m["kind"], m["entity"])].add(m["split"])
        split_of[("task", r["task"])].add(m["split"])  # the cluster id: one entity, one task, one side
    assert all(len(s) == 1 for s in split_of.values())
    # the split is the entity's, whatever the family's size: a larger build holds the same entities out
    larger = statement_records(["city_country", "capital"], per_family=300, seed=0)
    for r in larger:
        m = meta_dict(r)
        assert m["split"] == entity_split(m["kind"], m["entity"], 0, 0.2)
        if (m["kind"], m["entity"]) in split_of:
            assert split_of[(m["kind"], m["entity"])] == {m["split"]}
    eval_share = sum(meta_dict(r)["split"] == "eval" for r in larger) / len(larger)
    assert 0.1 < eval_share < 0.3


def test_the_same_seed_gives_the_same_records_and_another_seed_other_ones(records):
    again = statement_records(list(FAMILIES), per_family=120, seed=0)
    assert json.dumps(again, sort_keys=True) == json.dumps(records, sort_keys=True)
    other = statement_records(list(FAMILIES), per_family=120, seed=1)
    assert [r["answer"] for r in other] != [r["answer"] for r in records]


@pytest.mark.parametrize("affirmative,negated", [("city_country", "negated_city"), ("capital", "negated_capital")])
def test_negation_flips_the_label_of_the_same_claim(records, affirmative, negated):
    families = _by_family(records)
    plain = {r["answer"]: r["label"] for r in families[affirmative]}
    assert len(families[negated]) == len(plain)
    for r in families[negated]:
        assert meta_dict(r)["negated"] is True
        claim = r["answer"].replace(" is not ", " is ", 1)
        assert claim in plain, r["answer"]
        assert r["label"] == 1 - plain[claim]


def test_false_statements_name_another_entity_of_the_same_kind(records):
    families = _by_family(records)
    for name in ("city_country", "capital", "continent"):
        rows = families[name]
        true_objects = {meta_dict(r)["object"] for r in rows if r["label"] == 1}
        for r in rows:
            m = meta_dict(r)
            assert (m["object"] == r["gold"]) == (r["label"] == 1), r["id"]
            if r["label"] == 0:
                assert m["object"] in true_objects, (name, m["object"])  # a value some entity of the family has
    cities = {e.key: e for e in family_entities("city_country")}
    for r in families["city_country"]:
        m = meta_dict(r)
        if r["label"] == 0:  # never a country that has a city of the same name
            assert m["object"] not in cities[m["entity"]].excluded


def test_numeric_statements_are_true_exactly_when_the_comparison_holds(records):
    rows = _by_family(records)["numeric"]
    for r in rows:
        a, relation, b = re.fullmatch(r"(\d+) is (greater|less) than (\d+)\.", r["answer"]).groups()
        assert r["label"] == int(int(a) > int(b) if relation == "greater" else int(a) < int(b)), r["answer"]
    assert {meta_dict(r)["split"] for r in rows} == {"train", "eval"}


def test_records_are_statement_records_clustered_by_entity(records):
    for r in records[:40]:
        assert r["scenario"] == "statement" and r["parse_status"] == "na"
        assert r["source"] == f"statements-{meta_dict(r)['family']}"
    tasks = defaultdict(set)  # an entity's statements in every family share one task (its cluster), and only they
    for r in records:
        m = meta_dict(r)
        tasks[(m["kind"], m["entity"])].add(r["task"])
    assert all(len(t) == 1 for t in tasks.values())
    assert len({next(iter(t)) for t in tasks.values()}) == len(tasks)
    first_city = meta_dict(records[0])["entity"]
    city_families = {meta_dict(r)["family"] for r in records if meta_dict(r)["entity"] == first_city}
    assert city_families == {"city_country", "negated_city"}
    with pytest.raises(RecordError, match="parse_status"):
        make_record("x", "Tell me about 7.", "", "7 is less than 9.", 1, "s", "statement", "ok")
    assert validate_record(make_record("x", "Tell me about 7.", "", "7 is less than 9.", 1, "s", "statement", "na"))
    with pytest.raises(RecordError, match="scenario"):  # a problem is answered by candidates; a statement is not
        Problem("p", "Tell me about 7.", "", "s", scenario="statement")


def _check_positions(rec, tok):
    ids = rec["input_ids"]
    assert rec["verdict_index"] == len(ids) - 1
    assert rec["probe_indices"] == [rec["answer_end_index"], rec["verdict_index"]]
    # the probe position is the statement's last token: text up to it ends with the statement, before it does not
    assert tok.decode(ids[: rec["answer_end_index"] + 1]).rstrip().endswith(rec["answer"])
    assert not tok.decode(ids[: rec["answer_end_index"]]).rstrip().endswith(rec["answer"])
    assert tok.decode(ids) == rec["prompt"]


def test_rendered_positions_point_at_the_statement_end_and_the_verdict(records, tok):
    rows = [r for name, rs in _by_family(records).items() for r in rs[:6]]
    rendered, rejected = render_records(rows, tok)
    assert not rejected
    for r in rendered:
        _check_positions(r, tok)
        assert f"Statement: {r['answer']}\nIs the statement true?" in r["prompt"]
        assert r["task"] not in r["prompt"]  # the entity request is the cluster, not part of the prompt
        assert r["prompt"].endswith(
            "<|im_start|>assistant\n"
        )  # the chat template's generation prompt: the verdict next


def test_positions_without_a_chat_template_and_with_an_overridden_template(records, tok, tmp_path):
    raw = copy.deepcopy(tok)
    raw.chat_template = None  # a base model's tokenizer: the template's suffix asks for the verdict
    record = records[0]
    out = render_record(record, raw)
    _check_positions(out, raw)
    assert out["prompt"].endswith("Yes or No.\nVerdict:")

    path = tmp_path / "template.yaml"
    path.write_text('statement: "Claim: {statement}\\nTrue or false? Answer Yes or No."\n')
    template = load_template(path)
    custom = render_record(record, tok, template)
    _check_positions(custom, tok)
    assert f"Claim: {record['answer']}\nTrue or false?" in custom["prompt"]
    math_default = PromptTemplate().math
    assert template.math == math_default  # the other scenarios keep their templates
    with pytest.raises(ValueError, match=r"PromptTemplate.statement must contain \{statement\}"):
        PromptTemplate(statement="{task}: {statement}")


@pytest.mark.parametrize(
    "families,per_family,eval_fraction,option",
    [
        ("city_country,atlantis", 10, 0.2, "families"),
        ("", 10, 0.2, "families"),
        ("capital,capital", 10, 0.2, "families"),
        ("capital", 11, 0.2, "per_family"),
        ("capital", 0, 0.2, "per_family"),
        ("capital", 100000, 0.2, "per_family"),
        ("numeric", 10, 1.0, "eval_fraction"),
        ("numeric", 10, 0, "eval_fraction"),
    ],
)
def test_bad_options_are_named(families, per_family, eval_fraction, option):
    with pytest.raises(ValueError, match=rf"^{option}"):
        check_statement_options(families, per_family, eval_fraction)
    with pytest.raises(ValueError, match=rf"^{option}"):
        statement_records(families, per_family, 0, eval_fraction)


def test_select_statements_filters_by_family_and_split(records):
    chosen = select_statements(records, ["numeric", "continent"], "eval")
    assert chosen and all(meta_dict(r)["family"] in ("numeric", "continent") for r in chosen)
    assert all(meta_dict(r)["split"] == "eval" for r in chosen)
    assert len(select_statements(records)) == len(records)
    with pytest.raises(ValueError, match="split"):
        select_statements(records, split="test")


def test_tp_asks_each_entity_its_familys_question_once_for_both_polarities(records):
    """TP on statements: one question per relation and entity, whose gold is the records' gold; negated families ask
    their affirmative family's question (no second task for the same fact); numeric has none and is counted."""
    tasks, without = statement_tasks(records)
    assert without == {"numeric": 120}
    by_id = {r["id"]: r for r in records}
    asked = [(FAMILIES[meta_dict(by_id[t[0]])["family"]].relation, meta_dict(by_id[t[0]])["entity"]) for t in tasks]
    expected = {
        (FAMILIES[meta_dict(r)["family"]].relation, meta_dict(r)["entity"])
        for r in records
        if meta_dict(r)["family"] != "numeric"
    }
    assert len(asked) == len(set(asked)) and set(asked) == expected  # negated families add no task of their own
    first = {}  # a task is named by the first record that asks it (its cluster is that record's)
    for r in records:
        if meta_dict(r)["family"] != "numeric":
            first.setdefault((FAMILIES[meta_dict(r)["family"]].relation, meta_dict(r)["entity"]), r["id"])
    assert [t[0] for t in tasks] == [first[k] for k in asked]
    for task_id, question, answer in tasks:
        assert answer == by_id[task_id]["gold"] and question.endswith("only.")
    capital = next(t for t in tasks if t[0].startswith("capital/"))
    assert capital[1].startswith("What is the capital of ")
    assert statement_question("negated_capital", "France") == statement_question("capital", "France")
    assert "the Philippines" in statement_question("continent", "Philippines")
    assert "city of Lyon" in statement_question("negated_city", "Lyon")
    assert statement_question("numeric", "417") is None
    with pytest.raises(ValueError, match="unknown statement family 'poetry'"):
        statement_question("poetry", "x")


def test_statements_of_your_own_table_have_no_question_and_are_counted():
    own = make_record("claim/1", "n1", "6", "1 is smaller than 6.", 1, "table", "statement", "na", {"cluster": "n1"})
    assert statement_tasks([own, dict(own, id="claim/2")]) == ([], {"(no family)": 2})


def test_statements_only_reads_a_dataset_or_a_list_of_records(records):
    """TP's choice between the records' own tasks and the entities' questions: every record a statement, in a
    datasets.Dataset or a plain list; an empty set or one other record is not."""
    import datasets

    from loopalign.data.load import statements_only

    task = make_record("t/1", "What is 2 + 3?", "5", "The answer is 5.", 1, "synthetic", "math", "ok", {})
    assert statements_only(records) and statements_only(datasets.Dataset.from_list(records))
    assert not statements_only([*records, task]) and not statements_only(datasets.Dataset.from_list([*records, task]))
    assert not statements_only([]) and not statements_only(datasets.Dataset.from_list([]))
