"""Loop-aware interventions as plain forward hooks behind context managers.

A site is a (loop, layer) pair: the residual stream right after decoder layer ``layer``
(0-based) during loop ``loop`` (0-based), i.e. ``layer_hidden_states[loop][layer]``. Positions
are sequence columns (the index into ``input_ids``, counting cached tokens during generation),
so a hook placed before ``generate`` also sees every generated token.

    with capture_activations(model, [(3, 1)], positions=last_idx) as cap:
        model(**batch)
    h = cap.get(3, 1)                      # [B, K, H]

    with add_vector(model, vec, loop=3, layer=1, strength=4.0, start=start_idx):
        model.generate(**batch, max_new_tokens=20)

Hooks never patch library classes; they are removed when the context exits, also on error.
Works on a bare Ouro model and on one wrapped by PEFT or accelerate.

A site at a loop the forward never reaches is an error, never a silent no-op: ``add_vector``
raises as soon as a forward shows it runs fewer loops (or, at the latest, when its context exits),
and ``ActivationCapture.get`` raises for a site that never ran; both name the loops that ran.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.cache_utils import Cache

from loopalign.errors import ModelError
from loopalign.models.contract import looped_layers, unwrap

__all__ = ["decoder_layers", "capture_activations", "add_vector", "ActivationCapture", "VectorInjection"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers that run once per loop (:func:`loopalign.models.contract.looped_layers`): Ouro's shared
    layers, or a plain causal LM's blocks (its one loop), bare, PEFT-wrapped or accelerate-wrapped."""
    return looped_layers(model)


def _hidden(output) -> torch.Tensor:
    """A decoder layer's output hidden state [B,S,H] (some families return a tuple headed by it)."""
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden: torch.Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _Columns:
    """The sequence columns [S] a layer call covers. Ouro passes them (``token_positions``); for a plain causal LM
    a pre-hook on its first layer reads the cached length before the call (0 without a cache)."""

    def __init__(self, layers: list[nn.Module]):
        self.offset = 0
        self.handle = layers[0].register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        caches = [v for v in (*args, *kwargs.values()) if isinstance(v, Cache)]  # passed by name or position
        self.offset = int(caches[0].get_seq_length()) if caches else 0

    def __call__(self, kwargs, hidden: torch.Tensor) -> torch.Tensor:
        cols = kwargs.get("token_positions")
        if cols is not None:
            return cols
        return torch.arange(hidden.shape[1], device=hidden.device) + self.offset

    def remove(self) -> None:
        self.handle.remove()


