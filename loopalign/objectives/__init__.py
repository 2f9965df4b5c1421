"""Training objectives as small, pure functions of tensors (easy to test, composed by trainers)."""

from .deep_supervision import (
    ouro_entropy_objective,
    ouro_gate_loss,
    per_loop_token_kl,
    per_loop_token_losses,
    shifted_targets,
    weighted_loop_loss,
)
from .probe_consistency import consistency_loss, probe_loss, verbal_log_probs
from .probe_distillation import probe_distillation_loss, probe_ranking_distillation_loss
from .rr_preservation import frozen_probe_loss, hidden_distillation_loss

__all__ = [
    "consistency_loss",
    "frozen_probe_loss",
    "hidden_distillation_loss",
    "ouro_entropy_objective",
    "ouro_gate_loss",
    "per_loop_token_kl",
    "per_loop_token_losses",
    "probe_distillation_loss",
    "probe_loss",
    "probe_ranking_distillation_loss",
    "shifted_targets",
    "verbal_log_probs",
    "weighted_loop_loss",
]
