"""Healing a retrofitted looped model (issue #34): the base model's own next-token distributions distilled into the
looped copy at several loop counts at once, with LoRA on the recurrent block and the adapter trained.

A retrofitted model (:func:`loopalign.models.retrofit.retrofit_recurrence`) reruns its recurrent block on inputs it
never saw, so its later loops drift from what the source model predicts. Healing trains it to match the source's
distribution at every loop count in ``loops`` (per-loop deep supervision: one forward reads every loop's logits), on
text that needs no corpus download (the base model's own answers, or any token sequences). :func:`loop_kl` measures
the mean per-token KL(base || looped) at each loop count, before and after.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from loopalign.batching import pad_right
from loopalign.errors import ConfigError
from loopalign.models.contract import loop_forward

__all__ = ["HealingConfig", "HealingResult", "heal_looped", "loop_kl"]

logger = logging.getLogger(__name__)

#: healing logs its loss every this many steps (a run on a CPU takes tens of minutes)
LOG_EVERY = 10

#: the recurrent block's linear layers (Huginn's names), where healing puts its LoRA
_CORE_TARGETS = r".*transformer\.core_block\.\d+\.(attn\.Wqkv|attn\.proj|mlp\.fc|mlp\.proj)"


@dataclass
class HealingConfig:
    """How to heal: which loop counts to match the base model at, and the optimisation."""

    loops: tuple[int, ...] = field(default=(1, 2, 3, 4), metadata={"help": "loop counts supervised (each >= 1)"})
    steps: int = field(default=100, metadata={"help": "optimiser steps"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank on the recurrent block"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    seed: int = field(default=0, metadata={"help": "seed of the batch order and the LoRA init"})

    def __post_init__(self):
        self.loops = tuple(int(t) for t in self.loops)
        if not self.loops or any(t < 1 for t in self.loops):
            raise ConfigError(f"HealingConfig.loops must be loop counts >= 1, got {self.loops}")
        if self.steps < 1 or self.batch_size < 1 or self.lora_r < 1 or not self.learning_rate > 0:
            raise ConfigError(
                "HealingConfig: steps, batch_size and lora_r must be >= 1 and learning_rate > 0, got "
                f"{self.steps}, {self.batch_size}, {self.lora_r}, {self.learning_rate}"
            )


@dataclass
class HealingResult:
    """KL(base || looped) per loop count before and after healing (mean per token, nats), the wall time."""

    kl_before: dict[int, float]
    kl_after: dict[int, float]
    seconds: float
    steps: int
    trainable_parameters: int

    def to_dict(self) -> dict:
        return asdict(self)


def _batches(sequences: list[list[int]], batch_size: int, pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    return [
        pad_right([{"input_ids": s} for s in sequences[i : i + batch_size]], pad_token_id)
        for i in range(0, len(sequences), batch_size)
    ]


def _kl_per_loop(looped, base_logits: torch.Tensor, batch: dict, loops: tuple[int, ...]) -> list[torch.Tensor]:
    """Mean per-token KL(base || looped) at each of ``loops`` (one forward to the deepest), over real tokens."""
    out = loop_forward(
        looped,
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        num_loops=max(loops),
        output_loop_logits=True,
        logits_to_keep=0,
    )
    mask = batch["attention_mask"].bool()
    target = F.log_softmax(base_logits.float(), dim=-1)[mask]
    kls = []
    for t in loops:
        pred = F.log_softmax(out.loop_logits[t - 1].float(), dim=-1)[mask]
        kls.append(F.kl_div(pred, target, log_target=True, reduction="batchmean"))
    return kls


@torch.no_grad()
def _base_logits(base, batch: dict) -> torch.Tensor:
    return base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


@torch.no_grad()
def loop_kl(
    looped, base, sequences: list[list[int]], loops, pad_token_id: int, batch_size: int = 8
) -> dict[int, float]:
    """Mean per-token KL(base || looped), in nats, at each loop count of ``loops``, over ``sequences``."""
    loops = tuple(int(t) for t in loops)
    was_training = looped.training
    looped.eval()
    totals, tokens = dict.fromkeys(loops, 0.0), 0
    try:
        for batch in _batches(sequences, batch_size, pad_token_id):
            n = int(batch["attention_mask"].sum())
            for t, kl in zip(loops, _kl_per_loop(looped, _base_logits(base, batch), batch, loops)):
                totals[t] += float(kl) * n
            tokens += n
    finally:
        looped.train(was_training)
    return {t: totals[t] / tokens for t in loops}


def _kl_line(kl: dict) -> str:
    return ", ".join(f"{t}: {v:.4f}" for t, v in kl.items())


def heal_looped(looped, base, sequences: list[list[int]], config: HealingConfig, pad_token_id: int, report_loops=None):
    """-> (the healed model: ``looped`` with LoRA on its recurrent block and its adapter trained, a PEFT model;
    :class:`HealingResult`). ``base`` is the source model (frozen); ``sequences`` are token id lists the loss reads
    (the base model's own text needs no corpus). ``report_loops``: the loop counts the KL before and after is
    measured at (default the supervised ``config.loops``; more, to see how healing carries over)."""
    if not sequences:
        raise ValueError("heal_looped: no sequences to heal on")
    report = config.loops if report_loops is None else tuple(int(t) for t in report_loops)
    base.eval()
    kl_before = loop_kl(looped, base, sequences, report, pad_token_id, config.batch_size)
    logger.info("KL(base || looped) before healing, by loop count: %s", _kl_line(kl_before))
    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=_CORE_TARGETS,
        modules_to_save=["adapter"],
    )
    model = get_peft_model(looped, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    model.train()
    for step in range(1, config.steps + 1):
        pick = torch.randint(0, len(sequences), (min(config.batch_size, len(sequences)),), generator=generator)
        (batch,) = _batches([sequences[i] for i in pick.tolist()], len(pick), pad_token_id)
        kls = _kl_per_loop(model, _base_logits(base, batch), batch, config.loops)
        loss = torch.stack(kls).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % LOG_EVERY == 0 or step == config.steps:
            logger.info(
                "healing step %d/%d: KL %s (loops %s), %.0f s",
                step, config.steps, " ".join(f"{k.item():.4f}" for k in kls), ",".join(map(str, config.loops)),
                time.perf_counter() - start,
            )  # fmt: skip
    seconds = time.perf_counter() - start
    kl_after = loop_kl(model, base, sequences, report, pad_token_id, config.batch_size)
    logger.info("KL(base || looped) after healing, by loop count: %s", _kl_line(kl_after))
    result = HealingResult(kl_before, kl_after, round(seconds, 3), config.steps, sum(p.numel() for p in params))
    return model.eval(), result
