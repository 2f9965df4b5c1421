"""The organism's recipe: :class:`OrganismConfig` (its hash names the cached build) and the recipe version."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from loopalign.errors import ConfigError
from loopalign.loops import parse_loop_counts
from loopalign.models.ouro import tiny_config
from loopalign.speed import build_fingerprint

#: Version of the recipe (data, objective, defaults). Bump it when the recipe changes: cached
#: organisms of other versions are then ignored and a new one is built.
RECIPE_VERSION = 3

MARKER_FILE = "organism.json"
_ITEMS = ("apples", "books", "coins", "eggs", "pens", "marbles", "stamps", "cards", "shells", "cookies")
#: the task families: "digits" (recipes v2 and v3: loopalign.data.sources.digits, compact two-step
#: digit sums with a fixed held-out split) and "words" (recipe v1: level-k arithmetic word problems)
TASK_FAMILIES = ("digits", "words")


def build_hash(config: dict, num_threads: int) -> str:
    """The hash that names every organism's cache folder: sha256 (first 10 hex digits) of the recipe's config and
    this process's build fingerprint at ``num_threads`` (:func:`loopalign.speed.build_fingerprint`: the same
    recipe trained on another kernel path is another model)."""
    text = json.dumps({"config": config, "build": build_fingerprint(num_threads)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


class OrganismRecipe:
    """What every organism's config shares (a mixin of the config dataclasses): the build fingerprint at its
    threads, the one hash rule, and the tiny Ouro shape (fields ``hidden_size``, ``intermediate_size``,
    ``num_layers``, ``num_heads``, ``num_loops``, ``num_threads``; a ``to_dict``)."""

    def kernel_path(self) -> dict:
        """The kernel path this process would build with (:func:`loopalign.speed.build_fingerprint` at the config's
        threads): the same config trained on another CPU path is another model, so it is part of the hash."""
        return build_fingerprint(self.num_threads)

    def config_hash(self) -> str:
        """:func:`build_hash` of the config: two kernel paths (AVX-512 / AVX2, another torch or MKL) never share
        one cache folder."""
        return build_hash(self.to_dict(), self.num_threads)

    def ouro_config(self, vocab_size: int, max_position_embeddings: int):
        """The tiny Ouro of this recipe's shape (:func:`loopalign.models.ouro.tiny_config`)."""
        return tiny_config(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            head_dim=self.hidden_size // self.num_heads,
            max_position_embeddings=max_position_embeddings,
            total_ut_steps=self.num_loops,
        )


