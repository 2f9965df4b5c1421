"""``compare(before, after)``: the before/after verdict on two :class:`~loopalign.eval.gap.GapResult` s (rule v2:
:data:`VERDICT_RULE`, docs/concepts.md), every part on its own line, with paired cluster-bootstrap intervals.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from loopalign.errors import ConfigError

from .gap import GapResult, _nan_to_none, metric_value
from .metrics import METRICS, _quiet, auroc, cluster_members, cluster_resample, label_balance
from .report import YARDSTICK_TABLES, compare_markdown

__all__ = ["CompareConfig", "Comparison", "compare", "trained_depth", "VERDICT_RULE", "tp_deltas"]


#: Trained depth assumed when a GapResult's meta does not record the model's ``total_ut_steps``.
DEFAULT_TRAINED_DEPTH = 4

VERDICT_RULE = (
    "Verdict rule v2 (fixed before any number is looked at). Taken at the trained depth D (the model's "
    "total_ut_steps, else 4; CompareConfig.loops overrides) on the headline metric, with {level}% "
    "cluster-bootstrap CIs that resample tasks, paired (the same tasks in before and after; dTP resamples "
    "the same clusters). Every part is required for 'yes': "
    "(a) SV caught up with what the base model's hidden state showed: the lower bound of SV after - RR "
    "before > -{delta} points, on the headline metric and on AUROC; "
    "(b) gap closed, as an equivalence test: the upper bound of RR after - SV after <= +{delta} points "
    "(absence of evidence never passes: a smaller evaluation cannot pass more easily); "
    "(c) RR preserved, both ways: the refitted RR (lower bound of RR after - RR before > -{rr} points) and "
    "the probes fitted before training applied frozen to the after features (lower bound of RR frozen "
    "after - RR before > -{rr} points); without the frozen readout (c) cannot pass; a significant rise "
    "is reported as 'the readout changed'; "
    "(d) TP kept: the lower bound of dTP at D > -{tp} points (not blocking when TP was not measured); "
    "(e) saturation: when SV after and RR after are both >= {sat}% or an interval of (a) or (b) has "
    "zero width, the result is never 'yes': it is 'no' when (a), (b), (c) or (d) fails (a measured "
    "failure), else 'saturated: not measurable'. "
    "(f) flagged, not required: 'SV went past what the base readout knew' when the lower bound of SV "
    "after - RR before > +{delta} points. Loops past D are reported separately as extrapolation and "
    "never enter the verdict."
)


def trained_depth(result: GapResult) -> int:
    """The model's trained loop count: ``meta['total_ut_steps']`` when recorded, else 4."""
    d = result.meta.get("total_ut_steps") if isinstance(result.meta, dict) else None
    return int(d) if d else DEFAULT_TRAINED_DEPTH


