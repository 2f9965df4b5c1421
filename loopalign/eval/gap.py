"""The gap table (SV, RR and RR - SV per loop, with paired bootstrap 95% intervals) and
``compare(before, after)``, which says whether SV caught up and whether RR was preserved.

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
    _quiet,
    accuracy,
    auroc,
    balanced_accuracy,
    bootstrap_ci,
    cluster_members,
    cluster_resample,
    f1_score,
)

__all__ = [
    "GapResult",
    "gap_table",
    "CompareConfig",
    "Comparison",
    "compare",
    "metric_value",
    "parse_loops",
    "trained_depth",
    "TABLE_METRICS",
    "VERDICT_RULE",
]
from .report import compare_markdown, gap_markdown, log_wandb, save_gap


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
        rr = np.array([[np.nan if v is None else v for v in row] for row in r["rr_prob"]], dtype=np.float64)
        return (
            list(r["ids"]),
            np.asarray(r["labels"], dtype=np.int64),
            np.asarray(r["eval"], dtype=bool),
            np.asarray(r["sv_prob"], dtype=np.float64),
            np.asarray(r["sv_pred"], dtype=np.int64),
            rr,
        )

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


#: Trained depth assumed when a GapResult's meta does not record the model's ``total_ut_steps``.
DEFAULT_TRAINED_DEPTH = 4

VERDICT_RULE = (
    "Verdict rule (fixed before any number is looked at): the verdict is taken at the trained depth D "
    "(the model's total_ut_steps, else 4; CompareConfig.loops overrides) on the headline metric, with "
    "{level}% cluster-bootstrap CIs that resample tasks, paired (the same tasks in before and after). "
    "SV caught up = the after-gap RR - SV is not above 0 (its CI upper bound <= 0, or its CI includes 0: "
    "lower bound <= gap_tolerance = {gap_tol:g}) AND dSV's CI lower bound > sv_min_gain = {sv_gain:g}. "
    "RR preserved = dRR's CI lower bound > -rr_tolerance = {rr_neg:g}. Loops past D are reported "
    "separately as extrapolation and never enter the verdict."
)


def trained_depth(result: GapResult) -> int:
    """The model's trained loop count: ``meta['total_ut_steps']`` when recorded, else 4."""
    d = result.meta.get("total_ut_steps") if isinstance(result.meta, dict) else None
    return int(d) if d else DEFAULT_TRAINED_DEPTH


