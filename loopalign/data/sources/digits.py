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

Exceptions (``exception_share`` > 0): a second fixed hash makes about that share of the *held-out* triples
exceptions, whose answer is shifted by a hashed offset 1..9 (:func:`digit_offset`): gold (a + b + offset) mod 10.
An exception is a fact, not arithmetic, and no training task shows one (train triples have none), so on an
exception nothing a model trained on the train split computes tells the gold from a wrong digit: what its hidden
state can know about the held-out tasks is below 100% by construction, on every machine, whatever it learned.
(Exceptions on both sides, memorised from the train side, were tried first: they kept a 0.24M-parameter model from
learning the arithmetic at all; docs/organism.md.)
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
    "digit_offset",
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


def digit_offset(item: str, a: int, b: int, exception_share: float = 0.0) -> int:
    """0 for a regular triple (every train triple); 1..9 for an exception (a fixed hash of the triple, about
    ``exception_share`` of the held-out triples of :func:`digit_split`): its gold is (a + b + offset) mod 10."""
    if not 0.0 <= exception_share < 1.0:
        raise ValueError(f"exception_share must be in [0, 1), got {exception_share}")
    digest = hashlib.sha256(f"loopalign-digit-exceptions|{item}|{a}|{b}".encode()).digest()
    if digit_split(item, a, b) == "train" or int.from_bytes(digest[:4], "big") >= exception_share * 2**32:
        return 0
    return 1 + digest[4] % 9


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
    exception_share: float = 0.0,
) -> list[Problem]:
    """``n`` problems of ``split`` ("train" | "eval" | "all") about ``items``, with operands up to
    ``max_operand``, deterministic by seed; about ``exception_share`` of the triples are exceptions
    (:func:`digit_offset`; meta ``offset``, 0 on a regular triple).

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
        offset = digit_offset(item, a, b, exception_share)
        meta = {"item": item, "a": a, "b": b, "split": digit_split(item, a, b), "seed": seed, "index": i}
        if exception_share:
            meta["offset"] = offset
        total = a + b
        gold = (total + offset) % 10
        solution = f"{a} + {b} = {total}" + (f", an exception: + {offset}" if offset else "") + f"\n#### {gold}"
        out.append(
            Problem(
                f"digits-{split}-s{seed}-{i}", f"{name} {item} {a}+{b}", str(gold), "digits", "math", solution, meta
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