@dataclass
class CompareConfig:
    """The before/after verdict rule (v2) and its thresholds (fractions, e.g. 0.02 = 2 points).

    The rule, stated before any number is computed (:data:`VERDICT_RULE`; docs/concepts.md):

    - the verdict is taken at the trained depth D: ``loops`` (an int), default the model's trained
      depth (``meta['total_ut_steps']`` of the results, else 4; when D was not evaluated, the deepest
      evaluated loop below it). A list of loops averages them instead (none may exceed D);
    - **(a) SV caught up** with what the base model's hidden state showed: the CI lower bound of
      SV after - RR before > -``delta``, on the headline metric and on AUROC;
    - **(b) gap closed**, an equivalence test: the CI upper bound of RR after - SV after <= ``delta``;
    - **(c) RR preserved**, both ways: the refitted RR (CI lower bound of dRR > -``rr_tolerance``) and the
      probes fitted before training applied frozen to the after features (CI lower bound of RR frozen
      after - RR before > -``rr_tolerance``); absent frozen posteriors fail (c);
    - **(d) TP kept**: the CI lower bound of dTP at D > -``tp_tolerance`` (passes, saying so, when TP was
      not measured in both);
    - **(e) saturation**: SV after and RR after both >= ``saturation``, or a zero-width interval in (a)
      or (b): never "yes"; "no" when (a), (b), (c) or (d) fails (saturation cannot hide a measured failure;
      a zero-width interval at 0 passes (a) and (b), so a failing part is never the degenerate one), else
      "saturated: not measurable" (rule v2 as first written said "saturated" in both cases; amended
      2026-12-06, docs/concepts.md);
    - **(f)** flagged: the CI lower bound of SV after - RR before > ``delta``;
    - CIs are percentile cluster bootstraps over tasks (records without a task: one cluster each),
      paired when both results scored the same records; dTP resamples the same clusters;
    - loops past D are reported separately as extrapolation and never enter the verdict.

    ``sv_min_gain`` and ``gap_tolerance`` set the v1 rule of 0.1; they are gone (``delta`` is the margin of
    the v2 rule), and passing them fails, naming them.
    """

    loops: int | list[int] | None = None  # verdict depth D (int) or loops averaged (list); None = trained depth
    metric: str | None = None  # None = the results' headline metric; or one of METRICS
    delta: float = 0.02  # margin of parts a, b and flag f (0.02 = 2 points)
    rr_tolerance: float = 0.02  # part c: RR preserved when the lower bounds of dRR and frozen drift > -rr_tolerance
    tp_tolerance: float = 0.01  # part d: TP kept when the lower bound of dTP > -tp_tolerance
    saturation: float = 0.99  # part e: SV after and RR after both at or above it = saturated
    n_boot: int = 1000  # bootstrap resamples
    alpha: float = 0.05  # 1 - interval level
    seed: int = 0  # bootstrap seed

    def __post_init__(self):
        for name in ("delta", "rr_tolerance", "tp_tolerance"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ConfigError(f"CompareConfig.{name} must be in [0, 1) (a fraction; 0.02 = 2 points), got {value}")
        if not 0.5 < self.saturation <= 1:
            raise ConfigError(f"CompareConfig.saturation must be in (0.5, 1], got {self.saturation}")
        if self.n_boot < 10:
            raise ConfigError(f"CompareConfig.n_boot must be >= 10, got {self.n_boot}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"CompareConfig.alpha must be in (0, 1), got {self.alpha}")
        if self.metric is not None and self.metric not in METRICS:
            raise ConfigError(f"CompareConfig.metric must be one of {list(METRICS)} or None, got {self.metric!r}")
        if isinstance(self.loops, bool) or (isinstance(self.loops, int) and self.loops < 1):
            raise ConfigError(f"CompareConfig.loops must be a loop count >= 1 or a list of them, got {self.loops!r}")

    def rule(self) -> str:
        level = int(round(100 * (1 - self.alpha)))
        return VERDICT_RULE.format(
            level=level,
            delta=f"{100 * self.delta:g}",
            rr=f"{100 * self.rr_tolerance:g}",
            tp=f"{100 * self.tp_tolerance:g}",
            sat=f"{100 * self.saturation:g}",
        )


@dataclass
class Comparison:
    """compare() output (JSON-serialisable).

    loops: the verdict loops (one: the depth D, unless a list was asked for); depth: D; rows: per loop
    <= D, the before/after figures and deltas with CIs and ``in_verdict``; extrapolation: the same for
    loops past D (never in the verdict); summary: the verdict quantities (mean over the verdict loops)
    with CIs; rule: the rule in words; clusters: how the bootstrap resampled (n_clusters, n_records,
    n_without_task); tp: TP before / after and dTP per loop (paired over the gap's clusters).

    One boolean per part of the rule: ``sv_caught_up`` (a), ``gap_closed`` (b), ``rr_preserved`` (c,
    both ways; ``frozen_readout`` says whether its frozen half was measured), ``tp_kept`` (d; True with
    ``tp_measured`` False when TP was not measured), ``saturated`` (e), ``sv_past_base_readout`` (flag f,
    not required); ``passed``: the overall verdict (a, b, c, d and not e); ``outcome``: "yes", "no" or
    "saturated: not measurable"; ``parts``: each part's line; ``verdict``: the verdict in words, a line
    per part. ``sv_improved`` (dSV's lower bound > 0) is reported, not part of the rule. ``notes``:
    caveats (unbalanced labels, depth fallbacks).
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
    tp_kept: bool = True
    tp_measured: bool = False
    frozen_readout: bool = False
    saturated: bool = False
    sv_past_base_readout: bool = False
    passed: bool = False
    outcome: str = "no"
    parts: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(_nan_to_none(asdict(self)), indent=indent)

    def markdown(self) -> str:
        return compare_markdown(self)


#: the stronger yardsticks beside RR (never in place of it): compare's figure prefix -> the records' posteriors
#: (what each is: ``loopalign.eval.report.YARDSTICK_TABLES``, the same keys)
YARDSTICKS = {"all": "rr_all_prob", "train": "rr_train_prob"}


def _eval_arrays(res: GapResult, loops: list[int]):
    """The RR-scored records of ``res`` at ``loops``: ids, y, SV P(yes), SV decision, RR posterior, frozen
    RR posterior (NaN [T, n] when absent), the yardsticks' posteriors by :data:`YARDSTICKS` name (absent ones
    left out) and clusters."""
    ids, y, ev, svp, svd, rrp = res.arrays()
    ti = [res.loops.index(t) for t in loops]
    keep = np.flatnonzero(ev)
    clusters = res.clusters()
    frozen = res.frozen_rr()
    frozen = np.full(rrp.shape, np.nan) if frozen is None else frozen
    sticks = {k: res._posteriors(key) for k, key in YARDSTICKS.items()}
    return (
        [ids[i] for i in keep],
        y[keep],
        svp[ti][:, keep],
        svd[ti][:, keep],
        rrp[ti][:, keep],
        frozen[ti][:, keep],
        {k: v[ti][:, keep] for k, v in sticks.items() if v is not None},
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


def _cluster_keys(ids: list, clusters: list) -> list:
    """Bootstrap cluster of each record: its task id, or (for a record without one) the record itself."""
    return [c if c is not None else ("record", r) for r, c in zip(ids, clusters)]


def _tp_sums(before: GapResult, after: GapResult, gap_keys: list) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """TP of the tasks both results answered, summed per bootstrap cluster, for each loop both measured.

    A TP task is named by the id of its first record (:func:`loopalign.eval.api.evaluate_gap`); its cluster
    is that record's (the before result's records). Clusters are the gap's ``gap_keys`` first, then
    clusters only TP has (``n_tp_only``, resampled as a stratum of their own).
    -> (rows {loop, n_tasks, n_tp_only}, sums [L, 3, K + E] of (correct before, correct after, tasks), E)."""
    b_rows = {r["loop"]: r for r in (before.tp or [])}
    a_rows = {r["loop"]: r for r in (after.tp or [])}
    record_cluster = dict(zip(before.records["ids"], _cluster_keys(before.records["ids"], before.clusters())))
    position = {k: j for j, k in enumerate(dict.fromkeys(gap_keys))}
    extra: dict = {}
    found = []
    for t in sorted(set(b_rows) & set(a_rows)):
        b, a = b_rows[t], a_rows[t]
        if not b.get("task_ids") or not a.get("task_ids"):
            continue
        bc = {k: int(c == 1) for k, c in zip(b["task_ids"], b["correct"])}
        ac = {k: int(c == 1) for k, c in zip(a["task_ids"], a["correct"])}
        shared = [k for k in bc if k in ac]
        if not shared:
            continue
        cols = []
        for k in shared:
            key = record_cluster.get(k, ("record", k))
            if key not in position:
                extra.setdefault(key, len(extra))
            cols.append(("gap", position[key]) if key in position else ("extra", extra[key]))
        found.append((t, shared, bc, ac, cols))
    n_gap = len(position)
    sums = np.zeros((len(found), 3, n_gap + len(extra)))
    rows = []
    for li, (t, shared, bc, ac, cols) in enumerate(found):
        for k, (kind, j) in zip(shared, cols):
            col = j if kind == "gap" else n_gap + j
            sums[li, :, col] += (bc[k], ac[k], 1)
        rows.append({"loop": t, "n_tasks": len(shared), "n_tp_only_clusters": sum(kind == "extra" for kind, _ in cols)})
    return rows, sums, len(extra)


def _tp_figures(sums: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sums [L, 3, C], cluster weights [C] -> [L, 3]: TP before, TP after, dTP."""
    s = sums @ weights  # [L, 3]
    with np.errstate(all="ignore"):
        before, after = s[:, 0] / s[:, 2], s[:, 1] / s[:, 2]
    return np.stack([before, after, after - before], axis=1)


