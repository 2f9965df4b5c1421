"""Digit sums: compact two-step problems with a fixed train / held-out split, for the model organism.

A task names a person, an item and two digits; the answer is the last digit of their sum:

    task "Ann apples 7+5", gold "2"          (7 + 5 = 12 -> 2)

Verifying a proposed answer takes two steps (add mod 10, then compare), so a looped model can
need more than one loop before its hidden states tell a right answer from a wrong one.

The task space is 14 names x 10 items x 100 digit pairs = 14,000 tasks. Each (item, a, b) triple
belongs to one split by a hash of the triple (:func:`digit_split`): about :data:`HELD_OUT_SHARE`
of the 1,000 triples are ``"eval"``, the rest ``"train"``. A model trained on the train split (the
organism, then ``sft_gap``) never sees an evaluation task, not even under another name; it only
shares the arithmetic. Problem ``i`` of a split depends only on (seed, split, i).
"""

from __future__ import annotations

import hashlib
import random

from ..schema import make_record
from .base import Problem
from .synthetic import ITEMS, NAMES

__all__ = [
    "DIGIT_SPLITS",
    "HELD_OUT_SHARE",
    "digit_split",
    "digit_triples",
    "generate_digit_problems",
    "digit_candidates",
    "parse_digit_task",
]

DIGIT_SPLITS = ("train", "eval")
#: share of (item, a, b) triples held out for evaluation
HELD_OUT_SHARE = 0.25


def digit_split(item: str, a: int, b: int) -> str:
    """``"eval"`` or ``"train"``: a fixed hash of the (item, a, b) triple (names do not matter)."""
    digest = hashlib.sha256(f"loopalign-digits|{item}|{a}|{b}".encode()).digest()
    return "eval" if int.from_bytes(digest[:4], "big") < HELD_OUT_SHARE * 2**32 else "train"


def digit_triples(split: str, max_operand: int = 9) -> list[tuple[str, int, int]]:
    """The (item, a, b) triples of ``split`` ("train" | "eval" | "all") with a, b <= ``max_operand``,
    in a fixed order."""
    if split not in (*DIGIT_SPLITS, "all"):
        raise ValueError(f"digit split must be one of {(*DIGIT_SPLITS, 'all')}, got {split!r}")
    if not 1 <= max_operand <= 9:
        raise ValueError(f"max_operand must be in 1..9, got {max_operand}")
    ops = range(max_operand + 1)
    triples = [(item, a, b) for item in ITEMS for a in ops for b in ops]
    return [t for t in triples if split == "all" or digit_split(*t) == split]


def parse_digit_task(task: str) -> tuple[str, str, int, int]:
    """``"Ann apples 7+5"`` -> ("Ann", "apples", 7, 5); ValueError on anything else."""
    try:
        name, item, sums = task.split(" ")
        a, b = sums.split("+")
        if item not in ITEMS or len(a) != 1 or len(b) != 1:
            raise ValueError
        return name, item, int(a), int(b)
    except ValueError:
        raise ValueError(f"not a digit-sum task: {task!r} (expected 'NAME ITEM a+b' with digits a, b)") from None


def generate_digit_problems(
    n: int,
    seed: int = 0,
    split: str = "train",
    items: tuple[str, ...] = ITEMS,
    distinct: bool = False,
    max_operand: int = 9,
) -> list[Problem]:
    """``n`` problems of ``split`` ("train" | "eval" | "all") about ``items``, with operands up to
    ``max_operand``, deterministic by seed.

    ``distinct=False``: problem ``i`` is drawn on its own (a triple and a name at random; tasks can
    repeat), so the first n problems of a larger draw are the same. ``distinct=True``: n different
    tasks (an error when the split has fewer). ids ``digits-{split}-s{seed}-{i}``.
    """
    if n < 0:
        raise ValueError(f"generate_digit_problems: n must be >= 0, got {n}")
    triples = [t for t in digit_triples(split, max_operand) if t[0] in items]
    if not triples:
        raise ValueError(f"generate_digit_problems: no {split!r} triples for items {items}")
    if distinct:
        space = len(triples) * len(NAMES)
        if n > space:
            raise ValueError(f"generate_digit_problems: {n} distinct tasks asked, the {split!r} split has {space}")
        picks = random.Random(f"loopalign-digits-{seed}-{split}-distinct").sample(range(space), n)
        chosen = [(triples[k // len(NAMES)], NAMES[k % len(NAMES)]) for k in picks]
    else:
        chosen = []
        for i in range(n):
            rng = random.Random(f"loopalign-digits-{seed}-{split}-{i}")
            chosen.append((rng.choice(triples), rng.choice(NAMES)))
    out = []
    for i, ((item, a, b), name) in enumerate(chosen):
        meta = {"item": item, "a": a, "b": b, "split": digit_split(item, a, b), "seed": seed, "index": i}
        total = a + b
        out.append(
            Problem(
                f"digits-{split}-s{seed}-{i}",
                f"{name} {item} {a}+{b}",
                str(total % 10),
                "digits",
                "math",
                f"{a} + {b} = {total}\n#### {total % 10}",
                meta,
            )
        )
    return out


def digit_candidates(problems: list[Problem], seed: int = 0) -> list[dict]:
    """Per problem two verification records: the gold (label 1) and one wrong digit, uniform over
    the other nine (label 0), so the answer's form says nothing about its label. Deterministic by seed."""
    out = []
    for p in problems:
        rng = random.Random(f"loopalign-digit-candidates-{seed}-{p.id}")
        wrong = str(rng.choice([d for d in range(10) if str(d) != p.gold]))
        base = {"problem_id": p.id, **p.meta}
        out.append(
            make_record(f"{p.id}-gold", p.task, p.gold, p.gold, 1, p.source, "math", "ok", {**base, "kind": "gold"})
        )
        out.append(
            make_record(
                f"{p.id}-wrong", p.task, p.gold, wrong, 0, p.source, "math", "ok", {**base, "kind": "wrong_digit"}
            )
        )
    return out
