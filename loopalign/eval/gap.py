"""The gap table (SV, RR and RR - SV per loop, with paired bootstrap 95% intervals) and its result,
:class:`GapResult`. The before/after verdict is :mod:`loopalign.eval.verdict`.

Every loop gets the headline metric plus accuracy, balanced accuracy and AUROC, for SV by its fixed
0.5 rule on P(yes) ("raw"), for SV with a label-fitted threshold fitted as RR's probe is
("calibrated", ``sv_cal``), and for RR, with the gap RR - SV of each. Intervals are percentile
cluster bootstraps: tasks are resampled with all their records (a record without a task id is a
cluster of its own), jointly for SV and RR so the gap's interval accounts for their correlation.
All quantities are fractions in [0, 1].
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from loopalign.loops import parse_loop_counts

from .metrics import (
    METRICS,
    TABLE_METRICS,
    accuracy,
    auroc,
    balanced_accuracy,
    bootstrap_ci,
    f1_score,
)

__all__ = [
    "GapResult",
    "gap_table",
    "metric_value",
    "parse_loops",
    "TABLE_METRICS",
]
from .report import gap_markdown, log_wandb, save_gap


def parse_loops(spec: str | int | list[int] | tuple[int, ...], option: str = "loops") -> list[int]:
    """'1-8' | '1,2,4' | 4 | [1, 2] -> sorted loop counts >= 1 (:func:`loopalign.loops.parse_loop_counts`)."""
    return parse_loop_counts(spec, option)


def metric_value(metric: str, y: np.ndarray, prob: np.ndarray, pred: np.ndarray) -> float:
    """One metric of hard predictions pred [N] (accuracy, balanced_accuracy, f1) or scores prob [N] (auroc)."""
    if metric == "accuracy":
        return accuracy(y, pred)
    if metric == "balanced_accuracy":
        return balanced_accuracy(y, pred)
    if metric == "f1":
        return f1_score(y, pred)
    if metric == "auroc":
        return auroc(y, prob)
    raise ValueError(f"unknown metric {metric!r}: use one of {list(METRICS)}")


#: Figures reported for every loop next to the headline metric: threshold-free (AUROC) and
#: balance-robust (balanced accuracy) besides accuracy.


def _metric_rows(metrics, y, prob, pred) -> np.ndarray:
    """-> [len(metrics), T]: each metric of prob / pred [T, n] against y [n] (vectorised over loops)."""
    pos, neg = y == 1, y == 0
    out, cache = [], {}
    for m in metrics:
        if m not in cache:
            if m == "accuracy":
                cache[m] = (pred == y[None]).mean(1) if y.size else np.full(len(pred), np.nan)
            elif m == "balanced_accuracy":
                if pos.any() and neg.any():
                    cache[m] = 0.5 * ((pred[:, pos] == 1).mean(1) + (pred[:, neg] == 0).mean(1))
                else:
                    cache[m] = np.full(len(pred), np.nan)
            else:
                cache[m] = np.array([metric_value(m, y, prob[t], pred[t]) for t in range(prob.shape[0])])
        out.append(cache[m])
    return np.array(out)


def gap_table(
    labels: np.ndarray,
    sv_prob: np.ndarray,
    sv_pred: np.ndarray,
    rr_prob: np.ndarray,
    loops: list[int],
    metric: str = "accuracy",
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    sv_cal_prob: np.ndarray | None = None,
    clusters: list | None = None,
) -> list[dict]:
    """labels [N], sv_prob/sv_pred/rr_prob [T,N] on the same records -> per loop SV, RR, gap with CIs.

    Keys per loop (each with ``_lo`` / ``_hi``): ``sv``, ``rr``, ``gap`` = RR - SV in the headline
    ``metric`` (SV by its own rule: ``sv_pred``, i.e. P(yes) > 0.5); for every m in
    :data:`TABLE_METRICS`: ``sv_m``, ``rr_m``, ``gap_m``. With ``sv_cal_prob`` [T,N] (SV's P(yes) after a
    label-fitted threshold, :func:`loopalign.eval.readout.calibrate_scores`) also ``sv_cal``,
    ``gap_cal`` and ``sv_cal_m``, ``gap_cal_m``. AUROC scores SV by P(yes) and RR by the probe posterior.
    ``clusters`` [N] (task ids; None = a record of its own) makes the intervals a cluster bootstrap.
    """
    labels = np.asarray(labels)
    rr_pred = (rr_prob > 0.5).astype(np.int64)
    metrics = [metric] + [m for m in TABLE_METRICS]
    cal = sv_cal_prob is not None
    if cal:
        sv_cal_pred = (sv_cal_prob > 0.5).astype(np.int64)

    def stat(idx):
        y = labels[idx]
        sv = _metric_rows(metrics, y, sv_prob[:, idx], sv_pred[:, idx])
        rr = _metric_rows(metrics, y, rr_prob[:, idx], rr_pred[:, idx])
        parts = [sv, rr, rr - sv]
        if cal:
            sc = _metric_rows(metrics, y, sv_cal_prob[:, idx], sv_cal_pred[:, idx])
            parts += [sc, rr - sc]
        return np.stack(parts)  # [parts, metrics, T]

    est, lo, hi = bootstrap_ci(stat, len(labels), n_boot=n_boot, alpha=alpha, seed=seed, clusters=clusters)
    kinds = ["sv", "rr", "gap"] + (["sv_cal", "gap_cal"] if cal else [])
    rows = []
    for ti, t in enumerate(loops):
        row = {"loop": int(t)}
        for k, kind in enumerate(kinds):
            for mi, m in enumerate(metrics):
                name = kind if mi == 0 else f"{kind}_{m}"
                row[name], row[f"{name}_lo"], row[f"{name}_hi"] = (
                    float(est[k, mi, ti]),
                    float(lo[k, mi, ti]),
                    float(hi[k, mi, ti]),
                )
        rows.append(row)
    return rows


def _nan_to_none(x):
    if isinstance(x, float) and np.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, np.ndarray):
        return _nan_to_none(x.tolist())
    if isinstance(x, (np.floating, np.integer)):
        return _nan_to_none(x.item())
    return x


@dataclass
class GapResult:
    """Everything one gap evaluation measured (JSON-serialisable).

    table: per loop {loop, sv, rr, gap (+ _lo/_hi), rr_fixed, sv_valid_rate, best_layer} in the headline
    ``metric``, plus sv_m / rr_m / gap_m and (calibrated SV) sv_cal(_m) / gap_cal(_m), with CIs, for m in
    :data:`TABLE_METRICS` (see :func:`gap_table`);
    sv: SV metrics per loop on all records; sv_eval / rr / rr_fixed: on the RR-scored records;
    tp / sv_sampled: per loop (or None); heatmap: RR test accuracy [T][L'] and layer names;
    records: ids, labels, eval mask, sv_prob / sv_pred / rr_prob / sv_cal_prob [T][N] and clusters [N]
    (the task of each record, None = none) for ``compare``; meta: also ``label_balance``, ``clusters``,
    ``metric_rule``, ``warnings`` and the model's ``total_ut_steps`` (its trained depth);
    controls: the shortcut controls (:mod:`loopalign.eval.controls`): ``question_only`` and ``noise`` per
    loop, ``author`` (one figure), each with the headline metric, AUROC, balanced accuracy and n scored,
    and ``summary`` per loop (the share of RR above chance each reaches, flags). None when not computed
    (``GapConfig.controls=False``, or a result saved before controls existed).
    """

    loops: list[int]
    metric: str
    table: list[dict]
    sv: list[dict]
    sv_eval: list[dict]
    rr: list[dict]
    rr_fixed: list[dict]
    heatmap: dict
    records: dict
    tp: list[dict] | None = None
    sv_sampled: list[dict] | None = None
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    controls: dict | None = None

    def to_dict(self) -> dict:
        return _nan_to_none(asdict(self))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text_or_path: str) -> GapResult:
        """From a JSON string or a path to one (or to a folder holding ``gap.json``)."""
        if os.path.isdir(text_or_path):
            text_or_path = os.path.join(text_or_path, "gap.json")
        if not text_or_path.lstrip().startswith("{"):
            with open(text_or_path) as f:
                text_or_path = f.read()
        return cls(**json.loads(text_or_path))

    def arrays(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """-> (ids, labels [N], eval mask [N], sv_prob [T,N], sv_pred [T,N], rr_prob [T,N] (NaN unscored))."""
        r = self.records
        rr = self._posteriors("rr_prob")
        return (
            list(r["ids"]),
            np.asarray(r["labels"], dtype=np.int64),
            np.asarray(r["eval"], dtype=bool),
            np.asarray(r["sv_prob"], dtype=np.float64),
            np.asarray(r["sv_pred"], dtype=np.int64),
            rr,
        )

    def frozen_rr(self) -> np.ndarray | None:
        """[T, N] posteriors of the probes fitted on the *before* evaluation's features, applied frozen to
        this result's features (``evaluate_gap(frozen_probes=...)``; NaN where no frozen probe scored the
        record); None when this result has none (an old result, or evaluated without frozen probes)."""
        return self._posteriors("rr_frozen_prob")

    def all_sites_rr(self) -> np.ndarray | None:
        """[T, N] posteriors of the all-sites probe (``GapConfig.all_sites_probe``; NaN where it did not score
        the record); None when this result has none."""
        return self._posteriors("rr_all_prob")

    def train_split_rr(self) -> np.ndarray | None:
        """[T, N] posteriors of the train-split probe (``evaluate_gap(probe_train_dataset=...)``); None when this
        result has none."""
        return self._posteriors("rr_train_prob")

    def _posteriors(self, key: str) -> np.ndarray | None:
        """``records[key]`` ([T][N] posteriors, None where unscored) as a float array with NaN; None when absent."""
        rows = self.records.get(key)
        if rows is None:
            return None
        return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)

    def clusters(self) -> list:
        """The bootstrap cluster (task id) of each record [N]; None = a record of its own."""
        c = self.records.get("clusters")
        return list(c) if c is not None else [None] * len(self.records["ids"])

    def markdown(self) -> str:
        return gap_markdown(self)

    def save(self, out_dir: str, plots: bool = True) -> dict[str, str]:
        """Write gap.json, gap.md and (with plots) PNG + SVG figures to out_dir, atomically. -> paths."""
        return save_gap(self, out_dir, plots=plots)

    def log_wandb(self, **kwargs):
        return log_wandb(self, **kwargs)
