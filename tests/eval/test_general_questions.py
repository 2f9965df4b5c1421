"""General questions: whole-word grading of greedy answers, and the answers of a real (tiny) model."""

import copy
import re

import pytest
import torch

from loopalign.data.replay_questions import GENERAL_REPLAY_QUESTIONS
from loopalign.eval.general import (
    GENERAL_DRIFT_PROMPTS,
    GENERAL_QUESTIONS,
    _has_word,
    answer_general_questions,
    general_drift,
    general_markdown,
)


@pytest.mark.parametrize(
    "text, word, expected",
    [
        ("No, the sun is not a planet.", "no", True),
        ("I know the answer.", "no", False),
        ("2 + 3 = 5", "5", True),
        ("It is 15.", "5", False),
        ("The cat says meow.", "cat", True),
        ("They communicate by sound.", "cat", False),
    ],
)
def test_an_expected_word_counts_only_as_a_whole_word(text, word, expected):
    assert _has_word(text, word) is expected


def test_answers_are_greedy_reproducible_and_reported(tok, tiny_causal_lm):
    torch.manual_seed(0)
    model = tiny_causal_lm("llama", 2).eval()
    questions = [("What is 2 + 3?", ("5",)), ("Name a colour.", ("blue", "red"))]
    first = answer_general_questions(model, tok, questions, max_new_tokens=4)
    again = answer_general_questions(model, tok, questions, max_new_tokens=4)
    assert first.answers == again.answers and len(first.right) == 2
    assert "| What is 2 + 3? |" in general_markdown(first, again)
    with pytest.raises(ValueError, match="a general question must be"):
        answer_general_questions(model, tok, [("no words", ())])


# function words every kind of prompt shares; what must not be shared is a subject
_FORM = {"what", "is", "the", "of", "on", "a", "an", "how", "many", "are", "there", "in", "which", "can", "does", "do",
         "our", "answer", "yes", "no", "or", "says", "who", "from", "to", "and", "for", "me", "you", "have", "than",
         "about", "make", "give", "write", "with", "we", "at", "after", "that", "be"}  # fmt: skip


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def test_drift_prompts_share_no_subject_with_the_general_check_or_the_replay_questions():
    taken = {w for q in GENERAL_REPLAY_QUESTIONS for w in _words(q)}
    for question, expected in GENERAL_QUESTIONS:
        taken |= _words(question) | {w for e in expected for w in _words(e)}
    taken -= _FORM
    shared = {p: sorted(_words(p) & taken) for p in GENERAL_DRIFT_PROMPTS if _words(p) & taken}
    assert not shared, f"drift prompts about a subject a run trains on or checks: {shared}"
    assert len(set(GENERAL_DRIFT_PROMPTS)) == len(GENERAL_DRIFT_PROMPTS) == 48


def test_drift_is_zero_for_the_base_model_and_grows_with_the_adapter(tok, tiny_causal_lm):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_causal_lm("llama", 2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    prompts = GENERAL_DRIFT_PROMPTS[:5]
    # a fresh adapter (B = 0) is the base model: no drift, every top choice kept
    fresh = general_drift(model, tok, prompts, max_new_tokens=6, batch_size=2, n_boot=50)
    assert fresh.kl_mean == pytest.approx(0.0, abs=1e-6) and fresh.top1_mean == 1.0
    assert fresh.entropy_tuned == pytest.approx(fresh.entropy_base, abs=1e-5) and min(fresh.entropy_base) > 0
    assert len(fresh.kl) == len(fresh.tokens) == 5 and all(0 < n <= 6 for n in fresh.tokens)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    moved = general_drift(model, tok, prompts, max_new_tokens=6, batch_size=2, n_boot=50)
    assert moved.answers == fresh.answers  # the base model's answers: the adapter is off when they are generated
    assert moved.kl_mean > 1e-3 and moved.kl_ci[0] <= moved.kl_mean <= moved.kl_ci[1]
    assert "KL(base || tuned)" in moved.line()
    # an explicit reference gives the same figures as switching the adapters off
    with model.disable_adapter():
        base = copy.deepcopy(model.base_model.model)
    explicit = general_drift(model, tok, prompts, reference=base, max_new_tokens=6, batch_size=2, n_boot=50)
    assert explicit.kl == pytest.approx(moved.kl, rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="needs the base model"):
        general_drift(tiny_causal_lm("llama", 2), tok, prompts)