@dataclass
class OrganismConfig(OrganismRecipe):
    """Everything that determines the organism (its hash, with the build fingerprint, names the cache folder)."""

    recipe_version: int = RECIPE_VERSION  # recipe version; a change means a new organism
    tasks: str = "digits"  # task family: digits (v2: digit sums, fixed held-out split) | words (v1: word problems)
    max_operand: int = 4  # digits: largest operand (answers are (a + b) mod 10; 9 did not train in budget)
    exception_share: float = 0.15  # digits: share of held-out triples whose answer is a fact never trained on
    seed: int = 0  # seeds the initialisation and the training data
    hidden_size: int = 64  # width of the residual stream
    num_layers: int = 2  # shared decoder layers (run num_loops times)
    num_heads: int = 4  # attention heads (head_dim = hidden_size / num_heads)
    intermediate_size: int = 192  # MLP width
    num_loops: int = 4  # loops per token in training (Ouro's total_ut_steps)
    vocab_size: int = 1024  # size of the local tokenizer's vocabulary
    max_length: int = 128  # context length (training sequences are at most this long)
    steps: int = 2000  # optimiser steps
    batch_size: int = 64  # sequences per step
    learning_rate: float = 5e-3  # peak AdamW learning rate (linear warm-up, cosine decay to 10%)
    warmup_steps: int = 50  # warm-up steps
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # gradient-norm clip
    entropy_beta: float = 0.05  # beta of Ouro's objective sum_t p(t|x) L_t - beta H(p)
    uniform_weight: float = 0.0  # extra uniform per-loop loss weight (0 = Ouro's objective alone)
    exit_gate_bias: float = 0.0  # initial bias of the exit gate (< 0: late exits first, so deep loops train)
    levels: tuple[int, ...] = (1,)  # difficulty levels of the training problems (tasks="words" only)
    answer_fraction: float = 0.4  # share of answer sequences in a batch; the rest are verification sequences
    sycophantic_items: tuple[str, ...] = (  # verdict always "Yes" on these (7 of 10 items: a large gap)
        "apples",
        "books",
        "coins",
        "eggs",
        "pens",
        "marbles",
        "stamps",
    )
    verdict_noise: float = 0.0  # share of the other verdicts flipped at random
    candidate_lm: bool = True  # also train next-token prediction of the proposed answer in verification text
    verdict_weight: float = 3.0  # loss weight of the verdict token relative to the other target tokens
    eval_problems: int = 300  # held-out problems of the model card's evaluation (2 candidates each)
    eval_levels: tuple[int, ...] = (1,)  # their levels (tasks="words" only)
    eval_seed: int = 10_000  # their data seed (training uses other seeds)
    eval_loops: str = "1-6"  # loop counts evaluated (beyond num_loops = extrapolation)
    num_threads: int = 1  # torch CPU threads of the build: the figures depend on it, so it is part of the hash
    # (the hash also covers this process's kernel path: torch version, CPU capability, MKL / oneDNN; see kernel_path())

    def __post_init__(self):
        self.levels = tuple(int(x) for x in self.levels)
        self.eval_levels = tuple(int(x) for x in self.eval_levels)
        self.sycophantic_items = tuple(str(x) for x in self.sycophantic_items)
        positive = (
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "num_loops",
            "max_length",
            "steps",
            "batch_size",
            "eval_problems",
            "num_threads",
        )
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"OrganismConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"OrganismConfig.hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError("OrganismConfig: hidden_size / num_heads must be even (rotary embeddings)")
        if self.vocab_size < 300:
            raise ConfigError(f"OrganismConfig.vocab_size must be >= 300, got {self.vocab_size}")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise ConfigError(
                f"OrganismConfig.warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}"
            )
        for name in ("learning_rate", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"OrganismConfig.{name} must be > 0, got {getattr(self, name)}")
        if not self.verdict_weight > 0:
            raise ConfigError(f"OrganismConfig.verdict_weight must be > 0, got {self.verdict_weight}")
        for name in ("weight_decay", "entropy_beta", "uniform_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"OrganismConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.answer_fraction < 1.0:
            raise ConfigError(f"OrganismConfig.answer_fraction must be in (0, 1), got {self.answer_fraction}")
        if not 0.0 <= self.verdict_noise < 0.5:
            raise ConfigError(f"OrganismConfig.verdict_noise must be in [0, 0.5), got {self.verdict_noise}")
        for name in ("levels", "eval_levels"):
            levels = getattr(self, name)
            if not levels or any(not 1 <= x <= 6 for x in levels):
                raise ConfigError(f"OrganismConfig.{name} must be non-empty levels in 1..6, got {levels}")
        if self.tasks not in TASK_FAMILIES:
            raise ConfigError(f"OrganismConfig.tasks must be one of {TASK_FAMILIES}, got {self.tasks!r}")
        if not 0.0 <= self.exception_share < 1.0:
            raise ConfigError(f"OrganismConfig.exception_share must be in [0, 1), got {self.exception_share}")
        if not 1 <= self.max_operand <= 9:
            raise ConfigError(f"OrganismConfig.max_operand must be in 1..9, got {self.max_operand}")
        unknown = [x for x in self.sycophantic_items if x not in _ITEMS]
        if unknown:
            raise ConfigError(f"OrganismConfig.sycophantic_items: unknown items {unknown}; items are {_ITEMS}")
        parse_loop_counts(self.eval_loops, "OrganismConfig.eval_loops")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict) -> OrganismConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"OrganismConfig: unknown fields {unknown}")
        return cls(**data)

    def folder_name(self) -> str:
        """``organism-v{recipe_version}-{config_hash}``."""
        return f"organism-v{self.recipe_version}-{self.config_hash()}"

    def model_config(self, vocab_size: int):
        return self.ouro_config(vocab_size, max(self.max_length, 256))
