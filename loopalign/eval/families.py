"""The gap per record family: one evaluation and one before/after comparison per family (a statement family such
as ``city_country``, a data source, any record field), and the transfer summary of families never trained on.

A record's family is the value of ``field`` in the record itself or, failing that, in its JSON ``meta``
(:func:`record_family`). Each family is evaluated on its own records (its own probe folds and bootstrap clusters),
so RR, SV and the gap are read within the family, never pooled across families whose base rates differ.

The transfer rule, stated before any figure (``TRANSFER_RULE``): for the families that were never trained on, SV's
recovery is (SV_after − SV_before) / (RR_before − SV_before) on a metric, averaged over those families whose base
gap RR_before − SV_before is at least ``min_gap``; the goal is a mean recovery >= ``goal`` on balanced accuracy and
on AUROC, with no held-out family whose SV fell (the upper CI bound of its dSV below 0).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from loopalign.io import atomic_write_text

from .gap import GapResult
from .report import save_figure
from .verdict import CompareConfig, compare

__all__ = [
    "FamilyComparison",
    "TRANSFER_RULE",
    "compare_families",
    "families_figure",
    "family_counts",
    "record_family",
    "record_families",
    "verdict_log_odds",
    "yes_rate",
]

TRANSFER_RULE = (
    "Transfer rule (fixed before any number is looked at): for each family whose labels were never trained on (held "
    "out, or trained on as unlabelled text), SV recovery = "
    "(SV_after - SV_before) / (RR_before - SV_before) at the verdict depth, on balanced accuracy and on AUROC, over "
    "the families whose base gap RR_before - SV_before is >= {min_gap:g}; transfer reached = the mean recovery is "
    ">= {goal:g} on both metrics AND no held-out family's SV fell (the upper 95% CI bound of its dSV on balanced "
    "accuracy below 0)."
)


def record_family(row: dict, field_name: str) -> str | None:
    """The family of one record: ``row[field_name]`` when present and not empty, else the same key of its JSON
    ``meta``; None when neither has it."""
    value = row.get(field_name)
    if value not in (None, ""):
        return str(value)
    meta = row.get("meta")
    if isinstance(meta, str) and meta.strip().startswith("{"):
        value = json.loads(meta).get(field_name)
    elif isinstance(meta, dict):
        value = meta.get(field_name)
    return None if value in (None, "") else str(value)


def record_families(dataset, field_name: str) -> list[str]:
    """Every record's family, in order; a record without one fails, naming its id and the field."""
    out = []
    for i, row in enumerate(dataset):
        family = record_family(row, field_name)
        if family is None:
            raise ValueError(
                f"record {row.get('id', i)!r} has no {field_name!r} (neither a field nor a key of its meta): "
                "every record needs a family to be evaluated by family"
            )
        out.append(family)
    return out


def family_counts(dataset, field_name: str) -> dict[str, dict]:
    """{family: {"records": n, "label_1": n1}} in sorted family order."""
    counts: dict[str, dict] = {}
    for family, label in zip(record_families(dataset, field_name), dataset["label"]):
        c = counts.setdefault(family, {"records": 0, "label_1": 0})
        c["records"] += 1
        c["label_1"] += int(label == 1)
    return dict(sorted(counts.items()))


def _depth_row(result: GapResult, loop: int) -> dict:
    (row,) = [r for r in result.table if r["loop"] == loop]
    return row


def yes_rate(result: GapResult, loop: int) -> float:
    """The share of the evaluated records SV answers "Yes" at ``loop``: near 0 or 1, the verdict says one word
    whatever its ranking (AUROC) knows."""
    _, _, ev, _, decided, _ = result.arrays()
    return float(decided[result.loops.index(loop)][ev].mean())


