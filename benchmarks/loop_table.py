"""One evaluation's figures per loop, from its ``gap.json`` (an eval-gap output folder or the file): docs/real-models.md's
tables of the retrofitted SmolLM2 before and after healing.

    python benchmarks/loop_table.py docs/figures/runs/retrofit_12_18_untrained_tp
    python benchmarks/loop_table.py docs/figures/runs/healed_12_18_gap_tp
    python benchmarks/loop_table.py docs/figures/runs/healed_12_18_gap_tp \
        --before docs/figures/runs/retrofit_12_18_untrained_tp --figure docs/figures/healing_12_18_tp_sv_rr.png

A row per loop evaluated: SV and RR on the headline metric with their 95% cluster-bootstrap intervals and on AUROC,
the gap RR − SV with its interval, the share of valid verdicts (Yes or No the top token), and TP (the model's own
answers right, in %) with how many answers the token budget cut off (an answer cut off counts as wrong); "–" where
TP was not measured. ``--before DIR --figure PATH`` draws TP, SV and RR per loop of both evaluations, ``--before``
dashed and the result solid (the figure sft-gap draws of a run's before and after; here e.g. before and after
healing), the model's trained depth marked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", help="an eval-gap output folder (or its gap.json)")
    parser.add_argument(
        "--before", metavar="DIR", help="with --figure: the evaluation drawn dashed (folder or gap.json)"
    )
    parser.add_argument("--figure", metavar="PATH", help="draw TP, SV and RR per loop, --before dashed (.png / .svg)")
    return parser


def _file(path: str) -> str:
    return path if path.endswith(".json") else os.path.join(path, "gap.json")


def save_figure(before: str, after: str, out: str) -> str:
    """TP, SV and RR per loop of ``before`` (dashed) and ``after`` (solid), the trained depth of ``after``'s model
    marked, written to ``out`` (its suffix names the format) atomically. -> ``out``."""
    import matplotlib.pyplot as plt

    from loopalign.eval.gap import GapResult
    from loopalign.eval.report import before_after_figure
    from loopalign.io import atomic_write

    first, second = GapResult.from_json(_file(before)), GapResult.from_json(_file(after))
    depth = second.meta.get("total_ut_steps") or max(second.loops)
    name = os.path.basename(os.path.dirname(os.path.abspath(_file(after))))
    title = f"{os.path.basename(os.path.dirname(os.path.abspath(_file(before))))} (dashed) → {name} (solid)"
    fig = before_after_figure(first, second, depth, title=title)
    fmt = os.path.splitext(out)[1][1:] or "png"
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120))
    plt.close(fig)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _with_ci(row: dict, key: str) -> str:
    return f"{_pct(row[key])} [{_pct(row[key + '_lo'])}, {_pct(row[key + '_hi'])}]"


def loop_table(path: str) -> str:
    """The per-loop markdown table of one ``gap.json``."""
    with open(_file(path)) as f:
        gap = json.load(f)
    tp = {r["loop"]: r for r in gap.get("tp") or []}
    lines = [
        "| loops | SV acc. | SV AUROC | RR acc. | RR AUROC | gap RR − SV | valid verdicts | TP (answers cut off) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in gap["table"]:
        t = tp.get(row["loop"])
        tp_cell = f"{_pct(t['accuracy'])} ({t['truncated']}/{t['n']})" if t else "–"
        lines.append(
            f"| {row['loop']} | {_with_ci(row, 'sv')} | {_pct(row['sv_auroc'])} | {_with_ci(row, 'rr')} | "
            f"{_pct(row['rr_auroc'])} | {_with_ci(row, 'gap')} | {100 * row['sv_valid_rate']:.1f}% | {tp_cell} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if (args.before is None) != (args.figure is None):
        parser.error("--before and --figure go together")
    sys.stdout.write(loop_table(args.result))
    if args.figure:
        print(f"wrote {save_figure(args.before, args.result, args.figure)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
