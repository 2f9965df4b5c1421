"""Trainers, each next to its config (TRL style)."""

from loopalign.loading import is_gap_run_folder, load_gap_model

from .adapter_card import write_adapter_card
from .gap_data import GapCollator, build_gap_features, verdict_token_ids
from .gap_sft import GapSFTTrainer
from .gap_sft_config import LOSS_KEYS, GapSFTConfig
from .introspection import (
    IntrospectionGRPOConfig,
    IntrospectionGRPOTrainer,
    IntrospectionSFTConfig,
    IntrospectionSFTTrainer,
    introspection_dataset,
)
from .probe_targets import ProbeTargets, fit_probe_targets, labelled_only
from .replay import ReplayBuild, self_replay_dataset

__all__ = [
    "LOSS_KEYS",
    "GapCollator",
    "GapSFTConfig",
    "GapSFTTrainer",
    "ProbeTargets",
    "ReplayBuild",
    "build_gap_features",
    "fit_probe_targets",
    "is_gap_run_folder",
    "load_gap_model",
    "write_adapter_card",
    "labelled_only",
    "self_replay_dataset",
    "verdict_token_ids",
]

__all__ += [
    "IntrospectionGRPOConfig",
    "IntrospectionGRPOTrainer",
    "IntrospectionSFTConfig",
    "IntrospectionSFTTrainer",
    "introspection_dataset",
]
