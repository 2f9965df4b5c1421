"""One row per ``sft-gap`` run: the before/after figures and each part of the verdict rule, from the runs' own
``compare.json`` (docs/organism.md's tables of the default cure).

    python benchmarks/verdict_table.py RUN_DIR [RUN_DIR ...]
    python benchmarks/verdict_table.py docs/figures/runs/cure_organism_v3_*
    python benchmarks/verdict_table.py --per-loop docs/figures/runs/HL100_healed_loops_s0
    python benchmarks/verdict_table.py --per-loop docs/figures/runs/HLV200_healed_loops_verdict_only_s0 \
        --figure docs/figures/HLV200_healed_loops_before_after.png
    python benchmarks/verdict_table.py --families docs/figures/runs/HLV200_healed_loops_verdict_only_s0 \
        docs/figures/runs/HLDR200_healed_loops_distill_rr_s0

Printed at the verdict depth, in points (95% paired cluster-bootstrap intervals): SV and RR before → after, part
(a) SV after − RR before, (b) RR after − SV after, (c) the refitted dRR and the frozen before-probe's drift, (d)
dTP, (e) saturation, (f) the flag, and the outcome the run printed. With ``--per-loop`` (one run): a row per loop
evaluated (the verdict depth marked, loops past it marked as extrapolation), SV and RR before → after on the
headline metric and on AUROC, dSV, the refitted dRR and the frozen before-probe's drift, with their intervals (and
TP before → after with dTP, where both results measured TP);
``--figure PATH`` also draws the run's before/after figure (SV and RR per loop, before dashed, after solid: the one
sft-gap saves as ``before_after.png``) again from the run's kept ``before/gap.json`` and ``after/gap.json``, so a
figure in the docs is regenerated from the JSON beside it. With ``--families`` (two or more runs by family, the
first the reference): a row per family, each run's cell "training; SV before → after; dSV [interval]" (how the
family was trained, its SV balanced accuracy at the run's verdict depth and the paired interval of dSV, from
``families.json``), and for every later run whether its dSV interval lies wholly below the first run's ("below"),
wholly above it ("above") or neither ("overlaps"); then each run's transfer summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="sft-gap output folders (or their compare.json files)")
    parser.add_argument("--per-loop", action="store_true", help="one run: a row per loop instead of one per run")
    parser.add_argument(
        "--families", action="store_true", help="runs by family: a row per family, the first run the reference"
    )
    parser.add_argument(
        "--figure", metavar="PATH", help="with --per-loop: also draw the run's before/after figure to PATH (.png/.svg)"
    )
    return parser


def _ci(s: dict, key: str) -> str:
    return f"{100 * s[key]:+.1f} [{100 * s[key + '_lo']:+.1f}, {100 * s[key + '_hi']:+.1f}]"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _comparison(path: str) -> tuple[str, dict]:
    """A run folder or its compare.json -> (the file, its content)."""
    file = path if path.endswith(".json") else os.path.join(path, "compare.json")
    with open(file) as f:
        return file, json.load(f)


def run_row(path: str) -> str:
    """One run's markdown row."""
    file, comparison = _comparison(path)
    s, parts = comparison["summary"], {p["part"]: p["passed"] for p in comparison["parts"]}
    tp = next((r for r in comparison.get("tp") or [] if r["loop"] == comparison["depth"]), None)
    mark = {True: "yes", False: "no"}
    name = os.path.basename(os.path.dirname(file) if file.endswith("compare.json") else file)
    cells = [
        name,
        f"{_pct(s['sv_before'])} → {_pct(s['sv_after'])}",
        f"{_pct(s['rr_before'])} → {_pct(s['rr_after'])}",
        f"{_ci(s, 'sv_reach')}: {mark[parts['a']]}",
        f"{_ci(s, 'gap_after')}: {mark[parts['b']]}",
        f"{_ci(s, 'd_rr')} / {_ci(s, 'rr_drift')}: {mark[parts['c']]}" if "rr_drift" in s else "–",
        f"{_ci(tp, 'd_tp')}: {mark[parts['d']]}" if tp else "not measured",
        mark[parts["e"]],
        "flagged" if parts["f"] else "no",
        comparison["outcome"],
    ]
    return "| " + " | ".join(cells) + " |"


