"""The organism's training loop (Ouro's entropy-regularised per-loop objective, from scratch, on a CPU)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from loopalign.models.ouro import OuroForCausalLM
from loopalign.objectives import ouro_entropy_objective, per_loop_token_losses, weighted_loop_loss
from loopalign.tokenizer import local_tokenizer

from .config import OrganismConfig
from .data import training_batch


@dataclass
class TrainResult:
    """What :func:`train_organism` returns: the model, the tokenizer and the loss history."""

    model: torch.nn.Module
    tokenizer: object
    losses: list[float] = field(default_factory=list)  # objective per step
    loop_losses: list[list[float]] = field(default_factory=list)  # per-loop mean CE per step
    exit_probs: list[list[float]] = field(default_factory=list)  # mean exit distribution per step
    seconds: float = 0.0  # wall time of the training loop


def cosine_lr_at(config: OrganismConfig, step: int) -> float:
    """The organism recipe's learning rate at ``step``: linear warm-up, then cosine decay to 10% of the peak."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


#: seconds per training step of the default organism (recipe v2: 64 sequences of about 20 tokens) with
#: 1 thread on a 2-core machine running one other build (243-248 s for 2,000 steps, 2026-12-02); the
#: build estimate scales it by batch and model size
_REFERENCE_STEP_SECONDS = 0.125


def expected_build_seconds(config: OrganismConfig) -> float:
    """A rough build time on an unloaded 2-core machine: training scaled from the default organism's
    measured step time by batch size and model size, plus about 10% for the evaluation."""
    default = OrganismConfig()

    def size(c: OrganismConfig) -> float:
        return c.num_loops * c.num_layers * (4 * c.hidden_size**2 + 3 * c.hidden_size * c.intermediate_size)

    scale = (config.batch_size / default.batch_size) * (size(config) / size(default))
    return 1.1 * config.steps * _REFERENCE_STEP_SECONDS * max(scale, 0.05)


def adamw(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) with weight decay on matrices only (biases and norms undecayed)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate,
        betas=(0.9, 0.95),
    )


@dataclass
class PartLoss:
    """One part of a training step, as an organism's objective reads it."""

    loss: torch.Tensor  # the part's objective (a mean over its weighted target tokens)
    mass: float  # the part's weight in the step: its target tokens' summed weights
    loop_sums: torch.Tensor  # per loop, the summed weighted token losses (detached)
    exit_sums: torch.Tensor | None = None  # per loop, the summed weighted exit probabilities (Ouro only)


def train_steps(
    result: TrainResult,
    optimizer: torch.optim.Optimizer,
    steps: int,
    lr_at: Callable[[int], float],
    parts_at: Callable[[int], list[dict]],
    part_loss: Callable[[dict], PartLoss],
    grad_clip: float,
    num_loops: int,
    desc: str,
    progress: bool = True,
) -> TrainResult:
    """The one training loop of every organism: per step, the learning rate ``lr_at(step)``, the step's parts
    ``parts_at(step)`` (each a dict; one with ``"weights"`` counts as their sum, else as 1), each part's
    ``part_loss`` backpropagated at its share of the step's weight, the gradient clipped, one optimiser step.
    Appends the step's objective, per-loop losses and (when the parts give them) exit probabilities to ``result``
    and sets its ``seconds``; the model is left in eval mode."""
    model = result.model
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=2.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        parts = parts_at(step)
        n_total = sum(float(part["weights"].sum()) if "weights" in part else 1.0 for part in parts)
        step_loss, step_loops, step_exit = 0.0, torch.zeros(num_loops), None
        for part in parts:
            out = part_loss(part)
            share = out.mass / n_total  # a weighted mean over the whole step
            (out.loss * share).backward()
            step_loss += float(out.loss.detach()) * share
            step_loops += out.loop_sums / n_total
            if out.exit_sums is not None:
                step_exit = (step_exit if step_exit is not None else torch.zeros(num_loops)) + out.exit_sums / n_total
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(step_loss)
        result.loop_losses.append([round(float(x), 5) for x in step_loops])
        if step_exit is not None:
            result.exit_probs.append([round(float(x), 4) for x in step_exit])
        if progress:
            bar.set_postfix(
                loss=f"{step_loss:.3f}", loops="/".join(f"{x:.2f}" for x in result.loop_losses[-1]), refresh=False
            )
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


