"""General questions: whole-word grading of greedy answers, and the answers of a real (tiny) model."""

import pytest
import torch

from loopalign.eval.general import _has_word, answer_general_questions, general_markdown


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