#: the figures compare() reports per loop (and, as a mean over the verdict loops, in its summary)
COMPARE_FIGURES = (
    "d_sv",
    "d_rr",
    "d_gap",
    "gap_before",
    "gap_after",
    "sv_before",
    "sv_after",
    "rr_before",
    "rr_after",
    "sv_reach",  # SV after - RR before (part a, flag f)
    "sv_auroc_before",
    "sv_auroc_after",
    "rr_auroc_before",
    "rr_auroc_after",
    "sv_reach_auroc",  # AUROC of SV after - AUROC of RR before (part a)
    "rr_frozen_after",  # the before probes, frozen, on the after features
    "rr_drift",  # RR frozen after - RR before (part c)
    # the stronger yardsticks (YARDSTICKS; NaN when not computed) on the base model, and SV after against them:
    # all = one probe over every layer x position (rr_all_before, sv_reach_all, ...), train = a probe fitted on
    # the training split (rr_train_before, sv_reach_train, ...)
    *(
        f"{name}{k}{tail}"
        for k in YARDSTICKS
        for name, tail in (("rr_", "_before"), ("sv_reach_", ""), ("rr_", "_auroc_before"), ("sv_reach_", "_auroc"))
    ),
)


def _masked_metric(metric: str, y: np.ndarray, prob: np.ndarray) -> float:
    """The metric of a probe posterior on the records it scored (NaN elsewhere)."""
    ok = ~np.isnan(prob)
    if not ok.any():
        return float("nan")
    return metric_value(metric, y[ok], prob[ok], (prob[ok] > 0.5).astype(np.int64))


