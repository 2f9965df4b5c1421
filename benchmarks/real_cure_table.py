"""The real-model cure's tables and figure, regenerated from the runs' own JSON (docs/real-models.md).

    python benchmarks/real_cure_table.py RUN_DIR [RUN_DIR ...] [--figure docs/figures/real_cure.png] [--out table.md]

Each RUN_DIR is an ``sft-gap`` output folder run by family (``families.json``; ``compare.json``; ``general.json``
and ``gap_config.json`` when present). Runs whose folder names differ only by a trailing ``_s<seed>`` are one
variant over seeds: the table gives the mean and the range over the seeds. Printed per variant:

- the pooled evaluation (``compare.json``: the held-out entities of every family not held out, i.e. trained on
  with labels or as text): SV and RR before → after on the headline metric, the frozen before-probe after, the
  rule's outcome;
- per family kind (trained on with labels; text only; held out): the mean SV balanced accuracy and AUROC before →
  after, RR's, and the transfer summary (mean recovery, families whose SV fell);
- general questions kept (right answers before → after) and, in the goals table, the general drift where the run's
  ``general.json`` holds one (the mean per-token KL(base || tuned) on the base model's answers to 48 other prompts,
  ``benchmarks/general_drift.py``);
- with ``--goals``, per variant the issue's goals (fixed before running, docs/real-models.md) on point estimates:
  labelled family x seed cells where SV after >= RR before - 2 points (balanced accuracy; AUROC), the pooled
  refitted and frozen RR after minus RR before, the transfer's mean recovery, the held-out families whose SV fell,
  general answers kept, and the rule's outcomes;
- with ``--cut``, per run and family where SV's Yes/No cut lies after training: the share answered Yes, the median
  log-odds of Yes and the separation of true from false statements in log-odds (``families.json``, or for runs
  written before those columns, the run's ``after/families/<family>/gap.json``).

The figure: per family, SV before (hatched) and after (solid) beside RR before, on balanced accuracy and on AUROC,
for one run (the first given, or ``--figure-run``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

import numpy as np

log = logging.getLogger("real_cure_table")


def _load(path: str, name: str) -> dict | None:
    file = os.path.join(path, name)
    if not os.path.exists(file):
        return None
    with open(file) as f:
        return json.load(f)


def variant_of(run_dir: str) -> str:
    """The variant a run folder belongs to: its name without a trailing ``_s<seed>``."""
    return re.sub(r"_s\d+$", "", os.path.basename(os.path.normpath(run_dir)))


def run_summary(run_dir: str) -> dict:
    """The figures of one run, as plain numbers (fractions)."""
    families = _load(run_dir, "families.json")
    compare = _load(run_dir, "compare.json")
    if families is None or compare is None:
        raise FileNotFoundError(f"{run_dir}: not an sft-gap run by family (families.json and compare.json needed)")
    general = _load(run_dir, "general.json")
    (row,) = [r for r in compare["rows"] if r.get("in_verdict", True)][:1] or [compare["rows"][0]]
    out = {
        "run": run_dir,
        "metric": compare["metric"],
        "pooled": {
            "sv_before": row["sv_before"],
            "sv_after": row["sv_after"],
            "rr_before": row["rr_before"],
            "rr_after": row["rr_after"],
            "rr_frozen_after": row.get("rr_frozen_after"),
            "outcome": compare.get("outcome", "?"),
            "parts": {
                k: compare.get(k) for k in ("sv_caught_up", "gap_closed", "rr_preserved", "tp_kept", "saturated")
            },
        },
        "families": families["rows"],
        "family_loop": families["loop"],
        "transfer": families["transfer"],
    }
    if general and general.get("after"):  # graded again by today's rule (whole words), from the saved answers
        from loopalign.eval.general import is_right

        right = {
            k: [is_right(a, e) for a, e in zip(general[k]["answers"], general[k]["expected"])]
            for k in ("before", "after")
        }
        out["general"] = (sum(right["before"]), sum(right["after"]), len(right["before"]))
    if general and general.get("drift"):  # benchmarks/general_drift.py, or sft-gap itself since it measures it
        out["drift"] = (general["drift"]["kl_mean"], general["drift"]["top1_mean"])
    return out


def _kind(row: dict) -> str:
    return row.get("training", "labels" if row["trained"] else "none")


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def _fmt(values, pct: bool = True) -> str:
    """Mean over seeds, with the range when there are several."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    if not values:
        return "–"
    scale = 100 if pct else 1
    mean = scale * float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} [{scale * min(values):.1f}, {scale * max(values):.1f}]"


