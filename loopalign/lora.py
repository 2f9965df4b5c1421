"""Loop-aware LoRA: PEFT adapters that act only on chosen loops of a looped model.

The routing happens inside the single forward pass: each decoder layer call in a loop that is not
selected runs with that layer's adapters switched off (PEFT's per-layer ``disable_adapters``
state), so on those loops the model computes the base projections and its outputs equal the base
model's bit for bit. The switch is made inside the layer's ``forward`` (its ``call_contexts``; see
:func:`loopalign.models.contract.loop_context_layers`), so it is also right when gradient checkpointing recomputes a
layer during backward, and ``torch.compile``-d layers follow it: the compiled code guards on the
adapters' state (one graph with adapters on, one with them off), whether routing is installed
before or after compiling.

Under autocast, PEFT casts each adapter's input to the adapter's float32 weights, and autocast casts
it back for the matmul: :func:`skip_lora_input_upcast` drops that round trip where it is exact.

Loop specs (0-based loop indices, as everywhere in loopalign): ``"all"``, ``"last"`` (the last
loop of each call), ``">=2"`` (loops 2, 3, ...), ``"1,3"`` or ``"1-3"`` (a set, in the grammar of every loop set:
:func:`loopalign.loops.parse_int_set`), or a list of ints.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from loopalign.errors import ModelError
from loopalign.loops import parse_int_set
from loopalign.models.contract import loop_context_layers, unwrap

__all__ = [
    "LoopSelection",
    "parse_loop_selection",
    "route_lora_by_loop",
    "LoopLoRARouting",
    "merged_lora",
    "skip_lora_input_upcast",
    "computes_base",
]

_ROUTING = "lora_routing"
_UPCAST = "lora_input_upcast"

_RANGE = r"\d+(\s*-\s*\d+)?"
_SPEC = re.compile(rf"^\s*(all|last|>=\s*\d+|{_RANGE}(\s*,\s*{_RANGE})*)\s*$")


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
                f"loop spec {spec!r} not understood: use 'all', 'last', '>=K' or a set like '1,3' or '1-3' (0-based)"
            )
        s = spec.replace(" ", "")
        if s in ("all", "last"):
            selection = LoopSelection(s)
        elif s.startswith(">="):
            selection = LoopSelection("min", min_loop=int(s[2:]))
        else:
            selection = LoopSelection(
                "set", loops=frozenset(parse_int_set(s, "loop spec", what="0-based loop indices"))
            )
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

    def __init__(self, selection: LoopSelection, layers: list[nn.Module], model: nn.Module | None = None):
        self.selection = selection
        self._layers = layers
        self._model = model

    def remove(self) -> None:
        for layer in self._layers:
            layer.call_contexts.pop(_ROUTING, None)
        self._layers = []
        if self._model is not None and getattr(self._model, "_loopalign_lora_routing", None) is self:
            del self._model._loopalign_lora_routing  # merged_lora may merge again
        self._model = None

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


#: PEFT LoRA initialisations that leave the base weights as they were (the others, PiSSA, OLoRA, LoftQ, CorDA, ...,
#: rewrite them, so the model with its adapters off is no longer the base)
_BASE_KEEPING_INITS = (True, False, "gaussian")


def computes_base(model: nn.Module) -> bool:
    """True when ``model`` computes its base model's function as it stands: it has no PEFT LoRA layer, or every one
    is switched off (``disable_adapter()``) and was initialised without touching the base weights. False with any
    adapter on, even a fresh one whose B is still zero (the memo of ``reused_features`` keeps the two apart)."""
    layers = _lora_layers(model)
    if not layers:
        return True
    if any(not getattr(layer, "_disable_adapters", False) for _, layer in layers):
        return False
    configs = getattr(model, "peft_config", None) or getattr(unwrap(model), "peft_config", None) or {}
    return all(getattr(c, "init_lora_weights", True) in _BASE_KEEPING_INITS for c in configs.values())


@contextmanager
def _attribute_set(modules: list[nn.Module], name: str, value) -> Iterator[None]:
    """``name`` set to ``value`` on every module for the block, then each module's own value restored."""
    before = [getattr(m, name) for m in modules]
    for m in modules:
        setattr(m, name, value)
    try:
        yield
    finally:
        for m, old in zip(modules, before):
            setattr(m, name, old)


def _adapters_off(modules: list[nn.Module]):
    """PEFT's per-layer ``disable_adapters`` state set for the block (requires_grad untouched, unlike
    ``enable_adapters(False)``), then restored."""
    return _attribute_set(modules, "_disable_adapters", True)


