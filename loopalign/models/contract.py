"""The looped-model contract: what loopalign asks of a model, so evaluation, training and hooks work on every
family (see ``docs/models.md``). Adding a family is one folder under ``models/`` that answers these questions,
plus tests; the rest of the library calls only the functions here.

A looped model (Ouro today) provides
- ``config.total_ut_steps``: the depth it was trained at (:func:`trained_loops`);
- ``forward(..., num_loops=T, output_loop_states=True)`` -> ``loop_hidden_states``: T x [B,S,H], the normed
  state after each loop (what the LM head reads), and ``exit_probs`` [B,S,T] when it has an exit gate;
- ``forward(..., output_loop_logits=True)`` -> ``loop_logits``: T x [B,S,V] (the LM head on each loop's state);
- ``generate(..., num_loops=T)``;
- its looped decoder layers as modules that run once per loop (:func:`looped_layers`), with the current loop
  index readable while they run (``loopalign.models.current_loop.current_loop``), so forward hooks
  (:mod:`loopalign.hooks`) know the loop;
- the modules that take per-call contexts with the loop they run at (:func:`loop_context_layers`), so
  loop-routed LoRA (:mod:`loopalign.lora`) knows the loop.

A plain transformers causal LM is accepted as a model with one loop: its loop state is the final normed
hidden state, its loop logits its logits, its exit distribution all mass on loop 1, and its decoder layers run
at loop index 0. So ``eval_gap`` measures SV and RR of any causal LM at its single loop: a non-looped baseline.

Shapes: B batch, S sequence, H hidden, V vocabulary, T loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from .huginn.modeling_huginn import HuginnRecurrentBlock
from .ouro.modeling_ouro import OuroDecoderLayer

__all__ = [
    "LoopOutput",
    "is_looped",
    "loop_forward",
    "loop_generate_kwargs",
    "final_norm",
    "loop_context_layers",
    "looped_layers",
    "num_hidden_layers",
    "trained_loops",
    "unwrap",
    "LOOPED_LAYER_CLASSES",
]

#: the decoder-layer classes that run once per loop, one per looped family (a new family adds its own)
LOOPED_LAYER_CLASSES: tuple[type[nn.Module], ...] = (OuroDecoderLayer, HuginnRecurrentBlock)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT / accelerate / DDP wrappers (the one with the ``config`` that counts)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP / accelerate wrappers
            model = model.module
    return model


def is_looped(model: nn.Module) -> bool:
    """True for a model that runs its layers a chosen number of times (it has ``config.total_ut_steps``)."""
    return getattr(getattr(unwrap(model), "config", None), "total_ut_steps", None) is not None


def trained_loops(model: nn.Module) -> int:
    """The depth the model was trained at: ``config.total_ut_steps``; 1 for a plain causal LM."""
    return int(unwrap(model).config.total_ut_steps) if is_looped(model) else 1


def num_hidden_layers(model: nn.Module) -> int:
    """Decoder layers per loop (``config.num_hidden_layers``; GPT-2's ``n_layer``)."""
    config = unwrap(model).config
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        raise TypeError(f"{type(unwrap(model)).__name__}: its config names no num_hidden_layers")
    return int(n)


def looped_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers that run once per loop, in order (bare, PEFT- or accelerate-wrapped). Ouro: its shared
    decoder layers; a plain causal LM: the ``nn.ModuleList`` holding its ``num_hidden_layers`` blocks."""
    inner = unwrap(model)
    if getattr(inner, "config", None) is None:
        raise TypeError(f"{type(inner).__name__} has no Ouro decoder layers to hook and is not a transformers model")
    if is_looped(inner):
        layers = [m for m in inner.modules() if isinstance(m, LOOPED_LAYER_CLASSES)]
        if layers:
            return sorted(layers, key=lambda m: m.layer_idx)
    n = num_hidden_layers(inner)
    lists = [m for m in inner.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(lists) != 1:
        raise TypeError(
            f"{type(inner).__name__}: cannot tell which modules are its decoder layers "
            f"({len(lists)} module lists of length num_hidden_layers={n}); see docs/models.md to add the family"
        )
    return list(lists[0])


#: where plain causal LMs keep the norm applied to the last layer's output before the LM head (a logit lens reads an
#: earlier layer through it): Llama / Qwen2 / Mistral / Gemma, GPT-2, OPT / Phi, GPT-NeoX
_FINAL_NORM_PATHS = ("model.norm", "transformer.ln_f", "model.final_layernorm", "gpt_neox.final_layer_norm")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm a plain causal LM applies before its LM head, so ``lm_head(final_norm(h))`` reads any layer's
    residual stream ``h`` as the model reads its last (the logit lens)."""
    inner = unwrap(model)
    for path in _FINAL_NORM_PATHS:
        module = inner
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.Module):
            return module
    raise TypeError(
        f"{type(inner).__name__}: no final norm at any of {list(_FINAL_NORM_PATHS)}; see docs/models.md to add the family"
    )