def weighted_part_loss(
    model: torch.nn.Module, part: dict, num_loops: int, beta: float | None = None, uniform_weight: float = 0.0
) -> PartLoss:
    """The organisms' per-loop objective on one part (right-padded ``input_ids``, ``labels``, per-token
    ``weights``): every loop's token losses, each weighted by its target token's weight; with ``beta``, Ouro's
    entropy-regularised objective over the exit distribution (plus ``uniform_weight`` times the uniform per-loop
    loss), else the uniform mean over loops (Huginn has no exit gate)."""
    uniform = [1.0 / num_loops] * num_loops
    # right padding: real tokens never attend to the pads after them, so no mask is needed
    exit_gate = {} if beta is None else {"exit": "last"}  # Ouro's exit distribution, read with the last exit
    out = model(part["input_ids"], output_loop_states=True, use_cache=False, logits_to_keep=1, **exit_gate)
    token_losses, index = per_loop_token_losses(model.lm_head, out.loop_hidden_states, part["labels"])
    # position s predicts token s+1: the weight of a loss is its target token's
    weight = part["weights"].reshape(-1).index_select(0, index + 1)
    weighted = token_losses * (weight / weight.mean())
    exit_sums = None
    if beta is None:
        loss = weighted_loop_loss(weighted, uniform)[0]
    else:
        exit_probs = out.exit_probs.reshape(-1, num_loops).index_select(0, index)
        loss, _entropy = ouro_entropy_objective(weighted, exit_probs, beta=beta)
        if uniform_weight:
            loss = loss + uniform_weight * weighted_loop_loss(weighted, uniform)[0]
        exit_sums = (exit_probs.detach() * weight[:, None]).sum(dim=0)
    return PartLoss(loss, float(weight.sum()), (token_losses.detach() * weight).sum(dim=1), exit_sums)


def train_on_organism_data(
    config: OrganismConfig,
    build_model: Callable[[int], torch.nn.Module],
    objective: Callable[[torch.nn.Module, dict], PartLoss],
    desc: str,
    progress: bool = True,
) -> TrainResult:
    """A model of ``build_model(vocab_size)`` trained from scratch on the organism's tasks and data
    (:func:`training_batch`) with the recipe's optimiser and schedule, ``objective(model, part)`` per part, with
    ``config.num_threads`` torch threads: deterministic by ``config.seed`` on a given machine."""
    tokenizer = local_tokenizer(config.vocab_size)
    with torch_threads(config.num_threads):
        torch.manual_seed(config.seed)
        model = build_model(len(tokenizer))
        return train_steps(
            TrainResult(model=model, tokenizer=tokenizer),
            adamw(model, config.learning_rate, config.weight_decay),
            config.steps,
            lambda step: cosine_lr_at(config, step),
            lambda step: training_batch(config, tokenizer, step),
            lambda part: objective(model, part),
            config.grad_clip,
            config.num_loops,
            desc=desc,
            progress=progress,
        )


def train_organism(config: OrganismConfig, progress: bool = True) -> TrainResult:
    """Train the organism from scratch (Ouro's entropy-regularised per-loop objective) with ``config.num_threads``
    torch threads: deterministic by ``config.seed`` on a given machine (the thread count is part of the config)."""

    def build(vocab_size: int) -> OuroForCausalLM:
        model = OuroForCausalLM(config.model_config(vocab_size))
        with torch.no_grad():
            model.model.early_exit_gate.bias.fill_(config.exit_gate_bias)
        return model

    def objective(model, part: dict) -> PartLoss:
        return weighted_part_loss(
            model, part, config.num_loops, beta=config.entropy_beta, uniform_weight=config.uniform_weight
        )

    return train_on_organism_data(config, build, objective, desc="organism", progress=progress)
