"""Probe-consistency: pull the verbal Yes/No verdict toward a linear probe on the model's own state.

Per loop t: a probe reads h(t, layer) at the record's probe position and is trained on the
verifier label (on detached features by default, so it measures rather than reshapes); the
verbal verdict distribution q_t = softmax(logit_Yes, logit_No) at the verdict position, read
from loop t's logits, is pulled toward the probe's posterior p_t (detached):
``-[p_t log q_t(Yes) + (1 - p_t) log q_t(No)]``.

Dtypes: the probes keep float32 parameters and read their features in float32 with autocast off
(the features may be bf16 from a bf16 model, or float32 from accelerate's output conversion);
every loss here is computed and returned in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["verbal_log_probs", "probe_loss", "consistency_loss"]


def verbal_log_probs(verdict_logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """verdict_logits [..., V] -> log q(Yes) [...], renormalised over the two verdict tokens."""
    pair = torch.stack([verdict_logits[..., yes_id], verdict_logits[..., no_id]], dim=-1).float()
    return F.log_softmax(pair, dim=-1)[..., 0]


def masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """values [T,B], weight [B] >= 0 -> the weighted mean over B [T]; 0 (with a graph) where the
    weights sum to 0. No host sync."""
    w = weight.detach().to(values.device, torch.float32)
    total = w.sum()
    return (values.float() * w).sum(dim=1) / torch.where(total > 0, total, torch.ones_like(total))


def probe_loss(probe_logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-loop BCE of the probes on verifier labels. probe_logits [T,B], labels [B] in {0,1} -> [T].

    ``weight`` [B] (optional, >= 0): a weighted mean over records; records of weight 0 (e.g.
    unlabelled, label -1) do not count."""
    probe_logits = probe_logits.float()
    if weight is None:
        target = labels.to(probe_logits.dtype).expand_as(probe_logits)
        return F.binary_cross_entropy_with_logits(probe_logits, target, reduction="none").mean(dim=1)
    target = labels.clamp(0, 1).to(probe_logits.dtype).expand_as(probe_logits)
    return masked_mean(F.binary_cross_entropy_with_logits(probe_logits, target, reduction="none"), weight)


def consistency_loss(verdict_logits: torch.Tensor, probe_logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """Per-loop soft cross-entropy of the verbal verdict against the detached probe posterior.

    verdict_logits [T,B,V] (loop t's logits at the verdict position), probe_logits [T,B] -> [T].
    """
    log_yes = verbal_log_probs(verdict_logits, yes_id, no_id)  # [T,B]
    log_no = torch.log1p(-log_yes.exp().clamp(max=1 - 1e-6))
    p = torch.sigmoid(probe_logits.detach().float())
    return -(p * log_yes + (1 - p) * log_no).mean(dim=1)
