"""Introspection training: GRPO with concept injection in the rollouts, or SFT on target reports.

- :mod:`.data`: trial rows with the injection spec, their validation, SFT features and collator;
- :mod:`.grpo`: :class:`IntrospectionGRPOConfig`, :class:`IntrospectionGRPOTrainer`;
- :mod:`.sft`: :class:`IntrospectionSFTConfig`, :class:`IntrospectionSFTTrainer`;
- :mod:`.mode`: :func:`make_introspection_trainer` (one config, the trainer of the chosen mode).
"""

from .data import (
    DETECT_TARGET,
    NO_DETECT_TARGET,
    SPEC_COLUMNS,
    IntrospectionSFTCollator,
    introspection_dataset,
    sft_features,
    validate_injection_rows,
)
from .grpo import IntrospectionGRPOConfig, IntrospectionGRPOTrainer
from .mode import INTROSPECTION_MODES, make_introspection_trainer, sft_config_from
from .sft import IntrospectionSFTConfig, IntrospectionSFTTrainer

__all__ = [
    "DETECT_TARGET",
    "INTROSPECTION_MODES",
    "NO_DETECT_TARGET",
    "SPEC_COLUMNS",
    "IntrospectionGRPOConfig",
    "IntrospectionGRPOTrainer",
    "IntrospectionSFTCollator",
    "IntrospectionSFTConfig",
    "IntrospectionSFTTrainer",
    "introspection_dataset",
    "make_introspection_trainer",
    "sft_config_from",
    "sft_features",
    "validate_injection_rows",
]
