"""Streaming extraction of per-loop / per-layer features and verdict log-probabilities.

One forward per batch (``num_loops = max(loops)``) yields every loop: loop t's readout is the
state after loop t. Only the record's probe positions are kept ([B,K,H] per loop and layer,
gathered by capture hooks during the forward), so memory is O(N x T x L' x K x H) on the CPU,
never O(B x S x H) per (loop, layer). Shapes: N records, T loops asked, L' layers kept, K probe
positions, H hidden size.

Layer indices: 0..L-1 are the residual stream after decoder layer l; index L ("norm") is the
normed loop state that the LM head reads (``loop_hidden_states``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import torch

from loopalign.batching import pad_right
from loopalign.errors import ConfigError
from loopalign.hooks import capture_activations
from loopalign.loops import gather_positions, loop_logits
from loopalign.lora import computes_base, merged_lora
from loopalign.models.contract import loop_forward, num_hidden_layers, unwrap
from loopalign.speed import compiled_decoder_layers

__all__ = [
    "FeatureConfig",
    "Features",
    "EvalRecord",
    "prepare_records",
    "extract_features",
    "layer_name",
    "reused_features",
]

#: the per-record results of extract_features kept inside ``reused_features()`` (None outside it)
_REUSED: ContextVar[dict | None] = ContextVar("loopalign_reused_features", default=None)


@contextlib.contextmanager
def reused_features() -> Iterator[None]:
    """Inside this block, :func:`extract_features` runs the model once per record: a record asked for again (the
    same model object computing the same function, token ids, probe and verdict positions, loops and settings, and
    layers among those of its first extraction) gets the values of that extraction, whatever the other records of
    the call. For evaluations of one model state that overlap (a pooled evaluation, then each family's part of the
    same records; a before-evaluation, then the base model's features read again for training targets with its fresh
    adapters switched off); the kept values are dropped at the block's end, so a block must not span a change of the
    weights (training). A model with adapters on is another function than with them off (or without them)."""
    token = _REUSED.set({})
    try:
        yield
    finally:
        _REUSED.reset(token)


@dataclass
class FeatureConfig:
    """How features are extracted."""

    batch_size: int = 16  # records per forward
    layers: list[int] | None = None  # layers to keep (0..L-1 residual, L = normed loop state); None = all
    feature_dtype: torch.dtype = torch.float32  # CPU storage dtype of kept hidden states
    keep_states: bool = True  # False: verdict logits only (no probe features)
    merge_lora: bool = True  # fold PEFT LoRA adapters into the weights for the pass (restored exactly after)
    compile_layers: bool = False  # torch.compile the decoder layers for the pass (loopalign.speed); restored after
    compile_backend: str = "inductor"  # torch.compile backend of compile_layers ("aot_eager": no code generation)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"FeatureConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.layers is not None and (not self.layers or any(int(x) < 0 for x in self.layers)):
            raise ConfigError(f"FeatureConfig.layers must be None or non-empty indices >= 0, got {self.layers}")
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise ConfigError(
                f"FeatureConfig.compile_backend must name a torch.compile backend, got {self.compile_backend!r}"
            )


@dataclass
class EvalRecord:
    """One validated record: input_ids [S], verdict_index, probe_indices [K], label (or None)."""

    id: str
    input_ids: list[int]
    verdict_index: int
    probe_indices: list[int]
    label: int | None
    group: str
    task: str = ""
    gold: str = ""
    scenario: str = ""


def layer_name(layer: int, num_layers: int) -> str:
    return "norm" if layer == num_layers else str(layer)


def _rid(row: dict, i: int) -> str:
    return str(row.get("id", f"#{i}")) if row.get("id") is not None else f"#{i}"


def prepare_records(
    dataset: Iterable[dict], tokenizer=None, require_label: bool = True, group_by: str | None = "task"
) -> list[EvalRecord]:
    """Validate dataset rows (a ``datasets.Dataset`` or dicts) into :class:`EvalRecord`s.

    Needs ``input_ids`` + ``verdict_index`` (+ ``probe_indices``, default [verdict_index]) or, with a
    tokenizer, ``prompt`` (then the verdict index is the prompt's last token). Errors name the
    record id and the field.
    """
    out: list[EvalRecord] = []
    seen: set[str] = set()
    for i, row in enumerate(dataset):
        rid = _rid(row, i)
        if rid in seen:
            raise ValueError(f"record {rid!r}: duplicate id")
        seen.add(rid)
        ids = row.get("input_ids")
        if ids is None:
            if row.get("prompt") is None:
                raise ValueError(f"record {rid!r}: missing field 'input_ids' (and no 'prompt' to tokenize)")
            if tokenizer is None:
                raise ValueError(f"record {rid!r}: has no 'input_ids'; pass a tokenizer to encode 'prompt'")
            ids = tokenizer.encode(row["prompt"], add_special_tokens=False)
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"record {rid!r}: field 'input_ids' is empty")
        seq = len(ids)
        verdict = row.get("verdict_index")
        verdict = seq - 1 if verdict is None and row.get("input_ids") is None else verdict
        if verdict is None:
            raise ValueError(f"record {rid!r}: missing field 'verdict_index'")
        verdict = int(verdict)
        if not 0 <= verdict < seq:
            raise ValueError(f"record {rid!r}: field 'verdict_index' = {verdict} is outside input_ids of length {seq}")
        probes = row.get("probe_indices")
        probes = [verdict] if probes is None else [int(p) for p in probes]
        if not probes:
            raise ValueError(f"record {rid!r}: field 'probe_indices' is empty")
        for p in probes:
            if not 0 <= p < seq:
                raise ValueError(
                    f"record {rid!r}: field 'probe_indices' has position {p} past the sequence end "
                    f"(input_ids has length {seq})"
                )
        if out and len(probes) != len(out[0].probe_indices):
            raise ValueError(
                f"record {rid!r}: field 'probe_indices' has {len(probes)} positions, record "
                f"{out[0].id!r} has {len(out[0].probe_indices)}; all records need the same number"
            )
        label = row.get("label")
        if label is None:
            if require_label:
                raise ValueError(f"record {rid!r}: missing field 'label' (0/1)")
        else:
            if isinstance(label, bool) or label not in (0, 1):
                raise ValueError(f"record {rid!r}: field 'label' must be 0 or 1, got {label!r}")
            label = int(label)
        group = str(row.get(group_by)) if group_by and row.get(group_by) is not None else rid
        out.append(
            EvalRecord(
                id=rid,
                input_ids=ids,
                verdict_index=verdict,
                probe_indices=probes,
                label=label,
                group=group,
                task=str(row.get("task") or ""),
                gold=str(row.get("gold") or ""),
                scenario=str(row.get("scenario") or ""),
            )
        )
    if not out:
        raise ValueError("the dataset has no records")
    return out


@dataclass
class Features:
    """Per-record features for every asked loop.

    states: [T, L', N, K, H] hidden states at the probe positions (None if not kept);
    verdict_logp: [T, N, 2] full-vocabulary log P(yes), log P(no) at the verdict position;
    verdict_valid: bool [T, N], the argmax token is the yes or the no token;
    exit_probs: [N, T_max] the exit distribution at the verdict position.
    """

    ids: list[str]
    labels: np.ndarray
    groups: list[str]
    loops: list[int]
    layers: list[int]
    num_layers: int
    states: torch.Tensor | None
    verdict_logp: torch.Tensor
    verdict_valid: torch.Tensor
    exit_probs: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def layer_names(self) -> list[str]:
        return [layer_name(layer, self.num_layers) for layer in self.layers]

    def p_yes(self) -> torch.Tensor:
        """[T, N] P(yes) renormalised over {yes, no}."""
        return torch.softmax(self.verdict_logp, dim=-1)[..., 0]


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def extract_features(
    model,
    records: list[EvalRecord],
    loops: Sequence[int],
    verdict_ids: tuple[int, int],
    config: FeatureConfig | None = None,
    pad_id: int = 0,
) -> Features:
    """Run ``model`` once per batch at ``max(loops)`` loops; keep probe-position states and verdict log-probs.
    Inside :func:`reused_features`, records already extracted there are not run again."""
    config = config or FeatureConfig()
    memo = _REUSED.get()
    if memo is None:
        return _extract(model, records, loops, verdict_ids, config, pad_id)
    asked = None if config.layers is None else tuple(sorted({int(x) for x in config.layers}))
    settings = (
        id(unwrap(model)),
        computes_base(model),
        tuple(sorted({int(t) for t in loops})),
        config.keep_states,
        str(config.feature_dtype),
        tuple(int(v) for v in verdict_ids),
    )
    keys = [(settings, tuple(r.input_ids), tuple(r.probe_indices), r.verdict_index) for r in records]
    kept = [_layers_of(memo.get(key), asked) for key in keys]
    missing = [i for i, values in enumerate(kept) if values is None]
    fresh = _extract(model, [records[i] for i in missing], loops, verdict_ids, config, pad_id) if missing else None
    for j, i in enumerate(missing):
        kept[i] = _record_values(fresh, j)
        memo[keys[i]] = _with_layers_of(memo.get(keys[i]), kept[i])
    if len(missing) == len(records):
        return fresh
    return _assemble(records, kept)


def _with_layers_of(old: dict | None, new: dict) -> dict:
    """What to keep of a record extracted again at other layers: the new values, with the layers only the old
    extraction had added back (so a narrower ask does not drop what a later one may read)."""
    if old is None or old["states"] is None or new["states"] is None:
        return new
    extra = [x for x in old["layers"] if x not in new["layers"]]
    if not extra:
        return new
    layers = sorted(new["layers"] + extra)
    rows = [new["states"][:, new["layers"].index(x)] if x in new["layers"] else old["states"][:, old["layers"].index(x)]
            for x in layers]  # fmt: skip
    return {**new, "states": torch.stack(rows, dim=1), "layers": layers}


def _layers_of(values: dict | None, layers: tuple[int, ...] | None) -> dict | None:
    """A kept record's values (:func:`_record_values`) cut to ``layers`` (None: every layer), or None when it was
    extracted without some of them (or not at all)."""
    if values is None:
        return None
    have = values["layers"]
    want = list(range(values["num_layers"] + 1)) if layers is None else list(layers)
    if want == have:
        return values
    if not set(want) <= set(have):
        return None
    states = values["states"]
    if states is not None:
        states = states[:, [have.index(x) for x in want]]
    return {**values, "states": states, "layers": want}


def _record_values(feats: Features, j: int) -> dict:
    """Record ``j``'s computed values in ``feats`` (what :func:`reused_features` keeps)."""
    return {
        "states": None if feats.states is None else feats.states[:, :, j].clone(),
        "verdict_logp": feats.verdict_logp[:, j].clone(),
        "verdict_valid": feats.verdict_valid[:, j].clone(),
        "exit_probs": feats.exit_probs[j].clone(),
        "loops": feats.loops,
        "layers": feats.layers,
        "num_layers": feats.num_layers,
        "meta": feats.meta,
    }


def _assemble(records: list[EvalRecord], values: list[dict]) -> Features:
    """Features of ``records`` from their kept values (:func:`_record_values`, one per record, in order)."""
    first = values[0]
    states = None if first["states"] is None else torch.stack([v["states"] for v in values], dim=2)
    labels = np.array([-1 if r.label is None else r.label for r in records], dtype=np.int64)
    return Features(
        ids=[r.id for r in records],
        labels=labels,
        groups=[r.group for r in records],
        loops=first["loops"],
        layers=first["layers"],
        num_layers=first["num_layers"],
        states=states,
        verdict_logp=torch.stack([v["verdict_logp"] for v in values], dim=1),
        verdict_valid=torch.stack([v["verdict_valid"] for v in values], dim=1),
        exit_probs=torch.stack([v["exit_probs"] for v in values]),
        meta=dict(first["meta"]),
    )


@torch.no_grad()
def _extract(
    model,
    records: list[EvalRecord],
    loops: Sequence[int],
    verdict_ids: tuple[int, int],
    config: FeatureConfig,
    pad_id: int,
) -> Features:
    loops = sorted({int(t) for t in loops})
    if not loops or loops[0] < 1:
        raise ValueError(f"loops must be loop counts >= 1, got {loops}")
    num_layers = num_hidden_layers(model)
    layers = list(range(num_layers + 1)) if config.layers is None else sorted({int(x) for x in config.layers})
    if layers[-1] > num_layers:
        raise ValueError(
            f"FeatureConfig.layers: {layers[-1]} is out of range (0..{num_layers - 1} layers, {num_layers} = norm)"
        )
    vocab = int(unwrap(model).config.vocab_size)
    for name, tid in zip(("yes", "no"), verdict_ids):
        if not 0 <= int(tid) < vocab:
            raise ValueError(f"verdict token id for {name!r} = {tid} is outside the vocabulary (size {vocab})")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n, k = len(records), len(records[0].probe_indices)
    hidden = int(unwrap(model).config.hidden_size)
    t_max = loops[-1]
    states = (
        torch.zeros(len(loops), len(layers), n, k, hidden, dtype=config.feature_dtype) if config.keep_states else None
    )
    verdict_logp = torch.zeros(len(loops), n, 2)
    verdict_valid = torch.zeros(len(loops), n, dtype=torch.bool)
    exit_probs = torch.zeros(n, t_max)
    residual = [x for x in layers if x < num_layers]
    sites = [(t - 1, x) for t in loops for x in residual]
    yes_no = torch.tensor([int(verdict_ids[0]), int(verdict_ids[1])], device=device)
    merge = merged_lora(model) if config.merge_lora else contextlib.nullcontext()
    compiled = (
        compiled_decoder_layers(model, backend=config.compile_backend)
        if config.compile_layers
        else contextlib.nullcontext()
    )
    with merge, compiled:
        for batch in _batches([len(r.input_ids) for r in records], config.batch_size):
            rows = [records[i] for i in batch]
            enc = pad_right([{"input_ids": r.input_ids} for r in rows], pad_id)  # record indices stay valid
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            probe_pos = torch.tensor([r.probe_indices for r in rows], device=device)  # [B,K]
            verdict_pos = torch.tensor([[r.verdict_index] for r in rows], device=device)  # [B,1]
            capture_sites = sites if (config.keep_states and sites) else [(0, 0)]
            with capture_activations(model, capture_sites, positions=probe_pos) as cap:
                # any family (a plain causal LM is one loop); per-loop logits are read at the verdict only
                out = loop_forward(model, ids, mask, num_loops=t_max, logits_to_keep=1)
            index = torch.tensor(batch)
            head = unwrap(model).get_output_embeddings()
            logits = loop_logits(head, out.loop_hidden_states, verdict_pos, loops=[t - 1 for t in loops])
            logp = torch.log_softmax(logits[:, :, 0, :].float(), dim=-1)  # [T,B,V]
            verdict_logp[:, index] = logp.index_select(-1, yes_no).cpu()
            verdict_valid[:, index] = torch.isin(logp.argmax(-1), yes_no).cpu()
            exit_probs[index] = (
                out.exit_probs.gather(1, verdict_pos[:, :, None].expand(-1, -1, t_max))[:, 0].float().cpu()
            )
            if config.keep_states:
                for ti, t in enumerate(loops):
                    for li, layer in enumerate(layers):
                        if layer == num_layers:
                            h = gather_positions(out.loop_hidden_states[t - 1], probe_pos)
                        else:
                            h = cap.get(t - 1, layer)
                        states[ti, li, index] = h.to("cpu", config.feature_dtype)
            del out, cap, logits, logp
    if was_training:
        model.train()
    labels = np.array([-1 if r.label is None else r.label for r in records], dtype=np.int64)
    return Features(
        ids=[r.id for r in records],
        labels=labels,
        groups=[r.group for r in records],
        loops=loops,
        layers=layers,
        num_layers=num_layers,
        states=states,
        verdict_logp=verdict_logp,
        verdict_valid=verdict_valid,
        exit_probs=exit_probs,
        meta={"verdict_ids": [int(v) for v in verdict_ids], "positions": k},
    )


def meta_json(row: dict) -> dict:
    """Parse a record's ``meta`` JSON string (empty dict when absent)."""
    m = row.get("meta")
    return json.loads(m) if isinstance(m, str) and m else (m or {})
