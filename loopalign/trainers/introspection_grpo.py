"""Introspection GRPO / SFT trainers: moved to :mod:`loopalign.trainers.introspection`."""

# moved to loopalign.trainers.introspection (and load_vectors to loopalign.injection); re-exported for one release
from loopalign.injection import load_vectors

from .introspection import (
    DETECT_TARGET,
    NO_DETECT_TARGET,
    SPEC_COLUMNS,
    IntrospectionGRPOConfig,
    IntrospectionGRPOTrainer,
    IntrospectionSFTConfig,
    IntrospectionSFTTrainer,
    introspection_dataset,
    validate_injection_rows,
)

__all__ = [
    "IntrospectionGRPOConfig",
    "IntrospectionGRPOTrainer",
    "IntrospectionSFTConfig",
    "IntrospectionSFTTrainer",
    "introspection_dataset",
    "validate_injection_rows",
    "load_vectors",
    "DETECT_TARGET",
    "NO_DETECT_TARGET",
    "SPEC_COLUMNS",
]
