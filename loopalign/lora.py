"""Loop-aware LoRA: PEFT adapters that act only on chosen loops of a looped model.

The routing happens inside the single forward pass: a hook on every LoRA ``lora_B`` module
zeroes its contribution when the decoder layer being computed runs in a loop that is not
selected. Base output + 0 is exact, so on those loops the model's outputs equal the base
model's bit for bit. The loop is read from state set inside the decoder layer's ``forward``
(:func:`loopalign.models.ouro.modeling_ouro.current_loop`), so routing stays right when gradient
checkpointing recomputes a layer during backward.

Loop specs (0-based loop indices, as everywhere in loopalign): ``"all"``, ``"last"`` (the last
loop of each call), ``">=2"`` (loops 2, 3, ...), ``"1,3"`` (a list), or a list of ints.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from loopalign.models.ouro.modeling_ouro import current_loop

__all__ = ["LoopSelection", "parse_loop_selection", "route_lora_by_loop", "LoopLoRARouting", "merged_lora"]

_SPEC = re.compile(r"^\s*(all|last|>=\s*\d+|\d+(\s*,\s*\d+)*)\s*$")


@dataclass(frozen=True)
class LoopSelection:
    """Which loops an adapter acts on: every loop, the last loop of a call, loops >= ``min_loop``,
    or an explicit set (0-based)."""

    kind: str  # "all" | "last" | "min" | "set"
    min_loop: int = 0
    loops: frozenset[int] = frozenset()

    def active(self, loop_index: int, num_loops: int) -> bool:
        if self.kind == "all":
            return True
        if self.kind == "last":
            return loop_index == num_loops - 1
        if self.kind == "min":
            return loop_index >= self.min_loop
        return loop_index in self.loops

    def describe(self) -> str:
        return {"all": "all", "last": "last", "min": f">={self.min_loop}"}.get(
            self.kind, ",".join(map(str, sorted(self.loops)))
        )


def parse_loop_selection(spec: str | Iterable[int] | LoopSelection, max_loops: int | None = None) -> LoopSelection:
    """Parse a loop spec (see module doc). ``max_loops``: reject indices >= this (the trained depth
    is a good bound for a training config)."""
    if isinstance(spec, LoopSelection):
        selection = spec
    elif isinstance(spec, str):
        if not _SPEC.match(spec):
            raise ValueError(
                f"loop spec {spec!r} not understood: use 'all', 'last', '>=K' or a list like '1,3' (0-based)"
            )
        s = spec.replace(" ", "")
        if s in ("all", "last"):
            selection = LoopSelection(s)
        elif s.startswith(">="):
            selection = LoopSelection("min", min_loop=int(s[2:]))
        else:
            selection = LoopSelection("set", loops=frozenset(int(x) for x in s.split(",")))
    else:
        loops = list(spec)
        if not loops or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in loops):
            raise ValueError(f"loop list must be non-empty, 0-based non-negative ints, got {loops!r}")
        selection = LoopSelection("set", loops=frozenset(loops))
    if max_loops is not None:
        top = selection.min_loop if selection.kind == "min" else max(selection.loops, default=0)
        if top >= max_loops:
            raise ValueError(
                f"loop spec {selection.describe()!r} names loop {top}, but the model runs {max_loops} loops (0-based)"
            )
    return selection


class LoopLoRARouting:
    """Handle of an installed routing; ``remove()`` restores plain (all-loop) adapters."""

    def __init__(self, selection: LoopSelection, handles: list):
        self.selection = selection
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every PEFT LoRA layer (a module holding a non-empty ``lora_B`` dict)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "lora_B", None), nn.ModuleDict) and len(m.lora_B)
    ]


def route_lora_by_loop(model: nn.Module, loops: str | Iterable[int] | LoopSelection) -> LoopLoRARouting:
    """Make the PEFT LoRA adapters of ``model`` act only on the selected loops.

    Returns a handle (also usable as a context manager). Raises if the model has no LoRA modules
    or has adapters merged into the base weights (merged weights cannot be routed per loop).
    """
    selection = parse_loop_selection(loops)
    installed = getattr(model, "_loopalign_lora_routing", None)
    if installed is not None:
        installed.remove()
    lora_b_modules = []
    for name, module in _lora_layers(model):
        if getattr(module, "merged", False):
            raise RuntimeError(f"LoRA module {name} is merged into its base weights; unmerge before routing by loop")
        lora_b_modules.extend(module.lora_B.values())
    if not lora_b_modules:
        raise ValueError("route_lora_by_loop: the model has no PEFT LoRA modules (wrap it with get_peft_model first)")
    if selection.kind == "all":
        routing = LoopLoRARouting(selection, [])
    else:

        def gate(module, args, output):
            where = current_loop()
            if where is not None and not selection.active(*where):
                return torch.zeros_like(output)
            return None

        routing = LoopLoRARouting(selection, [m.register_forward_hook(gate) for m in lora_b_modules])
    model._loopalign_lora_routing = routing
    return routing


def _merge_blocker(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> str | None:
    routing = getattr(model, "_loopalign_lora_routing", None)
    if routing is not None and routing.selection.kind != "all":
        return f"its adapters are routed to loops {routing.selection.describe()!r}"
    for _, layer in layers:
        base = getattr(layer, "base_layer", None)
        if getattr(layer, "merged", False):
            return "an adapter is already merged"
        if type(base) is not nn.Linear:
            return f"a LoRA base layer is a {type(base).__name__}, not a plain Linear"
        if hasattr(base.weight, "ds_id"):
            return "its weights are partitioned by DeepSpeed ZeRO-3"
    return None


@contextmanager
def merged_lora(model: nn.Module, strict: bool = False) -> Iterator[bool]:
    """Fold the active PEFT LoRA adapters into their base weights for the duration of the block.

    A projection then costs one matmul instead of three plus an add, which is what evaluation
    and scoring want (the adapters are frozen there). On exit the base weights are restored from
    copies, bit for bit: un-merging by subtraction would drift in bf16. The copies take as much
    memory as the adapted weights.

    Yields True when merged. Models without LoRA, with adapters routed to some loops only
    (:func:`route_lora_by_loop`), or with ZeRO-3 partitioned weights run unmerged (yields False),
    or raise with the reason if ``strict``.
    """
    layers = _lora_layers(model)
    reason = "it has no PEFT LoRA modules" if not layers else _merge_blocker(model, layers)
    if reason is not None:
        if strict:
            raise RuntimeError(f"merged_lora: cannot merge the adapters of {type(model).__name__}: {reason}")
        yield False
        return
    saved = [(layer, layer.base_layer.weight.detach().clone()) for _, layer in layers]
    try:
        with torch.no_grad():
            for layer, _ in saved:
                layer.merge(adapter_names=list(layer.active_adapters))
        yield True
    finally:
        with torch.no_grad():
            for layer, weight in saved:
                if layer.merged:
                    layer.unmerge()
                layer.base_layer.weight.copy_(weight)
