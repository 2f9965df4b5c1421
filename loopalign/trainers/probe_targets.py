"""Offline, frozen probe targets for probe distillation (``loss_weights.probe_distill``).

Per loop t, a standardised L2 logistic probe reads the BASE model's state (adapters disabled) at
the site that ``evaluate_gap`` reads as RR (the record's verdict position, the normed loop state
by default; extracted with ``loopalign.eval``'s own feature code). Its posterior P(label 1) is the
target of the verbal verdict at loop t:

- labelled records get OUT-OF-FOLD posteriors (k folds over task groups, stratified by the
  group's majority label, as ``loopalign.eval.readout.make_splits`` groups): no record's target
  comes from a probe that saw its label;
- unlabelled records get the posterior of a probe fit on all labelled records.

``label_fraction < 1`` keeps the labels of a seeded, task-grouped share of the records
(``labelled`` True); the others (``labelled`` False) are trained by the distillation term only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from loopalign.batching import pad_token_id
from loopalign.eval.features import FeatureConfig, extract_features, prepare_records
from loopalign.eval.metrics import accuracy, auroc, log_loss
from loopalign.eval.readout import ReadoutConfig, select_features
from loopalign.log import get_logger
from loopalign.probes import LinearProbe, ProbeFitConfig, fit_probes

from .gap_data import PROBE_POSITIONS, verdict_token_ids

logger = get_logger(__name__)

__all__ = ["PROBE_LABEL", "ProbeTargets", "fit_probe_targets", "labelled_only"]

#: an optional column: the label the target probe is fitted on (None: the record does not fit it). Without it the
#: probe fits the records whose label the other terms read (``labelled``).
PROBE_LABEL = "probe_label"

#: Targets are kept inside (eps, 1 - eps): a soft label, never a hard 0 or 1.
TARGET_EPS = 1e-6


@dataclass
class ProbeTargets:
    """``fit_probe_targets``' result.

    dataset: the input records plus ``probe_target`` (num_loops floats, P(Yes) per loop) and
    ``labelled`` (bool); oof_auroc / oof_accuracy / oof_log_loss: per loop, of the out-of-fold
    posteriors on the labelled records; l2: per loop, the strength chosen (lowest OOF log-loss);
    probes: per loop, the probe fit on all labelled records (it scored the unlabelled ones).
    """

    dataset: object
    oof_auroc: list[float]
    oof_accuracy: list[float]
    oof_log_loss: list[float]
    l2: list[float]
    layer: int
    position: str
    n_folds: int
    n_labelled: int
    n_records: int
    probes: list[LinearProbe] = field(default_factory=list, repr=False)
    centering: dict[str, list[float]] = field(default_factory=dict)  # group -> logit shift per loop (center_groups)

    def summary(self) -> dict:
        """The probes' quality and settings as plain JSON-ready values."""
        return {
            "oof_auroc": self.oof_auroc,
            "oof_accuracy": self.oof_accuracy,
            "oof_log_loss": self.oof_log_loss,
            "l2": self.l2,
            "layer": self.layer,
            "position": self.position,
            "n_folds": self.n_folds,
            "n_labelled": self.n_labelled,
            "n_records": self.n_records,
            "centering": self.centering,
        }


def _strata(names: list[str], members: dict[str, list[int]], labels: np.ndarray) -> list[list[str]]:
    """Groups split by their majority label (order kept)."""
    return [
        [g for g in names if labels[members[g]].mean() >= 0.5],
        [g for g in names if labels[members[g]].mean() < 0.5],
    ]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def _members(groups: list[str], index: np.ndarray) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i in index.tolist():
        out.setdefault(groups[i], []).append(i)
    return out