def loop_context_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that run with a known loop and enter per-call contexts around each call: each has
    ``call_contexts``, a dict name -> ``make(loop_index, num_loops)`` -> a context manager or None, entered
    inside the module's forward (so also when gradient checkpointing recomputes it). Loop-routed LoRA and
    the LoRA upcast skip (:mod:`loopalign.lora`) install theirs here. Ouro: its decoder layers; Huginn: every
    block (prelude at loop 0, the recurrent block at its step, the coda at the step it reads out); a plain
    causal LM: none."""
    return [m for m in unwrap(model).modules() if isinstance(getattr(m, "call_contexts", None), dict)]


@dataclass
class LoopOutput(ModelOutput):
    """What :func:`loop_forward` returns for any family.

    loop_hidden_states: T x [B,S,H], the normed state after each loop (what the LM head reads).
    exit_probs: [B,S,T], the exit distribution (all mass on loop 1 for a plain model).
    loop_logits: T x [B,S,V], with ``output_loop_logits``.
    logits: [B,S',V], the model's own output logits (``logits_to_keep`` positions).
    """

    loop_hidden_states: tuple[torch.Tensor, ...] | None = None
    exit_probs: torch.Tensor | None = None
    loop_logits: tuple[torch.Tensor, ...] | None = None
    logits: torch.Tensor | None = None


def _check_loops(model: nn.Module, num_loops: int | None) -> int:
    if num_loops is None:
        return trained_loops(model)
    if isinstance(num_loops, bool) or not isinstance(num_loops, int) or num_loops < 1:
        raise ValueError(f"num_loops must be an int >= 1, got {num_loops!r}")
    if not is_looped(model) and num_loops != 1:
        raise ValueError(
            f"{type(unwrap(model)).__name__} is not a looped model: it runs one loop, asked for {num_loops}; "
            "evaluate it at loops '1'"
        )
    return num_loops


def loop_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    num_loops: int | None = None,
    output_loop_logits: bool = False,
    logits_to_keep: int = 1,
    **kwargs,
) -> LoopOutput:
    """One forward at ``num_loops`` loops (default the trained depth) -> :class:`LoopOutput`, for a looped
    model or a plain causal LM (``num_loops`` must then be 1). ``kwargs`` go to the model's forward."""
    num_loops = _check_loops(model, num_loops)
    if is_looped(model):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            num_loops=num_loops,
            output_loop_states=True,
            output_loop_logits=output_loop_logits,
            use_cache=False,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        states = tuple(out.loop_hidden_states)
        exit_probs = out.exit_probs
        loop_logits = tuple(out.loop_logits) if output_loop_logits else None
    else:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        states = (out.hidden_states[-1],)  # the final normed state: what the LM head reads
        exit_probs = torch.ones(*input_ids.shape, 1, device=input_ids.device)
        loop_logits = (unwrap(model).get_output_embeddings()(states[0]),) if output_loop_logits else None
    return LoopOutput(loop_hidden_states=states, exit_probs=exit_probs, loop_logits=loop_logits, logits=out.logits)


def loop_generate_kwargs(model: nn.Module, num_loops: int | None) -> dict:
    """The keyword arguments that make ``model.generate`` (or a forward) run ``num_loops`` loops:
    ``{"num_loops": T}`` for a looped model, ``{}`` for a plain one (which runs its single loop; any other count is
    an error)."""
    num_loops = _check_loops(model, num_loops)
    return {"num_loops": num_loops} if is_looped(model) else {}