def verdict_log_odds(result: GapResult, loop: int) -> tuple[float, float]:
    """Where SV's cut lies and how far it separates, at ``loop``, in log-odds of P(Yes) (the verdict says Yes above
    0) over the evaluated records: (the median, the mean on true records minus the mean on false ones). A median
    far from 0 beside a small separation is a verdict that ranks a little and says one word."""
    _, labels, ev, prob, _, _ = result.arrays()
    p = np.clip(prob[result.loops.index(loop)][ev], 1e-6, 1 - 1e-6)
    log_odds, y = np.log(p) - np.log1p(-p), labels[ev]
    separation = float(log_odds[y == 1].mean() - log_odds[y == 0].mean()) if 0 < y.sum() < len(y) else float("nan")
    return float(np.median(log_odds)), separation


@dataclass
class FamilyComparison:
    """Per family: the before/after figures at the verdict depth and the comparison's verdict; and the transfer
    summary over the families never trained on (``TRANSFER_RULE``).

    rows: one per family {family, trained, training ("labels" | "text only" | "none"), n_records, sv/rr before/after
    on balanced accuracy and AUROC, the share SV answers Yes (sv_yes_before / sv_yes_after), the before probes frozen
    on the after features (rr_frozen_bal_after), SV's log-odds median and true-minus-false separation
    (sv_log_odds_* / sv_separation_*, ``verdict_log_odds``), d_sv (+ CI)
    on balanced accuracy, recovery_bal / recovery_auroc (None when the base gap is below ``min_gap``), verdict};
    transfer: {families, mean_recovery_bal, mean_recovery_auroc, fell: [families whose SV fell], reached}."""

    loop: int
    rows: list[dict]
    transfer: dict
    rule: str
    config: dict = field(default_factory=dict)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(asdict(self), indent=indent, default=lambda x: None)

    def markdown(self) -> str:
        pct = _pct
        lines = [
            f"# Before / after per family (loop {self.loop})",
            "",
            self.rule,
            "",
            "| family | trained on | records | SV bal. acc before → after | dSV bal. acc [95% CI] | SV AUROC before → "
            "after | SV says Yes before → after | RR bal. acc before → after | RR AUROC before → after | recovery "
            "(bal. acc / AUROC) | (a) SV ≥ RR before | (b) gap closed | (c) RR kept | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            rec = " / ".join("–" if r[k] is None else f"{100 * r[k]:.0f}%" for k in ("recovery_bal", "recovery_auroc"))
            lines.append(
                f"| {r['family']} | {_TRAINING[r.get('training', 'labels' if r['trained'] else 'none')]} | "
                f"{r['n_records']} | "
                f"{pct(r['sv_bal_before'])} → {pct(r['sv_bal_after'])} | {pct(r['d_sv_bal'])} "
                f"[{pct(r['d_sv_bal_lo'])}, {pct(r['d_sv_bal_hi'])}] | {pct(r['sv_auroc_before'])} → "
                f"{pct(r['sv_auroc_after'])} | {pct(r.get('sv_yes_before'))} → {pct(r.get('sv_yes_after'))} | "
                f"{pct(r['rr_bal_before'])} → {pct(r['rr_bal_after'])} | "
                f"{pct(r['rr_auroc_before'])} → {pct(r['rr_auroc_after'])} | {rec} | "
                + " | ".join(_yn(r.get(k)) for k in ("sv_reached_rr_before", "gap_closed", "rr_preserved"))
                + f" | {r.get('outcome', '–')} |"
            )
        t = self.transfer
        if t["families"]:
            mean = " / ".join(
                "–" if t[k] is None else f"{100 * t[k]:.0f}%" for k in ("mean_recovery_bal", "mean_recovery_auroc")
            )
            lines += [
                "",
                f"**Transfer to families never trained on ({', '.join(t['families'])}): mean recovery {mean} "
                f"(balanced accuracy / AUROC; goal {100 * self.config['goal']:.0f}%); SV fell in: "
                f"{', '.join(t['fell']) or 'none'}; reached: {'yes' if t['reached'] else 'no'}.**",
            ]
        if all("sv_log_odds_after" in r for r in self.rows):
            lines += [
                "",
                "Where SV's Yes/No cut lies: its log-odds of Yes (Yes above 0) on the family's held-out records, "
                "the median, and the mean on true statements minus the mean on false ones (the separation). A "
                "median far from 0 beside a small separation is a verdict that says one word for the family.",
                "",
                "| family | median log-odds before → after | separation before → after |",
                "|---|---|---|",
                *(
                    f"| {r['family']} | {r['sv_log_odds_before']:+.2f} → {r['sv_log_odds_after']:+.2f} | "
                    f"{r['sv_separation_before']:+.2f} → {r['sv_separation_after']:+.2f} |"
                    for r in self.rows
                ),
            ]
        lines += [
            "",
            "(a), (b), (c) and the verdict are the comparison rule's (docs/concepts.md) on each family's held-out "
            "records, on balanced accuracy; families.json holds each family's verdict in full.",
        ]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str, title: str = "") -> None:
        """families.json, families.md and the per-family panels families.png / .svg (:func:`families_figure`)."""
        atomic_write_text(os.path.join(out_dir, "families.json"), self.to_json())
        atomic_write_text(os.path.join(out_dir, "families.md"), self.markdown())
        save_figure(families_figure(self.rows, title=title), out_dir, "families")


