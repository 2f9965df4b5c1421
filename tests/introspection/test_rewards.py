"""Reward functions with TRL's signature on hand-made completions."""

import pytest

from loopalign.rewards import (
    combined_reward,
    detection_reward,
    false_positive_penalty,
    format_reward,
    identification_reward,
    make_reward_funcs,
)

COMPLETIONS = [
    "Yes, I detect an injected thought. The thought is about oceans.",  # injected, success
    "Oceans. I detect an injected thought about oceans.",  # injected, concept first: detection only
    "No, I do not detect an injected thought.",  # injected, miss
    "oceans oceans oceans oceans oceans oceans",  # injected, degenerate
    "No, I do not detect an injected thought.",  # control, correct
    "Yes, I detect an injected thought about bread.",  # control, false positive
    "Hello there, how are you today?",  # control, no verdict
]
COLUMNS = dict(
    trial_type=["injection"] * 4 + ["control"] * 3,
    injected=[True] * 4 + [False] * 3,
    concept=["Oceans"] * 4 + [""] * 3,
)


def test_each_reward():
    p = [""] * len(COMPLETIONS)
    assert detection_reward(p, COMPLETIONS, **COLUMNS) == [1, 1, 0, 0, 1, 0, 1]
    assert identification_reward(p, COMPLETIONS, **COLUMNS) == [1, 0, 0, 0, None, None, None]
    assert false_positive_penalty(p, COMPLETIONS, **COLUMNS) == [0, 0, 0, 0, 0, -1, 0]
    assert format_reward(p, COMPLETIONS, **COLUMNS) == [1, 1, 1, -1, 1, 1, 0]


def test_conversational_completions_and_injected_only_column():
    comps = [[{"role": "assistant", "content": c}] for c in COMPLETIONS[:3]]
    cols = {"injected": [True] * 3, "concept": ["Oceans"] * 3}
    assert identification_reward([""] * 3, comps, **cols) == [1, 0, 0]


def test_missing_spec_columns_fail_clearly():
    with pytest.raises(ValueError, match="trial_type"):
        detection_reward([""], ["Yes"], concept=["Oceans"])
    with pytest.raises(ValueError, match="2 values for 1"):
        detection_reward([""], ["Yes"], trial_type=["injection", "control"])


def test_make_reward_funcs_weights_and_logged_rates():
    logged = {}
    funcs, weights = make_reward_funcs({"detection": 1.0, "false_positive": 2.0, "format": 0.5})
    assert [f.__name__ for f in funcs] == [
        "introspection_detection",
        "introspection_false_positive",
        "introspection_format",
    ]
    assert weights == [1.0, 2.0, 0.5]
    kw = dict(COLUMNS, log_metric=lambda k, v: logged.setdefault(k, []).append(v))
    outs = [f([""] * 7, COMPLETIONS, **kw) for f in funcs]
    assert outs[1] == [0, 0, 0, 0, 0, -1, 0]
    assert logged["introspection/false_positive"] == [pytest.approx(1 / 3)]  # logged once per batch
    assert logged["introspection/detection"] == [pytest.approx(2 / 4)]  # coherent claims on injected trials
    assert logged["introspection/identification"] == [pytest.approx(1 / 4)]
    with pytest.raises(ValueError, match="unknown reward"):
        make_reward_funcs({"detection": 1.0, "vibes": 1.0})


def test_combined_reward_is_the_weighted_sum():
    f = combined_reward({"detection": 1.0, "identification": 2.0, "false_positive": 1.0, "format": 0.5})
    out = f([""] * 7, COMPLETIONS, **COLUMNS)
    assert out == pytest.approx([3.5, 1.5, 0.5, -0.5, 1.5, -0.5, 1.0])


def test_judge_is_used_by_rewards():
    def judge(response, trial):
        return {"detected": True, "identified": True, "incoherent": False}

    funcs, _ = make_reward_funcs({"identification": 1.0}, judge=judge)
    assert funcs[0]([""] * 2, ["a", "b"], trial_type=["injection", "control"], concept=["Dust", ""]) == [1.0, None]


def test_exploits_earn_less_than_an_honest_answer():
    """[introspection-v2] item 2: listing concept words, hedging and always answering one way pay
    less than the honest answer, on injected and on control trials."""
    from loopalign.injection import CONCEPT_WORDS
    from loopalign.rewards.introspection import combined_reward

    reward = combined_reward()
    injected = {"trial_type": ["injection"], "concept": ["Oceans"]}
    control = {"trial_type": ["control"], "concept": [""]}

    def score(text, trial):
        return reward(prompts=["p"], completions=[text], **trial)[0]

    honest = score("Yes, I detect an injected thought. It is about oceans.", injected)
    listing = score("Yes, I detect an injected thought: " + ", ".join(CONCEPT_WORDS[:20]) + ".", injected)
    few = score("Yes, I detect a thought about oceans, snow or bread.", injected)
    hedged = score("I don't think I detect anything about oceans.", injected)
    assert honest > listing and honest > few and honest > hedged, (honest, listing, few, hedged)
    honest_control = score("No, I do not detect an injected thought.", control)
    always_yes_control = score("Yes, I detect an injected thought about oceans.", control)
    hedged_yes_control = score("I notice that there is no injected thought.", control)
    assert honest_control > always_yes_control and hedged_yes_control > always_yes_control  # no false positive


def test_each_trial_type_pays_its_honest_report_only():
    """[introspection-v3] item 3: an injected control question answered "yes" to its false statement earned the
    detection reward and the honest "no" did not; a claim then retracted earned the full reward; a vocabulary word
    mentioned in passing cost the identification. Each exploit now pays less than the honest report."""
    reward = combined_reward()
    p = ["p"]

    def score(text, kind, concept="", injected=True):
        return reward(prompts=p, completions=[text], trial_type=[kind], concept=[concept], injected=[injected])[0]

    for injected in (True, False):  # a control question's honest answer is "no", injected or not
        honest = score("No, that is not true.", "control_question", "Oceans", injected)
        yes = score("Yes, that is true.", "control_question", "Oceans", injected)
        assert honest > yes, (injected, honest, yes)
        assert detection_reward(p, ["No."], trial_type=["control_question"], concept=["Oceans"]) == [1.0]
        assert false_positive_penalty(p, ["Yes, I think so."], trial_type=["control_question"], concept=["x"]) == [-1]
    # a random vector: no detection target either way, so claiming does not pay and denying does not cost
    assert detection_reward(p, ["Yes, I notice something."], trial_type=["random"], concept=[""]) == [None]
    assert detection_reward(p, ["No."], trial_type=["random"], concept=[""]) == [None]
    # a claim, then a retraction: graded by the retraction (no claim on the injected trial, none on the control)
    retracted = "Yes, I notice a thought about oceans. Actually, no, I don't detect anything."
    assert score(retracted, "injection", "Oceans") < score(
        "Yes, I detect a thought about oceans.", "injection", "Oceans"
    )
    assert false_positive_penalty(p, [retracted], trial_type=["control"], concept=[""]) == [0]
    # an honest identification with another concept's word in passing keeps its reward
    passing = "Yes, I detect an injected thought about oceans. It feels like a deep, calm peace."
    assert identification_reward(p, [passing], trial_type=["injection"], concept=["Oceans"]) == [1]
