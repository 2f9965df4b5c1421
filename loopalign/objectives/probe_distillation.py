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

__all__ = ["probe_distillation_loss", "probe_ranking_distillation_loss"]


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


def probe_ranking_distillation_loss(
    verdict_logits: torch.Tensor,
    target_probs: torch.Tensor,
    groups: torch.Tensor,
    yes_id: int,
    no_id: int,
    clamp: float = 1e-4,
) -> torch.Tensor:
    """Per-loop pairwise (RankNet) distillation of the verdict's ranking within groups, blind to each group's offset.

    For every pair (i, j) of records in the same group (``groups[i] == groups[j] >= 0``, i < j), the verdict's
    logit difference z = log q(Yes) - log q(No) is trained so that sigmoid(z_i - z_j) matches the targets' pair
    probability sigmoid(t_i - t_j), t = logit(p) with p clamped to [clamp, 1 - clamp]. Adding a constant to every
    z of one group leaves the loss unchanged: the term teaches which records of a group are truer than which,
    never where the group's Yes/No cut lies (that is left to the labelled terms).

    verdict_logits [T,B,V]; target_probs [T,B] in [0,1] (detached); groups [B] int (-1: in no group) -> [T], the
    mean over pairs; a batch without a pair gives a zero that still carries a graph.
    """
    if verdict_logits.dim() != 3:
        raise ValueError(
            f"probe_ranking_distillation_loss: verdict_logits must be [T,B,V], got {list(verdict_logits.shape)}"
        )
    num_loops, batch = verdict_logits.shape[:2]
    if tuple(target_probs.shape) != (num_loops, batch):
        raise ValueError(
            f"probe_ranking_distillation_loss: target_probs must be [T={num_loops}, B={batch}], "
            f"got {list(target_probs.shape)}"
        )
    if tuple(groups.shape) != (batch,):
        raise ValueError(f"probe_ranking_distillation_loss: groups must be [B={batch}], got {list(groups.shape)}")
    with float32_region(verdict_logits.device):
        # log q(Yes) - log q(No) of the two-token softmax is the raw logit difference
        z = verdict_logits[..., yes_id].float() - verdict_logits[..., no_id].float()  # [T,B]
        g = groups.to(z.device)
        pairs = torch.triu((g[:, None] == g[None, :]) & (g[:, None] >= 0), diagonal=1).float()  # [B,B]
        n_pairs = pairs.sum()
        if n_pairs == 0:
            return (z * 0.0).sum(dim=1)
        t = torch.logit(target_probs.detach().to(z.device, torch.float32), eps=clamp)
        target = torch.sigmoid(t[:, :, None] - t[:, None, :])
        ce = torch.nn.functional.binary_cross_entropy_with_logits(
            z[:, :, None] - z[:, None, :], target, reduction="none"
        )
        return (ce * pairs).sum(dim=(1, 2)) / n_pairs
