"""The introspection organism: a tiny looped model that knows the concept words, built here on a CPU.

The gap organism (:mod:`loopalign.organism`) was trained on arithmetic only: it cannot talk about
concepts, its context (256) is shorter than the 257-token trial transcript, and every introspection
rate on it is 0. This organism is a tiny Ouro (2 shared layers x 4 loops, hidden 64, context 512)
trained from scratch with the local tokenizer to answer ``Tell me about {word}`` (the concept-vector
prompt, :func:`loopalign.injection.concept_prompt_ids`) with ``{Word}. I am thinking about {word}.``
for the 149 distinct words of the protocol (50 concept words, 99 baseline words), every loop
supervised (uniform per-loop cross-entropy, :mod:`loopalign.objectives`). So the residual stream at
the assistant-turn start carries the word, and concept vectors extracted there (the library's
extractor) point at words the model can say. It knows nothing about introspection: the recipes'
CPU default teaches the reports on the train concepts and measures the held-out ones.

Cached like the gap organism (its lock, stale-build cleanup and file checksums): under
:func:`loopalign.organism.organism_cache_dir` in ``introspection-organism-v{version}-{hash}`` (the hash covers
the config and the build fingerprint: torch, CPU capability, MKL / oneDNN, threads), built in
a temporary folder and renamed into place under a file lock; ``organism.json`` holds the config, the
losses and the size and sha256 of every model and tokenizer file, checked on load.

    from loopalign.organism.introspection import load_introspection_organism
    model, tokenizer = load_introspection_organism()  # about a minute on 2 cores the first time
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loopalign.batching import pad_sequences, pad_token_id
from loopalign.errors import ConfigError
from loopalign.injection import BASELINE_WORDS, CONCEPT_WORDS, concept_prompt_ids
from loopalign.log import get_logger
from loopalign.models.ouro import OuroForCausalLM
from loopalign.objectives import per_loop_token_losses, weighted_loop_loss
from loopalign.tokenizer import local_tokenizer

from .build import ensure_cached_build, load_built, save_trained, write_build
from .cache import cache_root, check_build_files, is_organism
from .config import OrganismRecipe
from .train import PartLoss, TrainResult, torch_threads, train_steps

logger = get_logger(__name__)

__all__ = [
    "INTROSPECTION_ORGANISM",
    "IntrospectionOrganismConfig",
    "introspection_organism_path",
    "ensure_introspection_organism",
    "load_introspection_organism",
    "build_introspection_organism",
    "word_reply",
    "word_accuracy",
    "train_word_stage",
]

#: the model name the introspection recipes resolve to this organism
INTROSPECTION_ORGANISM = "introspection_organism"
RECIPE_VERSION = 1
REBUILD_COMMAND = (
    'python -c "from loopalign.organism.introspection import ensure_introspection_organism as e; e(force=True)"'
)


@dataclass
class IntrospectionOrganismConfig(OrganismRecipe):
    """Everything that determines the introspection organism (its hash names the cache folder)."""

    recipe_version: int = RECIPE_VERSION
    seed: int = 0  # initialisation and data order
    hidden_size: int = 64  # residual stream width
    num_layers: int = 2  # shared decoder layers (run num_loops times)
    num_heads: int = 4  # attention heads
    intermediate_size: int = 192  # MLP width
    num_loops: int = 4  # loops per token (Ouro's total_ut_steps)
    vocab_size: int = 1024  # the local tokenizer's vocabulary
    max_position_embeddings: int = 512  # context: the 257-token trial transcript plus a reply fits
    steps: int = 600  # optimiser steps of the word stage
    batch_size: int = 32  # word prompts per step
    learning_rate: float = 3e-3  # AdamW peak learning rate (linear warm-up, linear decay to 10%)
    warmup_steps: int = 30
    num_threads: int = 1  # torch CPU threads of the build (the figures depend on it: part of the hash)

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "num_loops", "steps", "batch_size", "num_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"IntrospectionOrganismConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError("IntrospectionOrganismConfig.hidden_size must be a multiple of num_heads")
        if self.max_position_embeddings < 300:
            raise ConfigError(
                "IntrospectionOrganismConfig.max_position_embeddings must hold the trial transcript (>= 300)"
            )
        if not self.learning_rate > 0:
            raise ConfigError(f"IntrospectionOrganismConfig.learning_rate must be > 0, got {self.learning_rate}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def folder_name(self) -> str:
        return f"introspection-organism-v{self.recipe_version}-{self.config_hash()}"

    def model_config(self, vocab_size: int):
        return self.ouro_config(vocab_size, self.max_position_embeddings)


def word_reply(word: str) -> str:
    """The organism's answer to ``Tell me about {word}``."""
    return f"{word}. I am thinking about {word.lower()}."


def _words() -> list[str]:
    return list(dict.fromkeys([*CONCEPT_WORDS, *BASELINE_WORDS]))


