"""Probe distillation: pull the verbal Yes/No verdict toward fixed probe posteriors.

The targets come from probes fit once, offline, on the base model's states (out of fold for the
records whose labels they saw; ``loopalign.trainers.fit_probe_targets``), so they carry what the
representation already knows and do not move during training. Per loop t and record b, with the
verbal verdict q = softmax(logit_Yes, logit_No) read from loop t's logits and the target p:
``-[p log q(Yes) + (1 - p) log q(No)]``, averaged over the (weighted) records. Float32 math.
"""

from __future__ import annotations

import torch

from loopalign.probes import float32_region

from .probe_consistency import masked_mean, verbal_log_probs

__all__ = ["probe_distillation_loss"]


def probe_distillation_loss(
    verdict_logits: torch.Tensor,
    target_probs: torch.Tensor,
    yes_id: int,
    no_id: int,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-loop soft cross-entropy of the two-token verbal verdict against fixed targets.

    verdict_logits [T,B,V] (loop t's logits at the verdict position); target_probs [T,B],
    P(Yes) in [0,1] (detached); weight [B] >= 0 (optional: a 0/1 mask or record weights) -> [T].
    The weighted mean over records; where the weights sum to 0, a zero that still carries a graph.
    """
    if verdict_logits.dim() != 3:
        raise ValueError(f"probe_distillation_loss: verdict_logits must be [T,B,V], got {list(verdict_logits.shape)}")
    num_loops, batch = verdict_logits.shape[:2]
    if tuple(target_probs.shape) != (num_loops, batch):
        raise ValueError(
            f"probe_distillation_loss: target_probs must be [T={num_loops}, B={batch}] like verdict_logits "
            f"{list(verdict_logits.shape)}, got {list(target_probs.shape)}"
        )
    if weight is not None and tuple(weight.shape) != (batch,):
        raise ValueError(f"probe_distillation_loss: weight must be [B={batch}], got {list(weight.shape)}")
    with float32_region(verdict_logits.device):
        log_yes = verbal_log_probs(verdict_logits, yes_id, no_id)  # [T,B]
        log_no = verbal_log_probs(verdict_logits, no_id, yes_id)  # exact, no log(1 - q) cancellation
        p = target_probs.detach().to(log_yes.device, torch.float32)
        ce = -(p * log_yes + (1 - p) * log_no)  # [T,B]
        return ce.mean(dim=1) if weight is None else masked_mean(ce, weight)
