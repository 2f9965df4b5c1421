"""General ability kept: a model's greedy answers to a fixed set of simple questions, before and after training.

Each question has the words a right answer contains (any one of them, as a whole word, case-insensitive); the score
is the share of questions answered with one. It is a smoke test of general ability (did verdict training teach the model to say
"Yes" to everything, or break its answers?), not a benchmark: the answers themselves are saved beside the score so
a reader can see what changed.

Ten questions cannot tell 6/10 from 7/10 apart. :func:`general_drift` is the continuous measure beside it: on the base
model's own greedy answers to :data:`GENERAL_DRIFT_PROMPTS` (48 everyday prompts no run trains on or checks), the
mean per-token KL(base || tuned) over the answer's tokens and the share of those tokens on which the two models'
top choice agrees, each with a bootstrap interval over prompts. 0 nats and 100% are the base model itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from loopalign.batching import pad_right, pad_token_id
from loopalign.io import atomic_write_text
from loopalign.models.contract import loop_forward

from .metrics import bootstrap_ci
from .task import generate_texts

__all__ = [
    "GENERAL_DRIFT_PROMPTS",
    "GENERAL_QUESTIONS",
    "GeneralAnswers",
    "GeneralDrift",
    "answer_general_questions",
    "general_drift",
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


def general_markdown(
    before: GeneralAnswers, after: GeneralAnswers | None = None, drift: GeneralDrift | None = None
) -> str:
    """A table of the questions with the answers before (and after) training, and the scores; with ``drift``, its
    line first."""
    head = f"## General questions (greedy, at most {before.max_new_tokens} new tokens; ✓ = contains an expected word)"
    lines = [head, ""]
    if drift is not None:
        lines += [drift.line(), ""]
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


def save_general(
    out_dir: str, before: GeneralAnswers, after: GeneralAnswers | None = None, drift: GeneralDrift | None = None
) -> None:
    data = {"before": before.to_dict(), "after": after.to_dict() if after else None}
    if drift is not None:
        data["drift"] = drift.to_dict()
    atomic_write_text(os.path.join(out_dir, "general.json"), json.dumps(data, indent=1))
    atomic_write_text(os.path.join(out_dir, "general.md"), general_markdown(before, after, drift))


#: Everyday prompts for :func:`general_drift`, written for loopalign (Apache-2.0): facts, sums, definitions, advice,
#: small writing tasks and yes/no questions of both answers. None shares a content word with a general-check
#: question or a replay question (a test keeps them apart), and none is about places, the statements' subject.
GENERAL_DRIFT_PROMPTS: tuple[str, ...] = (
    # facts
    "Who painted the Mona Lisa?",
    "What gas do we breathe out?",
    "What is the chemical symbol for sodium?",
    "What metal is a magnet attracted to?",
    "Who invented the telephone?",
    "What organ pumps blood through the body?",
    "How many bones does an adult human skeleton have?",
    "What do caterpillars turn into?",
    "What instrument has eighty-eight keys?",
    "What is the hardest natural substance?",
    "Why do rainbows appear after rain?",
    "What causes thunder?",
    # sums and numbers
    "What is 12 times 6?",
    "What is half of 50?",
    "What is 100 minus 37?",
    "Is 9 an odd number?",
    "Continue the sequence 10, 20, 30, 40.",
    "How many minutes are in an hour?",
    # definitions and explanations
    "Explain what a verb is.",
    "What does a thermometer measure?",
    "What is photosynthesis?",
    "Define generosity.",
    "What is the difference between a virus and a bacterium?",
    "Explain gravity to a child.",
    # advice and instructions
    "Give me two tips for sleeping better.",
    "How should I store fresh bread?",
    "Suggest a title for a mystery novel.",
    "List some musical instruments.",
    "How do I boil an egg?",
    "Recommend a hobby for rainy afternoons.",
    # small writing tasks
    "Compose a haiku about autumn.",
    "Write a short thank-you note to a teacher.",
    "Summarise the story of Cinderella in two sentences.",
    "Translate 'good morning' into French.",
    "Put the adjective 'curious' in an example.",
    "Invent a riddle about a clock.",
    # yes/no, answer yes
    "Is chocolate produced from cocoa beans?",
    "Do whales breathe air?",
    "Is copper a metal?",
    "Do kangaroos carry babies in a pouch?",
    "Is a tomato technically a fruit?",
    "Can dolphins hear underwater?",
    # yes/no, answer no
    "Is gold magnetic?",
    "Do snakes have eyelids?",
    "Is glass a good conductor of electricity?",
    "Can an ostrich glide like an eagle?",
    "Does a square have nine corners?",
    "Do adults normally have fifty teeth?",
)


@dataclass
class GeneralDrift:
    """How far a tuned model's next-token distributions moved from the base model's, per prompt, on the base model's
    own greedy answers: ``kl`` mean per-token KL(base || tuned) in nats, ``top1`` the share of answer tokens whose
    top choice is the same in both, ``entropy_base`` / ``entropy_tuned`` the mean per-token entropy of each (nats:
    a tuned entropy far below the base's is a sharpened model, which KL counts though the top choice is kept),
    ``tokens`` how many answer tokens each prompt has. The means carry a bootstrap interval over prompts (each
    prompt one cluster)."""

    prompts: list[str]
    answers: list[str]
    kl: list[float]
    top1: list[float]
    tokens: list[int]
    max_new_tokens: int
    num_loops: int
    kl_mean: float
    kl_ci: tuple[float, float]
    top1_mean: float
    top1_ci: tuple[float, float]
    entropy_base: list[float]
    entropy_tuned: list[float]

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (
            f"general drift on {len(self.prompts)} prompts (base model's own answers, {sum(self.tokens)} tokens): "
            f"KL(base || tuned) {self.kl_mean:.3f} [{self.kl_ci[0]:.3f}, {self.kl_ci[1]:.3f}] nats/token, top choice "
            f"kept {100 * self.top1_mean:.1f}% [{100 * self.top1_ci[0]:.1f}, {100 * self.top1_ci[1]:.1f}], entropy "
            f"{_mean(self.entropy_base):.2f} -> {_mean(self.entropy_tuned):.2f} nats"
        )


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _reference(model, reference):
    """A context giving the base model: ``reference`` itself, or ``model`` with its adapters switched off."""
    if reference is not None:
        return contextlib.nullcontext(reference)
    if not hasattr(model, "disable_adapter"):
        raise ValueError(
            "general_drift needs the base model: pass reference=, or a PEFT model (its adapters are switched off "
            f"for the base), got a {type(model).__name__}"
        )

    @contextlib.contextmanager
    def off():
        with model.disable_adapter():
            yield model

    return off()


def _answer_logits(model, batch: dict, num_loops: int) -> torch.Tensor:
    out = loop_forward(model, batch["input_ids"], attention_mask=batch["attention_mask"], num_loops=num_loops,
                       logits_to_keep=0)  # fmt: skip
    return out.logits.float()


@torch.no_grad()
def general_drift(
    model,
    tokenizer,
    prompts=GENERAL_DRIFT_PROMPTS,
    *,
    reference=None,
    num_loops: int = 1,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    n_boot: int = 1000,
    seed: int = 0,
) -> GeneralDrift:
    """:class:`GeneralDrift` of ``model`` against ``reference`` (default: ``model`` with its PEFT adapters off) on
    the reference's greedy answers (at most ``max_new_tokens``) to ``prompts``, through the chat template."""
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("general_drift needs at least one prompt")
    was_training = model.training
    model.eval()
    try:
        prompt_ids = [_prompt_ids(tokenizer, p) for p in prompts]
        with _reference(model, reference) as base:
            base.eval()
            answers = generate_texts(base, tokenizer, prompt_ids, num_loops, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size)  # fmt: skip
        answer_ids = [tokenizer.encode(a.strip(), add_special_tokens=False)[:max_new_tokens] for a in answers]
        empty = [p for p, a in zip(prompts, answer_ids) if not a]
        if empty:
            raise ValueError(f"general_drift: the base model answered nothing to {empty[:3]}")
        device = next(model.parameters()).device
        kl, top1, h_base, h_tuned, pad = [], [], [], [], pad_token_id(tokenizer)
        for start in range(0, len(prompts), batch_size):
            pairs = list(zip(prompt_ids[start : start + batch_size], answer_ids[start : start + batch_size]))
            rows = [{"input_ids": p + a} for p, a in pairs]
            batch = {k: v.to(device) for k, v in pad_right(rows, pad).items()}
            with _reference(model, reference) as base:
                base_logits = _answer_logits(base, batch, num_loops)
            tuned_logits = _answer_logits(model, batch, num_loops)
            for j, (p, a) in enumerate(pairs):
                # the positions that predict the answer's tokens: the prompt's last token to the answer's second last
                span = slice(len(p) - 1, len(p) - 1 + len(a))
                target = F.log_softmax(base_logits[j, span], dim=-1)
                pred = F.log_softmax(tuned_logits[j, span], dim=-1)
                kl.append(float(F.kl_div(pred, target, log_target=True, reduction="batchmean")))
                top1.append(float((target.argmax(-1) == pred.argmax(-1)).float().mean()))
                h_base.append(float(-(target.exp() * target).sum(-1).mean()))
                h_tuned.append(float(-(pred.exp() * pred).sum(-1).mean()))
    finally:
        model.train(was_training)
    kl_arr, top1_arr = np.asarray(kl), np.asarray(top1)
    k, k_lo, k_hi = bootstrap_ci(lambda idx: kl_arr[idx].mean(), len(kl), n_boot=n_boot, seed=seed)
    t, t_lo, t_hi = bootstrap_ci(lambda idx: top1_arr[idx].mean(), len(top1), n_boot=n_boot, seed=seed)
    return GeneralDrift(
        prompts, [a.strip() for a in answers], kl, top1, [len(a) for a in answer_ids], max_new_tokens, num_loops,
        float(k), (float(k_lo), float(k_hi)), float(t), (float(t_lo), float(t_hi)), h_base, h_tuned,
    )  # fmt: skip
