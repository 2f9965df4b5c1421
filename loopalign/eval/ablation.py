"""Ablation tables: gap-SFT variants run with several seeds, summarised per loop with intervals that
resample seeds and, within each seed, task clusters.

A run is an ``sft_gap`` output folder (``before/gap.json``, ``after/gap.json``, ``compare.json``).
Each seed draws its own training and held-out tasks, so the seed is the outer unit of a two-level
bootstrap: a draw resamples seeds with replacement, then the task clusters of each drawn seed, and
averages the per-seed figures. The interval therefore holds both the task sampling and the
run-to-run variation (data, LoRA initialisation, probe folds).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .gap import GapResult
from .metrics import auroc, cluster_members, cluster_resample
from .steering import steered_logits

__all__ = [
    "RunArrays",
    "load_run",
    "ablation_rows",
    "rule_rows",
    "steering_rows",
    "ablation_markdown",
    "rule_markdown",
    "plot_ablation",
]

#: the figures of a row, each a difference or level in [0, 1] (AUROC in [0, 1] too)
FIGURES = ("d_sv", "d_rr", "d_sv_auroc", "d_rr_auroc", "sv_after", "rr_after", "gap_after", "sv_auroc_after")


@dataclass
class RunArrays:
    """One run's paired held-out records at its loops: labels y [N], clusters [N], and per loop
    SV P(Yes), SV decision and RR posterior before and after [T,N]; TP rows of compare.json."""

    path: str
    loops: list[int]
    y: np.ndarray
    clusters: list
    sv_prob: tuple[np.ndarray, np.ndarray]
    sv_pred: tuple[np.ndarray, np.ndarray]
    rr_prob: tuple[np.ndarray, np.ndarray]
    tp: list[dict]
    #: compare.json's verdict: each rule part's pass/fail ({"a": True, ...}) and the outcome ("yes", "no", ...)
    parts: dict[str, bool] | None = None
    outcome: str | None = None
    #: families.json's transfer summary (runs by family, e.g. items held out), else None
    transfer: dict | None = None


def load_run(path: str | os.PathLike) -> RunArrays:
    """An ``sft_gap`` output folder -> its paired before/after arrays (records scored in both)."""
    path = os.fspath(path)
    for part in ("before/gap.json", "after/gap.json", "compare.json"):
        if not os.path.exists(os.path.join(path, part)):
            raise FileNotFoundError(f"ablation run {path}: missing {part} (an unfinished or failed run)")
    before = GapResult.from_json(os.path.join(path, "before"))
    after = GapResult.from_json(os.path.join(path, "after"))
    loops = [t for t in before.loops if t in after.loops]
    b_ids, b_y, b_ev, b_svp, b_svd, b_rr = before.arrays()
    a_ids, a_y, a_ev, a_svp, a_svd, a_rr = after.arrays()
    a_index = {r: i for i, r in enumerate(a_ids)}
    keep_b = [i for i, r in enumerate(b_ids) if b_ev[i] and r in a_index and a_ev[a_index[r]]]
    keep_a = [a_index[b_ids[i]] for i in keep_b]
    if not keep_b:
        raise ValueError(f"ablation run {path}: no held-out record was scored both before and after")
    if not np.array_equal(b_y[keep_b], a_y[keep_a]):
        raise ValueError(f"ablation run {path}: before and after give different labels to the same records")
    bt = [before.loops.index(t) for t in loops]
    at = [after.loops.index(t) for t in loops]
    clusters = before.clusters()
    with open(os.path.join(path, "compare.json")) as f:
        comparison = json.load(f)
    tp = comparison.get("tp") or []
    parts = {p["part"]: bool(p["passed"]) for p in comparison.get("parts") or []} or None
    transfer = None
    if os.path.exists(os.path.join(path, "families.json")):
        with open(os.path.join(path, "families.json")) as f:
            transfer = json.load(f).get("transfer")
    return RunArrays(
        path=path,
        loops=loops,
        y=b_y[keep_b],
        clusters=[clusters[i] for i in keep_b],
        sv_prob=(b_svp[bt][:, keep_b], a_svp[at][:, keep_a]),
        sv_pred=(b_svd[bt][:, keep_b], a_svd[at][:, keep_a]),
        rr_prob=(b_rr[bt][:, keep_b], a_rr[at][:, keep_a]),
        tp=tp,
        parts=parts,
        outcome=comparison.get("outcome"),
        transfer=transfer,
    )


def _figures(run: RunArrays, t: int, idx: np.ndarray) -> np.ndarray:
    """The FIGURES of one run at loop index t on records idx."""
    y = run.y[idx]
    sv = [np.mean(run.sv_pred[k][t, idx] == y) for k in (0, 1)]
    rr = [np.mean((run.rr_prob[k][t, idx] > 0.5) == y) for k in (0, 1)]
    sv_auc = [auroc(y, run.sv_prob[k][t, idx]) for k in (0, 1)]
    rr_auc = [auroc(y, run.rr_prob[k][t, idx]) for k in (0, 1)]
    return np.array(
        [
            sv[1] - sv[0],
            rr[1] - rr[0],
            sv_auc[1] - sv_auc[0],
            rr_auc[1] - rr_auc[0],
            sv[1],
            rr[1],
            rr[1] - sv[1],
            sv_auc[1],
        ],
        dtype=np.float64,
    )


def _two_level(runs: Sequence[RunArrays], stat, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean over runs, 2.5%, 97.5%) of stat(run, record idx) -> array, resampling runs then clusters."""
    rng = np.random.default_rng(seed)
    members = [cluster_members(r.clusters) for r in runs]
    est = np.mean([stat(r, np.arange(len(r.y))) for r in runs], axis=0)
    draws = []
    for _ in range(n_boot):
        picks = rng.integers(0, len(runs), len(runs))
        draws.append(np.mean([stat(runs[j], cluster_resample(members[j], rng)) for j in picks], axis=0))
    with np.errstate(all="ignore"):
        lo, hi = np.nanpercentile(np.stack(draws), [2.5, 97.5], axis=0)
    return est, lo, hi