def _tp_row(row: dict, est, lo, hi) -> dict:
    """One loop's TP comparison row from (before, after, after - before) estimates and their bounds."""
    return {
        "loop": row["loop"],
        "tp_before": float(est[0]),
        "tp_after": float(est[1]),
        "d_tp": float(est[2]),
        "d_tp_lo": float(lo[2]),
        "d_tp_hi": float(hi[2]),
        "n_tasks": row["n_tasks"],
        "n_tp_only_clusters": row["n_tp_only_clusters"],
    }


def compare(before: GapResult, after: GapResult, config: CompareConfig | None = None) -> Comparison:
    """The before/after verdict at the trained depth under the v2 rule (:class:`CompareConfig`,
    :data:`VERDICT_RULE`): every part on its own line, all required for "yes".

    Paired over shared record ids (cluster-resampling their tasks) when both results scored mostly the
    same records, else independent cluster bootstraps. dTP resamples the same clusters as the gap (the
    before result's tasks in the unpaired case). The frozen half of part (c) reads ``after``'s
    ``records['rr_frozen_prob']`` (:func:`loopalign.eval.api.evaluate_gap` with ``frozen_probes``)."""
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
    b_ids, b_y, b_svp, b_svd, b_rr, _, b_sticks, b_cl = _eval_arrays(before, reported)
    a_ids, a_y, a_svp, a_svd, a_rr, a_frz, _, a_cl = _eval_arrays(after, reported)
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
    frozen_present = after.frozen_rr() is not None and bool(np.isfinite(a_frz[vi]).any())
    frozen_note = ""
    if paired and frozen_present:
        n_frozen = int(np.isfinite(a_frz[vi][:, a_sel]).all(0).sum())
        if n_frozen < len(shared):
            frozen_note = f"the frozen probes scored {n_frozen} of the {len(shared)} paired records. "

    def per_loop(y, svp, svd, rrp, idx):
        rrd = (rrp > 0.5).astype(np.int64)
        yi = y[idx]
        sv = [metric_value(metric, yi, svp[t, idx], svd[t, idx]) for t in range(n_loops)]
        rr = [metric_value(metric, yi, rrp[t, idx], rrd[t, idx]) for t in range(n_loops)]
        sv_auc = [auroc(yi, svp[t, idx]) for t in range(n_loops)]
        rr_auc = [auroc(yi, rrp[t, idx]) for t in range(n_loops)]
        return np.array(sv), np.array(rr), np.array(sv_auc), np.array(rr_auc)

    def stat(b_idx, a_idx):
        sv_b, rr_b, sv_auc_b, rr_auc_b = per_loop(b_y, b_svp, b_svd, b_rr, b_idx)
        sv_a, rr_a, sv_auc_a, rr_auc_a = per_loop(a_y, a_svp, a_svd, a_rr, a_idx)
        if frozen_present:
            frz = np.array([_masked_metric(metric, a_y[a_idx], a_frz[t, a_idx]) for t in range(n_loops)])
        else:
            frz = np.full(n_loops, np.nan)
        sticks = []
        for k in YARDSTICKS:
            if k in b_sticks:
                yard = np.array([_masked_metric(metric, b_y[b_idx], b_sticks[k][t, b_idx]) for t in range(n_loops)])
                yard_auc = np.array(
                    [_masked_metric("auroc", b_y[b_idx], b_sticks[k][t, b_idx]) for t in range(n_loops)]
                )
            else:
                yard = yard_auc = np.full(n_loops, np.nan)
            sticks += [yard, sv_a - yard, yard_auc, sv_auc_a - yard_auc]
        gap_b, gap_a = rr_b - sv_b, rr_a - sv_a
        figures = np.stack(
            [
                sv_a - sv_b,
                rr_a - rr_b,
                gap_a - gap_b,
                gap_b,
                gap_a,
                sv_b,
                sv_a,
                rr_b,
                rr_a,
                sv_a - rr_b,
                sv_auc_b,
                sv_auc_a,
                rr_auc_b,
                rr_auc_a,
                sv_auc_a - rr_auc_b,
                frz,
                frz - rr_b,
                *sticks,
            ]
        )  # [F, n_loops]
        with np.errstate(all="ignore"), _quiet():
            return np.concatenate([figures.ravel(), figures[:, vi].mean(1)])

    rng = np.random.default_rng(config.seed)
    if paired:
        keys = _cluster_keys(shared, [b_cl[i] for i in b_sel])
        members = cluster_members(keys)
        gap_keys = list(dict.fromkeys(keys))
        n_clusters, n_records = len(members), len(shared)
        n_without = sum(c is None for c in (b_cl[i] for i in b_sel))
    else:
        keys = _cluster_keys(b_ids, b_cl)
        members, a_members = cluster_members(keys), cluster_members(_cluster_keys(a_ids, a_cl))
        gap_keys = list(dict.fromkeys(keys))
        n_clusters, n_records = len(members) + len(a_members), len(b_y) + len(a_y)
        n_without = sum(c is None for c in b_cl) + sum(c is None for c in a_cl)
    tp_rows, tp_sums, n_extra = _tp_sums(before, after, gap_keys)
    k_gap = len(members)

    def tp_weights(picks):
        w = np.bincount(picks, minlength=k_gap).astype(np.float64)
        if n_extra:
            w = np.concatenate([w, np.bincount(rng.integers(0, n_extra, n_extra), minlength=n_extra)])
        return w

    est = stat(b_sel, a_sel) if paired else stat(np.arange(len(b_y)), np.arange(len(a_y)))
    tp_est = _tp_figures(tp_sums, np.ones(tp_sums.shape[-1]))
    boots, tp_boots = [], []
    for _ in range(config.n_boot):
        picks = rng.integers(0, k_gap, k_gap)
        r = np.concatenate([members[j] for j in picks])
        if paired:
            boots.append(stat(b_sel[r], a_sel[r]))
        else:
            boots.append(stat(r, cluster_resample(a_members, rng)))
        tp_boots.append(_tp_figures(tp_sums, tp_weights(picks)))
    boots = np.stack(boots)
    with np.errstate(all="ignore"), _quiet():
        lo = np.nanpercentile(boots, 100 * config.alpha / 2, axis=0)
        hi = np.nanpercentile(boots, 100 * (1 - config.alpha / 2), axis=0)
        if tp_rows:
            tp_lo = np.nanpercentile(np.stack(tp_boots), 100 * config.alpha / 2, axis=0)
            tp_hi = np.nanpercentile(np.stack(tp_boots), 100 * (1 - config.alpha / 2), axis=0)
    rows, extrapolation = [], []
    for ti, t in enumerate(reported):
        row = {"loop": t, "in_verdict": t in loops, "extrapolation": t > depth}
        for k, name in enumerate(COMPARE_FIGURES):
            j = k * n_loops + ti
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = float(est[j]), float(lo[j]), float(hi[j])
        (extrapolation if t > depth else rows).append(row)
    base = len(COMPARE_FIGURES) * n_loops
    summary = {}
    for k, name in enumerate(COMPARE_FIGURES):
        j = base + k
        summary[name], summary[f"{name}_lo"], summary[f"{name}_hi"] = float(est[j]), float(lo[j]), float(hi[j])
    tp = [_tp_row(r, tp_est[li], tp_lo[li], tp_hi[li]) for li, r in enumerate(tp_rows)]
    level = int(round(100 * (1 - config.alpha)))
    notes = [n for n in (note.strip(), frozen_note.strip()) if n]
    balance = label_balance(b_y[b_sel] if paired else b_y)
    if metric in ("accuracy", "f1") and balance["n"] and balance["minority_share"] < PRIOR_DRIVEN_SHARE:
        notes.append(
            f"labels are unbalanced ({100 * balance['positive_share']:.1f}% label 1): {metric} is prior-driven "
            "here (a label-prior predictor scores well); read part (a)'s AUROC line"
        )
    judged = _judge(summary, tp, depth, frozen_present, config)
    where = f"loop {loops[0]}" if len(loops) == 1 else f"mean over loops {loops}"
    head = (
        f"Verdict: {judged['outcome']} ({metric}, {where}, trained depth {depth}; {level}% cluster-bootstrap CIs "
        f"over {n_clusters} clusters, {'paired' if paired else 'unpaired'})"
    )
    verdict = "\n".join([head] + [p["line"] for p in judged["parts"]] + notes)
    return Comparison(
        loops=loops,
        metric=metric,
        paired=bool(paired),
        rows=rows,
        summary=summary,
        sv_improved=bool(summary["d_sv_lo"] > 0),
        sv_caught_up=judged["a"],
        rr_preserved=judged["c"],
        verdict=verdict,
        config=asdict(config),
        depth=depth,
        extrapolation=extrapolation,
        gap_closed=judged["b"],
        rule=config.rule(),
        clusters={"n_clusters": n_clusters, "n_records": n_records, "n_without_task": n_without},
        tp=tp,
        tp_kept=judged["d"],
        tp_measured=judged["tp_measured"],
        frozen_readout=bool(frozen_present),
        saturated=judged["e"],
        sv_past_base_readout=judged["f"],
        passed=judged["passed"],
        outcome=judged["outcome"],
        parts=judged["parts"],
        notes=notes,
    )


