"""What differs between the transformers releases loopalign supports (5.x), in one place.

transformers 5.24 renamed the key/value cache from ``past_key_values`` (``cache_params`` for
state-space models) to ``cache``, in model keyword arguments and in output fields, and its
``generate`` now passes and reads ``cache``; earlier 5.x releases pass and read
``past_key_values``. Ouro's outputs carry the field the installed release's ``generate`` reads,
and its ``forward`` takes both names.
"""

from __future__ import annotations

from dataclasses import fields

from transformers.modeling_outputs import BaseModelOutputWithPast

__all__ = ["CACHE_FIELD", "pick_cache"]

#: the name the installed transformers gives the KV cache in model outputs and ``generate``'s
#: model kwargs: ``"cache"`` from 5.24 on, ``"past_key_values"`` before.
CACHE_FIELD: str = "cache" if "cache" in {f.name for f in fields(BaseModelOutputWithPast)} else "past_key_values"


def pick_cache(cache, past_key_values, where: str):
    """The cache passed under either name (``cache`` or the older ``past_key_values``); both is an error."""
    if cache is not None and past_key_values is not None:
        raise ValueError(f"{where}: pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values
