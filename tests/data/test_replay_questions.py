"""The built-in replay questions (sft-gap --replay_questions general) stay apart from the general check they guard,
and a file of one's own is read line by line, a bad one failing with the option, file and line named."""

import re

import pytest

from loopalign.data.replay_questions import GENERAL_REPLAY_QUESTIONS, load_replay_questions
from loopalign.errors import ConfigError
from loopalign.eval.general import GENERAL_QUESTIONS

# words every kind of short question shares; the check's yes/no form ("Answer yes or no.") is shared on purpose
_FORM = {"what", "is", "the", "of", "on", "a", "an", "how", "many", "are", "there", "in", "which", "can", "does",
         "do", "our", "answer", "yes", "no", "or", "says"}  # fmt: skip


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def test_no_replay_question_shares_a_content_word_with_a_general_check_question_or_its_answers():
    check = set()
    for question, expected in GENERAL_QUESTIONS:
        check |= (_words(question) | {w for e in expected for w in _words(e)}) - _FORM
    shared = {q: sorted(_words(q) & check) for q in GENERAL_REPLAY_QUESTIONS if _words(q) & check}
    assert not shared, f"replay questions about a general-check subject: {shared}"
    assert len(set(GENERAL_REPLAY_QUESTIONS)) == len(GENERAL_REPLAY_QUESTIONS) == 42
    assert load_replay_questions("general") == list(GENERAL_REPLAY_QUESTIONS)
    # yes/no questions are in the set, in the check's own form too (what verdict training spilled into)
    assert sum(q.endswith("Answer yes or no.") for q in GENERAL_REPLAY_QUESTIONS) == 8


def test_a_questions_file_is_read_line_by_line_and_a_bad_one_fails_naming_it(tmp_path):
    good = tmp_path / "q.txt"
    good.write_text("Is grass green?\n  Name a colour.  \n")
    assert load_replay_questions(str(good)) == ["Is grass green?", "Name a colour."]
    blank = tmp_path / "blank.txt"
    blank.write_text("Is grass green?\n\nName a colour.\n")
    with pytest.raises(ConfigError, match=r"blank.txt line 2 is blank"):
        load_replay_questions(str(blank))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="holds no question"):
        load_replay_questions(str(empty))
    with pytest.raises(ConfigError, match="replay_questions: no file"):
        load_replay_questions(str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="'general' or a .txt file"):
        load_replay_questions("questions.csv")
