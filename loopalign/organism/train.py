"""The organism's training loop (Ouro's entropy-regularised per-loop objective, from scratch, on a CPU)."""

from __future__ import annotations

import contextlib
import math
import time
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


def _lr_at(config: OrganismConfig, step: int) -> float:
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


def train_organism(config: OrganismConfig, progress: bool = True) -> TrainResult:
    """Train the organism from scratch with ``config.num_threads`` torch threads: deterministic by
    ``config.seed`` on a given machine (the thread count is part of the config)."""

    tokenizer = local_tokenizer(config.vocab_size)
    with torch_threads(config.num_threads):
        torch.manual_seed(config.seed)
        model = OuroForCausalLM(config.model_config(len(tokenizer)))
        with torch.no_grad():
            model.model.early_exit_gate.bias.fill_(config.exit_gate_bias)
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.learning_rate,
            betas=(0.9, 0.95),
        )
        uniform = [1.0 / config.num_loops] * config.num_loops
        result = TrainResult(model=model, tokenizer=tokenizer)
        model.train()
        start = time.perf_counter()
        bar = tqdm(range(config.steps), desc="organism", disable=not progress, mininterval=2.0)
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(config, step)
            parts = training_batch(config, tokenizer, step)
            n_total = sum(float(part["weights"].sum()) for part in parts)
            step_loss, step_loops, step_exit = 0.0, torch.zeros(config.num_loops), torch.zeros(config.num_loops)
            for part in parts:
                # right padding: real tokens never attend to the pads after them, so no mask is needed
                out = model(part["input_ids"], output_loop_states=True, use_cache=False, exit="last", logits_to_keep=1)
                token_losses, index = per_loop_token_losses(model.lm_head, out.loop_hidden_states, part["labels"])
                exit_probs = out.exit_probs.reshape(-1, config.num_loops).index_select(0, index)
                # position s predicts token s+1: the weight of a loss is its target token's
                weight = part["weights"].reshape(-1).index_select(0, index + 1)
                weighted = token_losses * (weight / weight.mean())
                loss, _entropy = ouro_entropy_objective(weighted, exit_probs, beta=config.entropy_beta)
                if config.uniform_weight:
                    loss = loss + config.uniform_weight * weighted_loop_loss(weighted, uniform)[0]
                share = float(weight.sum()) / n_total  # weighted mean over the whole batch
                (loss * share).backward()
                step_loss += float(loss.detach()) * share
                step_loops += (token_losses.detach() * weight).sum(dim=1) / n_total
                step_exit += (exit_probs.detach() * weight[:, None]).sum(dim=0) / n_total
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(step_loss)
            result.loop_losses.append([round(float(x), 5) for x in step_loops])
            result.exit_probs.append([round(float(x), 4) for x in step_exit])
            if progress:
                bar.set_postfix(
                    loss=f"{result.losses[-1]:.3f}",
                    loops="/".join(f"{x:.2f}" for x in result.loop_losses[-1]),
                    refresh=False,
                )
        result.seconds = time.perf_counter() - start
    model.eval()
    return result
