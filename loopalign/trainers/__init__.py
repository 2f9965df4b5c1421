"""Trainers, each next to its config (TRL style)."""

from .gap_data import GapCollator, build_gap_features, verdict_token_ids
from .gap_sft import LOSS_KEYS, GapSFTConfig, GapSFTTrainer

__all__ = ["LOSS_KEYS", "GapCollator", "GapSFTConfig", "GapSFTTrainer", "build_gap_features", "verdict_token_ids"]
from .introspection_grpo import (  # noqa: E402
    IntrospectionGRPOConfig,
    IntrospectionGRPOTrainer,
    IntrospectionSFTConfig,
    IntrospectionSFTTrainer,
    introspection_dataset,
)

__all__ += [
    "IntrospectionGRPOConfig",
    "IntrospectionGRPOTrainer",
    "IntrospectionSFTConfig",
    "IntrospectionSFTTrainer",
    "introspection_dataset",
]
