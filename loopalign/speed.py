"""Speed options for training and evaluating looped models: selective activation checkpointing,
``torch.compile`` of the decoder layers, and the torch thread count of runs on a CPU.

Both keep the model's numerics (tests compare gradients and outputs with the plain path). The
policy is the ``policy`` key of ``activation_checkpointing_kwargs`` (read by
``OuroPreTrainedModel.activation_checkpointing_enable``); compiling is
:class:`loopalign.trainers.GapSFTConfig`'s ``compile_layers``. Figures are in ``docs/performance.md``.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

__all__ = ["CHECKPOINT_POLICIES", "checkpointing_kwargs", "compile_decoder_layers", "set_cpu_threads"]

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
#: only the cheap elementwise ops (norms, rotary, activation).
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


def compile_decoder_layers(model: nn.Module, backend: str = "inductor", mode: str | None = None, **options) -> int:
    """Compile each decoder layer's arithmetic (``OuroDecoderLayer.compute``) with ``torch.compile``.

    The loop bookkeeping (which loop runs, read by loop-routed LoRA and hooks) stays outside the
    compiled region. The compiled version serves calls without a KV cache (training, scoring,
    probing); cached generation runs the plain one. Call it after adapters are attached (PEFT's
    LoRA modules are then compiled with the layer). Returns the number of layers compiled;
    raises (:func:`loopalign.hooks.decoder_layers`) if the model has none.
    """
    from loopalign.hooks import decoder_layers

    layers = decoder_layers(model)
    for layer in layers:
        layer.compiled_compute = torch.compile(layer.compute, backend=backend, mode=mode, **options)
    return len(layers)


def set_cpu_threads(on_cpu: bool | None = None, default: int = 1, announce: bool = False) -> int | None:
    """Set torch's CPU thread count for a run on the CPU: ``default`` (1) unless ``OMP_NUM_THREADS``
    names another count (set by the user, or per process by ``accelerate launch``). -> the count
    set, or None when the run is not on the CPU (``on_cpu``; None: when there is no CUDA device).
    ``announce`` prints the count (for the main process of a recipe).

    Why 1: on loopalign's small CPU models a 2-core machine gains about 15% from a second thread
    when idle, and loses 3x when another process is busy (the threads wait on each other);
    ``benchmarks/organism_threads.py`` measures it. Threads also change float reductions, so 1
    thread keeps runs reproducible.
    """
    if on_cpu is None:
        on_cpu = not torch.cuda.is_available()
    if not on_cpu:
        return None
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = default
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {value!r}") from None
        if threads < 1:
            raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {value!r}")
    torch.set_num_threads(threads)
    if announce:
        print(f"torch CPU threads: {threads} (OMP_NUM_THREADS sets another count)", flush=True)
    return threads