def ablation_rows(
    variants: dict[str, Sequence[RunArrays]], loops: Sequence[int] | None = None, n_boot: int = 500, seed: int = 0
) -> list[dict]:
    """Per variant and loop: the mean over seeds of each of :data:`FIGURES` with its two-level 95%
    interval (``{figure}_lo`` / ``_hi``), the seeds, and TP after (mean over seeds, and dTP).
    -> rows {variant, loop, n_seeds, n_records, <figures>, tp_after, d_tp}."""
    rows = []
    for name, runs in variants.items():
        if not runs:
            raise ValueError(f"ablation variant {name!r} has no finished run")
        shared = [t for t in runs[0].loops if all(t in r.loops for r in runs)]
        for loop in [t for t in (loops or shared) if t in shared]:

            def stat(run, idx, loop=loop):
                return _figures(run, run.loops.index(loop), idx)

            est, lo, hi = _two_level(runs, stat, n_boot, seed)
            row = {"variant": name, "loop": loop, "n_seeds": len(runs), "n_records": int(sum(len(r.y) for r in runs))}
            for k, figure in enumerate(FIGURES):
                row[figure], row[f"{figure}_lo"], row[f"{figure}_hi"] = float(est[k]), float(lo[k]), float(hi[k])
            tps = [next((x for x in r.tp if x["loop"] == loop), None) for r in runs]
            tps = [x for x in tps if x is not None]
            row["tp_after"] = float(np.mean([x["tp_after"] for x in tps])) if tps else None
            row["d_tp"] = float(np.mean([x["d_tp"] for x in tps])) if tps else None
            rows.append(row)
    return rows


#: the verdict rule's parts (docs/concepts.md), in the order compare() prints them
RULE_PARTS = ("a", "b", "c", "d", "e", "f")


def rule_rows(variants: dict[str, Sequence[RunArrays]]) -> list[dict]:
    """Per variant: how many seeds pass each part of the verdict rule (``parts[p]``: seeds passing part p; e:
    saturated, f: flagged), the outcomes, and for runs by family the transfer summary (seeds reaching it, the mean
    recovery over seeds). -> rows {variant, n_seeds, parts, outcomes, transfer}."""
    rows = []
    for name, runs in variants.items():
        judged = [r for r in runs if r.parts is not None]
        parts = {p: sum(bool(r.parts.get(p)) for r in judged) for p in RULE_PARTS} if judged else None
        outcomes: dict[str, int] = {}
        for r in judged:
            outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
        transfers = [r.transfer for r in runs if r.transfer is not None]
        transfer = None
        if transfers:

            def mean(key, transfers=transfers):
                values = [t[key] for t in transfers if t.get(key) is not None]
                return float(np.mean(values)) if values else None

            transfer = {
                "families": transfers[0].get("families"),
                "reached": sum(bool(t.get("reached")) for t in transfers),
                "n": len(transfers),
                "mean_recovery_bal": mean("mean_recovery_bal"),
                "mean_recovery_auroc": mean("mean_recovery_auroc"),
            }
        rows.append(
            {"variant": name, "n_seeds": len(runs), "n_judged": len(judged), "parts": parts, "outcomes": outcomes,
             "transfer": transfer}
        )  # fmt: skip
    return rows


def rule_markdown(rows: list[dict]) -> list[str]:
    """Markdown lines: per variant, the seeds passing each part of the verdict rule, the outcomes and the transfer."""
    names = {"a": "(a) SV reached RR before", "b": "(b) gap closed", "c": "(c) RR preserved", "d": "(d) TP kept",
             "e": "(e) saturated", "f": "(f) SV past the base readout"}  # fmt: skip
    lines = [
        "",
        "The verdict rule per variant (docs/concepts.md): seeds whose run passes each part (e: saturated, f: flagged; "
        "each run's own compare.json), the outcomes, and, for runs by family, the transfer rule (families.json).",
        "",
        "| variant | seeds | " + " | ".join(names[p] for p in RULE_PARTS) + " | outcomes | transfer reached |",
        "|---|---|" + "---|" * (len(RULE_PARTS) + 2),
    ]
    for r in rows:
        if r["parts"] is None:
            cells = ["–"] * len(RULE_PARTS)
        else:
            cells = [f"{r['parts'][p]}/{r['n_judged']}" for p in RULE_PARTS]
        outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(r["outcomes"].items())) or "–"
        t = r["transfer"]
        if t is None:
            transfer = "–"
        else:
            rec = [x for x in (t["mean_recovery_bal"], t["mean_recovery_auroc"]) if x is not None]
            recovery = " / ".join(f"{100 * x:.0f}%" for x in rec) if rec else "–"
            transfer = f"{t['reached']}/{t['n']} (held out: {', '.join(t['families'] or [])}; mean recovery {recovery})"
        lines.append(f"| {r['variant']} | {r['n_seeds']} | " + " | ".join(cells) + f" | {outcomes} | {transfer} |")
    return lines