def by_variant(runs: list[dict]) -> dict[str, list[dict]]:
    """{variant: its runs (seeds)}, in the order the variants first appear."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(variant_of(r["run"]), []).append(r)
    return groups


def variant_table(runs: list[dict]) -> list[str]:
    """Markdown lines for the variants of ``runs`` (grouped by variant)."""
    groups = by_variant(runs)
    lines = [
        "| variant | seeds | pooled held-out entities (every family not held out): SV before → after | RR before → "
        "after (frozen probe after) | outcome "
        "| families | SV bal. acc before → after | SV AUROC before → after | RR bal. acc before | mean recovery "
        "(bal. acc / AUROC) | general questions |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in groups.items():
        first = True
        for kind in ("labels", "probe labels", "text only", "none"):
            fam = [[f for f in r["families"] if _kind(f) == kind] for r in rs]
            if not any(fam):
                continue
            per_run = lambda key, fam=fam: [_mean([f[key] for f in fs]) for fs in fam]  # noqa: E731
            names = ", ".join(f["family"] for f in fam[0])
            head = ["", "", "", "", ""]
            if first:
                pooled = [r["pooled"] for r in rs]
                outcomes = sorted({p["outcome"] for p in pooled})
                head = [
                    name,
                    str(len(rs)),
                    f"{_fmt([p['sv_before'] for p in pooled])} → {_fmt([p['sv_after'] for p in pooled])}",
                    f"{_fmt([p['rr_before'] for p in pooled])} → {_fmt([p['rr_after'] for p in pooled])} "
                    f"({_fmt([p['rr_frozen_after'] for p in pooled])})",
                    " / ".join(outcomes),
                ]
                first = False
            recovery = "–"
            if kind in ("text only", "none"):  # the transfer families of this kind (a probe read no label of theirs)

                def kind_mean(key, fam=fam):
                    return [_mean([f[key] for f in fs if f.get(key) is not None]) for fs in fam]

                recovery = f"{_fmt(kind_mean('recovery_bal'))} / {_fmt(kind_mean('recovery_auroc'))}"
            general = "–"
            if kind == "labels" and all("general" in r for r in rs):
                general = ", ".join(f"{b}/{n} → {a}/{n}" for b, a, n in (r["general"] for r in rs))
            lines.append(
                "| "
                + " | ".join(
                    head
                    + [
                        f"{kind}: {names}",
                        f"{_fmt(per_run('sv_bal_before'))} → {_fmt(per_run('sv_bal_after'))}",
                        f"{_fmt(per_run('sv_auroc_before'))} → {_fmt(per_run('sv_auroc_after'))}",
                        _fmt(per_run("rr_bal_before")),
                        recovery,
                        general,
                    ]
                )
                + " |"
            )
    return lines


#: the issue's margin: SV after may trail RR before, RR after may trail RR before, by this much (fractions)
GOAL_MARGIN = 0.02


def _general_cell(run: dict) -> str:
    """Right general answers before → after, with the drift (KL; top choice kept) when the run has one."""
    before, after, _ = run["general"]
    if "drift" not in run:
        return f"{before} → {after}"
    kl, top1 = run["drift"]
    return f"{before} → {after} ({kl:.2f}; {100 * top1:.0f}%)"


def goals_table(runs: list[dict]) -> list[str]:
    """Markdown lines, one per variant (seeds pooled): the goals of docs/real-models.md on point estimates."""
    groups = by_variant(runs)
    lines = [
        "| variant | seeds | labelled families' held-out entities: cells with SV after >= RR before - 2 "
        "(bal. acc; AUROC) | pooled RR after - before, refitted; frozen (points) | transfer: mean recovery "
        "(bal. acc / AUROC) | held-out families whose SV fell (dSV's CI below 0; seeds) | general questions (drift: KL "
        "nats/token; top choice kept) | rule outcome "
        "(pooled) | families whose verdict is yes (seeds) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in groups.items():
        cells = [f for r in rs for f in r["families"] if _kind(f) == "labels"]
        bal = sum(f["sv_bal_after"] >= f["rr_bal_before"] - GOAL_MARGIN for f in cells)
        auroc = sum(f["sv_auroc_after"] >= f["rr_auroc_before"] - GOAL_MARGIN for f in cells)
        pooled = [r["pooled"] for r in rs]
        refit = [p["rr_after"] - p["rr_before"] for p in pooled]
        frozen = [None if p["rr_frozen_after"] is None else p["rr_frozen_after"] - p["rr_before"] for p in pooled]
        t = [r["transfer"] for r in rs]
        recovery = (
            f"{_fmt([x.get('mean_recovery_bal') for x in t])} / {_fmt([x.get('mean_recovery_auroc') for x in t])}"
        )
        fell_lists = [x.get("fell", []) for x in t]
        fell = [
            f"{f} ({sum(f in x for x in fell_lists)}/{len(rs)})" for f in sorted({f for x in fell_lists for f in x})
        ]
        general = ", ".join(_general_cell(r) for r in rs) if all("general" in r for r in rs) else "–"
        outcomes = [p["outcome"] for p in pooled]
        outcome = ", ".join(f"{o} {outcomes.count(o)}/{len(outcomes)}" for o in sorted(set(outcomes)))
        yes_by_run = [[f["family"] for f in r["families"] if f.get("outcome") == "yes"] for r in rs]
        passed = [
            f"{f} ({sum(f in y for y in yes_by_run)}/{len(rs)})" for f in sorted({f for y in yes_by_run for f in y})
        ]
        lines.append(
            f"| {name} | {len(rs)} | {bal}/{len(cells)}; {auroc}/{len(cells)} | {_fmt(refit)}; {_fmt(frozen)} | "
            f"{recovery} | {', '.join(fell) or 'none'} | {general} | {outcome} | "
            f"{', '.join(passed) or 'none'} |"
        )
    return lines


def cut_of(run: dict) -> dict[str, tuple[float, float, float] | None]:
    """Per family: (the share SV answers Yes, the median log-odds of Yes, the true-minus-false separation) after
    training, from families.json (runs written since the columns exist) or else from the run's per-family
    after-evaluation (``after/families/<family>/gap.json``); None where neither is there."""
    from loopalign.eval.families import verdict_log_odds, yes_rate
    from loopalign.eval.gap import GapResult

    out = {}
    for row in run["families"]:
        if row.get("sv_log_odds_after") is not None and row.get("sv_yes_after") is not None:
            out[row["family"]] = (row["sv_yes_after"], row["sv_log_odds_after"], row["sv_separation_after"])
            continue
        path = os.path.join(run["run"], "after", "families", row["family"], "gap.json")
        if not os.path.exists(path):
            out[row["family"]] = None
            continue
        result = GapResult.from_json(path)
        loop = run["family_loop"]  # the verdict depth the family comparison read, not the deepest loop evaluated
        out[row["family"]] = (yes_rate(result, loop), *verdict_log_odds(result, loop))
    return out


def cut_table(runs: list[dict]) -> list[str]:
    """Markdown lines: per run and family, where SV's Yes/No cut lies after training: the share it answers Yes, the
    median log-odds of Yes and the separation (true minus false, in log-odds)."""
    cuts = [cut_of(r) for r in runs]
    families = sorted({f for c in cuts for f in c})
    lines = [
        "| run | " + " | ".join(families) + " |",
        "|---|" + "---|" * len(families),
    ]
    for run, cut in zip(runs, cuts):
        cells = []
        for f in families:
            c = cut.get(f)
            cells.append("–" if c is None else f"{100 * c[0]:.0f}% ({c[1]:+.1f}, {c[2]:+.2f})")
        lines.append(f"| {os.path.basename(os.path.normpath(run['run']))} | " + " | ".join(cells) + " |")
    return lines


def family_figure(run: dict, path: str) -> None:
    """The run's per-family panels (``loopalign.eval.families.families_figure``) written to ``path`` (PNG / SVG)."""
    import matplotlib.pyplot as plt

    from loopalign.eval.families import families_figure
    from loopalign.io import atomic_write

    fig = families_figure(run["families"], title=variant_of(run["run"]))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=os.path.splitext(path)[1][1:] or "png", dpi=120))
    plt.close(fig)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="sft-gap output folders run by family")
    parser.add_argument("--figure", default=None, help="write the per-family figure of one run here (PNG / SVG)")
    parser.add_argument("--figure-run", default=None, help="the run the figure shows (default: the first)")
    parser.add_argument("--out", default=None, help="also write the table here (Markdown)")
    parser.add_argument(
        "--goals",
        action="store_true",
        help="print only the goals table: per variant, the issue's goals on point estimates (docs/real-models.md)",
    )
    parser.add_argument(
        "--cut",
        action="store_true",
        help="also print where SV's cut lies after training, per run and family: the share answered Yes (the "
        "median log-odds of Yes, the true-minus-false separation)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = make_parser().parse_args(argv)
    runs = [run_summary(r) for r in args.runs]  # a folder that is not a run fails here, naming it
    text = "\n".join(goals_table(runs) if args.goals else variant_table(runs)) + "\n"
    if args.cut:
        text += "\n" + "\n".join(cut_table(runs)) + "\n"
    sys.stdout.write(text)
    if args.out:
        from loopalign.io import atomic_write_text

        atomic_write_text(args.out, text)
    if args.figure:
        chosen = next((r for r in runs if r["run"] == args.figure_run), runs[0]) if args.figure_run else runs[0]
        family_figure(chosen, args.figure)
        log.info("figure: %s", args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
