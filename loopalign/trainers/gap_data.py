"""Training features for gap SFT, built from rendered verification records.

A rendered record (see ``data_builders``) holds the verification prompt's ``input_ids`` (ending
with the generation prompt), ``verdict_index`` (its last token: the verdict is read from that
position's next-token logits), ``answer_end_index`` / ``probe_indices``, and the verifier
``label``. A feature appends the target verdict ("Yes" for label 1, "No" for 0) and the end of
turn to the prompt; only those tokens carry ``labels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loopalign.batching import pad_right
from loopalign.data.prompts import verdict_token_ids

__all__ = [
    "PROBE_POSITIONS",
    "verdict_token_ids",
    "build_gap_features",
    "GapCollator",
    "with_distill_groups",
]

#: Where the probes read: the end of the candidate answer, or the verdict position.
PROBE_POSITIONS = ("answer_end", "verdict")
REQUIRED_COLUMNS = ("id", "input_ids", "label", "verdict_index", "answer_end_index")


def build_gap_features(
    records,
    tokenizer,
    probe_position: str = "answer_end",
    yes: str = "Yes",
    no: str = "No",
    max_length: int | None = None,
    completion_only: bool = True,
):
    """Map rendered records (a ``datasets.Dataset``) to training features.

    ``completion_only``: only the target verdict and end of turn carry labels (TRL's
    ``completion_only_loss``); False labels the prompt's tokens too (language modelling on the
    whole sequence, as in plain SFT).

    Columns out: input_ids, labels, label, verdict_index, probe_index, id, length (the number of
    tokens, read by ``train_sampling_strategy='group_by_length'``), and ``probe_target`` /
    ``labelled`` when the records carry them (``fit_probe_targets``). A record with ``labelled``
    False keeps no trace of its label: no target verdict is appended (input_ids = the prompt, so
    no term trains on it and it is not in the input) and its ``label`` is -1 (it may be missing).
    Errors name the record and field at fault (a dataset missing the verdict position fails here,
    before training).
    """
    if probe_position not in PROBE_POSITIONS:
        raise ValueError(f"probe_position must be one of {PROBE_POSITIONS}, got {probe_position!r}")
    missing = [c for c in REQUIRED_COLUMNS if c not in records.column_names]
    if missing:
        raise ValueError(
            f"gap SFT dataset lacks column(s) {missing} (has {records.column_names}); "
            "render it with data_builders (python -m loopalign.data.verification --render ...)"
        )
    yes_id, no_id = verdict_token_ids(tokenizer, yes, no, option="verdict_yes / verdict_no")
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tail = [end_id] if isinstance(end_id, int) and end_id != tokenizer.unk_token_id else []

    has_labelled = "labelled" in records.column_names

    def to_features(row):
        rid = row["id"]
        ids = list(row["input_ids"])
        labelled = bool(row["labelled"]) if has_labelled else True
        if labelled and row["label"] not in (0, 1):
            raise ValueError(f"record {rid!r}: field 'label' must be 0 or 1, got {row['label']!r}")
        v = row["verdict_index"]
        if not isinstance(v, int) or not 0 <= v < len(ids):
            raise ValueError(f"record {rid!r}: field 'verdict_index' {v!r} is outside its {len(ids)} input_ids")
        if v != len(ids) - 1:
            raise ValueError(
                f"record {rid!r}: field 'verdict_index' {v} must be the last prompt token ({len(ids) - 1})"
            )
        p = row["answer_end_index"] if probe_position == "answer_end" else v
        if not isinstance(p, int) or not 0 <= p < len(ids):
            raise ValueError(f"record {rid!r}: field 'answer_end_index' {p!r} is outside its {len(ids)} input_ids")
        target = [yes_id if row["label"] == 1 else no_id, *tail] if labelled else []
        full = ids + target
        if max_length is not None and len(full) > max_length:
            raise ValueError(f"record {rid!r}: {len(full)} tokens exceed max_length={max_length}")
        out = {
            "input_ids": full,
            "labels": ([-100] * len(ids) if completion_only else ids) + target,
            "label": int(row["label"]) if labelled else -1,
            "verdict_index": v,
            "probe_index": p,
            "length": len(full),
        }
        if "probe_target" in row:
            t = row["probe_target"]
            if t is None or not len(t) or any(x is None or not 0.0 <= x <= 1.0 for x in t):
                raise ValueError(f"record {rid!r}: field 'probe_target' must be probabilities in [0, 1], got {t!r}")
        return out

    keep = {
        "input_ids",
        "labels",
        "label",
        "verdict_index",
        "probe_index",
        "id",
        "length",
        "probe_target",
        "labelled",
        "distill_group",
    }
    drop = [c for c in records.column_names if c not in keep]
    return records.map(to_features, remove_columns=drop, desc="gap SFT features")


def with_distill_groups(records, groups: list[str]):
    """``records`` with a ``distill_group`` column: each record's group (``groups``, one name per record, e.g. its
    family) as an int, the index of the name in sorted order; read by probe_distill's pairwise form."""
    if len(groups) != len(records):
        raise ValueError(f"with_distill_groups: {len(groups)} group names for {len(records)} records")
    index = {name: i for i, name in enumerate(sorted(set(groups)))}
    if "distill_group" in records.column_names:
        records = records.remove_columns("distill_group")
    return records.add_column("distill_group", [index[g] for g in groups])


@dataclass
class GapCollator:
    """Right-pads a list of features into a batch.

    Out: input_ids, attention_mask, labels [B,S]; label, verdict_index, probe_index [B];
    labelled [B] bool (all True when the features have no ``labelled``); probe_target [B,T] float
    and distill_group [B] int when the features carry them.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return {
            **pad_right(features, self.pad_token_id),
            "label": torch.tensor([int(f["label"]) for f in features]),
            "verdict_index": torch.tensor([int(f["verdict_index"]) for f in features]),
            "probe_index": torch.tensor([int(f["probe_index"]) for f in features]),
            "labelled": torch.tensor([bool(f.get("labelled", True)) for f in features]),
            **self._optional(features, "probe_target", torch.float32),
            **self._optional(features, "distill_group", torch.long),
        }

    @staticmethod
    def _optional(features: list[dict], name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` when every feature carries ``name``, ``{}`` when none does; a mix fails."""
        present = [name in f for f in features]
        if not any(present):
            return {}
        if not all(present):
            raise ValueError(f"GapCollator: some features carry {name!r} and some do not")
        return {name: torch.tensor([f[name] for f in features], dtype=dtype)}
