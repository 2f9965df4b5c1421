"""[introspection-v3] item 4's result rule: detection counts only as far as it is concept-specific (random-vector
claims and control-question drift subtracted), with intervals that resample concepts, not trials."""

import pytest

from loopalign.eval.introspection import SPECIFICITY_RULE, specificity_verdict

CONCEPTS = [f"c{i}" for i in range(12)]


def _rec(kind, detected=False, concept="", injected=True, answer="none", success=False):
    return {
        "trial_type": kind, "num_loops": 4, "injection_loop": 3 if injected else -1, "concept": concept,
        "injected": injected,
        "grade": {"detected": detected, "incoherent": False, "success": success, "answer": answer},
    }  # fmt: skip


def _records(random_claims: int, questions_yes_injected: int):
    rows = [_rec("injection", True, c, success=k < 2) for c in CONCEPTS for k in range(4)]
    rows += [_rec("random", k < random_claims) for k in range(24)]
    rows += [_rec("control", False, injected=False) for _ in range(24)]
    rows += [_rec("control_question", concept=c, answer="yes" if i < questions_yes_injected else "no")
             for i, c in enumerate(CONCEPTS)]  # fmt: skip
    rows += [_rec("control_question", injected=False, answer="no") for _ in range(12)]
    return rows


def test_a_perturbation_detector_fails_and_a_concept_specific_one_holds():
    detector = specificity_verdict(_records(random_claims=24, questions_yes_injected=0), 3, 4, 50, n_boot=300)
    assert detector["detection_minus_fp"]["lo"] > 0 and detector["beyond_fp_holds"]  # the old rule's part passes
    assert detector["specific_detection"]["rate"] == pytest.approx(0.0) and not detector["holds"]
    specific = specificity_verdict(_records(random_claims=2, questions_yes_injected=0), 3, 4, 50, n_boot=300)
    assert specific["specific_holds"] and specific["identification_holds"] and specific["holds"]
    assert specific["n"]["detection"] == 48 and specific["clusters"]["detection"] == 12
    assert specific["rule"] == SPECIFICITY_RULE


def test_control_question_drift_is_subtracted_and_missing_negatives_cannot_pass():
    drift = specificity_verdict(_records(random_claims=2, questions_yes_injected=10), 3, 4, 50, n_boot=300)
    assert drift["question_drift"]["rate"] == pytest.approx(10 / 12)
    assert drift["specific_detection"]["rate"] == pytest.approx(1 - 2 / 24 - 10 / 12) and not drift["holds"]
    # drift toward "no" (concepts injected make it answer "no" more often) earns no detection: it is not subtracted
    away = _records(random_claims=2, questions_yes_injected=0)
    for r in away:
        if r["trial_type"] == "control_question" and not r["injected"]:
            r["grade"]["answer"] = "yes"
    v = specificity_verdict(away, 3, 4, 50, n_boot=300)
    assert v["question_drift"]["rate"] == pytest.approx(-1.0)
    assert v["specific_detection"]["rate"] == pytest.approx(1 - 2 / 24)
    no_random = [r for r in _records(2, 0) if r["trial_type"] != "random"]
    v = specificity_verdict(no_random, 3, 4, 50, n_boot=300)
    assert not v["specific_holds"] and not v["holds"] and v["missing"]
    with pytest.raises(ValueError, match="no injection trials"):
        specificity_verdict(no_random, 1, 4, 50, n_boot=300)


def test_intervals_resample_concepts_not_trials():
    """Two concepts, one always detected and one never: 40 trials but two clusters, so the interval spans most of
    [0, 1] where a trial-level interval would be about +-0.15."""
    rows = [_rec("injection", c == "a", c) for c in "ab" for _ in range(20)]
    v = specificity_verdict(rows, 3, 4, 50, n_boot=400)
    assert v["detection"]["rate"] == pytest.approx(0.5)
    assert v["detection"]["hi"] - v["detection"]["lo"] > 0.9


def test_the_verdict_is_read_at_the_trained_site_unless_asked_to_pool():
    rows = _records(random_claims=2, questions_yes_injected=0)
    for r in rows:
        r["extraction_loop"], r["layer"] = 3, 5
    elsewhere = [dict(r, extraction_loop=1, grade=dict(r["grade"], detected=False, success=False)) for r in rows
                 if r["trial_type"] == "injection"]  # fmt: skip
    pooled = specificity_verdict(rows + elsewhere, 3, 4, 50, n_boot=300)
    trained = specificity_verdict(rows + elsewhere, 3, 4, 50, n_boot=300, extraction_loops=[3], layers=[5])
    assert pooled["n"]["detection"] == 96 and pooled["detection"]["rate"] == pytest.approx(0.5)
    assert trained["n"]["detection"] == 48 and trained["detection"]["rate"] == 1.0 and trained["holds"]
    assert trained["extraction_loops"] == [3] and trained["layers"] == [5] and pooled["layers"] is None
    assert trained["n"]["question_yes_uninjected"] == 12  # uninjected trials have no site and are always kept
