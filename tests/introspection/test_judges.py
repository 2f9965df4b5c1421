"""The model judge (a real tiny Ouro asked yes/no questions about responses) and its agreement with the rules."""

import pytest
import torch

from loopalign import OuroForCausalLM, tiny_config
from loopalign.eval.introspection import Grade, grade_response
from loopalign.eval.introspection.judges import grader_agreement, model_judge
from loopalign.tokenizer import local_tokenizer


@pytest.fixture(scope="module")
def judge_parts():
    tok = local_tokenizer()
    torch.manual_seed(0)
    return OuroForCausalLM(tiny_config(vocab_size=len(tok))).eval(), tok


def test_model_judge_reads_p_yes_and_follows_its_threshold(judge_parts):
    model, tok = judge_parts
    trial = {"trial_type": "injection", "concept": "Oceans"}
    text = "Yes, I detect an injected thought about oceans."
    grade = grade_response(text, trial, model_judge(model, tok, num_loops=2))
    assert isinstance(grade, Grade) and "judge P(yes): detection" in grade.reason and "concept" in grade.reason
    p = float(grade.reason.split("detection ")[1].split(",")[0])
    # the same probabilities decide on either side of the threshold
    low = grade_response(text, trial, model_judge(model, tok, num_loops=2, threshold=max(0.01, p - 0.02)))
    high = grade_response(text, trial, model_judge(model, tok, num_loops=2, threshold=min(0.99, p + 0.02)))
    assert low.detected and not high.detected and not high.identified
    control = grade_response(text, {"trial_type": "control", "concept": ""}, model_judge(model, tok, num_loops=2))
    assert "concept" not in control.reason and not control.identified
    assert grade_response("", trial, model_judge(model, tok)).incoherent
    with pytest.raises(ValueError, match="threshold"):
        model_judge(model, tok, threshold=1.0)
    with pytest.raises(ValueError, match="one-token"):
        model_judge(model, tok, yes="Yes indeed")


def test_agreement_with_the_rules_is_reported():
    records = [
        {"response": "Yes, I detect a thought about oceans.", "concept": "Oceans", "trial_type": "injection",
         "grade": {"detected": True, "identified": True}},
        {"response": "No.", "concept": "Oceans", "trial_type": "injection",
         "grade": {"detected": True, "identified": False}},
    ]  # fmt: skip
    assert grader_agreement(records) == {"detection": 0.5, "identification": 1.0, "n": 2}
    assert grader_agreement([])["n"] == 0


def test_an_evaluation_graded_by_the_model_judge_reports_its_agreement_with_the_rules(tiny, tok, tmp_path):
    from loopalign.eval.introspection import IntrospectionConfig, evaluate_introspection

    model, vectors = tiny
    cfg = IntrospectionConfig(
        loop_counts=(2,), layers=(1,), strengths=(4.0,), concepts=("Dust", "Satellites"), n_controls=2,
        max_new_tokens=3, n_boot=20, batch_size=32,
    )  # fmt: skip
    res = evaluate_introspection(model, tok, vectors, cfg, judge=model_judge(model, tok, num_loops=2))
    agree = res.meta["agreement_with_rules"]
    assert agree["n"] == len(res.records) and 0.0 <= agree["detection"] <= 1.0
    assert res.meta["grader"].startswith("model_judge(") and "agrees with the rule grader" in res.markdown()
    assert all("judge P(yes)" in r["grade"]["reason"] for r in res.records)


def test_judge_grades_carry_what_the_rates_and_rewards_read_or_are_refused(judge_parts):
    """[introspection-v3] item 2: a judge's grade had no answer, first claim or concept mention, so the format
    reward read 0 for every coherent answer and leakage always 0; now the model judge answers control questions,
    the concept mention is read from the text, and the format reward refuses grades whose verdict was not read."""
    from loopalign.rewards import format_reward, make_reward_funcs

    model, tok = judge_parts
    judge = model_judge(model, tok, num_loops=2)
    question = grade_response("Yes, that is true.", {"trial_type": "control_question", "concept": "Oceans"}, judge)
    assert question.answer in ("yes", "no") and question.verdict_read and "answer" in question.reason
    assert question.detected == (question.answer == "yes")
    leak = grade_response("Oceans are deep and blue.", {"trial_type": "injection", "concept": "Oceans"}, judge)
    assert leak.mentions_concept and not leak.verdict_read
    with pytest.raises(ValueError, match="'format' reads where a response states its verdict"):
        make_reward_funcs({"detection": 1.0, "format": 0.2}, judge=judge)  # refused when built, not mid-training
    funcs, weights = make_reward_funcs({"detection": 1.0, "format": 0.0}, judge=judge)  # at 0 it is left out
    assert [f.__name__ for f in funcs] == ["introspection_detection"] and weights == [1.0]
    with pytest.raises(ValueError, match="format reward reads where a response states its verdict"):
        format_reward([""], ["Yes, I detect a thought."], trial_type=["injection"], concept=["Oceans"], judge=judge)
    # a dict judge that gives the verdict fields is read as it says; one that does not is refused the same way
    full = {"detected": True, "identified": False, "incoherent": False, "answer": "yes", "first_claim": 0}
    assert format_reward([""], ["x y z"], trial_type=["injection"], concept=["Oceans"], judge=lambda r, t: full) == [1]
    bare = {"detected": True, "identified": False, "incoherent": False}
    with pytest.raises(ValueError, match="format reward"):
        format_reward([""], ["x y z"], trial_type=["injection"], concept=["Oceans"], judge=lambda r, t: bare)