def per_loop_table(path: str) -> str:
    """One run's figures per loop (``compare.json`` rows)."""
    _, comparison = _comparison(path)
    tp = {r["loop"]: r for r in comparison.get("tp") or []}
    lines = [
        "| loop | SV before → after | RR before → after | SV AUROC before → after | RR AUROC before → after | dSV | "
        "dRR (refitted) | RR frozen − RR before |" + (" TP before → after | dTP |" if tp else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if tp else ""),
    ]
    for r in [*comparison["rows"], *(comparison.get("extrapolation") or [])]:
        mark = " (verdict)" if r.get("in_verdict") else " (extrapolation)" if r.get("extrapolation") else ""
        drift = _ci(r, "rr_drift") if "rr_drift" in r else "–"
        t = tp.get(r["loop"])
        tp_cells = ""
        if tp:  # a column pair only where the run measured TP; "–" at a loop it did not
            tp_cells = f" {_pct(t['tp_before'])} → {_pct(t['tp_after'])} | {_ci(t, 'd_tp')} |" if t else " – | – |"
        lines.append(
            f"| {r['loop']}{mark} | {_pct(r['sv_before'])} → {_pct(r['sv_after'])} | {_pct(r['rr_before'])} → "
            f"{_pct(r['rr_after'])} | {_pct(r['sv_auroc_before'])} → {_pct(r['sv_auroc_after'])} | "
            f"{_pct(r['rr_auroc_before'])} → {_pct(r['rr_auroc_after'])} | {_ci(r, 'd_sv')} | {_ci(r, 'd_rr')} | {drift} |"
            + tp_cells
        )
    return "\n".join(lines) + "\n"


def before_after(path: str):
    """The run's before/after figure from its kept ``before/gap.json``, ``after/gap.json`` and ``compare.json`` (the
    trained depth and the outcome): what sft-gap drew as ``before_after.png``. -> a matplotlib figure."""
    from loopalign.eval.gap import GapResult
    from loopalign.eval.report import before_after_figure

    _, comparison = _comparison(path)
    before, after = (GapResult.from_json(os.path.join(path, when)) for when in ("before", "after"))
    title = f"{os.path.basename(os.path.normpath(path))}: sft-gap, verdict {comparison['outcome']}"
    return before_after_figure(before, after, comparison["depth"], title=title)


def save_before_after(path: str, out: str) -> str:
    """:func:`before_after` written to ``out`` (its suffix names the format), atomically. -> ``out``."""
    import matplotlib.pyplot as plt

    from loopalign.io import atomic_write

    fig = before_after(path)
    fmt = os.path.splitext(out)[1][1:] or "png"
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120))
    plt.close(fig)
    return out


def _families(path: str) -> dict:
    with open(os.path.join(path, "families.json")) as f:
        return json.load(f)


def families_table(paths: list[str]) -> str:
    """Per family, each run's dSV at its verdict depth against the first run's (``families.json`` of each)."""
    runs = [_families(p) for p in paths]
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    by_run = [{r["family"]: r for r in run["rows"]} for run in runs]
    families = list(by_run[0])
    for name, rows in zip(names[1:], by_run[1:]):
        if set(rows) != set(families):
            raise SystemExit(f"error: {name} has the families {sorted(rows)}, {names[0]} {sorted(families)}")
    header = ["family", *(f"{n} (loop {run['loop']})" for n, run in zip(names, runs))]
    header += [f"{n} against {names[0]}" for n in names[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for family in families:
        ref = by_run[0][family]
        cells = [family]
        for rows in by_run:
            r = rows[family]
            cells.append(
                f"{r['training']}; {_pct(r['sv_bal_before'])} → {_pct(r['sv_bal_after'])}; {_ci(r, 'd_sv_bal')}"
            )
        for rows in by_run[1:]:
            r = rows[family]
            below, above = r["d_sv_bal_hi"] < ref["d_sv_bal_lo"], r["d_sv_bal_lo"] > ref["d_sv_bal_hi"]
            cells.append("below" if below else "above" if above else "overlaps")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, run in zip(names, runs):
        t = run["transfer"]
        lines.append(
            f"- {name}: transfer over {', '.join(t['families'])}: mean recovery {100 * t['mean_recovery_bal']:.0f}% "
            f"(balanced accuracy) / {100 * t['mean_recovery_auroc']:.0f}% (AUROC); fell: {', '.join(t['fell']) or 'none'};"
            f" reached: {'yes' if t['reached'] else 'no'}"
        )
    return "\n".join(lines) + "\n"


def table(paths: list[str]) -> str:
    lines = [
        "| run | SV before → after | RR before → after | (a) SV after − RR before | (b) RR after − SV after | "
        "(c) dRR refitted / frozen drift | (d) dTP | (e) saturated | (f) | outcome |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + [run_row(p) for p in paths]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.families:
        if args.per_loop or args.figure or len(args.runs) < 2:
            raise SystemExit("error: --families compares two or more runs, without --per-loop or --figure")
        sys.stdout.write(families_table(args.runs))
        return 0
    if args.per_loop and len(args.runs) != 1:
        raise SystemExit(f"error: --per-loop takes one run, got {len(args.runs)}")
    if args.figure and not args.per_loop:
        raise SystemExit("error: --figure draws one run's figure: give it with --per-loop")
    if args.figure and args.runs[0].endswith(".json"):
        raise SystemExit("error: --figure needs the run's folder (its before/ and after/ gap.json), not a file")
    if args.figure:
        save_before_after(args.runs[0], args.figure)
    sys.stdout.write(per_loop_table(args.runs[0]) if args.per_loop else table(args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