_TRAINING = {
    "labels": "yes",
    "probe labels": "text only; labels fit the target probe",
    "text only": "text only (no labels)",
    "none": "no (held out)",
}


def _yn(x) -> str:
    return "–" if x is None else "yes" if x else "no"


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}"


def _recovery(sv_before: float, sv_after: float, rr_before: float, min_gap: float) -> float | None:
    base_gap = rr_before - sv_before
    return None if base_gap < min_gap else (sv_after - sv_before) / base_gap


def compare_families(
    before: dict[str, GapResult],
    after: dict[str, GapResult],
    trained: set[str] | list[str],
    loop: int,
    unlabeled: set[str] | list[str] = (),
    config: CompareConfig | None = None,
    probe_labeled: set[str] | list[str] = (),
    goal: float = 0.5,
    min_gap: float = 0.05,
) -> FamilyComparison:
    """Compare each family's before/after evaluation at ``loop`` (the verdict depth) and summarise the transfer to
    the families not in ``trained`` (held out, or in ``unlabeled``: trained on without labels); families in
    ``probe_labeled`` (trained on without labels, but their labels fitted the probe_distill targets) are neither
    trained nor counted as transfer, since a probe read their labels. ``config``: the
    comparison rule of each family's own verdict (its loops are set
    to ``loop``); ``goal`` / ``min_gap``: the transfer rule's thresholds (fractions)."""
    missing = sorted(set(before) ^ set(after))
    if missing:
        raise ValueError(f"compare_families: families {missing} were evaluated before or after training, not both")
    base = dict(asdict(config or CompareConfig()), loops=loop)
    by_metric = {m: CompareConfig(**dict(base, metric=m)) for m in ("balanced_accuracy", "auroc")}
    kinds = (("labels", set(trained)), ("probe labels", set(probe_labeled)), ("text only", set(unlabeled)))

    def kind_of(family: str) -> str:  # how the family was trained on: the first kind naming it, else held out
        return next((kind for kind, names in kinds if family in names), "none")

    rows = []
    for family in sorted(before):
        b, a = before[family], after[family]
        comp_bal = compare(b, a, by_metric["balanced_accuracy"])
        rb, ra = _depth_row(b, loop), _depth_row(a, loop)
        (crow,) = [r for r in comp_bal.rows if r["loop"] == loop]
        row = {
            "family": family,
            "trained": kind_of(family) == "labels",
            "training": kind_of(family),
            "n_records": int(b.meta.get("n_records", 0)),
            "sv_bal_before": rb["sv_balanced_accuracy"],
            "sv_bal_after": ra["sv_balanced_accuracy"],
            "sv_auroc_before": rb["sv_auroc"],
            "sv_auroc_after": ra["sv_auroc"],
            "rr_bal_before": rb["rr_balanced_accuracy"],
            "rr_bal_after": ra["rr_balanced_accuracy"],
            "rr_auroc_before": rb["rr_auroc"],
            "rr_auroc_after": ra["rr_auroc"],
            "rr_frozen_bal_after": crow.get("rr_frozen_after"),
            "sv_yes_before": yes_rate(b, loop),
            "sv_yes_after": yes_rate(a, loop),
            **{
                f"{name}_{when}": value
                for when, result in (("before", b), ("after", a))
                for name, value in zip(("sv_log_odds", "sv_separation"), verdict_log_odds(result, loop))
            },
            "d_sv_bal": crow["d_sv"],
            "d_sv_bal_lo": crow["d_sv_lo"],
            "d_sv_bal_hi": crow["d_sv_hi"],
            "verdict": comp_bal.verdict,
            "outcome": comp_bal.outcome,
            "sv_reached_rr_before": comp_bal.sv_caught_up,
            "gap_closed": comp_bal.gap_closed,
            "rr_preserved": comp_bal.rr_preserved,
        }
        row["recovery_bal"] = _recovery(row["sv_bal_before"], row["sv_bal_after"], row["rr_bal_before"], min_gap)
        row["recovery_auroc"] = _recovery(
            row["sv_auroc_before"], row["sv_auroc_after"], row["rr_auroc_before"], min_gap
        )
        rows.append(row)
    held = [r for r in rows if r["training"] in ("text only", "none")]  # no label of theirs was read

    def mean(key):
        values = [r[key] for r in held if r[key] is not None]
        return float(np.mean(values)) if values else None

    fell = [r["family"] for r in held if r["d_sv_bal_hi"] < 0]
    m_bal, m_auc = mean("recovery_bal"), mean("recovery_auroc")
    transfer = {
        "families": [r["family"] for r in held],
        "mean_recovery_bal": m_bal,
        "mean_recovery_auroc": m_auc,
        "fell": fell,
        "reached": bool(held) and m_bal is not None and m_auc is not None and min(m_bal, m_auc) >= goal and not fell,
    }
    return FamilyComparison(
        loop=loop,
        rows=rows,
        transfer=transfer,
        rule=TRANSFER_RULE.format(min_gap=min_gap, goal=goal),
        config={"goal": goal, "min_gap": min_gap, "compare": base},
    )