def steering_rows(
    runs: Sequence[RunArrays], loops: Sequence[int] | None = None, alpha: float = 1.0, n_boot: int = 500, seed: int = 0
) -> list[dict]:
    """The training-free baseline (:mod:`loopalign.eval.steering`) on the runs' *before* records: SV
    whose Yes − No logit gets alpha x the probe's log-odds, as a row like :func:`ablation_rows`'s
    (the "after" model is the steered base; RR is the base's, so d_rr is 0)."""
    steered = []
    for r in runs:
        score = steered_logits(r.sv_prob[0], r.rr_prob[0], alpha)
        prob = 1.0 / (1.0 + np.exp(-score))
        steered.append(
            RunArrays(
                path=r.path,
                loops=r.loops,
                y=r.y,
                clusters=r.clusters,
                sv_prob=(r.sv_prob[0], prob),
                sv_pred=(r.sv_pred[0], (score > 0).astype(np.int64)),
                rr_prob=(r.rr_prob[0], r.rr_prob[0]),
                tp=[{"loop": x["loop"], "tp_after": x["tp_before"], "d_tp": 0.0} for x in r.tp],
            )
        )
    return ablation_rows({f"steering (no training, alpha {alpha:g})": steered}, loops, n_boot, seed)


def _cell(row: dict, key: str, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    v, lo, hi = row[key], row[f"{key}_lo"], row[f"{key}_hi"]
    return f"{fmt.format(scale * v)} [{fmt.format(scale * lo)}, {fmt.format(scale * hi)}]"


def ablation_markdown(rows: list[dict], depth: int, title: str = "Gap-SFT ablation") -> str:
    """The table at the trained depth ``depth``, then SV after / gap after per loop for every variant."""
    at = [r for r in rows if r["loop"] == depth]
    lines = [
        f"# {title}",
        "",
        f"Loop {depth} (the trained depth). Means over seeds; 95% intervals from a two-level bootstrap "
        "(seeds, then task clusters within each seed). Accuracy in points, AUROC x 100.",
        "",
        "| variant | seeds | dSV | dRR | dAUROC SV | dAUROC RR | SV after | RR after | gap after | AUROC SV after | TP after | dTP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in at:
        tp = "–" if r["tp_after"] is None else f"{100 * r['tp_after']:.1f}"
        dtp = "–" if r["d_tp"] is None else f"{100 * r['d_tp']:+.1f}"
        lines.append(
            f"| {r['variant']} | {r['n_seeds']} | {_cell(r, 'd_sv', signed=True)} | {_cell(r, 'd_rr', signed=True)} | "
            f"{_cell(r, 'd_sv_auroc', signed=True)} | {_cell(r, 'd_rr_auroc', signed=True)} | {_cell(r, 'sv_after')} | "
            f"{_cell(r, 'rr_after')} | {_cell(r, 'gap_after', signed=True)} | {_cell(r, 'sv_auroc_after')} | {tp} | {dtp} |"
        )
    loops = sorted({r["loop"] for r in rows})
    lines += ["", "Per loop: SV after / gap after (points; loops past the trained depth are extrapolation):", ""]
    lines += ["| variant | " + " | ".join(str(t) for t in loops) + " |", "|---|" + "---|" * len(loops)]
    for name in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for t in loops:
            r = next((x for x in rows if x["variant"] == name and x["loop"] == t), None)
            cells.append("–" if r is None else f"{100 * r['sv_after']:.1f} / {100 * r['gap_after']:+.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ablation(rows: list[dict], depth: int, path: str) -> str:
    """dSV and dRR at the trained depth per variant (error bars: the two-level intervals). -> path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    at = [r for r in rows if r["loop"] == depth]
    names = [r["variant"] for r in at]
    x = np.arange(len(at))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(at) + 2), 4.2))
    for k, (key, label) in enumerate((("d_sv", "dSV"), ("d_rr", "dRR"))):
        v = np.array([100 * r[key] for r in at])
        err = np.array([[100 * (r[key] - r[f"{key}_lo"]) for r in at], [100 * (r[f"{key}_hi"] - r[key]) for r in at]])
        ax.bar(x + (k - 0.5) * 0.38, v, 0.38, yerr=err, capsize=3, label=label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, names, rotation=25, ha="right")
    ax.set_ylabel(f"change at loop {depth} (points)")
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
