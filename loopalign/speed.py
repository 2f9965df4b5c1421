"""Speed options for training and evaluating looped models: selective activation checkpointing,
``torch.compile`` of the decoder layers, the torch thread count of runs on a CPU, and the CPU build
fingerprint (:func:`build_fingerprint`: the kernel path a CPU build's numbers depend on).

Both keep the model's numerics (tests compare gradients and outputs with the plain path). The
policy is the ``policy`` key of ``activation_checkpointing_kwargs`` (read by
``OuroPreTrainedModel.activation_checkpointing_enable``); compiling is
:class:`loopalign.trainers.GapSFTConfig`'s ``compile_layers``. Figures are in ``docs/performance.md``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from loopalign.hooks import decoder_layers
from loopalign.log import get_logger

# the policies live beside the model (loopalign.models.checkpointing) so that imports point one
# way (speed -> hooks -> models); their public place stays here
from loopalign.models.checkpointing import CHECKPOINT_POLICIES, checkpointing_kwargs

logger = get_logger(__name__)

__all__ = [
    "CHECKPOINT_POLICIES",
    "build_fingerprint",
    "cpu_bf16_is_native",
    "fingerprint_hash",
    "checkpointing_kwargs",
    "compile_decoder_layers",
    "compiled_decoder_layers",
    "set_cpu_threads",
]


def compile_decoder_layers(
    model: nn.Module,
    backend: str = "inductor",
    mode: str | None = None,
    dynamic: bool | None = True,
    recompile_limit: int | None = 16,
    **options,
) -> int:
    """Compile each decoder layer's arithmetic (``OuroDecoderLayer.compute``) with ``torch.compile``.

    The loop bookkeeping (which loop runs, read by hooks) stays outside the compiled region; the
    per-call switches of :mod:`loopalign.lora` (loop routing, the input-upcast skip) and PEFT's
    ``disable_adapter`` set module state that the compiled code guards on, so they hold in compiled
    layers too, installed before or after this call. The compiled version serves calls without a KV
    cache (training, scoring, probing); cached generation runs the plain one. Call it after adapters
    are attached (PEFT's LoRA modules are then compiled with the layer).

    ``dynamic=True`` traces batch size and sequence length as symbols, so a batch of a new length
    reuses the graph instead of recompiling. One graph is still made per variant: whether the layer
    input needs grad (the first layer call of a training forward does not), grad mode, train/eval,
    a mask or none, adapters on/off, merged adapters, autocast, and a batch or sequence of size 1
    (torch specialises size-1 dims). All layers share one code object, whose cache torch caps at
    ``torch._dynamo.config.recompile_limit`` (default 8); past it the layers run uncompiled with
    only a log line. ``recompile_limit`` raises that cap to at least this value (None: leave it):
    a gap-SFT run with routing, ``rr_distill`` (adapters off) and evaluation uses about 8 (counted in
    ``tests/test_compile.py``). Returns the number of layers compiled; raises
    (:func:`loopalign.hooks.decoder_layers`) if the model has none.
    """
    layers = decoder_layers(model)
    if not all(hasattr(layer, "compute") for layer in layers):
        raise TypeError(
            f"compile_layers compiles Ouro decoder layers; {type(layers[0]).__name__} has no separable compute: "
            "compile the whole model with torch.compile (TrainingArguments.torch_compile) instead"
        )
    if recompile_limit is not None and torch._dynamo.config.recompile_limit < recompile_limit:
        torch._dynamo.config.recompile_limit = recompile_limit
    for layer in layers:
        layer.compiled_compute = torch.compile(layer.compute, backend=backend, mode=mode, dynamic=dynamic, **options)
    return len(layers)


@contextmanager
def compiled_decoder_layers(model: nn.Module, backend: str = "inductor", **kwargs) -> Iterator[int]:
    """:func:`compile_decoder_layers` for the block; on exit each layer's previous ``compiled_compute``
    (None: plain) is restored. Compiled graphs are cached on the layers' shared code object, so a
    later block with the same variants compiles nothing. Yields the number of layers compiled."""
    layers = decoder_layers(model)
    before = [layer.compiled_compute for layer in layers]
    try:
        yield compile_decoder_layers(model, backend=backend, **kwargs)
    finally:
        for layer, compiled in zip(layers, before):
            layer.compiled_compute = compiled


#: the CPU flags (Linux's /proc/cpuinfo names) of a bf16 matrix multiply in hardware: AMX tiles, or AVX-512 BF16
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The CPU's feature flags: the ``flags`` line of ``cpuinfo`` (default: /proc/cpuinfo, Linux), or None where
    there is none to read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    found = re.findall(r"^flags\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    return set(found[0].split()) if found else None


def cpu_bf16_is_native(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU multiplies bf16 matrices in hardware (``NATIVE_BF16_FLAGS``), read from ``cpuinfo`` (default:
    /proc/cpuinfo); None where that cannot be read (not Linux). Without it, bf16 autocast on the CPU is emulated and
    slower than float32 (docs/performance.md)."""
    flags = _cpu_flags(cpuinfo)
    return None if flags is None else any(f in flags for f in NATIVE_BF16_FLAGS)


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
        logger.info(f"torch CPU threads: {threads} (OMP_NUM_THREADS sets another count)")
    return threads


@functools.cache
def _native_cpu_isa() -> str:
    """The widest x86 vector extension this CPU offers (what MKL picks on its own): ``AVX512``, ``AVX2`` or
    ``DEFAULT`` read from ``/proc/cpuinfo``; the machine name (``arm64``, ...) where there is none."""
    flags = _cpu_flags()
    if flags is None:
        return platform.machine() or "unknown"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "AVX512"
    if {"avx2", "fma"} <= flags:
        return "AVX2"
    return "DEFAULT"


@functools.cache
def _library_versions() -> tuple[str | None, str | None]:
    """(MKL, oneDNN) versions torch was built with, read from ``torch.__config__.show()``; None where absent."""
    text = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([\w.]+)", text) if torch.backends.mkl.is_available() else None
    onednn = re.search(r"MKL-DNN v(\S+)", text) if torch.backends.mkldnn.is_available() else None
    return (mkl.group(1) if mkl else None), (onednn.group(1) if onednn else None)


def build_fingerprint(num_threads: int) -> dict:
    """What makes a CPU build of a model a different model on another machine with the same code: the torch
    version, the CPU capability torch's kernels use (``torch.backends.cpu.get_cpu_capability()``, which honours
    ``ATEN_CPU_CAPABILITY``), the MKL and oneDNN versions torch was built with (None when absent), MKL's
    instruction set (``MKL_ENABLE_INSTRUCTIONS``, else ``auto`` with the CPU's widest extension, which MKL then
    picks) and the build's torch thread count ``num_threads`` (threads change float reductions). Losses of the
    same training differ from step 1 between AVX-512 and AVX2 kernels, so a cache keyed on the config alone
    would hand one machine's model to another; organism cache keys hash this record (:func:`fingerprint_hash`)."""
    mkl, onednn = _library_versions()
    mkl_isa = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").strip().upper()
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": mkl,
        "mkl_instructions": mkl_isa or f"auto ({_native_cpu_isa()})",
        "onednn": onednn,
        "threads": int(num_threads),
    }


def fingerprint_hash(fingerprint: dict) -> str:
    """sha256 (first 8 hex digits) of a :func:`build_fingerprint` record: a short name for a kernel path."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:8]
