"""RR: representation readout. Linear probes on h(loop t, layer l) at the record's probe position
predict the verifier label. Regularisation strength and, per loop, the best layer are chosen on a
validation split and reported on a held-out test split (or out-of-fold with k-fold cross-fitting).

Splits are by group (default the record's ``task``), so candidate answers to one task never sit
in both train and test, and stratified by the group's majority label.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from loopalign.errors import ConfigError
from loopalign.probes import LinearProbe, ProbeFitConfig, fit_probes, load_probes

from .features import Features
from .metrics import accuracy, auroc, balanced_accuracy, binary_metrics, f1_score, log_loss

__all__ = [
    "ReadoutConfig",
    "ReadoutResult",
    "all_sites_features",
    "fit_all_sites_readout",
    "fit_train_split_readout",
    "make_splits",
    "fit_readout",
    "select_features",
    "calibrate_scores",
    "apply_frozen_probes",
    "frozen_probes",
    "load_frozen_probes",
]

#: the selection criteria a readout knows; "headline" follows the evaluation's headline metric
SELECT_BY = ("headline", "accuracy", "auroc", "balanced_accuracy", "f1", "log_loss")


@dataclass
class ReadoutConfig:
    """How RR probes are fit, selected and scored."""

    l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # L2 strengths tried (chosen on validation)
    split: str = "holdout"  # "holdout" (train/validation/test) or "kfold" (cross-fitting, every record scored)
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train/validation/test shares for "holdout"
    folds: int = 5  # number of folds for "kfold" (test = fold f, validation = fold f+1, train = the rest)
    seed: int = 0  # split seed
    position: str | int = "verdict"  # "verdict" (last probe index), "answer_end" (first), "concat", or an int
    fixed_layer: int | None = None  # layer of the fixed-layer readout; None = the normed loop state (L)
    select_by: str = "headline"  # validation criterion: "headline" (the evaluation's headline metric; accuracy
    # for fit_readout on its own), "accuracy", "auroc", "balanced_accuracy", "f1", "log_loss"
    fit: ProbeFitConfig = field(default_factory=ProbeFitConfig)  # optimiser settings

    def __post_init__(self):
        if self.split not in ("holdout", "kfold"):
            raise ConfigError(f"ReadoutConfig.split must be 'holdout' or 'kfold', got {self.split!r}")
        if len(self.fractions) != 3 or any(f <= 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise ConfigError(f"ReadoutConfig.fractions must be 3 positive shares summing to 1, got {self.fractions}")
        if self.folds < 3:
            raise ConfigError(f"ReadoutConfig.folds must be >= 3 (train, validation, test), got {self.folds}")
        if not self.l2_grid or any(c < 0 for c in self.l2_grid):
            raise ConfigError(f"ReadoutConfig.l2_grid must be non-empty strengths >= 0, got {self.l2_grid}")
        if self.select_by not in SELECT_BY:
            raise ConfigError(
                f"ReadoutConfig.select_by {self.select_by!r} is not a known criterion: use one of {SELECT_BY}"
            )
        if isinstance(self.position, str) and self.position not in ("verdict", "answer_end", "concat"):
            raise ConfigError(
                f"ReadoutConfig.position must be 'verdict', 'answer_end', 'concat' or an int, got {self.position!r}"
            )


def select_features(states: torch.Tensor, position: str | int) -> torch.Tensor:
    """states [..., N, K, H] -> [..., N, H'] at the chosen probe position (H' = K*H for 'concat')."""
    k = states.shape[-2]
    if position == "concat":
        return states.reshape(*states.shape[:-2], k * states.shape[-1])
    index = {"verdict": k - 1, "answer_end": 0}.get(position, position)
    if not -k <= int(index) < k:
        raise ValueError(f"ReadoutConfig.position {position!r} is out of range for {k} probe positions")
    return states[..., int(index), :]


def make_splits(
    ids: list[str], labels: np.ndarray, groups: list[str], config: ReadoutConfig
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """-> list of (train, validation, test) record-index arrays (one for holdout, ``folds`` for kfold)."""
    labels = np.asarray(labels)
    if (labels < 0).any():
        raise ValueError(f"record {ids[int(np.argmax(labels < 0))]!r}: missing field 'label', needed for RR probes")
    if len(set(labels.tolist())) < 2:
        raise ValueError(f"the dataset has a single class (label {int(labels[0])} for all {len(labels)} records)")
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    rng = np.random.default_rng(config.seed)
    names = list(by_group)
    rng.shuffle(names)
    strata = [
        [g for g in names if labels[by_group[g]].mean() >= 0.5],
        [g for g in names if labels[by_group[g]].mean() < 0.5],
    ]
    n_parts = 3 if config.split == "holdout" else config.folds
    part_of: dict[str, int] = {}
    for stratum in strata:
        if config.split == "holdout":
            total = sum(len(by_group[g]) for g in stratum)
            cuts = np.cumsum(config.fractions)[:-1] * total
            done = 0
            for g in stratum:
                part_of[g] = int(np.searchsorted(cuts, done + len(by_group[g]) / 2))
                done += len(by_group[g])
        else:
            for j, g in enumerate(stratum):
                part_of[g] = j % n_parts
    part = np.array([part_of[g] for g in groups])
    names_ = ["train", "validation", "test"]
    if config.split == "holdout":
        splits = [(np.flatnonzero(part == 0), np.flatnonzero(part == 1), np.flatnonzero(part == 2))]
    else:
        splits = []
        for f in range(n_parts):
            test, val = part == f, part == (f + 1) % n_parts
            splits.append((np.flatnonzero(~(test | val)), np.flatnonzero(val), np.flatnonzero(test)))
    for fi, split in enumerate(splits):
        where = f" (fold {fi})" if config.split == "kfold" else ""
        for name, idx in zip(names_, split):
            if len(idx) == 0:
                raise ValueError(
                    f"the {name} split{where} is empty ({len(ids)} records in {len(by_group)} groups); "
                    "add records or change ReadoutConfig.fractions/folds"
                )
            if len(set(labels[idx].tolist())) < 2:
                raise ValueError(
                    f"the {name} split{where} has a single class (label {int(labels[idx][0])}, {len(idx)} records); "
                    "add records or change ReadoutConfig.seed/fractions"
                )
    return splits


def _score(y: np.ndarray, p: np.ndarray, by: str) -> float:
    """Higher is better."""
    pred = (p > 0.5).astype(np.int64)
    if by == "accuracy":
        return accuracy(y, pred) - 1e-3 * log_loss(y, p)  # tie-break on log-loss
    if by == "balanced_accuracy":
        return balanced_accuracy(y, pred) - 1e-3 * log_loss(y, p)
    if by == "f1":
        return f1_score(y, pred) - 1e-3 * log_loss(y, p)
    if by == "auroc":
        return auroc(y, p)
    return -log_loss(y, p)


@dataclass
class ReadoutResult:
    """RR per loop.

    prob: [T, N] P(label 1) from the selected probe per loop (NaN where a record was not scored);
    fixed_prob: [T, N] from the fixed layer; heatmap_test / heatmap_val: [T, L'] accuracy of each
    layer's probe (its L2 chosen on validation); best_layer / best_l2: per loop (per fold for kfold);
    eval_index: records with a test prediction; probes: selected probes (first fold) by name;
    fold_probes: the selected probe of every loop and fold (``loop{t}_fold{f}``), whose meta names the
    layer, position and the fold's test record ids: applied frozen to a later model's features
    (:func:`apply_frozen_probes`) they score each record with the probe that scored it here.
    """

    loops: list[int]
    layers: list[int]
    layer_names: list[str]
    prob: np.ndarray
    fixed_prob: np.ndarray
    heatmap_test: np.ndarray
    heatmap_val: np.ndarray
    best_layer: list[list[int]]
    best_l2: list[list[float]]
    fixed_layer: int
    eval_index: np.ndarray
    splits: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    probes: dict[str, LinearProbe]
    fold_probes: dict[str, LinearProbe] = field(default_factory=dict)

    def metrics(self, labels: np.ndarray, fixed: bool = False) -> list[dict]:
        """Per loop: accuracy, balanced accuracy, F1, AUROC (and ECE, log-loss) on the scored records."""
        prob = self.fixed_prob if fixed else self.prob
        y = labels[self.eval_index]
        rows = []
        for ti, t in enumerate(self.loops):
            m = binary_metrics(y, prob[ti, self.eval_index])
            m["loop"] = t
            if not fixed:
                m["best_layer"] = [self.layer_names[self.layers.index(x)] for x in self.best_layer[ti]]
                m["best_l2"] = self.best_l2[ti]
            rows.append(m)
        return rows


def resolve_select_by(config: ReadoutConfig, metric: str) -> ReadoutConfig:
    """``config`` with ``select_by="headline"`` replaced by the headline ``metric`` (other criteria as set)."""
    if config.select_by != "headline":
        return config
    return dataclasses.replace(config, select_by=metric)


def fit_readout(features: Features, config: ReadoutConfig | None = None, metric: str = "accuracy") -> ReadoutResult:
    """Fit probes for every (loop, layer, L2) on train, select on validation, score on test.

    ``metric``: the headline metric, the selection criterion when ``config.select_by`` is "headline"."""
    config = resolve_select_by(config or ReadoutConfig(), metric)
    if features.states is None:
        raise ValueError("features were extracted with keep_states=False; RR needs hidden states")
    labels = features.labels
    splits = make_splits(features.ids, labels, features.groups, config)
    fixed_layer = features.num_layers if config.fixed_layer is None else config.fixed_layer
    if fixed_layer not in features.layers:
        raise ValueError(f"ReadoutConfig.fixed_layer={fixed_layer} was not extracted (layers {features.layers})")
    fixed_li = features.layers.index(fixed_layer)
    n_loops, n_layers, n = len(features.loops), len(features.layers), len(labels)
    prob = np.full((n_loops, n), np.nan)
    fixed_prob = np.full((n_loops, n), np.nan)
    heat_test = np.zeros((n_loops, n_layers))
    heat_val = np.zeros((n_loops, n_layers))
    best_layer = [[] for _ in range(n_loops)]
    best_l2 = [[] for _ in range(n_loops)]
    probes: dict[str, LinearProbe] = {}
    fold_probes: dict[str, LinearProbe] = {}
    layer_prob = np.full((n_loops, n_layers, n), np.nan)
    for fi, (train, val, test) in enumerate(splits):
        y_tr, y_va = torch.as_tensor(labels[train]), labels[val]
        for ti, t in enumerate(features.loops):
            cands = []  # (score, li, probe, test prob)
            for li in range(n_layers):
                x = select_features(features.states[ti, li], config.position).float()  # [N,H']
                fitted = fit_probes(x[train], y_tr, config.l2_grid, config.fit)
                with torch.no_grad():
                    scored = [(_score(y_va, p.predict_proba(x[val]).numpy(), config.select_by), p) for p in fitted]
                score, probe = max(scored, key=lambda s: s[0])
                with torch.no_grad():
                    p_test = probe.predict_proba(x[test]).numpy()
                    p_val = probe.predict_proba(x[val]).numpy()
                layer_prob[ti, li, test] = p_test
                heat_val[ti, li] += accuracy(y_va, (p_val > 0.5).astype(np.int64)) / len(splits)
                cands.append((score, li, probe, p_test))
            score, li, probe, p_test = max(cands, key=lambda c: (c[0], -c[1]))
            prob[ti, test] = p_test
            fixed_prob[ti, test] = cands[fixed_li][3]
            best_layer[ti].append(features.layers[li])
            best_l2[ti].append(probe.meta["l2"])
            meta = dict(probe.meta, loop=t, layer=features.layers[li], position=config.position, fold=fi)
            meta.update(select_by=config.select_by, test_ids=[features.ids[i] for i in test])
            fold_probes[f"loop{t}_fold{fi}"] = dataclasses.replace(probe, meta=meta)
            if fi == 0:
                for name, (chosen, lyr, sc) in {
                    "best": (probe, features.layers[li], score),
                    "fixed": (cands[fixed_li][2], fixed_layer, cands[fixed_li][0]),
                }.items():
                    meta = dict(chosen.meta, loop=t, layer=lyr, position=config.position, select_by=config.select_by)
                    meta.update(layer_name=features.layer_names[features.layers.index(lyr)], val_score=float(sc))
                    probes[f"loop{t}_{name}"] = dataclasses.replace(chosen, meta=meta)
    eval_index = np.flatnonzero(~np.isnan(prob[0]))
    y_eval = labels[eval_index]
    for ti in range(n_loops):
        for li in range(n_layers):
            heat_test[ti, li] = accuracy(y_eval, (layer_prob[ti, li, eval_index] > 0.5).astype(np.int64))
    return ReadoutResult(
        loops=list(features.loops),
        layers=list(features.layers),
        layer_names=features.layer_names,
        prob=prob,
        fixed_prob=fixed_prob,
        heatmap_test=heat_test,
        heatmap_val=heat_val,
        best_layer=best_layer,
        best_l2=best_l2,
        fixed_layer=fixed_layer,
        eval_index=eval_index,
        splits=splits,
        probes=probes,
        fold_probes=fold_probes,
    )


def all_sites_features(features: Features, loop_index: int) -> torch.Tensor:
    """[N, L'·K·H]: every extracted layer's state at every probe position, side by side, for one loop."""
    states = features.states[loop_index]  # [L', N, K, H]
    return states.permute(1, 0, 2, 3).reshape(states.shape[1], -1).float()


def fit_all_sites_readout(
    features: Features, splits: list[tuple[np.ndarray, np.ndarray, np.ndarray]], config: ReadoutConfig
) -> np.ndarray:
    """A stronger yardstick beside RR: per loop, one linear probe over every extracted layer x probe position
    (:func:`all_sites_features`), on RR's own splits (``ReadoutResult.splits``), its L2 chosen on each split's
    validation part by ``config.select_by`` (resolved, not "headline"). -> [T, N] P(label 1) on each split's test
    records (NaN elsewhere), so it scores the same records as RR."""
    if features.states is None:
        raise ValueError("features were extracted with keep_states=False; the all-sites readout needs hidden states")
    if config.select_by == "headline":
        raise ValueError("fit_all_sites_readout: resolve select_by first (resolve_select_by)")
    labels = features.labels
    prob = np.full((len(features.loops), len(labels)), np.nan)
    for ti in range(len(features.loops)):
        x = all_sites_features(features, ti)
        for train, val, test in splits:
            fitted = fit_probes(x[train], torch.as_tensor(labels[train]), config.l2_grid, config.fit)
            with torch.no_grad():
                scored = [(_score(labels[val], p.predict_proba(x[val]).numpy(), config.select_by), p) for p in fitted]
                probe = max(scored, key=lambda item: item[0])[1]
                prob[ti, test] = probe.predict_proba(x[test]).numpy()
    return prob


def fit_train_split_readout(
    train: Features, features: Features, config: ReadoutConfig
) -> tuple[np.ndarray, list[dict]]:
    """A stronger yardstick beside RR: per loop, a linear probe fitted on records the evaluation never scores
    (``train``: typically the fine-tune's labelled training split, through the same model), applied to every
    record of ``features``. Its layer and L2 are chosen on ``train`` alone: fitted on two thirds of its groups
    (stratified like RR's splits) and scored on the third left out by ``config.select_by`` (resolved, not
    "headline"); then it is refitted on all of ``train`` at that layer and L2, at ``config.position``.
    -> ([T, N] P(label 1) on every record of ``features``, per loop {"loop", "layer", "l2", "n_train"})."""
    for name, f in (("train", train), ("features", features)):
        if f.states is None:
            raise ValueError(f"fit_train_split_readout: {name} were extracted with keep_states=False")
    if config.select_by == "headline":
        raise ValueError("fit_train_split_readout: resolve select_by first (resolve_select_by)")
    if list(train.loops) != list(features.loops) or list(train.layers) != list(features.layers):
        raise ValueError(
            f"fit_train_split_readout: the training records were extracted at loops {train.loops} / layers "
            f"{train.layers}, the evaluated ones at loops {features.loops} / layers {features.layers}"
        )
    shared = sorted(set(train.ids) & set(features.ids))
    if shared:
        raise ValueError(
            f"fit_train_split_readout: {len(shared)} records are in both the training split and the evaluation "
            f"(first {shared[0]!r}): a held-out yardstick cannot be fitted on what it scores"
        )
    # selection on one split: fit on two thirds of the training records (whole groups), score the third left out
    fit_part, val, held = make_splits(
        train.ids, train.labels, train.groups, dataclasses.replace(config, split="kfold", folds=3)
    )[0]
    fit_idx = np.concatenate([fit_part, val])
    y_all = torch.as_tensor(train.labels)
    prob = np.full((len(features.loops), len(features.ids)), np.nan)
    chosen = []
    for ti, t in enumerate(features.loops):
        best = None  # (held-out score, layer index, l2); ties keep the shallower layer
        for li in range(len(train.layers)):
            x = select_features(train.states[ti, li], config.position).float()
            fitted = fit_probes(x[fit_idx], y_all[fit_idx], config.l2_grid, config.fit)
            with torch.no_grad():
                y_held = train.labels[held]
                scores = [_score(y_held, p.predict_proba(x[held]).numpy(), config.select_by) for p in fitted]
            ci = int(np.argmax(scores))
            if best is None or scores[ci] > best[0]:
                best = (scores[ci], li, config.l2_grid[ci])
        _, li, l2 = best
        x = select_features(train.states[ti, li], config.position).float()
        probe = fit_probes(x, y_all, [l2], config.fit)[0]
        with torch.no_grad():
            x_eval = select_features(features.states[ti, li], config.position).float()
            prob[ti] = probe.predict_proba(x_eval).double().numpy()
        chosen.append({"loop": t, "layer": train.layer_names[li], "l2": float(l2), "n_train": len(train.ids)})
    return prob, chosen


def frozen_probes(probes: dict[str, LinearProbe]) -> dict[str, LinearProbe]:
    """The per-fold probes of a readout (:attr:`ReadoutResult.fold_probes`, as saved in probes.json) in a
    set of probes; ValueError when there are none (a probe set saved before frozen readouts existed)."""
    out = {k: p for k, p in probes.items() if {"fold", "loop", "layer", "test_ids"} <= set(p.meta)}
    if not out:
        raise ValueError(
            f"frozen_probes: none of the probes {sorted(probes)[:4]}... is a per-fold readout probe (meta with "
            "'fold', 'loop', 'layer', 'test_ids'): the before-evaluation was saved before frozen readouts "
            "existed; re-run it to measure drift"
        )
    return out


def load_frozen_probes(path: str, required: bool = True) -> dict[str, LinearProbe] | None:
    """The per-fold readout probes saved by ``evaluate_gap(out_dir=...)``: ``path`` is that folder (its
    ``probes.safetensors`` / ``probes.json``) or the probe file's path without extension. With
    ``required=False`` a folder without them gives None."""
    if os.path.isdir(path):
        path = os.path.join(path, "probes")
    try:
        return frozen_probes(load_probes(path))
    except (FileNotFoundError, ValueError):
        if required:
            raise
        return None


def apply_frozen_probes(features: Features, probes: dict[str, LinearProbe]) -> np.ndarray:
    """Per-fold probes fitted on another model's features (:func:`frozen_probes`), applied unchanged to
    ``features``: each record is scored, at each loop, by the probe whose fold held it out (its
    ``test_ids``), at that probe's layer and position. -> [T, N] P(label 1), NaN where no probe scored
    the record (a loop or record the probes never saw). Fails, naming the probe, on a layer that was
    not extracted or a record two folds claim."""
    if features.states is None:
        raise ValueError("features were extracted with keep_states=False; frozen probes need hidden states")
    probes = frozen_probes(probes)
    row = {rid: i for i, rid in enumerate(features.ids)}
    out = np.full((len(features.loops), len(features.ids)), np.nan)
    for name, probe in sorted(probes.items()):
        m = probe.meta
        if m["loop"] not in features.loops:
            continue
        if m["layer"] not in features.layers:
            raise ValueError(
                f"frozen probe {name!r} reads layer {m['layer']}, which was not extracted (layers {features.layers})"
            )
        idx = np.array([row[r] for r in m["test_ids"] if r in row], dtype=np.int64)
        if not idx.size:
            continue
        ti, li = features.loops.index(m["loop"]), features.layers.index(m["layer"])
        if not np.isnan(out[ti, idx]).all():
            raise ValueError(f"frozen probe {name!r}: its test records are also another fold's (loop {m['loop']})")
        x = select_features(features.states[ti, li][torch.as_tensor(idx)], m["position"]).float()
        with torch.no_grad():
            out[ti, idx] = probe.predict_proba(x).double().numpy()
    return out


def _fit_threshold(score: np.ndarray, y: np.ndarray, by: str) -> float:
    """The cut t on a one-number score (predict 1 where score > t) that is best on (score, y) by the
    thresholded criterion ``by`` (balanced accuracy for ``balanced_accuracy``, else accuracy; ties:
    the cut nearest 0, i.e. nearest SV's own rule). Candidates: midpoints between sorted distinct
    scores, below all, and 0."""
    values = np.unique(score)
    cuts = np.concatenate([[values[0] - 1.0, 0.0], (values[:-1] + values[1:]) / 2]) if values.size else np.zeros(1)
    pred = score[None, :] > cuts[:, None]  # [C, N]
    pos, neg = y == 1, y == 0
    if by == "balanced_accuracy" and pos.any() and neg.any():
        quality = 0.5 * (pred[:, pos].mean(1) + (~pred[:, neg]).mean(1))
    else:
        quality = (pred == (y[None, :] == 1)).mean(1)
    best = np.flatnonzero(quality >= quality.max() - 1e-12)
    return float(cuts[best[np.argmin(np.abs(cuts[best]))]])


def calibrate_scores(
    scores: np.ndarray,
    labels: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    config: ReadoutConfig | None = None,
) -> np.ndarray:
    """SV with a label-fitted threshold, out of fold on RR's splits.

    scores [T, N] (SV's log-odds log P(yes) - log P(no) per loop) -> [T, N] "calibrated P(yes)":
    per split, the cut on the score that is best on the split's train + validation records (by
    ``config.select_by``: balanced accuracy when that is the criterion, else accuracy) is applied to
    its test records, as ``sigmoid(score - cut)``, so the 0.5 rule is the fitted cut and the ranking
    (AUROC) is the raw score's. NaN where RR scores no record. RR's probe gets its threshold from
    the labels the same way (its bias, fitted on the train split); a cut, not a one-feature
    likelihood fit, because a likelihood fit on a score that is not logistic in the label (a mass of
    P(yes) = 1 on both answers of biased items) can put the cut where it is worse than SV's own rule.
    On its fitting records the cut is never worse than the raw rule (0 is a candidate).
    """
    config = config or ReadoutConfig()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != len(labels):
        raise ValueError(f"calibrate_scores: scores must be [T, N={len(labels)}], got {scores.shape}")
    labels = np.asarray(labels)
    scores = np.nan_to_num(scores, nan=0.0, posinf=50.0, neginf=-50.0)
    by = "balanced_accuracy" if config.select_by == "balanced_accuracy" else "accuracy"
    out = np.full(scores.shape, np.nan)
    for train, val, test in splits:
        fit = np.concatenate([np.asarray(train), np.asarray(val)]).astype(np.int64)
        for ti in range(scores.shape[0]):
            cut = _fit_threshold(scores[ti, fit], labels[fit], by)
            out[ti, test] = 1.0 / (1.0 + np.exp(-(scores[ti, test] - cut)))
    return out