def families_figure(rows: list[dict], title: str = ""):
    """Per family (the rows of :class:`FamilyComparison`): SV before (hatched) and after (solid) beside RR before
    (a bar-wide dash) and after (a dot), on balanced accuracy and on AUROC, one 0–100% axis each with the chance
    line; each family's label says how it was trained on. -> a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 2.0 * len(rows) + 3), 4.2))
    for ax, metric, name in zip(axes, ("bal", "auroc"), ("balanced accuracy", "AUROC")):
        ax.bar(x - 0.2, [100 * r[f"sv_{metric}_before"] for r in rows], 0.4, label="SV before", hatch="//", fill=False)
        ax.bar(x + 0.2, [100 * r[f"sv_{metric}_after"] for r in rows], 0.4, label="SV after")
        ax.scatter(x, [100 * r[f"rr_{metric}_before"] for r in rows], marker="_", s=900, color="k", label="RR before")
        ax.scatter(x, [100 * r[f"rr_{metric}_after"] for r in rows], marker="o", s=25, color="k", label="RR after")
        ax.axhline(50, color="grey", lw=0.8, ls=":", label="chance (50%)")
        kinds = [_SHORT_TRAINING[r.get("training", "labels" if r["trained"] else "none")] for r in rows]
        ax.set_xticks(x, [f"{r['family']}\n({k})" for r, k in zip(rows, kinds)], fontsize=7)
        ax.set_ylabel(f"{name} (%)")
        ax.set_ylim(0, 100)
        ax.set_title(name)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle((title + ": " if title else "") + "SV and RR per family before / after, held-out entities", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


#: how a family was trained on, in a figure's tick label
_SHORT_TRAINING = {"labels": "labels", "probe labels": "probe labels", "text only": "text only", "none": "held out"}
