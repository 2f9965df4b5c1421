"""RR preservation: keep what a probe can read from the representations while the verdict moves.

- ``frozen_probe_loss``: a probe fit on the base model before training stays frozen; its BCE on
  the tuned model's features is penalised (the base's readout must keep working).
- ``hidden_distillation_loss``: the tuned hidden states at the readout (loop, layer) sites are
  pulled toward the base model's (the adapter-disabled model in the same process).

Both read the features in float32 with autocast off and return float32 losses, whatever the
features' dtype (bf16 from a bf16 model, float32 from accelerate's output conversion).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loopalign.probes import LoopProbes, float32_region

from .probe_consistency import probe_loss

__all__ = ["frozen_probe_loss", "hidden_distillation_loss"]


def frozen_probe_loss(
    frozen, features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """features [T,B,H] of the tuned model -> per-loop BCE [T] of the frozen base probes
    (``weight`` [B]: optional record weights / labelled mask, as in ``probe_loss``).

    ``frozen``: a ``LoopProbes`` with ``requires_grad=False``, or one probe per loop with a
    ``logits(x [B,H]) -> [B]`` method (e.g. :class:`loopalign.probes.LinearProbe`, which
    standardises its input). Gradients reach the features only.
    """
    if isinstance(frozen, LoopProbes):
        if any(p.requires_grad for p in frozen.parameters()):
            raise ValueError("frozen_probe_loss: the base probe must be frozen (requires_grad=False)")
        return probe_loss(frozen(features), labels, weight)
    if len(frozen) != features.shape[0]:
        raise ValueError(f"frozen_probe_loss: {len(frozen)} probes for {features.shape[0]} loops")
    with float32_region(features.device):
        logits = torch.stack([probe.logits(features[t].float()) for t, probe in enumerate(frozen)])
    return probe_loss(logits, labels, weight)


def hidden_distillation_loss(tuned: torch.Tensor, base: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """tuned, base [T,B,H] -> per-loop [T]: ``mse`` (mean squared error, normalised by the base's
    mean square so layers of any scale weigh alike) or ``cosine`` (1 - cosine similarity)."""
    if tuned.shape != base.shape:
        raise ValueError(f"tuned {list(tuned.shape)} and base {list(base.shape)} features differ in shape")
    if kind not in ("mse", "cosine"):
        raise ValueError(f"unknown distillation kind {kind!r}: use 'mse' or 'cosine'")
    base = base.detach().float()
    tuned = tuned.float()
    with float32_region(tuned.device):
        if kind == "mse":
            scale = base.pow(2).mean(dim=(1, 2)).clamp_min(1e-8)
            return (tuned - base).pow(2).mean(dim=(1, 2)) / scale
        return (1 - F.cosine_similarity(tuned, base, dim=-1)).mean(dim=1)