def introspection_organism_path(
    config: IntrospectionOrganismConfig | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    return cache_root(cache_dir) / (config or IntrospectionOrganismConfig()).folder_name()


def _batch(tokenizer, words: list[str], rng: random.Random, size: int) -> dict[str, torch.Tensor]:
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    seqs = []
    for w in (rng.choice(words) for _ in range(size)):
        prompt = concept_prompt_ids(tokenizer, w)
        reply = tokenizer.encode(word_reply(w), add_special_tokens=False) + [end]
        seqs.append((prompt + reply, len(prompt)))
    ids = pad_sequences([s for s, _ in seqs], pad_token_id(tokenizer))  # right padding
    labels = pad_sequences([[-100] * n_prompt + s[n_prompt:] for s, n_prompt in seqs], -100)
    return {"input_ids": ids, "labels": labels}


def train_word_stage(config: IntrospectionOrganismConfig, progress: bool = True) -> TrainResult:
    """The word stage from scratch (every loop's readout supervised equally), through the organisms' one training
    loop (:func:`loopalign.organism.train.train_steps`). -> :class:`TrainResult`."""
    tokenizer = local_tokenizer(config.vocab_size)
    with torch_threads(config.num_threads):
        torch.manual_seed(config.seed)
        model = OuroForCausalLM(config.model_config(len(tokenizer)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.01)
        rng = random.Random(f"introspection-organism-{config.seed}")
        words, uniform = _words(), [1.0 / config.num_loops] * config.num_loops

        def lr_at(step: int) -> float:  # linear warm-up, then linear decay to 10%
            warm = (step + 1) / config.warmup_steps if step < config.warmup_steps else 1.0
            decay = 1.0 - 0.9 * max(0, step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
            return config.learning_rate * min(warm, decay)

        def part_loss(part: dict) -> PartLoss:
            out = model(part["input_ids"], output_loop_states=True, use_cache=False, exit="last", logits_to_keep=1)
            token_losses, _ = per_loop_token_losses(model.lm_head, out.loop_hidden_states, part["labels"])
            loss, _ = weighted_loop_loss(token_losses, uniform)
            return PartLoss(loss, 1.0, token_losses.detach().mean(dim=1))

        return train_steps(
            TrainResult(model=model, tokenizer=tokenizer),
            optimizer,
            config.steps,
            lr_at,
            lambda step: [_batch(tokenizer, words, rng, config.batch_size)],
            part_loss,
            1.0,
            config.num_loops,
            desc="introspection organism",
            progress=progress,
        )


@torch.no_grad()
def word_accuracy(model, tokenizer, words: list[str] | None = None) -> float:
    """Share of words whose greedy answer to ``Tell me about {word}`` starts with the word."""
    words = words or _words()
    hits = 0
    for w in words:
        ids = torch.tensor([concept_prompt_ids(tokenizer, w)])
        out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        hits += tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip().startswith(w)
    return hits / len(words)


def build_introspection_organism(
    config: IntrospectionOrganismConfig | None = None, out_dir: str | os.PathLike = "", progress: bool = True
) -> Path:
    """Train and save (model + tokenizer + ``organism.json``) into ``out_dir``, atomically (temporary folder, rename)."""
    config = config or IntrospectionOrganismConfig()

    def write(tmp: Path) -> dict:
        t0 = time.perf_counter()
        logger.info(f"building the introspection organism {out_dir}: {config.steps} steps")
        trained = train_word_stage(config, progress)
        model, tokenizer, losses = trained.model, trained.tokenizer, trained.losses
        files = save_trained(tmp, model, tokenizer)
        meta = {
            "recipe_version": config.recipe_version,
            "config_hash": config.config_hash(),
            "config": config.to_dict(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "loss_first_20": sum(losses[:20]) / len(losses[:20]),
            "loss_last_20": sum(losses[-20:]) / len(losses[-20:]),
            "word_accuracy": word_accuracy(model, tokenizer),
            "build_seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__,
            "build": config.kernel_path(),  # the kernel path (part of config_hash)
            "files": files,
        }
        (tmp / "losses.json").write_text(json.dumps(losses))
        logger.info(f"introspection organism built in {meta['build_seconds']} s; word accuracy "
                    f"{100 * meta['word_accuracy']:.0f}%")  # fmt: skip
        return meta

    return write_build(out_dir, "introspection organism", write)


def ensure_introspection_organism(
    config: IntrospectionOrganismConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    lock_timeout: float | None = None,
) -> Path:
    """The organism's folder in the cache, built first when missing (or with ``force``) under a lock, checked
    (:func:`loopalign.organism.build.ensure_cached_build`)."""
    config = config or IntrospectionOrganismConfig()
    return ensure_cached_build(
        introspection_organism_path(config, cache_dir),
        lambda p: is_organism(p, config, required=("config.json", "tokenizer.json")),
        lambda p: build_introspection_organism(config, p, progress=progress),
        lambda p: check_build_files(p, REBUILD_COMMAND, what="introspection organism"),
        what="introspection organism",
        rebuild=REBUILD_COMMAND,
        force=force,
        lock_timeout=lock_timeout,
    )


def load_introspection_organism(
    config: IntrospectionOrganismConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
):
    """-> (model in eval mode, tokenizer), built into the cache first when missing."""
    return load_built(ensure_introspection_organism(config, cache_dir), device)
