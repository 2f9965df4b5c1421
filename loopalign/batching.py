"""Batching: the one padder, and the one pad-token rule.

Right padding serves training and scoring (positions are read by index from the left); left padding serves
generation (every prompt ends at the last column). Shapes: B rows, S the longest row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["pad_left", "pad_right", "pad_sequences", "pad_token_id"]


def pad_token_id(tokenizer) -> int:
    """The pad rule: the tokenizer's pad token, else its end-of-sequence token; a ValueError when it has neither."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an eos token")
    return int(eos)


def pad_sequences(
    rows: Sequence[Sequence], value, side: str = "right", dtype: torch.dtype = torch.long, length: int | None = None
) -> torch.Tensor:
    """Rows of numbers -> a [B,S] tensor filled with ``value`` where a row is shorter than S (the longest row,
    or ``length``, which must not be shorter). ``side``: where the padding goes, "right" or "left"."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not rows:
        raise ValueError("pad_sequences: no rows to pad")
    longest = max(len(r) for r in rows)
    width = longest if length is None else length
    if width < longest:
        raise ValueError(f"pad_sequences: length={length} is shorter than the longest row ({longest})")
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        n = len(row)
        if n:
            values = torch.as_tensor(row, dtype=dtype)
            if side == "right":
                out[i, :n] = values
            else:
                out[i, width - n :] = values
    return out


def pad_right(features: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pads the ``input_ids`` (and ``labels`` when present) of features. -> input_ids (``pad_token_id``),
    attention_mask (1 on real tokens) and labels (-100 on padding) [B,S]."""
    ids = [f["input_ids"] for f in features]
    batch = {
        "input_ids": pad_sequences(ids, pad_token_id),
        "attention_mask": pad_sequences([[1] * len(r) for r in ids], 0),
    }
    if all("labels" in f for f in features):
        batch["labels"] = pad_sequences([f["labels"] for f in features], -100)
    return batch


def pad_left(prompts: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pads prompts (token ids) for generation. -> input_ids and attention_mask [B,S]."""
    return {
        "input_ids": pad_sequences(prompts, pad_token_id, side="left"),
        "attention_mask": pad_sequences([[1] * len(p) for p in prompts], 0, side="left"),
    }
