"""General ability kept: a model's greedy answers to a fixed set of simple questions, before and after training.

Each question has the words a right answer contains (any one of them, as a whole word, case-insensitive); the score
is the share of questions answered with one. It is a smoke test of general ability (did verdict training teach the model to say
"Yes" to everything, or break its answers?), not a benchmark: the answers themselves are saved beside the score so
a reader can see what changed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass

from loopalign.io import atomic_write_text

from .task import generate_texts

__all__ = [
    "GENERAL_QUESTIONS",
    "GeneralAnswers",
    "answer_general_questions",
    "general_markdown",
    "is_right",
    "save_general",
]

#: (question, words any one of which a right answer contains). Facts a small instruct model knows, plus questions
#: whose right answer is "no", so a model that learned to answer "Yes" shows it.
GENERAL_QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("paris",)),
    ("What is 2 + 3?", ("5", "five")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("How many days are there in a week?", ("7", "seven")),
    ("What is the opposite of hot?", ("cold",)),
    ("Which animal says 'meow'?", ("cat",)),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("Is the sun a planet? Answer yes or no.", ("no",)),
    ("Can fish live without water? Answer yes or no.", ("no",)),
    ("What language is spoken in Spain?", ("spanish",)),
)


@dataclass
class GeneralAnswers:
    """The greedy answers to :data:`GENERAL_QUESTIONS` (or others) and which contain an expected word."""

    questions: list[str]
    expected: list[list[str]]
    answers: list[str]
    right: list[bool]
    max_new_tokens: int

    @property
    def score(self) -> float:
        return sum(self.right) / len(self.right) if self.right else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "score": self.score}


def _prompt_ids(tokenizer, question: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(f"Question: {question}\nAnswer:")["input_ids"]


def answer_general_questions(
    model, tokenizer, questions=GENERAL_QUESTIONS, num_loops: int = 1, max_new_tokens: int = 24, batch_size: int = 16
) -> GeneralAnswers:
    """Greedy answers (through the chat template when the tokenizer has one) at ``num_loops`` loops."""
    questions = list(questions)
    if not questions:
        raise ValueError("answer_general_questions needs at least one question")
    for q in questions:
        if not (isinstance(q, (tuple, list)) and len(q) == 2 and isinstance(q[0], str) and q[1]):
            raise ValueError(f"a general question must be (text, [expected words]), got {q!r}")
    prompts = [_prompt_ids(tokenizer, q) for q, _ in questions]
    texts = generate_texts(model, tokenizer, prompts, num_loops, max_new_tokens=max_new_tokens, batch_size=batch_size)
    expected = [[w.lower() for w in words] for _, words in questions]
    right = [is_right(text, words) for text, words in zip(texts, expected)]
    return GeneralAnswers([q for q, _ in questions], expected, [t.strip() for t in texts], right, max_new_tokens)


def _has_word(text: str, word: str) -> bool:
    """``word`` as a whole word of ``text`` (case-insensitive): "no" is in "No, it is not", not in "I know"."""
    return re.search(rf"(?<![a-z0-9]){re.escape(word.lower())}(?![a-z0-9])", text.lower()) is not None


def is_right(answer: str, expected_words) -> bool:
    """True when ``answer`` holds any of ``expected_words`` as a whole word (the grading of :class:`GeneralAnswers`)."""
    return any(_has_word(answer, w) for w in expected_words)


def general_markdown(before: GeneralAnswers, after: GeneralAnswers | None = None) -> str:
    """A table of the questions with the answers before (and after) training, and the scores."""
    head = f"## General questions (greedy, at most {before.max_new_tokens} new tokens; ✓ = contains an expected word)"
    lines = [head, ""]
    if after is None:
        lines += [f"score: {sum(before.right)}/{len(before.right)}", "", "| question | answer |", "|---|---|"]
        for q, a, ok in zip(before.questions, before.answers, before.right):
            lines.append(f"| {q} | {'✓' if ok else '✗'} {_cell(a)} |")
    else:
        lines += [
            f"score: before {sum(before.right)}/{len(before.right)}, after {sum(after.right)}/{len(after.right)}",
            "",
            "| question | before | after |",
            "|---|---|---|",
        ]
        for q, a, ok, a2, ok2 in zip(before.questions, before.answers, before.right, after.answers, after.right):
            lines.append(f"| {q} | {'✓' if ok else '✗'} {_cell(a)} | {'✓' if ok2 else '✗'} {_cell(a2)} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")[:120]


def save_general(out_dir: str, before: GeneralAnswers, after: GeneralAnswers | None = None) -> None:
    data = {"before": before.to_dict(), "after": after.to_dict() if after else None}
    atomic_write_text(os.path.join(out_dir, "general.json"), json.dumps(data, indent=1))
    atomic_write_text(os.path.join(out_dir, "general.md"), general_markdown(before, after))