@dataclass
class CompareConfig:
    """The before/after verdict rule and its thresholds (fractions, e.g. 0.02 = 2 points).

    The rule, stated before any number is computed:

    - the verdict is taken at the trained depth D: ``loops`` (an int), default the model's trained
      depth (``meta['total_ut_steps']`` of the results, else 4; when D was not evaluated, the deepest
      evaluated loop below it). A list of loops averages them instead (none may exceed D);
    - **SV caught up** = the after-gap RR - SV is not above 0 — its CI upper bound <= 0 or its CI
      includes 0, i.e. its CI lower bound <= ``gap_tolerance`` (default 0) — AND the dSV CI lower
      bound > ``sv_min_gain`` (default 0);
    - **RR preserved** = the dRR CI lower bound > -``rr_tolerance`` (default 0.02);
    - CIs are percentile cluster bootstraps over tasks (records without a task: one cluster each),
      paired when both results scored the same records (the same tasks are resampled in both);
    - loops past D are reported separately as extrapolation and never enter the verdict.
    """

    loops: int | list[int] | None = None  # verdict depth D (int) or loops averaged (list); None = trained depth
    metric: str | None = None  # None = the results' headline metric; or one of METRICS
    sv_min_gain: float = 0.0  # SV improved when the dSV CI lower bound > sv_min_gain
    gap_tolerance: float = 0.0  # gap closed when the after-gap CI lower bound <= gap_tolerance (CI includes 0)
    rr_tolerance: float = 0.02  # RR preserved when the dRR CI lower bound > -rr_tolerance
    n_boot: int = 1000  # bootstrap resamples
    alpha: float = 0.05  # 1 - interval level
    seed: int = 0  # bootstrap seed

    def __post_init__(self):
        if self.gap_tolerance < 0 or self.rr_tolerance < 0:
            raise ValueError(
                f"CompareConfig tolerances must be >= 0, got gap_tolerance={self.gap_tolerance}, "
                f"rr_tolerance={self.rr_tolerance}"
            )
        if self.n_boot < 10:
            raise ValueError(f"CompareConfig.n_boot must be >= 10, got {self.n_boot}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"CompareConfig.alpha must be in (0, 1), got {self.alpha}")
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(f"CompareConfig.metric must be one of {list(METRICS)} or None, got {self.metric!r}")
        if isinstance(self.loops, bool) or (isinstance(self.loops, int) and self.loops < 1):
            raise ValueError(f"CompareConfig.loops must be a loop count >= 1 or a list of them, got {self.loops!r}")

    def rule(self) -> str:
        level = int(round(100 * (1 - self.alpha)))
        return VERDICT_RULE.format(
            level=level, gap_tol=self.gap_tolerance, sv_gain=self.sv_min_gain, rr_neg=-self.rr_tolerance
        )


@dataclass
class Comparison:
    """compare() output.

    loops: the verdict loops (one: the depth D, unless a list was asked for); depth: D; rows: per loop
    <= D, deltas with CIs and ``in_verdict``; extrapolation: the same for loops past D (never in the
    verdict); summary: the verdict quantities (mean over the verdict loops) with CIs; gap_closed /
    sv_improved / sv_caught_up / rr_preserved: the rule's parts; rule: the rule in words; clusters:
    how the bootstrap resampled (n_clusters, n_records, n_without_task).
    """

    loops: list[int]
    metric: str
    paired: bool
    rows: list[dict]
    summary: dict
    sv_improved: bool
    sv_caught_up: bool
    rr_preserved: bool
    verdict: str
    config: dict
    depth: int = DEFAULT_TRAINED_DEPTH
    extrapolation: list[dict] = field(default_factory=list)
    gap_closed: bool = False
    rule: str = ""
    clusters: dict = field(default_factory=dict)
    tp: list[dict] = field(default_factory=list)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(_nan_to_none(asdict(self)), indent=indent)

    def markdown(self) -> str:
        return compare_markdown(self)


def _eval_arrays(res: GapResult, loops: list[int]):
    ids, y, ev, svp, svd, rrp = res.arrays()
    ti = [res.loops.index(t) for t in loops]
    keep = np.flatnonzero(ev)
    clusters = res.clusters()
    return (
        [ids[i] for i in keep],
        y[keep],
        svp[ti][:, keep],
        svd[ti][:, keep],
        rrp[ti][:, keep],
        [clusters[i] for i in keep],
    )


def _verdict_loops(before: GapResult, after: GapResult, config: CompareConfig, common: list[int]):
    """-> (verdict loops, depth D, note)."""
    if isinstance(config.loops, (list, tuple)):
        loops = sorted({int(t) for t in config.loops})
        depth = max(trained_depth(before), trained_depth(after))
        past = [t for t in loops if t > depth]
        if past:
            raise ValueError(
                f"compare: CompareConfig.loops {loops} includes loops {past} past the trained depth {depth}: "
                "extrapolated loops never enter the verdict (pass loops=D, an int, to move the depth)"
            )
        return loops, depth, ""
    if config.loops is not None:
        return [int(config.loops)], int(config.loops), ""
    depth, note = trained_depth(after), ""
    if trained_depth(before) != depth:
        note = f"trained depths differ (before {trained_depth(before)}, after {depth}); using the after model's. "
    if depth not in common:
        below = [t for t in common if t <= depth]
        if not below:
            raise ValueError(
                f"compare: no loop at or below the trained depth {depth} in both results "
                f"(before {before.loops}, after {after.loops}); pass CompareConfig(loops=...)"
            )
        note += f"the trained depth {depth} was not evaluated; verdict at loop {below[-1]}, the deepest below it. "
        return [below[-1]], depth, note
    return [depth], depth, note


def compare(before: GapResult, after: GapResult, config: CompareConfig | None = None) -> Comparison:
    """Did SV catch up at the trained depth while RR held? See :class:`CompareConfig` for the rule.

    Paired over shared record ids (cluster-resampling their tasks) when both results scored mostly the
    same records, else independent cluster bootstraps."""
    config = config or CompareConfig()
    if config.metric is None and before.metric != after.metric:
        raise ValueError(
            f"compare: headline metrics differ (before {before.metric!r}, after {after.metric!r}); "
            "set CompareConfig.metric"
        )
    metric = config.metric or before.metric
    common = [t for t in before.loops if t in after.loops]
    loops, depth, note = _verdict_loops(before, after, config, common)
    missing = [t for t in loops if t not in common]
    if not loops or missing:
        raise ValueError(
            f"compare: loops {missing or loops} not in both results (before {before.loops}, after {after.loops})"
        )
    reported = common
    b_ids, b_y, b_svp, b_svd, b_rr, b_cl = _eval_arrays(before, reported)
    a_ids, a_y, a_svp, a_svd, a_rr, a_cl = _eval_arrays(after, reported)
    shared = sorted(set(b_ids) & set(a_ids))
    paired = len(shared) > 0 and len(shared) >= 0.5 * min(len(b_ids), len(a_ids))
    if paired:
        bi = {r: i for i, r in enumerate(b_ids)}
        ai = {r: i for i, r in enumerate(a_ids)}
        b_sel = np.array([bi[r] for r in shared])
        a_sel = np.array([ai[r] for r in shared])
        if not np.array_equal(b_y[b_sel], a_y[a_sel]):
            raise ValueError("compare: the two results give different labels to the same record ids")
    n_loops = len(reported)
    vi = [reported.index(t) for t in loops]

    def per_loop(y, svp, svd, rrp, idx):
        rrd = (rrp > 0.5).astype(np.int64)
        sv = np.array([metric_value(metric, y[idx], svp[t, idx], svd[t, idx]) for t in range(n_loops)])
        rr = np.array([metric_value(metric, y[idx], rrp[t, idx], rrd[t, idx]) for t in range(n_loops)])
        return sv, rr

    def stat(b_idx, a_idx):
        sv_b, rr_b = per_loop(b_y, b_svp, b_svd, b_rr, b_idx)
        sv_a, rr_a = per_loop(a_y, a_svp, a_svd, a_rr, a_idx)
        d_sv, d_rr = sv_a - sv_b, rr_a - rr_b
        gap_b, gap_a = rr_b - sv_b, rr_a - sv_a
        return np.concatenate(
            [
                d_sv,
                d_rr,
                gap_a - gap_b,
                gap_b,
                gap_a,
                sv_b,
                sv_a,
                rr_b,
                rr_a,
                [d_sv[vi].mean(), d_rr[vi].mean(), gap_b[vi].mean(), gap_a[vi].mean()],
            ]
        )

    rng = np.random.default_rng(config.seed)
    if paired:
        # the tasks of the shared records (before's ids; a record without one is its own cluster)
        members = cluster_members([b_cl[i] for i in b_sel])
        est = stat(b_sel, a_sel)
        boots = []
        for _ in range(config.n_boot):
            r = cluster_resample(members, rng)
            boots.append(stat(b_sel[r], a_sel[r]))
        n_clusters, n_records = len(members), len(shared)
        n_without = sum(c is None for c in (b_cl[i] for i in b_sel))
    else:
        b_members, a_members = cluster_members(b_cl), cluster_members(a_cl)
        est = stat(np.arange(len(b_y)), np.arange(len(a_y)))
        boots = [stat(cluster_resample(b_members, rng), cluster_resample(a_members, rng)) for _ in range(config.n_boot)]
        n_clusters, n_records = len(b_members) + len(a_members), len(b_y) + len(a_y)
        n_without = sum(c is None for c in b_cl) + sum(c is None for c in a_cl)
    boots = np.stack(boots)
    with np.errstate(all="ignore"), _quiet():
        lo = np.nanpercentile(boots, 100 * config.alpha / 2, axis=0)
        hi = np.nanpercentile(boots, 100 * (1 - config.alpha / 2), axis=0)
    names = ["d_sv", "d_rr", "d_gap", "gap_before", "gap_after", "sv_before", "sv_after", "rr_before", "rr_after"]
    rows, extrapolation = [], []
    for ti, t in enumerate(reported):
        row = {"loop": t, "in_verdict": t in loops, "extrapolation": t > depth}
        for k, name in enumerate(names):
            j = k * n_loops + ti
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = float(est[j]), float(lo[j]), float(hi[j])
        (extrapolation if t > depth else rows).append(row)
    base = len(names) * n_loops
    summary = {}
    for k, name in enumerate(["d_sv", "d_rr", "gap_before", "gap_after"]):
        j = base + k
        summary[name], summary[f"{name}_lo"], summary[f"{name}_hi"] = float(est[j]), float(lo[j]), float(hi[j])
    sv_improved = bool(summary["d_sv_lo"] > config.sv_min_gain)
    gap_closed = bool(summary["gap_after_lo"] <= config.gap_tolerance)
    sv_caught_up = bool(sv_improved and gap_closed)
    rr_preserved = bool(summary["d_rr_lo"] > -config.rr_tolerance)
    yn = {True: "yes", False: "no"}
    level = int(round(100 * (1 - config.alpha)))
    where = f"loop {loops[0]}" if len(loops) == 1 else f"mean over loops {loops}"
    s = summary
    verdict = (
        f"SV caught up: {yn[sv_caught_up]}: dSV = {s['d_sv']:+.3f} [{s['d_sv_lo']:+.3f}, {s['d_sv_hi']:+.3f}] "
        f"(lower bound > {config.sv_min_gain:+.3f}: {yn[sv_improved]}), gap after = {s['gap_after']:+.3f} "
        f"[{s['gap_after_lo']:+.3f}, {s['gap_after_hi']:+.3f}] (not above 0, lower bound <= "
        f"{config.gap_tolerance:+.3f}: {yn[gap_closed]}); dRR = {s['d_rr']:+.3f} [{s['d_rr_lo']:+.3f}, "
        f"{s['d_rr_hi']:+.3f}]; RR preserved: {yn[rr_preserved]} (lower bound > {-config.rr_tolerance:+.3f}). "
        f"{metric}, {where} (trained depth {depth}), {level}% cluster-bootstrap CIs over {n_clusters} "
        f"clusters, {'paired' if paired else 'unpaired'}. {note}"
    ).strip()
    return Comparison(
        loops=loops,
        metric=metric,
        paired=bool(paired),
        rows=rows,
        summary=summary,
        sv_improved=sv_improved,
        sv_caught_up=sv_caught_up,
        rr_preserved=rr_preserved,
        verdict=verdict,
        config=asdict(config),
        depth=depth,
        extrapolation=extrapolation,
        gap_closed=gap_closed,
        rule=config.rule(),
        clusters={"n_clusters": n_clusters, "n_records": n_records, "n_without_task": n_without},
        tp=tp_deltas(before, after, config),
    )


def tp_deltas(before: GapResult, after: GapResult, config: CompareConfig | None = None) -> list[dict]:
    """TP before and after per loop (both measured), with dTP and its CI: a bootstrap over the tasks
    both answered, paired (each task is answered once per model, so tasks are the clusters).
    Rows: loop, tp_before, tp_after, d_tp (+ _lo/_hi), n_tasks. [] when either lacks TP."""
    config = config or CompareConfig()
    b_rows = {r["loop"]: r for r in (before.tp or [])}
    a_rows = {r["loop"]: r for r in (after.tp or [])}
    rng = np.random.default_rng(config.seed)
    out = []
    for t in sorted(set(b_rows) & set(a_rows)):
        b, a = b_rows[t], a_rows[t]
        if not b.get("task_ids") or not a.get("task_ids"):
            continue
        bc = {k: int(c == 1) for k, c in zip(b["task_ids"], b["correct"])}
        ac = {k: int(c == 1) for k, c in zip(a["task_ids"], a["correct"])}
        shared = sorted(set(bc) & set(ac))
        if not shared:
            continue
        x = np.array([bc[k] for k in shared], dtype=float)
        y = np.array([ac[k] for k in shared], dtype=float)
        idx = rng.integers(0, len(shared), size=(config.n_boot, len(shared)))
        boots = (y[idx] - x[idx]).mean(axis=1)
        lo, hi = np.percentile(boots, [100 * config.alpha / 2, 100 * (1 - config.alpha / 2)])
        out.append(
            {
                "loop": t,
                "tp_before": float(x.mean()),
                "tp_after": float(y.mean()),
                "d_tp": float(y.mean() - x.mean()),
                "d_tp_lo": float(lo),
                "d_tp_hi": float(hi),
                "n_tasks": len(shared),
            }
        )
    return out
