"""Moved to :mod:`loopalign.loading` (the one loader); these names stay importable for one release."""

from __future__ import annotations

from loopalign.loading import load_model as _load_model
from loopalign.loading import load_tokenizer

__all__ = ["load_tokenizer", "load_model"]


def load_model(name: str, tokenizer=None, seed: int = 0, device: str = "cpu"):
    """(model, tokenizer) with this module's old argument order; see :func:`loopalign.loading.load_model`."""
    return _load_model(name, device=device, seed=seed, tokenizer=tokenizer)
