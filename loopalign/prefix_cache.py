"""The frozen prefix of a plain causal LM, computed once per record and replayed from memory.

When only the layers from ``k`` up train (LoRA on the top half, ``layers_to_transform``), the residual stream
entering layer ``k`` is a fixed function of a record's tokens: no adapter, no gradient below it. A
:class:`PrefixCache` computes it once per record (without grad, stored unpadded as float32 on the CPU, keyed by
the record's token ids) and, inside :meth:`PrefixCache.substitute`, the model's layers below ``k`` return the
cached states instead of computing them; embeddings, position embeddings, masks and the layers from ``k`` on run
as the model runs them. Autograd stops at layer ``k``: there is nothing to go back through below it.

    cache = PrefixCache(model, readout_layers=[probe_layer])
    with cache.substitute(model, batch["input_ids"], batch["attention_mask"]):
        out = model(**batch)  # layers 0..k-1 cost nothing after a record's first forward

Every record a forward inside :meth:`PrefixCache.substitute` sees is kept (training, evaluation and replay
records alike): hidden x 4 bytes per token and cached layer (SmolLM2-135M from layer 12: 2.3 KiB per
token, about 10 MiB for 80 records of 55 tokens).

Exact up to float32 rounding: a record's states are those of its first forward (batched with other rows, right
padding never reaches a real token under a causal mask), so later forwards see the same values the plain path
would compute, to the rounding of a differently shaped matmul. Batches must be right-padded (rows 1..1 0..0 in
the attention mask). The layers below ``k`` must be deterministic: a dropout with p > 0 there is refused.

Readouts below ``k`` (a probe reading the state after layer ``j < k``) are cached too: ``readout_layers`` names
them, and layer ``j``'s call returns its cached output, so forward hooks on it (:mod:`loopalign.hooks`) read the
right state. The other layers below ``k`` pass their input through: their outputs (``output_hidden_states``'
entries 1..k-1 except the cached ones) are not computed inside :meth:`substitute`.

Families: Llama, Qwen2 and GPT-2 (their decoder layers take the residual stream as the first positional argument
and return it as a tensor). A looped model (Ouro, Huginn) re-runs the same layers every loop: it has no prefix to
cache and is refused, as are other families, by name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from loopalign.errors import ModelError
from loopalign.models.contract import looped_layers, unwrap

__all__ = [
    "DROPOUT_CONFIG_FIELDS",
    "PREFIX_CACHE_FAMILIES",
    "PrefixCache",
    "active_dropouts",
    "check_prefix_cache_family",
    "lowest_trainable_layer",
    "record_keys",
]

logger = logging.getLogger(__name__)

#: model_type -> the names of the modules that run before the first decoder layer (their parameters must be frozen,
#: their dropout off)
PREFIX_CACHE_FAMILIES = {
    "llama": ("embed_tokens",),
    "qwen2": ("embed_tokens",),
    "gpt2": ("wte", "wpe", "drop"),
}


def record_keys(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, what: str = "prefix_cache"
) -> tuple[list[bytes], list[int]]:
    """Each row's key (its real tokens' bytes) and length, for a per-record cache (``what`` names it in errors);
    raises unless every row is right-padded."""
    ids = input_ids.detach().cpu()
    if ids.dim() != 2:
        raise ValueError(f"{what}: input_ids must be [batch, sequence], got shape {tuple(ids.shape)}")
    if attention_mask is None:
        lengths = [ids.shape[1]] * ids.shape[0]
    else:
        mask = attention_mask.detach().cpu().bool()
        lengths = mask.sum(dim=1).tolist()
        expected = torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]
        bad = (mask != expected).any(dim=1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{what} needs right-padded batches (attention mask 1..1 0..0); row(s) {bad} are not")
    keys = [ids[i, :n].numpy().tobytes() for i, n in enumerate(lengths)]
    return keys, lengths


def check_prefix_cache_family(config) -> None:
    """Raise ValueError unless ``config`` (a model config) is a family the prefix cache supports."""
    name = type(config).__name__
    if getattr(config, "total_ut_steps", None) is not None:
        raise ValueError(
            f"prefix_cache: {name} is a looped model; it re-runs the same layers every loop, so there is no frozen "
            "prefix to cache"
        )
    model_type = getattr(config, "model_type", None)
    if model_type not in PREFIX_CACHE_FAMILIES:
        raise ValueError(
            f"prefix_cache supports the families {sorted(PREFIX_CACHE_FAMILIES)}; {name} (model_type "
            f"{model_type!r}) is not one of them"
        )


def lowest_trainable_layer(model: nn.Module) -> int | None:
    """The index of the lowest decoder layer holding a parameter with ``requires_grad``; None if none does."""
    for index, layer in enumerate(looped_layers(model)):
        if any(p.requires_grad for p in layer.parameters()):
            return index
    return None


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _StopForward(Exception):
    """Raised by the hook on the last cached layer: the rest of the model is not needed to fill the cache."""


#: config fields of dropout in the model families loopalign loads (Llama / Qwen, GPT-2 style)
DROPOUT_CONFIG_FIELDS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop")


def active_dropouts(named_modules, config=None) -> list[str]:
    """What would sample anew at each forward in training, among ``named_modules`` ((name, module) pairs): each
    ``nn.Dropout`` with p > 0 and each module's float ``attention_dropout`` > 0 (attention applies it functionally);
    with ``config``, its dropout fields (:data:`DROPOUT_CONFIG_FIELDS`) > 0. A cache of outputs must find none."""
    found = []
    for name, module in named_modules:
        if isinstance(module, nn.Dropout) and module.p > 0:
            found.append(f"{name} (p={module.p})")
        elif isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout > 0:
            found.append(f"{name}.attention_dropout={module.attention_dropout}")
    for field in DROPOUT_CONFIG_FIELDS if config is not None else ():
        if float(getattr(config, field, 0.0) or 0.0) > 0:
            found.append(f"config.{field}={getattr(config, field)}")
    return found


class PrefixCache:
    """The residual stream after the frozen layers below the lowest trainable one, per record (module doc).

    Args:
        model: a plain causal LM of a supported family (bare, PEFT- or accelerate-wrapped), adapters attached.
        readout_layers: layers whose output something reads (a probe layer); those below ``layer`` are cached.
        layer: the first layer that runs (default: :func:`lowest_trainable_layer`). Every parameter below it and
            in the embeddings must be frozen.
    """

    def __init__(self, model: nn.Module, readout_layers=(), layer: int | None = None):
        inner = unwrap(model)
        check_prefix_cache_family(inner.config)
        layers = looped_layers(model)
        trainable = lowest_trainable_layer(model)
        if layer is None:
            if trainable is None:
                raise ValueError("prefix_cache: no decoder layer has a trainable parameter (nothing trains)")
            layer = trainable
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 < layer < len(layers):
            raise ValueError(
                f"prefix_cache: the first layer to run must be in 1..{len(layers) - 1}, got {layer!r}; layer 0 "
                "trains (e.g. LoRA's layers_to_transform includes 0), so there is no frozen prefix to cache"
            )
        if trainable is not None and trainable < layer:
            raise ValueError(f"prefix_cache: layer {trainable} has trainable parameters, below layer {layer}")
        prefix_modules = PREFIX_CACHE_FAMILIES[inner.config.model_type]
        for name, param in inner.named_parameters():
            if param.requires_grad and any(part in prefix_modules for part in name.split(".")):
                raise ValueError(
                    f"prefix_cache: {name} requires grad; the embeddings run below layer {layer} and must be frozen"
                )
        below_ids = {id(m) for below in layers[:layer] for m in below.modules()}
        dropouts = active_dropouts(
            (name, module)
            for name, module in inner.named_modules()
            if id(module) in below_ids or name.split(".")[-1] in prefix_modules
        )
        if dropouts:
            raise ValueError(
                f"prefix_cache: dropout below layer {layer} would differ every step, but the cache holds one value "
                f"per record: {', '.join(dropouts)}; set the model config's dropout below the trained layers to 0"
            )
        for j in readout_layers:
            if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < len(layers):
                raise ValueError(f"prefix_cache: readout layer {j!r} is out of range 0..{len(layers) - 1}")
        #: the first layer that runs; the states entering it (layer - 1's output) are cached
        self.layer = layer
        #: the layers whose outputs are cached: ``layer - 1`` and the readout layers below it
        self.cached_layers = tuple(sorted({layer - 1, *(j for j in readout_layers if j < layer)}))
        self._states: dict[bytes, dict[int, torch.Tensor]] = {}
        #: records whose states were computed (a record seen again is not computed again)
        self.computed = 0

    @property
    def num_records(self) -> int:
        """Records held (distinct token sequences)."""
        return len(self._states)

    def nbytes(self) -> int:
        """The cached states' size in bytes."""
        return sum(t.numel() * t.element_size() for states in self._states.values() for t in states.values())

    # ----- keys and padding ---------------------------------------------------------------------------------------
    # ----- filling --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fill(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
        """Compute the states of the batch's rows not cached yet (one forward of the layers below ``layer``, no
        grad). Call it outside any forward hook that must not see this forward. -> the number of rows computed."""
        keys, lengths = record_keys(input_ids, attention_mask)
        missing: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in self._states and key not in missing:
                missing[key] = i
        if not missing:
            return 0
        rows = list(missing.values())
        width = max(lengths[i] for i in rows)
        ids = input_ids[rows, :width]
        mask = None if attention_mask is None else attention_mask[rows, :width]
        layers = looped_layers(model)
        captured: dict[int, torch.Tensor] = {}
        last = self.layer - 1

        def record(index):
            def hook(module, args, output):
                captured[index] = _hidden(output).detach()
                if index == last:
                    raise _StopForward

            return hook

        handles = [layers[j].register_forward_hook(record(j)) for j in self.cached_layers]
        try:
            unwrap(model)(input_ids=ids, attention_mask=mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if set(captured) != set(self.cached_layers):
            raise ModelError(
                f"prefix_cache: the forward ran layers {sorted(captured)} of the cached {list(self.cached_layers)}"
            )
        for row, (key, i) in enumerate(missing.items()):
            self._states[key] = {j: captured[j][row, : lengths[i]].float().cpu().clone() for j in self.cached_layers}
        self.computed += len(rows)
        logger.debug("prefix cache: %d record(s) computed, %d held", len(rows), len(self._states))
        return len(rows)

    def _batch_states(self, keys: list[bytes], width: int, dtype, device) -> dict[int, torch.Tensor]:
        """The cached states of a batch, right-padded with zeros to ``width`` -> layer -> [B, width, H]."""
        out = {}
        for j in self.cached_layers:
            rows = [self._states[key][j] for key in keys]
            batch = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
            for i, row in enumerate(rows):
                batch[i, : row.shape[0]] = row
            out[j] = batch.to(device=device, dtype=dtype)
        return out

    # ----- substituting ---------------------------------------------------------------------------------------------
    @contextmanager
    def substitute(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> Iterator[PrefixCache]:
        """Inside: one forward of this batch (``input_ids`` [B,S], right-padded) runs the layers from ``layer`` on,
        on the cached states. Fills the cache for rows not seen before first (so enter it before any hook that
        must see only the substituted forward). Positions past a row's length carry zeros below ``layer``: under a
        causal mask with right padding they never reach a real token. With activation checkpointing on the first
        running layer, its input is a leaf that requires grad (reentrant checkpointing needs one), so autograd
        still stops there."""
        self.fill(model, input_ids, attention_mask)
        keys, _ = record_keys(input_ids, attention_mask)
        layers = looped_layers(model)
        shape = tuple(input_ids.shape)
        states: dict[int, torch.Tensor] = {}
        checkpointed = bool(getattr(layers[self.layer], "gradient_checkpointing", False))
        last = self.layer - 1

        def stand_in(index):
            def forward(hidden_states, *args, **kwargs):
                if tuple(hidden_states.shape[:2]) != shape:
                    raise ModelError(
                        f"prefix_cache: layer {index} was called on a batch of shape {tuple(hidden_states.shape[:2])} "
                        f"inside substitute() for a batch of shape {shape}"
                    )
                if index not in self.cached_layers:
                    return hidden_states
                if not states:
                    states.update(self._batch_states(keys, shape[1], hidden_states.dtype, hidden_states.device))
                out = states[index]
                if index == last and checkpointed and torch.is_grad_enabled():
                    out = out.detach().requires_grad_(True)
                return out

            return forward

        saved = [layer.__dict__.get("forward") for layer in layers[: self.layer]]
        for index, layer in enumerate(layers[: self.layer]):
            layer.forward = stand_in(index)
        try:
            yield self
        finally:
            for layer, previous in zip(layers[: self.layer], saved):
                if previous is None:
                    del layer.forward
                else:
                    layer.forward = previous