def labelled_subset(groups: list[str], labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """bool [N]: a seeded share ``fraction`` of the records with a label (labels >= 0), whole groups
    at a time, stratified by the group's majority label."""
    keep = np.zeros(len(groups), dtype=bool)
    candidates = np.flatnonzero(labels >= 0)
    if fraction >= 1.0:
        keep[candidates] = True
        return keep
    members = _members(groups, candidates)
    names = list(members)
    np.random.default_rng([seed, 1]).shuffle(names)
    for stratum in _strata(names, members, labels):
        target = fraction * sum(len(members[g]) for g in stratum)
        done = 0
        for g in stratum:
            if done + len(members[g]) / 2 < target:
                keep[members[g]] = True
                done += len(members[g])
    return keep


def labelled_only(dataset, fraction: float, seed: int = 0, group_by: str | None = "task"):
    """The records of ``dataset`` that keep their labels under ``label_fraction`` = ``fraction``:
    the same task-grouped subset :func:`fit_probe_targets` labels with the same seed, so a run on
    these alone is the labelled-only baseline of a probe-distillation run. Prints how many."""
    groups = []
    for r in _rows(dataset, group_by):  # as prepare_records groups: the field, else the record alone
        g = r.get(group_by) if group_by else None
        groups.append(str(g) if g is not None else str(r["id"]))
    labels = np.asarray(dataset["label"], dtype=np.int64)
    keep = np.flatnonzero(labelled_subset(groups, labels, float(fraction), seed))
    if len(keep) == 0 or len(set(labels[keep].tolist())) < 2:
        raise ValueError(
            f"label_fraction={fraction} keeps {len(keep)} of {len(labels)} training records, not both classes; "
            "raise label_fraction"
        )
    logger.info(
        f"label_fraction={fraction}: training on the {len(keep)} of {len(labels)} records that keep their labels"
    )
    return dataset.select(keep.tolist())


def grouped_folds(groups: list[str], labels: np.ndarray, index: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """int [N]: the fold (0..n_folds-1) of each record in ``index``, -1 elsewhere. Whole groups per
    fold, groups shuffled by ``seed`` and dealt round-robin within each majority-label stratum."""
    fold = np.full(len(groups), -1, dtype=np.int64)
    members = _members(groups, index)
    names = list(members)
    np.random.default_rng([seed, 2]).shuffle(names)
    for stratum in _strata(names, members, labels):
        for j, g in enumerate(stratum):
            fold[members[g]] = j % n_folds
    return fold


def _rows(dataset, group_by: str | None):
    """The columns prepare_records reads; probe_indices from answer_end_index when absent."""
    wanted = ["id", "input_ids", "verdict_index", "probe_indices", "answer_end_index", "label", "prompt"]
    if group_by:
        wanted.append(group_by)
    cols = [c for c in dict.fromkeys(wanted) if c in dataset.column_names]
    for row in dataset.select_columns(cols):
        if row.get("probe_indices") is None and row.get("answer_end_index") is not None:
            row["probe_indices"] = [row["answer_end_index"], row["verdict_index"]]
        yield row


def fit_probe_targets(
    model,
    tokenizer,
    dataset,
    num_loops: int,
    layer: int | None = None,
    position: str = "verdict",
    n_folds: int = 5,
    label_fraction: float = 1.0,
    seed: int = 0,
    l2: float | Sequence[float] = ReadoutConfig.l2_grid,
    batch_size: int = 16,
    group_by: str | None = "task",
    verdict_tokens: tuple[str, str] = ("Yes", "No"),
    fit: ProbeFitConfig | None = None,
    center_groups: Sequence[str] | None = None,
) -> ProbeTargets:
    """Frozen per-loop probe targets for the records of ``dataset`` (see the module doc).

    ``dataset``: rendered verification records (``input_ids``, ``verdict_index``, ``label``;
    ``probe_indices`` or ``answer_end_index``; ``group_by`` names the grouping field, records
    without it are their own group). An existing ``labelled`` column is used as is (then
    ``label_fraction`` must be 1); records with no label are unlabelled. A ``probe_label`` column
    (with ``labelled``) chooses the probe's own training labels: records with one fit the probe and
    get out-of-fold targets even where ``labelled`` is False. ``layer``: 0..L-1 after
    that decoder layer, L = the normed loop state (default). ``position``: "verdict" or
    "answer_end". ``l2``: a strength or a grid (per loop, the lowest OOF log-loss wins).
    ``center_groups``: one name per record (a family): the targets of each group's unlabelled records are shifted,
    in logit, by minus their median per loop, so half of them fall on each side of 0.5. It states an assumption,
    that each such group is balanced (true of statement families built balanced per entity), and corrects a probe
    whose bias was fitted on other groups' features: its ranking is kept, its cut is not. Labelled records keep
    their out-of-fold targets.
    Returns :class:`ProbeTargets`; ``.dataset`` gains ``probe_target`` [num_loops] and ``labelled``.
    """
    if isinstance(label_fraction, bool) or not 0.0 < float(label_fraction) <= 1.0:
        raise ValueError(f"fit_probe_targets: label_fraction must be in (0, 1], got {label_fraction!r}")
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise ValueError(f"fit_probe_targets: n_folds must be an int >= 2, got {n_folds!r}")
    if position not in PROBE_POSITIONS:
        raise ValueError(f"fit_probe_targets: position must be one of {PROBE_POSITIONS}, got {position!r}")
    if not isinstance(num_loops, int) or num_loops < 1:
        raise ValueError(f"fit_probe_targets: num_loops must be an int >= 1, got {num_loops!r}")
    grid = [float(l2)] if isinstance(l2, (int, float)) else [float(c) for c in l2]
    if not grid or any(c < 0 for c in grid):
        raise ValueError(f"fit_probe_targets: l2 must be a strength >= 0 or a non-empty list of them, got {l2!r}")
    if center_groups is not None and len(center_groups) != len(dataset):
        raise ValueError(
            f"fit_probe_targets: center_groups names {len(center_groups)} groups for {len(dataset)} records"
        )
    num_layers = int(model.config.num_hidden_layers)
    layer = num_layers if layer is None else int(layer)
    if not 0 <= layer <= num_layers:
        raise ValueError(
            f"fit_probe_targets: layer={layer} is out of range: 0..{num_layers - 1} (after a layer) "
            f"or {num_layers} (the loop state)"
        )

    records = prepare_records(_rows(dataset, group_by), tokenizer, require_label=False, group_by=group_by)
    groups = [r.group for r in records]
    labels = np.array([-1 if r.label is None else r.label for r in records], dtype=np.int64)
    if PROBE_LABEL in dataset.column_names:
        # the target probe reads its own labels: records the other terms train without a label may still fit it
        if "labelled" not in dataset.column_names or label_fraction < 1.0:
            raise ValueError(
                f"fit_probe_targets: a {PROBE_LABEL!r} column needs a 'labelled' column (which records the other "
                "terms read the label of) and label_fraction=1"
            )
        labels = np.array([-1 if v is None else int(v) for v in dataset[PROBE_LABEL]], dtype=np.int64)
        labelled = labels >= 0
    elif "labelled" in dataset.column_names:
        if label_fraction < 1.0:
            raise ValueError(
                f"fit_probe_targets: the dataset has a 'labelled' column, so label_fraction={label_fraction} "
                "cannot choose the labelled records too; drop the column or use label_fraction=1"
            )
        labelled = np.array([bool(v) for v in dataset["labelled"]], dtype=bool)
        missing = np.flatnonzero(labelled & (labels < 0))
        if missing.size:
            raise ValueError(f"record {records[missing[0]].id!r}: 'labelled' is True but field 'label' is missing")
    else:
        labelled = labelled_subset(groups, labels, float(label_fraction), seed)
    index = np.flatnonzero(labelled)
    for cls in (0, 1):
        count = int((labels[index] == cls).sum())
        if count < 2:
            raise ValueError(
                f"fit_probe_targets: {count} labelled record(s) of class {cls} ({index.size} labelled of "
                f"{len(records)}, label_fraction={label_fraction}); the probes need at least 2 of each class: "
                "raise label_fraction or add records"
            )
    fold = grouped_folds(groups, labels, index, n_folds, seed)
    n_groups = len({groups[i] for i in index.tolist()})
    if n_groups < n_folds:
        raise ValueError(
            f"fit_probe_targets: n_folds={n_folds} exceeds the {n_groups} labelled groups ('{group_by}'); "
            "lower n_folds or raise label_fraction"
        )
    for f in range(n_folds):
        train = index[fold[index] != f]
        if len(set(labels[train].tolist())) < 2:
            raise ValueError(
                f"fit_probe_targets: the training part of fold {f} (n_folds={n_folds}) holds a single class; "
                "lower n_folds, raise label_fraction or add records"
            )

    pad_id = pad_token_id(tokenizer)
    verdict_ids = verdict_token_ids(tokenizer, *verdict_tokens)
    config = FeatureConfig(batch_size=batch_size, layers=[layer], merge_lora=False)
    base = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with base:
        feats = extract_features(model, records, range(1, num_loops + 1), verdict_ids, config, pad_id=pad_id)
    x = select_features(feats.states[:, 0], position).clone()  # [T,N,H]
    del feats  # the other probe position's copy

    y_all = torch.as_tensor(labels)
    unlabelled = torch.as_tensor(np.flatnonzero(~labelled))
    logits = np.zeros((num_loops, len(records)))
    report = {"oof_auroc": [], "oof_accuracy": [], "oof_log_loss": [], "l2": []}
    probes = []
    for t in range(num_loops):
        oof = np.zeros((len(grid), index.size))
        for f in range(n_folds):
            train = torch.as_tensor(index[fold[index] != f])
            test = fold[index] == f
            fitted = fit_probes(x[t][train], y_all[train], grid, fit)
            with torch.no_grad():
                x_test = x[t][torch.as_tensor(index[test])]
                oof[:, test] = np.stack([p.logits(x_test).double().numpy() for p in fitted])
        y = labels[index]
        prob = _sigmoid(oof)
        best = int(np.argmin([log_loss(y, p) for p in prob]))
        all_labelled = torch.as_tensor(index)
        full = fit_probes(x[t][all_labelled], y_all[all_labelled], grid, fit)[best]
        logits[t, index] = oof[best]
        if unlabelled.numel():
            with torch.no_grad():
                logits[t, unlabelled.numpy()] = full.logits(x[t][unlabelled]).double().numpy()
        full.meta.update(loop=t + 1, layer=layer, position=position)
        probes.append(full)
        report["oof_auroc"].append(auroc(y, prob[best]))
        report["oof_accuracy"].append(accuracy(y, (prob[best] > 0.5).astype(np.int64)))
        report["oof_log_loss"].append(log_loss(y, prob[best]))
        report["l2"].append(grid[best])
    shifts = {}
    if center_groups is not None:
        logits, shifts = center_unlabelled(logits, ~labelled, [str(g) for g in center_groups])
    targets = np.clip(_sigmoid(logits), TARGET_EPS, 1.0 - TARGET_EPS)  # [T,N]

    out = dataset.remove_columns([c for c in ("probe_target",) if c in dataset.column_names])
    out = out.add_column("probe_target", targets.T.tolist())
    if "labelled" not in out.column_names:
        out = out.add_column("labelled", labelled.tolist())
    return ProbeTargets(
        dataset=out,
        layer=layer,
        position=position,
        n_folds=n_folds,
        n_labelled=int(index.size),
        n_records=len(records),
        probes=probes,
        centering=shifts,
        **report,
    )


def center_unlabelled(
    logits: np.ndarray, unlabelled: np.ndarray, groups: list[str]
) -> tuple[np.ndarray, dict[str, list[float]]]:
    """``logits`` [T, N] with each group's unlabelled records shifted by minus their median per loop
    (:func:`fit_probe_targets`' ``center_groups``). -> (shifted logits, {group: the shift per loop})."""
    out = logits.copy()
    shifts: dict[str, list[float]] = {}
    names = np.asarray(groups)
    for g in sorted(set(names[unlabelled].tolist())):
        idx = np.flatnonzero(unlabelled & (names == g))
        median = np.median(logits[:, idx], axis=1)  # [T]
        out[:, idx] -= median[:, None]
        shifts[g] = [-float(m) for m in median]
    return out, shifts
