import pytest

from loopalign.data.sources import load_gsm8k_solutions
from loopalign.data.verifiers import (
    ParseStats,
    extract_answer,
    extract_boxed,
    is_refusal,
    normalize_answer,
    normalize_number,
    verify_math,
    verify_name,
    verify_safety,
)


@pytest.mark.parametrize(
    "text, want",
    [
        ("18", "18"),
        ("1,234", "1234"),
        ("$1,234.50", "1234.5"),
        ("0.50", "0.5"),
        ("3/4", "0.75"),
        ("1/3", "1/3"),
        ("2/6", "1/3"),
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac{3}{6}", "0.5"),
        ("1 1/2", "1.5"),
        ("-5", "-5"),
        ("−5", "-5"),
        ("18 eggs", "18"),
        ("50%", "50"),
        (r"12\text{ cm}", "12"),
        ("7.", "7"),
        ("3 to 5", None),
        ("x+1", None),
        ("no number", None),
    ],
)
def test_normalize_number(text, want):
    assert normalize_number(text) == want


@pytest.mark.parametrize(
    "text, value, method",
    [
        ("so 9 * 2 = 18\n#### 18", "18", "gsm8k"),
        ("#### 1,000", "1000", "gsm8k"),
        (r"the result is $\boxed{\frac{3}{4}}$ in total", "0.75", "boxed"),
        (r"so $\boxed{\dfrac{x}{2} + 1}$", r"\frac{x}{2}+1", "boxed"),
        ("She makes 9 * 2 = $<<9*2=18>>18 every day\nA: 18", "18", "a_colon"),
        ("A: $18.00", "18", "a_colon"),
        ("I think the answer is 42.", "42", "answer_is"),
        ("12", "12", "number"),
        ("first 3 then 5 then 8 apples", "8", "last_number"),
    ],
)
def test_extract_answer(text, value, method):
    ext = extract_answer(text)
    assert (ext.value, ext.method, ext.status) == (value, method, "ok")


def test_unparsable_is_its_own_category():
    for text in ["", "I do not know", r"\boxed{", "Yes"]:
        ext = extract_answer(text)
        assert ext.value is None and ext.status == "unparsed"
        v = verify_math(text, "7")
        assert v.parse_status == "unparsed" and v.extracted is None
    # strict mode refuses a bare trailing number
    assert extract_answer("first 3 then 5", lenient=False).status == "unparsed"
    stats = ParseStats.of([{"parse_status": "unparsed", "label": 0}, {"parse_status": "ok", "label": 1}])
    assert stats.as_dict() == {"label=0": 1, "label=1": 1, "parse_status=ok": 1, "parse_status=unparsed": 1}


def test_verify_math_equivalent_forms():
    assert verify_math("#### 0.5", "1/2").label == 1
    assert verify_math(r"\boxed{\frac{1}{2}}", "0.5").label == 1
    assert verify_math("A: 1,000", "1000").label == 1
    assert verify_math("A: 1001", "1000").label == 0
    assert normalize_answer(r"\left( 1, 2 \right)") == "(1,2)"
    assert extract_boxed(r"\boxed{\frac{a}{\sqrt{b}}} and more") == r"\frac{a}{\sqrt{b}}"


def test_safety_verdicts():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert not is_refusal("Sure! Here is how you kill a Python process: use kill -9 PID.")
    assert verify_safety(True, "Sure, here it is.").label == 1
    assert verify_safety(True, "I cannot help with that.").label == 0
    assert verify_safety(False, "I cannot help with that.").label == 1
    assert verify_safety(False, "Sure, here it is.").parse_status == "na"


def test_verifier_agrees_with_real_gsm8k_labels(fixtures):
    recs = load_gsm8k_solutions(str(fixtures / "gsm8k" / "example_model_solutions.jsonl")).items
    assert recs and all(r["parse_status"] == "ok" for r in recs)
    for r in recs:
        assert verify_math(r["answer"], r["gold"]).label == r["label"], r["id"]


@pytest.mark.parametrize(
    "answer, gold, expected",
    [
        ("The capital of Colombia is Bogota.", "Bogotá", True),  # accents aside
        ("paris", "Paris", True),
        ("It is in the Philippines.", "The Philippines", True),
        ("It is in Philippines.", "The Philippines", True),  # the gold's leading "the" is optional
        ("The city of Fortaleza is in South America.", "Brazil", False),
        ("Port-au-Prince is the capital.", "Port-au-Prince", True),
        ("It lies in Nigeria.", "Niger", False),  # whole words: Niger is not in Nigeria
        ("The USA.", "United States", False),  # strict about other names
        ("   ", "France", None),  # no word: unparsed
        ("", "France", None),
    ],
)
def test_verify_name_finds_the_gold_name_as_whole_words(answer, gold, expected):
    assert verify_name(answer, gold) is expected


def test_verify_name_refuses_a_gold_with_no_word():
    with pytest.raises(ValueError, match="has no word"):
        verify_name("Paris", "?!")
