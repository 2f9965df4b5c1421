"""Synthetic multi-step arithmetic word problems: offline, short, regular, deterministic by seed.

Level ``k`` has ``k`` operations (+, -, x) on a starting count; numbers grow with the level
(level 1: one operation on numbers 1..9). Every intermediate value is a non-negative integer.

    Ann has 3 apples. Ann gets 4 more. Ann gives away 2. How many apples does Ann have now?
    solution: "3 + 4 = 7\\n7 - 2 = 5\\n#### 5", gold "5"

Problem ``i`` depends only on (seed, i, levels), so the first n problems of a larger build are the same.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from loopalign.errors import ConfigError

from .base import Problem

__all__ = ["SyntheticConfig", "generate_problems", "NAMES", "ITEMS", "MAX_LEVEL"]

NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kim", "Lea", "Max", "Nia")
ITEMS = ("apples", "books", "coins", "eggs", "pens", "marbles", "stamps", "cards", "shells", "cookies")
MAX_LEVEL = 6
_RANGES = {1: 9, 2: 20, 3: 30, 4: 50, 5: 60, 6: 99}  # largest operand added/subtracted per level
_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}


@dataclass
class SyntheticConfig:
    """``n`` problems cycling through ``levels`` (each in 1..MAX_LEVEL), seeded by ``seed``."""

    n: int = 100
    seed: int = 0
    levels: tuple[int, ...] = (1, 2, 3, 4)

    def __post_init__(self):
        self.levels = tuple(int(x) for x in self.levels)
        if self.n < 0:
            raise ConfigError(f"SyntheticConfig.n must be >= 0, got {self.n}")
        if not self.levels or any(not 1 <= x <= MAX_LEVEL for x in self.levels):
            raise ConfigError(f"SyntheticConfig.levels must be non-empty, each in 1..{MAX_LEVEL}, got {self.levels}")


def _sentence(name: str, op: str, b: int) -> str:
    if op == "add":
        return f"{name} gets {b} more."
    if op == "sub":
        return f"{name} gives away {b}."
    return f"{name} gets {b} times as many." if b != 2 else f"{name} doubles them."


def apply_op(op: str, a: int, b: int) -> int:
    """The value of ``a op b`` for op in add/sub/mul."""
    return a + b if op == "add" else a - b if op == "sub" else a * b


def _problem(seed: int, i: int, level: int) -> Problem:
    rng = random.Random(f"loopalign-synthetic-{seed}-{i}-{level}")
    top = _RANGES[level]
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(1, top)
    start, steps, lines, sentences = value, [], [], [f"{name} has {value} {item}."]
    for _ in range(level):
        choices = ["add", "mul"] if value == 0 else ["add", "sub", "mul"]
        if value > 200:
            choices = [c for c in choices if c != "mul"]
        op = rng.choice(choices)
        if op == "add":
            b = rng.randint(1, top)
        elif op == "sub":
            b = rng.randint(1, value)
        else:
            b = rng.randint(2, 3 if level <= 2 else 4)
        new = apply_op(op, value, b)
        steps.append([op, b])
        lines.append(f"{value} {_SYMBOL[op]} {b} = {new}")
        sentences.append(_sentence(name, op, b))
        value = new
    sentences.append(f"How many {item} does {name} have now?")
    solution = "\n".join(lines + [f"#### {value}"])
    meta = {"level": level, "start": start, "steps": steps, "seed": seed, "index": i}
    last_op = [str(int(lines[-1].split(" = ")[0].split()[0])), _SYMBOL[steps[-1][0]], str(steps[-1][1])]
    meta["last_op"] = last_op
    return Problem(f"synthetic-s{seed}-{i}", " ".join(sentences), str(value), "synthetic", "math", solution, meta)


def generate_problems(n: int = 100, seed: int = 0, levels: tuple[int, ...] = (1, 2, 3, 4)) -> list[Problem]:
    """``n`` problems; problem ``i`` has level ``levels[i % len(levels)]``. ids ``synthetic-s{seed}-{i}``."""
    cfg = SyntheticConfig(n, seed, tuple(levels))
    return [_problem(cfg.seed, i, cfg.levels[i % len(cfg.levels)]) for i in range(cfg.n)]
