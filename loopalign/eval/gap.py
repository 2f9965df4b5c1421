"""The gap table (SV, RR and RR - SV per loop, with paired bootstrap 95% intervals) and
``compare(before, after)``, which says whether SV caught up and whether RR was preserved.

Intervals are percentile bootstraps over records (resampled jointly for SV and RR, so the gap's
interval accounts for their correlation). All quantities are fractions in [0, 1].
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .metrics import METRICS, _quiet, accuracy, auroc, balanced_accuracy, bootstrap_ci, f1_score

__all__ = ["GapResult", "gap_table", "CompareConfig", "Comparison", "compare", "metric_value", "parse_loops"]


def parse_loops(spec: str | int | list[int] | tuple[int, ...]) -> list[int]:
    """'1-8' | '1,2,4' | 4 | [1, 2] -> sorted loop counts >= 1."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        loops = [spec]
    elif isinstance(spec, str):
        loops = []
        for part in spec.replace(" ", "").split(","):
            if "-" in part:
                a, b = part.split("-", 1)
                loops.extend(range(int(a), int(b) + 1))
            elif part:
                loops.append(int(part))
    else:
        loops = [int(t) for t in spec]
    if not loops or min(loops) < 1:
        raise ValueError(f"loops must be loop counts >= 1 (e.g. '1-8' or '1,2,4'), got {spec!r}")
    return sorted(set(loops))


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
) -> list[dict]:
    """labels [N], sv_prob/sv_pred/rr_prob [T,N] on the same records -> per loop SV, RR, gap with CIs."""
    labels = np.asarray(labels)
    rr_pred = (rr_prob > 0.5).astype(np.int64)
    n_loops = len(loops)

    def stat(idx):
        y = labels[idx]
        sv = [metric_value(metric, y, sv_prob[t, idx], sv_pred[t, idx]) for t in range(n_loops)]
        rr = [metric_value(metric, y, rr_prob[t, idx], rr_pred[t, idx]) for t in range(n_loops)]
        return np.array(sv + rr + [r - s for s, r in zip(sv, rr)])

    est, lo, hi = bootstrap_ci(stat, len(labels), n_boot=n_boot, alpha=alpha, seed=seed)
    rows = []
    for ti, t in enumerate(loops):
        row = {"loop": int(t)}
        for k, name in enumerate(("sv", "rr", "gap")):
            j = k * n_loops + ti
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = float(est[j]), float(lo[j]), float(hi[j])
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

    table: per loop {loop, sv, rr, gap (+ _lo/_hi), rr_fixed, tp, sv_valid_rate, best_layer};
    sv: SV metrics per loop on all records; sv_eval / rr / rr_fixed: on the RR-scored records;
    tp / sv_sampled: per loop (or None); heatmap: RR test accuracy [T][L'] and layer names;
    records: ids, labels, eval mask, sv_prob / sv_pred / rr_prob [T][N] (for ``compare``).
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

    def markdown(self) -> str:
        from .report import gap_markdown

        return gap_markdown(self)

    def save(self, out_dir: str, plots: bool = True) -> dict[str, str]:
        """Write gap.json, gap.md and (with plots) PNG + SVG figures to out_dir, atomically. -> paths."""
        from .report import save_gap

        return save_gap(self, out_dir, plots=plots)

    def log_wandb(self, **kwargs):
        from .report import log_wandb

        return log_wandb(self, **kwargs)


@dataclass
class CompareConfig:
    """Thresholds of the before/after verdict (fractions, e.g. 0.02 = 2 points)."""

    loops: list[int] | None = None  # loops compared and averaged for the verdict; None = all loops both have
    sv_min_gain: float = 0.0  # SV improved when the dSV CI lower bound > sv_min_gain
    gap_tolerance: float = 0.05  # SV caught up when it improved and the after-gap (RR - SV) <= gap_tolerance
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


@dataclass
class Comparison:
    """compare() output: per-loop deltas with CIs, the averaged deltas, the booleans and the verdict line."""

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

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(_nan_to_none(asdict(self)), indent=indent)

    def markdown(self) -> str:
        from .report import compare_markdown

        return compare_markdown(self)


def _eval_arrays(res: GapResult, loops: list[int]):
    ids, y, ev, svp, svd, rrp = res.arrays()
    ti = [res.loops.index(t) for t in loops]
    keep = np.flatnonzero(ev)
    return [ids[i] for i in keep], y[keep], svp[ti][:, keep], svd[ti][:, keep], rrp[ti][:, keep]


def compare(before: GapResult, after: GapResult, config: CompareConfig | None = None) -> Comparison:
    """Did SV catch up (dSV > 0 with the gap closed) while RR held? Paired over shared record ids when
    both results scored the same records, else independent bootstraps."""
    config = config or CompareConfig()
    if before.metric != after.metric:
        raise ValueError(f"compare: metrics differ (before {before.metric!r}, after {after.metric!r})")
    metric = before.metric
    common = [t for t in before.loops if t in after.loops]
    loops = common if config.loops is None else [int(t) for t in config.loops]
    missing = [t for t in loops if t not in common]
    if not loops or missing:
        raise ValueError(
            f"compare: loops {missing or loops} not in both results (before {before.loops}, after {after.loops})"
        )
    b_ids, b_y, b_svp, b_svd, b_rr = _eval_arrays(before, loops)
    a_ids, a_y, a_svp, a_svd, a_rr = _eval_arrays(after, loops)
    shared = sorted(set(b_ids) & set(a_ids))
    paired = len(shared) > 0 and len(shared) >= 0.5 * min(len(b_ids), len(a_ids))
    if paired:
        bi = {r: i for i, r in enumerate(b_ids)}
        ai = {r: i for i, r in enumerate(a_ids)}
        b_sel = np.array([bi[r] for r in shared])
        a_sel = np.array([ai[r] for r in shared])
        if not np.array_equal(b_y[b_sel], a_y[a_sel]):
            raise ValueError("compare: the two results give different labels to the same record ids")
    n_loops = len(loops)

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
                [d_sv.mean(), d_rr.mean(), gap_b.mean(), gap_a.mean()],
            ]
        )

    rng = np.random.default_rng(config.seed)
    if paired:
        est = stat(b_sel, a_sel)
        boots = []
        for _ in range(config.n_boot):
            r = rng.integers(0, len(shared), len(shared))
            boots.append(stat(b_sel[r], a_sel[r]))
    else:
        est = stat(np.arange(len(b_y)), np.arange(len(a_y)))
        boots = [
            stat(rng.integers(0, len(b_y), len(b_y)), rng.integers(0, len(a_y), len(a_y))) for _ in range(config.n_boot)
        ]
    boots = np.stack(boots)
    with np.errstate(all="ignore"), _quiet():
        lo = np.nanpercentile(boots, 100 * config.alpha / 2, axis=0)
        hi = np.nanpercentile(boots, 100 * (1 - config.alpha / 2), axis=0)
    names = ["d_sv", "d_rr", "d_gap", "gap_before", "gap_after", "sv_before", "sv_after", "rr_before", "rr_after"]
    rows = []
    for ti, t in enumerate(loops):
        row = {"loop": t}
        for k, name in enumerate(names):
            j = k * n_loops + ti
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = float(est[j]), float(lo[j]), float(hi[j])
        rows.append(row)
    base = len(names) * n_loops
    summary = {}
    for k, name in enumerate(["d_sv", "d_rr", "gap_before", "gap_after"]):
        j = base + k
        summary[name], summary[f"{name}_lo"], summary[f"{name}_hi"] = float(est[j]), float(lo[j]), float(hi[j])
    sv_improved = summary["d_sv_lo"] > config.sv_min_gain
    gap_closed = summary["gap_after"] <= config.gap_tolerance
    sv_caught_up = bool(sv_improved and gap_closed)
    rr_preserved = bool(summary["d_rr_lo"] > -config.rr_tolerance)
    yn = {True: "yes", False: "no"}
    level = int(round(100 * (1 - config.alpha)))
    verdict = (
        f"SV caught up: {yn[sv_caught_up]}: dSV = {summary['d_sv']:+.3f} [{summary['d_sv_lo']:+.3f}, {summary['d_sv_hi']:+.3f}] "
        f"(lower bound > {config.sv_min_gain:+.3f}: {yn[bool(sv_improved)]}), gap after = {summary['gap_after']:+.3f} "
        f"[{summary['gap_after_lo']:+.3f}, {summary['gap_after_hi']:+.3f}] (<= {config.gap_tolerance:.3f}: {yn[bool(gap_closed)]}); "
        f"dRR = {summary['d_rr']:+.3f} [{summary['d_rr_lo']:+.3f}, {summary['d_rr_hi']:+.3f}]; "
        f"RR preserved: {yn[rr_preserved]} (lower bound > {-config.rr_tolerance:+.3f}). "
        f"{metric}, mean over loops {loops}, {level}% bootstrap CIs, {'paired' if paired else 'unpaired'}."
    )
    return Comparison(
        loops=loops,
        metric=metric,
        paired=bool(paired),
        rows=rows,
        summary=summary,
        sv_improved=bool(sv_improved),
        sv_caught_up=sv_caught_up,
        rr_preserved=rr_preserved,
        verdict=verdict,
        config=asdict(config),
    )