#: below this minority-class share, accuracy columns are marked prior-driven (compare.md, gap.md)
PRIOR_DRIVEN_SHARE = 0.4


def _pts(x: float, signed: bool = True) -> str:
    return "–" if x is None or np.isnan(x) else (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}")


def _ci_pts(s: dict, name: str) -> str:
    return f"{_pts(s[name])} [{_pts(s[name + '_lo'])}, {_pts(s[name + '_hi'])}]"


def _gt(x: float, bound: float) -> bool:
    """x > bound, False when x is undefined."""
    return bool(not np.isnan(x) and x > bound)


def _judge(s: dict, tp: list[dict], depth: int, frozen: bool, config: CompareConfig) -> dict:
    """The v2 rule's parts from compare()'s summary and TP rows -> booleans, outcome and one line per part."""
    yn = {True: "yes", False: "no"}
    d, d_rr, d_tp = config.delta, config.rr_tolerance, config.tp_tolerance
    a_head, a_auc = _gt(s["sv_reach_lo"], -d), _gt(s["sv_reach_auroc_lo"], -d)
    a = a_head and a_auc
    b = bool(not np.isnan(s["gap_after_hi"]) and s["gap_after_hi"] <= d)
    c_refit = _gt(s["d_rr_lo"], -d_rr)
    c_frozen = frozen and _gt(s["rr_drift_lo"], -d_rr)
    c = c_refit and c_frozen
    tp_row = next((r for r in tp if r["loop"] == depth), None)
    tp_measured = tp_row is not None
    tp_ok = (not tp_measured) or _gt(tp_row["d_tp_lo"], -d_tp)
    zero = [
        name
        for name in ("sv_reach", "sv_reach_auroc", "gap_after")
        if not np.isnan(s[f"{name}_lo"]) and s[f"{name}_hi"] - s[f"{name}_lo"] <= 1e-12
    ]
    ceiling = s["sv_after"] >= config.saturation and s["rr_after"] >= config.saturation
    e = bool(ceiling or zero)
    f = _gt(s["sv_reach_lo"], d)
    measured_pass = bool(a and b and c and tp_ok)
    passed = measured_pass and not e
    outcome = "saturated: not measurable" if e and measured_pass else yn[passed]
    parts = [
        (
            "a",
            "SV caught up with what the base model's hidden state showed",
            a,
            f"SV after − RR before = {_ci_pts(s, 'sv_reach')} (lower bound > {_pts(-d)}: {yn[a_head]}); in AUROC "
            f"{_ci_pts(s, 'sv_reach_auroc')} (lower bound > {_pts(-d)}: {yn[a_auc]})",
        ),
        (
            "b",
            "gap closed (equivalence test)",
            b,
            f"RR after − SV after = {_ci_pts(s, 'gap_after')} (upper bound ≤ {_pts(d)}: {yn[b]})",
        ),
    ]
    c_text = f"refitted: dRR = {_ci_pts(s, 'd_rr')} (lower bound > {_pts(-d_rr)}: {yn[c_refit]}); "
    if frozen:
        c_text += (
            f"frozen (the before probes on the after features): RR frozen after − RR before = "
            f"{_ci_pts(s, 'rr_drift')} (lower bound > {_pts(-d_rr)}: {yn[c_frozen]})"
        )
    else:
        c_text += (
            "frozen readout absent (the after result has no frozen-probe posteriors: an old result, or "
            "evaluate_gap without frozen_probes), so this part cannot pass"
        )
    rises = [name for name, key in (("refitted", "d_rr_lo"), ("frozen", "rr_drift_lo")) if _gt(s[key], d_rr)]
    if rises:
        c_text += f"; the readout changed: RR rose by more than {_pts(d_rr, False)} points ({', '.join(rises)})"
    parts.append(("c", "RR preserved, both ways", c, c_text))
    if tp_measured:
        tp_text = (
            f"dTP at loop {depth} = {_ci_pts(tp_row, 'd_tp')} (TP {_pts(tp_row['tp_before'], False)} → "
            f"{_pts(tp_row['tp_after'], False)}; lower bound > {_pts(-d_tp)}: {yn[tp_ok]})"
        )
    else:
        tp_text = f"TP not measured at loop {depth} in both results (not blocking)"
    parts.append(("d", "TP kept", tp_ok, tp_text))
    if e:
        why = []
        if ceiling:
            why.append(
                f"SV after {_pts(s['sv_after'], False)} and RR after {_pts(s['rr_after'], False)} are both ≥ "
                f"{_pts(config.saturation, False)}"
            )
        if zero:
            why.append(f"zero-width interval: {', '.join(zero)}")
        failing = [k for k, ok in (("a", a), ("b", b), ("c", c), ("d", tp_ok)) if not ok]
        e_text = f"{'; '.join(why)}; the verdict cannot be yes" + (
            f" (it is no: ({'), ('.join(failing)}) failed as measured)" if failing else ""
        )
    else:
        e_text = (
            f"not saturated (SV after {_pts(s['sv_after'], False)}, RR after {_pts(s['rr_after'], False)}; "
            "no zero-width interval)"
        )
    parts.append(("e", "saturation", e, e_text))
    parts.append(
        (
            "f",
            "SV went past what the base readout knew",
            f,
            f"lower bound of SV after − RR before {_pts(s['sv_reach_lo'])} > {_pts(d)}: {yn[f]}"
            + (" (the fine-tune taught the task, or RR is too weak a yardstick)" if f else "")
            + "".join(
                f"; against the stronger yardstick ({what}, base model, {_pts(s[f'rr_{k}_before'], False)}): "
                f"SV after − it = {_ci_pts(s, f'sv_reach_{k}')}, in AUROC {_ci_pts(s, f'sv_reach_{k}_auroc')}"
                for k, (what, _) in YARDSTICK_TABLES.items()
                if not np.isnan(s.get(f"rr_{k}_before", np.nan))
            ),
        )
    )
    lines = []
    for key, name, ok, text in parts:
        state = {"e": "saturated" if ok else "no", "f": "flagged" if ok else "no"}.get(key, yn[ok])
        lines.append({"part": key, "name": name, "passed": bool(ok), "line": f"({key}) {name}: {state} — {text}"})
    return {
        "a": a,
        "b": b,
        "c": c,
        "d": tp_ok,
        "e": e,
        "f": f,
        "tp_measured": tp_measured,
        "passed": passed,
        "outcome": outcome,
        "parts": lines,
    }


def tp_deltas(before: GapResult, after: GapResult, config: CompareConfig | None = None) -> list[dict]:
    """TP before and after per loop (both measured), with dTP and its CI: a paired cluster bootstrap over
    the bootstrap clusters (tasks, :meth:`GapResult.clusters`) of the tasks both answered, as the gap's.
    :func:`compare` computes the same rows within the gap's own bootstrap draws. Rows: loop, tp_before,
    tp_after, d_tp (+ _lo/_hi), n_tasks, n_tp_only_clusters. [] when either lacks TP."""
    config = config or CompareConfig()
    rows, sums, n = _tp_sums(before, after, [])
    if not rows:
        return []
    rng = np.random.default_rng(config.seed)
    est = _tp_figures(sums, np.ones(n))
    boots = np.stack(
        [_tp_figures(sums, np.bincount(rng.integers(0, n, n), minlength=n).astype(float)) for _ in range(config.n_boot)]
    )
    with np.errstate(all="ignore"), _quiet():
        lo = np.nanpercentile(boots, 100 * config.alpha / 2, axis=0)
        hi = np.nanpercentile(boots, 100 * (1 - config.alpha / 2), axis=0)
    return [_tp_row(r, est[i], lo[i], hi[i]) for i, r in enumerate(rows)]
