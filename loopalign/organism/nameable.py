"""The nameable organism: the introspection organism taught to *say* a word whose concept vector is injected.

The introspection organism (:mod:`.introspection`) knows the 149 protocol words, but injecting a concept's vector
never makes it say the word (0/192 held-out trials): so a positive control on it can show detection, never
concept-specific detection or identification (issue #29 item 4). A real LLM is steerable: add a concept's
direction and it talks about the concept. This organism is given that property on purpose, and nothing about
introspection: after the same word stage, a **steering stage** trains, beside the word rows (kept so it keeps its
words), rows where a word's concept vector is injected, norm-matched, at the last loop and the default vector layer
into a neutral request for a word (:data:`loopalign.eval.introspection.nameability.NAMEABILITY_PROMPTS`, after 0-3
earlier exchanges about other words); the target is the word alone (``{Word}.``) or after a lead-in (``I am
thinking about {word}.``), and only the last loop's readout is supervised on those rows. The vectors are the
library's extraction (the concept prompt's last-token state at the site minus the baseline words' mean), computed
in each step from the model being trained with the loss reaching the extraction site, so the model learns to put
what names the word where a concept vector is read as well as to read it (with vectors fixed between refreshes,
held-out concepts were named 17-29%; with the gradient, 73-83%). The baseline mean and the site norms are refreshed
every ``steer_refresh`` steps. Every one of the 149 words is steered, the held-out concepts of the recipes' split
included: "held out" in the positive control means never in *introspection* training, and nameability is the
pretrained ability it presupposes, as in an LLM. The trial question, the researcher's text and the control
questions never appear.

The build records nameability of the held-out concepts (:func:`loopalign.eval.introspection.nameability.nameability`)
on a neutral request no build trains on and in the trial transcript, which it never saw: ``organism.json``
``nameability``. Cached like the introspection organism (``nameable-organism-v{version}-{hash}``).

    from loopalign.organism.nameable import load_nameable_organism
    model, tokenizer = load_nameable_organism()  # 10-13 minutes on one shared core the first time
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loopalign.batching import pad_left, pad_sequences, pad_token_id
from loopalign.errors import ConfigError
from loopalign.eval.introspection.nameability import NAMEABILITY_PROMPTS, nameability
from loopalign.eval.introspection.trials import split_concepts
from loopalign.hooks import capture_activations
from loopalign.injection import (
    BASELINE_WORDS,
    CONCEPT_WORDS,
    concept_prompt_ids,
    default_vector_layer,
    extract_concept_vectors,
    inject_rows,
    render_chat,
    residual_site_norms,
)
from loopalign.log import get_logger
from loopalign.objectives import per_loop_token_losses

from .build import ensure_cached_build, load_built, save_trained, write_build
from .cache import cache_root, check_build_files, is_organism
from .introspection import IntrospectionOrganismConfig, train_word_stage, word_accuracy, word_reply
from .train import PartLoss, TrainResult, torch_threads, train_steps

logger = get_logger(__name__)

__all__ = [
    "NAMEABLE_ORGANISM",
    "NameableOrganismConfig",
    "nameable_organism_path",
    "ensure_nameable_organism",
    "load_nameable_organism",
    "build_nameable_organism",
    "steering_rows",
    "held_out_nameability",
]

#: the replies a steering row is trained on: the word alone, and the word stage's own second sentence (so the word
#: is read from the injection after a lead-in too, not only as the reply's first token); never the trial's report
STEER_FRAMES: tuple[str, ...] = ("{Word}.", "I am thinking about {word}.")
#: the model name the introspection recipes resolve to this organism
NAMEABLE_ORGANISM = "nameable_organism"
NAMEABLE_VERSION = 3
REBUILD_COMMAND = 'python -c "from loopalign.organism.nameable import ensure_nameable_organism as e; e(force=True)"'


@dataclass
class NameableOrganismConfig(IntrospectionOrganismConfig):
    """The introspection organism's word stage, then the steering stage (its hash names the cache folder)."""

    nameable_version: int = NAMEABLE_VERSION
    steer_steps: int = 1500  # optimiser steps of the steering stage
    steer_batch_size: int = 16  # steering rows per step (beside batch_size word rows)
    steer_learning_rate: float = 1e-3  # AdamW, constant after 20 warm-up steps
    steer_strengths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # fractions of the residual norm at the site
    steer_refresh: int = 50  # steps between re-extractions of the concept vectors from the model in training
    steer_max_context: int = 3  # earlier exchanges (about other words) before a steering row's request: 0..this
    steer_frames: tuple[str, ...] = STEER_FRAMES  # the replies a steering row is trained on, one drawn per row
    # the steering rows' vectors computed in the step from the model in training, the loss reaching them (else the
    # last refresh's, fixed): the model learns to put what names the word where a concept vector is read
    steer_vector_grad: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.steer_strengths = tuple(float(s) for s in self.steer_strengths)
        for name in ("steer_steps", "steer_batch_size", "steer_refresh"):
            if getattr(self, name) < 1:
                raise ConfigError(f"NameableOrganismConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.steer_strengths or any(not s > 0 for s in self.steer_strengths):
            raise ConfigError(f"NameableOrganismConfig.steer_strengths must be > 0, got {self.steer_strengths}")
        if self.steer_max_context < 0:
            raise ConfigError(f"NameableOrganismConfig.steer_max_context must be >= 0, got {self.steer_max_context}")
        self.steer_frames = tuple(self.steer_frames)
        if not self.steer_frames or any("{word}" not in f.lower() for f in self.steer_frames):
            raise ConfigError(
                f"NameableOrganismConfig.steer_frames must each hold {{word}} or {{Word}}, got {self.steer_frames}"
            )
        if not self.steer_learning_rate > 0:
            raise ConfigError(f"NameableOrganismConfig.steer_learning_rate must be > 0, got {self.steer_learning_rate}")

    def folder_name(self) -> str:
        return f"nameable-organism-v{self.nameable_version}-{self.config_hash()}"

    def word_stage(self) -> IntrospectionOrganismConfig:
        """The introspection organism's config this build's word stage trains (the same fields)."""
        names = IntrospectionOrganismConfig.__dataclass_fields__
        return IntrospectionOrganismConfig(**{k: v for k, v in self.to_dict().items() if k in names})


def _words() -> list[str]:
    return list(dict.fromkeys([*CONCEPT_WORDS, *BASELINE_WORDS]))


def nameable_organism_path(config: NameableOrganismConfig | None = None, cache_dir=None) -> Path:
    return cache_root(cache_dir) / (config or NameableOrganismConfig()).folder_name()


def steering_rows(
    tokenizer, word: str, prompt: str, context_words: Sequence[str] = (), frame: str = STEER_FRAMES[0]
) -> tuple[list[int], int, int]:
    """One steering row: (token ids of the request (after one earlier exchange per word of ``context_words``) and the
    reply ``frame`` with the word, the injection start (the last user turn's first token), the prompt length)."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    messages = []
    for other in context_words:
        messages += [
            {"role": "user", "content": f"Tell me about {other.lower()}"},
            {"role": "assistant", "content": word_reply(other)},
        ]
    start = 0
    if messages:
        before = tokenizer(render_chat(tokenizer, messages, add_generation_prompt=False), add_special_tokens=False)
        start = len(before["input_ids"])
    text = render_chat(tokenizer, [*messages, {"role": "user", "content": prompt}])
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if messages and ids[:start] != list(before["input_ids"]):
        raise ValueError("the chat template does not render the earlier exchanges as a prefix of the conversation")
    reply = tokenizer.encode(frame.format(Word=word, word=word.lower()), add_special_tokens=False) + [end]
    return ids + reply, start, len(ids)


def train_steer_stage(result: TrainResult, config: NameableOrganismConfig, progress: bool = True) -> TrainResult:
    """The steering stage on the word stage's model (see the module docstring). -> a new :class:`TrainResult`."""
    model, tokenizer = result.model, result.tokenizer
    num_loops, loop = config.num_loops, config.num_loops - 1
    layer = default_vector_layer(model.config)
    words, hidden = _words(), config.hidden_size
    rng = random.Random(f"nameable-organism-{config.seed}")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    state: dict = {}

    def site_states(batch_words: list[str]) -> torch.Tensor:
        """[B,H] residual at the site, last token of each word's concept prompt (as the extraction reads it)."""
        enc = pad_left([concept_prompt_ids(tokenizer, w) for w in batch_words], pad_token_id(tokenizer))
        with capture_activations(model, [(loop, layer)], detach=False) as cap:
            model(enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False, logits_to_keep=1)
        return cap.get(loop, layer)[:, -1].float()

    def refresh() -> None:  # site norms and the vectors' reference from the model as it is now
        was = model.training
        model.eval()
        if config.steer_vector_grad:  # the vectors are computed in each step: only the baseline mean is kept
            with torch.no_grad():
                state["base_mean"] = site_states(list(BASELINE_WORDS)).mean(0)
        else:  # the vectors themselves, fixed until the next refresh
            state["vectors"] = extract_concept_vectors(
                model, tokenizer, words, num_loops=num_loops, layers=[layer], batch_size=64
            )
        sites = []
        for p in NAMEABILITY_PROMPTS:
            ids, _, n = steering_rows(tokenizer, words[0], p)
            sites.append({"input_ids": ids[:n], "injection_start": 0, "num_loops": num_loops,
                          "injection_loop": loop, "layer": layer})  # fmt: skip
        norms = [residual_site_norms(model, [s])[(num_loops, loop, layer)] for s in sites]
        state["norms"] = dict(zip(NAMEABILITY_PROMPTS, norms))
        model.train(was)

    def batch(step: int) -> list[dict]:
        if step % config.steer_refresh == 0:
            refresh()
        seqs, vecs, steer_words, scales = [], [], [], []
        for w in (rng.choice(words) for _ in range(config.batch_size)):  # word rows: every loop supervised
            prompt = concept_prompt_ids(tokenizer, w)
            seqs.append((prompt + tokenizer.encode(word_reply(w), add_special_tokens=False) + [end], len(prompt), -1))
            vecs.append(torch.zeros(hidden))
        for _ in range(config.steer_batch_size):  # steering rows: the last loop supervised
            w, p = rng.choice(words), rng.choice(NAMEABILITY_PROMPTS)
            others = rng.sample([x for x in words if x != w], rng.randint(0, config.steer_max_context))
            ids, start, n = steering_rows(tokenizer, w, p, others, rng.choice(config.steer_frames))
            scale = rng.choice(config.steer_strengths) * state["norms"][p]
            seqs.append((ids, n, start))
            if config.steer_vector_grad:  # computed in part_loss
                vecs.append(torch.zeros(hidden))
            else:
                v = state["vectors"].vector(w, loop, layer).float()
                vecs.append(scale * v / v.norm().clamp_min(1e-12))
            steer_words.append(w)
            scales.append(scale)
        ids = pad_sequences([q for q, _, _ in seqs], pad_token_id(tokenizer))
        labels = pad_sequences([[-100] * n + q[n:] for q, n, _ in seqs], -100)
        steered = torch.tensor([st >= 0 for _, _, st in seqs])
        return [{"input_ids": ids, "labels": labels, "vectors": torch.stack(vecs), "steered": steered,
                 "starts": [max(st, 0) for _, _, st in seqs], "steer_words": steer_words,
                 "scales": torch.tensor(scales)}]  # fmt: skip

    uniform = torch.full((num_loops, 1), 1.0 / num_loops)

    def part_loss(part: dict) -> PartLoss:
        steered, vectors = part["steered"], part["vectors"]
        if config.steer_vector_grad:  # this step's vectors, differentiable: the loss reaches the extraction site
            live = site_states(part["steer_words"]) - state["base_mean"]
            live = live * (part["scales"] / live.norm(dim=-1).clamp_min(1e-12)).unsqueeze(-1)
            vectors = torch.cat([vectors[~steered], live])  # the word rows come first, then the steering rows
        loops = [loop if s else -1 for s in steered.tolist()]
        with inject_rows(model, vectors, loops, [layer] * len(loops), part["starts"], num_loops=num_loops):
            out = model(part["input_ids"], output_loop_states=True, use_cache=False, exit="last", logits_to_keep=1)
        token_losses, index = per_loop_token_losses(model.lm_head, out.loop_hidden_states, part["labels"])
        row_steered = steered[index // part["input_ids"].shape[1]]
        word_loss = (token_losses[:, ~row_steered] * uniform).sum(0).mean()
        steer_loss = token_losses[loop, row_steered].mean()
        return PartLoss(word_loss + steer_loss, 1.0, token_losses.detach().mean(dim=1))

    with torch_threads(config.num_threads):
        torch.manual_seed(config.seed + 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.steer_learning_rate, betas=(0.9, 0.95),
                                      weight_decay=0.01)  # fmt: skip
        return train_steps(
            TrainResult(model=model, tokenizer=tokenizer),
            optimizer,
            config.steer_steps,
            lambda step: config.steer_learning_rate * min(1.0, (step + 1) / 20),
            batch,
            part_loss,
            1.0,
            num_loops,
            desc="nameable organism: steering stage",
            progress=progress,
        )


def held_out_nameability(model, tokenizer, strengths: Sequence[float] = (0.5, 1.0, 2.0, 4.0)) -> dict:
    """Nameability of the recipes' held-out concepts (``split_concepts(CONCEPT_WORDS)``, 12 words) at the last loop and
    the default vector layer, among the 149 protocol words, on a neutral request no build trains on and in the trial
    transcript, at each norm-matched strength. -> {"neutral": ..., "trial": ...} (any model of the protocol)."""
    num_loops = int(getattr(model.config, "total_ut_steps", 1))
    loop, layer = num_loops - 1, default_vector_layer(model.config)
    _, held = split_concepts(CONCEPT_WORDS)
    cv = extract_concept_vectors(model, tokenizer, _words(), num_loops=num_loops, layers=[layer], batch_size=64)
    return {
        context: nameability(model, tokenizer, cv, held, loop, layer, strengths, context, _words())
        for context in ("neutral", "trial")
    }


def build_nameable_organism(
    config: NameableOrganismConfig | None = None, out_dir: str | os.PathLike = "", progress: bool = True
) -> Path:
    """Train (word stage, steering stage) and save into ``out_dir`` atomically, with ``organism.json``."""
    config = config or NameableOrganismConfig()

    def write(tmp: Path) -> dict:
        t0 = time.perf_counter()
        logger.info(f"building the nameable organism {out_dir}: {config.steps} + {config.steer_steps} steps")
        words = train_word_stage(config.word_stage(), progress)
        steered = train_steer_stage(words, config, progress)
        model, tokenizer = steered.model, steered.tokenizer
        with torch_threads(config.num_threads):
            named = held_out_nameability(model, tokenizer, config.steer_strengths)
            accuracy = word_accuracy(model, tokenizer)
        files = save_trained(tmp, model, tokenizer)
        meta = {
            "recipe_version": config.recipe_version,
            "nameable_version": config.nameable_version,
            "config_hash": config.config_hash(),
            "config": config.to_dict(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "word_stage_loss_last_20": sum(words.losses[-20:]) / len(words.losses[-20:]),
            "steer_stage_loss_first_20": sum(steered.losses[:20]) / len(steered.losses[:20]),
            "steer_stage_loss_last_20": sum(steered.losses[-20:]) / len(steered.losses[-20:]),
            "word_accuracy": accuracy,
            "nameability": named,
            "build_seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__,
            "build": config.kernel_path(),
            "files": files,
        }
        (tmp / "losses.json").write_text(json.dumps({"word": words.losses, "steer": steered.losses}))
        logger.info(
            f"nameable organism built in {meta['build_seconds']} s; word accuracy {100 * accuracy:.0f}%; held-out "
            f"concepts named {100 * named['neutral']['rate']:.0f}% (neutral request), "
            f"{100 * named['trial']['rate']:.0f}% (trial transcript)"
        )
        return meta

    return write_build(out_dir, "nameable organism", write)


def ensure_nameable_organism(
    config: NameableOrganismConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    lock_timeout: float | None = None,
) -> Path:
    """The organism's folder in the cache, built first when missing (or with ``force``) under a lock, checked."""
    config = config or NameableOrganismConfig()
    return ensure_cached_build(
        nameable_organism_path(config, cache_dir),
        lambda p: is_organism(p, config, required=("config.json", "tokenizer.json")),
        lambda p: build_nameable_organism(config, p, progress=progress),
        lambda p: check_build_files(p, REBUILD_COMMAND, what="nameable organism"),
        what="nameable organism",
        rebuild=REBUILD_COMMAND,
        force=force,
        lock_timeout=lock_timeout,
    )


def load_nameable_organism(
    config: NameableOrganismConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
):
    """-> (model in eval mode, tokenizer), built into the cache first when missing."""
    return load_built(ensure_nameable_organism(config, cache_dir), device)