class _LoopGate:
    """Per-call context of one decoder layer: its adapters off on the loops ``selection`` leaves out."""

    def __init__(self, selection: LoopSelection, modules: list[nn.Module]):
        self.selection, self.modules = selection, modules

    def __call__(self, loop_index: int, num_loops: int):
        return None if self.selection.active(loop_index, num_loops) else _adapters_off(self.modules)


def route_lora_by_loop(model: nn.Module, loops: str | Iterable[int] | LoopSelection) -> LoopLoRARouting:
    """Make the PEFT LoRA adapters of ``model``'s decoder layers act only on the selected loops.

    Returns a handle (also usable as a context manager). Works with compiled layers
    (:func:`loopalign.speed.compile_decoder_layers`), installed before or after compiling. Raises if
    the model has no LoRA modules or has adapters merged into the base weights (merged weights
    cannot be routed per loop). Adapters outside the decoder layers (e.g. on ``lm_head``) act on
    every call.
    """
    selection = parse_loop_selection(loops)
    installed = getattr(model, "_loopalign_lora_routing", None)
    if installed is not None:
        installed.remove()
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("route_lora_by_loop: the model has no PEFT LoRA modules (wrap it with get_peft_model first)")
    for name, module in layers:
        if getattr(module, "merged", False):
            raise ModelError(f"LoRA module {name} is merged into its base weights; unmerge before routing by loop")
    routed = []
    if selection.kind != "all":
        loop_layers = loop_context_layers(model)
        if not loop_layers:
            raise ValueError(
                f"route_lora_by_loop: {type(unwrap(model)).__name__} is not a looped model (it runs one loop); "
                f"route its adapters to 'all', not {selection.describe()!r}"
            )
        for loop_layer in loop_layers:
            modules = [m for _, m in _lora_layers(loop_layer)]
            if modules:
                loop_layer.call_contexts[_ROUTING] = _LoopGate(selection, modules)
                routed.append(loop_layer)
    routing = LoopLoRARouting(selection, routed, model)
    model._loopalign_lora_routing = routing
    return routing


def _upcast_is_a_round_trip(layer: nn.Module) -> bool:
    """Under autocast, is PEFT's cast of this LoRA layer's input to the adapter dtype undone, exactly,
    by autocast's cast for the ``lora_A`` matmul? True for plain LoRA (no DoRA or other variant)
    with an ``nn.Linear`` ``lora_A`` and no dropout: a cast up to float32 is exact, so the matmul
    sees the same autocast-dtype input either way."""
    return (
        type(getattr(layer, "base_layer", None)) is nn.Linear
        and not getattr(layer, "lora_variant", {})
        and all(type(a) is nn.Linear for a in layer.lora_A.values())
        and all(type(d) is nn.Identity for d in layer.lora_dropout.values())
    )


class _UpcastSkip:
    """Per-call context of one decoder layer: PEFT's input upcast off while autocast is on."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules

    def __call__(self, loop_index: int, num_loops: int):
        device_type = self.modules[0].base_layer.weight.device.type
        return _upcast_off(self.modules) if torch.is_autocast_enabled(device_type) else None


def _upcast_off(modules: list[nn.Module]):
    """PEFT's cast of the LoRA input to the adapters' dtype off for the block, then restored."""
    return _attribute_set(modules, "cast_input_dtype_enabled", False)


def skip_lora_input_upcast(model: nn.Module) -> int:
    """Under autocast, let the LoRA layers in ``model``'s decoder layers skip PEFT's cast of their
    input to the adapters' (float32) dtype, which autocast undoes for the matmul: one [B,S,H] copy
    up and one down per adapted projection and layer call. Only where the result is bit-identical
    (:func:`_upcast_is_a_round_trip`); outside autocast PEFT casts as before (it is needed there when
    the activations are bf16 and the adapters float32). -> the number of LoRA layers affected."""
    count = 0
    if not _lora_layers(model):
        return count
    for loop_layer in loop_context_layers(model):
        modules = [m for _, m in _lora_layers(loop_layer) if _upcast_is_a_round_trip(m)]
        loop_layer.call_contexts.pop(_UPCAST, None)
        if modules:
            loop_layer.call_contexts[_UPCAST] = _UpcastSkip(modules)
            count += len(modules)
    return count


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
            raise ModelError(f"merged_lora: cannot merge the adapters of {type(model).__name__}: {reason}")
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