def _check_site(layers: list[nn.Module], loop: int, layer: int) -> None:
    if isinstance(loop, bool) or not isinstance(loop, int) or loop < 0:
        raise ValueError(f"hook loop index must be an int >= 0 (0-based), got {loop!r}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise ValueError(f"hook layer index {layer!r} is out of range: the model has {len(layers)} layers (0-based)")


def _loops_text(loops) -> str:
    """'0..3' for a contiguous run of loop indices, else their list; 'none' for none."""
    loops = sorted(set(loops))
    if not loops:
        return "none"
    if loops == list(range(loops[0], loops[-1] + 1)) and len(loops) > 2:
        return f"{loops[0]}..{loops[-1]}"
    return ", ".join(str(t) for t in loops)


def _as_row_tensor(value, batch: int, device, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must be an int or one value per row ({batch}), got shape {list(t.shape)}")
    return t.long()


class ActivationCapture:
    """Activations captured at (loop, layer) sites; filled by :func:`capture_activations`."""

    def __init__(self, sites: list[tuple[int, int]], positions: torch.Tensor | None, detach: bool):
        self.sites = sites
        self.positions = positions
        self.detach = detach
        self._chunks: dict[tuple[int, int], list[torch.Tensor]] = {s: [] for s in sites}
        self._filled: dict[tuple[int, int], torch.Tensor] = {}
        self._found: dict[tuple[int, int], torch.Tensor] = {}
        #: loop indices the forward ran (seen by the hooked layers)
        self.loops_run: set[int] = set()

    def _record(self, site, hidden: torch.Tensor, token_positions: torch.Tensor) -> None:
        h = hidden.detach() if self.detach else hidden
        if self.positions is None:
            self._chunks[site].append(h)
            return
        pos = self.positions.to(h.device)
        if pos.dim() == 1:
            pos = pos.unsqueeze(0).expand(h.shape[0], -1)
        if pos.shape[0] != h.shape[0]:
            raise ValueError(f"capture positions have {pos.shape[0]} rows for a batch of {h.shape[0]}")
        first = int(token_positions[0])
        local = pos - first
        inside = (local >= 0) & (local < h.shape[1])
        if not bool(inside.any()):
            return
        if site not in self._filled:
            self._filled[site] = torch.zeros(*pos.shape, h.shape[-1], dtype=h.dtype, device=h.device)
            self._found[site] = torch.zeros(pos.shape, dtype=torch.bool, device=h.device)
        gathered = h.gather(1, local.clamp(0, h.shape[1] - 1).unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        self._filled[site] = torch.where(inside.unsqueeze(-1), gathered, self._filled[site])
        self._found[site] = self._found[site] | inside

    def get(self, loop: int, layer: int) -> torch.Tensor:
        """[B,K,H] at the requested positions, or [B,S_total,H] (all calls joined) without positions."""
        site = (loop, layer)
        if site not in self._chunks:
            raise KeyError(f"site (loop={loop}, layer={layer}) was not requested; requested: {self.sites}")
        if self.positions is None:
            if not self._chunks[site]:
                raise ModelError(
                    f"site (loop={loop}, layer={layer}) never ran: the forward ran loops "
                    f"{_loops_text(self.loops_run)} (0-based)"
                )
            return torch.cat(self._chunks[site], dim=1)
        if site not in self._filled or not bool(self._found[site].all()):
            reason = (
                "position past the sequence end"
                if loop in self.loops_run
                else f"loop {loop} never ran: the forward ran loops {_loops_text(self.loops_run)} (0-based)"
            )
            raise ModelError(f"site (loop={loop}, layer={layer}): not every requested position was seen ({reason})")
        return self._filled[site]

    def __getitem__(self, site: tuple[int, int]) -> torch.Tensor:
        return self.get(*site)


@contextmanager
def capture_activations(
    model: nn.Module,
    sites: Iterable[tuple[int, int]],
    positions: torch.Tensor | list | None = None,
    detach: bool = True,
) -> Iterator[ActivationCapture]:
    """Record the residual stream after layer ``layer`` in loop ``loop`` for each site.

    positions: sequence columns to keep, long [B,K] or [K] (shared by all rows); None keeps all.
    """
    layers = decoder_layers(model)
    sites = [(int(loop), int(layer)) for loop, layer in sites]
    if not sites:
        raise ValueError("capture_activations needs at least one (loop, layer) site")
    for loop, layer in sites:
        _check_site(layers, loop, layer)
    pos = None if positions is None else torch.as_tensor(positions).long()
    capture = ActivationCapture(sites, pos, detach)
    wanted: dict[int, list[int]] = {}
    for loop, layer in sites:
        wanted.setdefault(layer, []).append(loop)
    columns = _Columns(layers)
    handles = [columns]
    for layer_index, loops in wanted.items():

        def hook(module, args, kwargs, output, loops=tuple(loops), layer_index=layer_index):
            loop = kwargs.get("loop_index", 0)  # a plain causal LM runs its one loop, index 0
            capture.loops_run.add(loop)
            if loop in loops:
                hidden = _hidden(output)
                capture._record((loop, layer_index), hidden, columns(kwargs, hidden))

        handles.append(layers[layer_index].register_forward_hook(hook, with_kwargs=True))
    try:
        yield capture
    finally:
        for h in handles:
            h.remove()


class VectorInjection:
    """What :func:`add_vector` did: ``calls`` counts the forward calls in which it added the vector;
    ``loops_run`` holds the loop indices the forwards ran."""

    def __init__(self, loop: int, layer: int):
        self.loop, self.layer, self.calls = loop, layer, 0
        self.loops_run: set[int] = set()

    def _never_reached(self, num_loops: int | None = None) -> ValueError:
        ran = (
            f"loops 0..{num_loops - 1} (num_loops={num_loops})" if num_loops else f"loops {_loops_text(self.loops_run)}"
        )
        return ValueError(
            f"add_vector: loop {self.loop} (0-based) is never reached, so nothing would be injected at "
            f"(loop={self.loop}, layer={self.layer}): the forward ran {ran}. Run more loops (num_loops=) "
            "or inject at an earlier loop."
        )


@contextmanager
def add_vector(
    model: nn.Module,
    vector: torch.Tensor,
    loop: int,
    layer: int,
    strength: float = 1.0,
    start: int | torch.Tensor | list = 0,
    end: int | torch.Tensor | list | None = None,
    positions: torch.Tensor | list | None = None,
) -> Iterator[VectorInjection]:
    """Add ``strength * vector`` to the residual stream after ``layer`` in ``loop``.

    vector: [H] or [B,H] (one per row). Columns covered: ``start <= column < end`` (``end`` None:
    to the end, generated tokens included); ``start``/``end`` are ints or one value per row. Or
    give explicit ``positions`` (long [B,K] or [K]) instead.

    Raises ``ValueError`` if a forward inside the context runs fewer than ``loop + 1`` loops (at
    that forward's first layer call), or, when the context exits, if forwards ran but none reached
    ``loop``. A context with no forward at all raises nothing (``calls`` stays 0).
    """
    layers = decoder_layers(model)
    _check_site(layers, loop, layer)
    vector = torch.as_tensor(vector)
    hidden_size = int(unwrap(model).config.hidden_size)
    if vector.shape[-1] != hidden_size or vector.dim() not in (1, 2):
        raise ValueError(f"vector must be [H] or [B,H] with H={hidden_size}, got shape {list(vector.shape)}")
    record = VectorInjection(loop, layer)

    columns = _Columns(layers)

    def hook(module, args, kwargs, output):
        ran = kwargs.get("loop_index", 0)
        num_loops = kwargs.get("num_loops")
        if num_loops is not None and loop >= num_loops:  # this forward stops before our loop: say so now
            raise record._never_reached(num_loops)
        record.loops_run.add(ran)
        if ran != loop:
            return None
        layer_output, output = output, _hidden(output)
        cols = columns(kwargs, output)  # [S]
        bsz = output.shape[0]
        vec = vector.to(device=output.device, dtype=output.dtype)
        if vec.dim() == 2 and vec.shape[0] != bsz:
            raise ValueError(f"vector has {vec.shape[0]} rows for a batch of {bsz}")
        vec = vec.expand(bsz, -1) if vec.dim() == 1 else vec
        if positions is not None:
            pos = torch.as_tensor(positions, device=output.device).long()
            pos = pos.unsqueeze(0).expand(bsz, -1) if pos.dim() == 1 else pos
            where = (cols[None, :, None] == pos[:, None, :]).any(-1)  # [B,S]
        else:
            lo = _as_row_tensor(start, bsz, output.device, "start")
            where = cols[None, :] >= lo[:, None]
            if end is not None:
                where = where & (cols[None, :] < _as_row_tensor(end, bsz, output.device, "end")[:, None])
        if not bool(where.any()):
            return None
        record.calls += 1
        return _replace_hidden(layer_output, output + strength * where.unsqueeze(-1).to(output.dtype) * vec[:, None, :])

    handle = layers[layer].register_forward_hook(hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()
        columns.remove()
    # reached only when the body raised nothing: forwards ran, but none of them reached the loop
    if record.loops_run and loop not in record.loops_run:
        raise record._never_reached()
