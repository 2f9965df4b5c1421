"""The frozen base model's outputs that the base-reading terms compare against, computed once per record.

``rr_distill`` compares the trained model's features at the readout site with the base model's (the same model with
its adapters off), and ``replay_kind="kl"`` compares its next-token distributions on the replayed answers with the
base's. The base never changes during training, so for one record these are the same tensors at every visit:
a run of 300 steps at batch 16 over 1,700 records runs each record's base forward about three times, and each
replay record's (64 of them, 8 a step) about 40 times. :class:`BaseOutputCache` keeps them per record (keyed by
the record's tokens, and for features by the read position; float32 on the CPU, unpadded), so a batch whose records
are all held is served from memory and any other batch runs the base forward as before and keeps its rows.

    cache = BaseOutputCache()
    base_feats = cache.features(input_ids, attention_mask, positions, compute=lambda: base_forward_features())
    base_states = cache.sequences(input_ids, attention_mask, compute=lambda: base_forward().loop_hidden_states)

Exact up to float32 rounding: a record's tensors are those of the forward that first saw it (batched with other
rows; right padding never reaches a real token under a causal mask), handed back in the dtype that forward gave.
It holds hidden x loops x 4 bytes per record for features (SmolLM2-135M: 2.3 KiB) and per token for sequences
(64 replay records of 100 tokens: about 15 MiB). A base with active dropout would give another sample each visit:
:func:`check_no_base_dropout` refuses one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from loopalign.errors import ConfigError
from loopalign.log import get_logger
from loopalign.prefix_cache import active_dropouts, record_keys

logger = get_logger(__name__)

__all__ = ["BaseOutputCache", "check_no_base_dropout"]


def check_no_base_dropout(model: nn.Module) -> None:
    """Raise ConfigError when the base model (every module but the adapters' own dropout) has a dropout with p > 0:
    its outputs would be another sample at each visit, which a cache would fix to the first."""
    active = active_dropouts(
        ((name, module) for name, module in model.named_modules() if "lora_dropout" not in name),
        getattr(model, "config", None),
    )
    if active:
        raise ConfigError(
            f"base_cache: the base model has active dropout ({', '.join(active[:4])}): its outputs differ at each "
            "visit, so they cannot be kept; set base_cache false or turn the dropout off"
        )


class BaseOutputCache:
    """Per-record base outputs: :meth:`features` (one vector per loop at a read position) and :meth:`sequences`
    (every token's final hidden state per loop). ``computed`` / ``served`` count the records each way."""

    def __init__(self):
        self._features: dict[bytes, torch.Tensor] = {}
        self._sequences: dict[bytes, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self.computed = 0
        self.served = 0

    @property
    def num_records(self) -> int:
        return len(self._features) + len(self._sequences)

    def nbytes(self) -> int:
        """The held tensors' size in bytes."""
        held = [*self._features.values(), *self._sequences.values()]
        return sum(t.numel() * t.element_size() for t in held)

    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        positions: torch.Tensor,
        compute: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """The base's features of a batch, [T, B, H]: from memory when every row is held, else ``compute()``
        (the base forward, -> [T, B, H]) with its rows kept. ``positions`` [B]: each row's read position (part of
        its key)."""
        keys, _ = record_keys(input_ids, attention_mask, what="base_cache")
        keys = [k + int(p).to_bytes(8, "little", signed=True) for k, p in zip(keys, positions.tolist())]
        if all(k in self._features for k in keys):
            self.served += len(keys)
            held = torch.stack([self._features[k] for k in keys], dim=1)
            return held.to(device=positions.device, dtype=self._dtypes["features"])
        out = compute()
        self._dtypes["features"] = out.dtype
        for b, key in enumerate(keys):
            self._features[key] = out[:, b].detach().float().cpu().clone()
        self.computed += len(keys)
        return out

    def sequences(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        compute: Callable[[], Sequence[torch.Tensor]],
    ) -> list[torch.Tensor]:
        """The base's final hidden states of a batch, per loop (T x [B, S, H]): from memory when every row is held
        (right-padded with zeros, which no real token's loss reads), else ``compute()`` with its rows kept."""
        keys, lengths = record_keys(input_ids, attention_mask, what="base_cache")
        if all(k in self._sequences for k in keys):
            self.served += len(keys)
            rows = [self._sequences[k] for k in keys]  # [T, length, H] each
            T, H = rows[0].shape[0], rows[0].shape[-1]
            batch = rows[0].new_zeros(T, len(rows), input_ids.shape[1], H)
            for b, row in enumerate(rows):
                batch[:, b, : row.shape[1]] = row
            batch = batch.to(device=input_ids.device, dtype=self._dtypes["sequences"])
            return list(batch.unbind(0))
        states = list(compute())
        self._dtypes["sequences"] = states[0].dtype
        for b, (key, n) in enumerate(zip(keys, lengths)):
            self._sequences[key] = torch.stack([s[b, :n].detach().float().cpu() for s in states]).clone()
        self.computed += len(keys)
        logger.debug("base cache: %d record(s) held, %.1f MiB", self.num_records, self.nbytes() / 2**20)
        return states
