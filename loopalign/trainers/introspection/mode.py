"""The GRPO / SFT mode choice: one config, the trainer to run.

Recipes parse one :class:`IntrospectionGRPOConfig` (TRL's GRPOConfig plus the introspection fields);
:func:`make_introspection_trainer` builds the GRPO trainer from it, or for ``mode="sft"`` the SFT
trainer from the same TrainingArguments (:func:`sft_config_from`).
"""

from __future__ import annotations

import dataclasses

from transformers import TrainingArguments

from .grpo import IntrospectionGRPOConfig, IntrospectionGRPOTrainer
from .sft import IntrospectionSFTConfig, IntrospectionSFTTrainer

__all__ = ["INTROSPECTION_MODES", "sft_config_from", "make_introspection_trainer"]

INTROSPECTION_MODES = ("grpo", "sft")


def sft_config_from(args: IntrospectionGRPOConfig) -> IntrospectionSFTConfig:
    """The SFT config with every TrainingArguments field (and ``concept_vectors``, ``norm_matched``) of a GRPO
    config."""
    names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_")}
    kw = {n: getattr(args, n) for n in names if hasattr(args, n)}
    kw["concept_vectors"] = args.concept_vectors
    kw["norm_matched"] = args.norm_matched
    return IntrospectionSFTConfig(**kw)


def make_introspection_trainer(
    mode: str,
    model,
    args: IntrospectionGRPOConfig,
    train_dataset,
    concept_vectors=None,
    processing_class=None,
    peft_config=None,
    **kwargs,
):
    """``mode`` "grpo" -> :class:`IntrospectionGRPOTrainer` on ``args``; "sft" ->
    :class:`IntrospectionSFTTrainer` on :func:`sft_config_from` ``(args)`` (the dataset needs its
    ``completion`` targets: ``introspection_dataset(..., with_targets=True)``)."""
    if mode not in INTROSPECTION_MODES:
        raise ValueError(f"mode must be one of {INTROSPECTION_MODES}, got {mode!r}")
    if not isinstance(args, IntrospectionGRPOConfig):
        raise TypeError(f"make_introspection_trainer needs an IntrospectionGRPOConfig, got {type(args).__name__}")
    cls, config = (
        (IntrospectionSFTTrainer, sft_config_from(args)) if mode == "sft" else (IntrospectionGRPOTrainer, args)
    )
    return cls(
        model=model,
        args=config,
        train_dataset=train_dataset,
        concept_vectors=concept_vectors,
        processing_class=processing_class,
        peft_config=peft_config,
        **kwargs,
    )
