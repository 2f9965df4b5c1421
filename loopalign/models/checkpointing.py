"""Selective activation checkpointing policies for looped decoder layers (every family).

Kept beside the models (not in :mod:`loopalign.speed`, which re-exports them) so that imports point
one way: ``loopalign.speed``, ``loopalign.hooks`` and ``loopalign.lora`` import ``loopalign.models``,
never the reverse.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

__all__ = ["CHECKPOINT_POLICIES", "checkpointing_kwargs"]

_aten = torch.ops.aten
_ATTENTION_OPS = tuple(
    getattr(_aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(_aten, name)
)
_MATMUL_OPS = (_aten.mm.default, _aten.addmm.default, _aten.bmm.default)

#: Which op outputs a checkpointed layer keeps for backward (everything else is recomputed):
#: ``full``: nothing (transformers' default gradient checkpointing; least memory);
#: ``save_attention``: attention outputs (and their softmax statistics), so backward does not
#: re-run attention; ``save_matmuls``: attention and every matmul output, so backward recomputes
#: only the cheap elementwise ops (norms, rotary, activation). It keeps nearly what no checkpointing
#: keeps: at the Ouro-1.4B shape with LoRA r16 on every linear, batch 4 x 2048 in bf16, about 66 GiB
#: (``benchmarks/train_step.py`` prints the estimate for its shape), far over a 20 GiB budget. Use it
#: only where that fits (short sequences, small batches); ``save_attention`` otherwise.
CHECKPOINT_POLICIES = {
    "full": (),
    "save_attention": _ATTENTION_OPS,
    "save_matmuls": _ATTENTION_OPS + _MATMUL_OPS,
}


def _policy(saved_ops, ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in saved_ops else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointing_kwargs(policy: str, base: dict | None = None) -> dict:
    """``gradient_checkpointing_kwargs`` for ``model.gradient_checkpointing_enable`` that apply
    ``policy`` (a key of :data:`CHECKPOINT_POLICIES`) on top of ``base``."""
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"checkpoint_policy must be one of {sorted(CHECKPOINT_POLICIES)}, got {policy!r}")
    kwargs = dict(base or {})
    kwargs.setdefault("use_reentrant", False)
    if policy == "full":
        return kwargs
    if kwargs.get("use_reentrant"):
        raise ValueError(
            f"checkpoint_policy={policy!r} needs non-reentrant checkpointing; "
            "drop use_reentrant=True from gradient_checkpointing_kwargs"
        )
    saved = CHECKPOINT_POLICIES[policy]
    kwargs["use_reentrant"] = False
    kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, functools.partial(_policy, saved))
    return kwargs
