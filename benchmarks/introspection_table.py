"""Introspection tables and verdicts, regenerated from runs' own JSON (docs/introspection.md).

    python benchmarks/introspection_table.py docs/figures/runs/introspection_smollm2_baseline --concept-words 50
    python benchmarks/introspection_table.py docs/figures/runs/nameable_control_s{0,1,2} --concept-words 50 \
        --num-loops 4 --injection-loop 3

RUN_DIR is an ``eval-introspection`` output folder: ``introspection.json`` (its ``summary``: rates with Wilson
intervals) and ``trials.jsonl`` (the graded trials). Printed: the baseline table of the docs (detection, by strength,
identification against chance, false positives, random-vector claims, incoherence by strength, leakage) at one
(loop count, injection loop), then the two rules' verdicts recomputed from the trials: detection minus false
positives (from the summary) and the concept-specific rule (``specificity_verdict``, concept-clustered bootstrap).
Then the layer sweep: the same rates per injection layer, pooled over strengths. With several folders (seeds of a
positive control), one row per run of the concept-specific rule's parts instead. ``--out`` writes the text to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from loopalign.eval.introspection.report import format_rate
from loopalign.eval.introspection.stats import specificity_verdict
from loopalign.io import atomic_write_text


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run",
        nargs="+",
        help="an eval-introspection output folder (introspection.json, trials.jsonl); with several (e.g. seeds), one "
        "row each of the concept-specific rule's parts instead of the single run's tables",
    )
    parser.add_argument("--concept-words", type=int, required=True, help="the vocabulary identification is among")
    parser.add_argument("--num-loops", type=int, default=None, help="default: the run's only loop count")
    parser.add_argument("--injection-loop", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--out", default=None)
    return parser


def _signed(rate: dict) -> str:
    """A difference with its interval (:func:`format_rate`), minus signs as the docs write them."""
    return format_rate(rate).replace("-", "−")


def _pooled(cells: list[dict], metric: str) -> tuple[float, int]:
    """The rate of ``metric`` over ``cells`` (weighted by each cell's trials) and their count."""
    n = sum(c[metric]["n"] for c in cells)
    return (sum(c[metric]["rate"] * c[metric]["n"] for c in cells) / n if n else float("nan")), n


def site_row(summary: dict, num_loops: int, injection_loop: int) -> dict:
    """The summary's ``by_injection_loop`` row at (``num_loops``, ``injection_loop``)."""
    (row,) = [
        r for r in summary["by_injection_loop"] if r["num_loops"] == num_loops and r["injection_loop"] == injection_loop
    ]
    return row


def baseline_lines(summary: dict, row: dict, num_loops: int, injection_loop: int, chance: float) -> list[str]:
    """The docs' table for the site whose summary row is ``row`` (:func:`site_row`)."""
    cells = [c for c in summary["cells"] if c["num_loops"] == num_loops and c["injection_loop"] == injection_loop]
    strengths = sorted({float(c["strength"]) for c in cells})
    names = " / ".join(f"{s:g}" for s in strengths)
    at = {s: [c for c in cells if float(c["strength"]) == s] for s in strengths}
    by_strength = [_pooled(at[s], "detection") for s in strengths]
    incoherent = [_pooled(at[s], "incoherent") for s in strengths]
    counts = {n for _, n in by_strength}
    each = f"{counts.pop()} each" if len(counts) == 1 else " / ".join(str(n) for _, n in by_strength)
    random = [c for c in summary["random"] if c["num_loops"] == num_loops and c["injection_loop"] == injection_loop]
    random_rate, n_random = _pooled(random, "detection")
    (controls,) = [c for c in summary["controls"] if c["num_loops"] == num_loops]
    return [
        "| | rate (95% Wilson interval) | n |",
        "|---|---|---|",
        f"| detection (coherent claims, injected concepts) | {format_rate(row['detection'])} | {row['detection']['n']} |",
        f"| by strength {names} | {' / '.join(f'{100 * r:.1f}' for r, _ in by_strength)} | {each} |",
        f"| identification | {format_rate(row['identification'])} (chance {100 * chance:.1f}) | "
        f"{row['identification']['n']} |",
        f"| false positives (claims on uninjected controls) | {format_rate(controls['false_positive'])} | "
        f"{controls['false_positive']['n']} |",
        f"| random-vector claims | {100 * random_rate:.1f} | {n_random} |",
        f"| incoherent injection trials, by strength {names} | "
        f"{' / '.join(f'{100 * r:.0f}' for r, _ in incoherent)}% | {each} |",
        f"| concept named without a claim (leakage) | {format_rate(row['leakage'])} | {row['leakage']['n']} |",
    ]


def layer_lines(summary: dict, num_loops: int, injection_loop: int) -> list[str]:
    """The layer sweep at one (loop count, injection loop): per injection layer, pooled over strengths, detection,
    identification, incoherent injection trials and random-vector claims (rates in %, with their counts)."""
    cells = [c for c in summary["cells"] if c["num_loops"] == num_loops and c["injection_loop"] == injection_loop]
    random = [c for c in summary["random"] if c["num_loops"] == num_loops and c["injection_loop"] == injection_loop]
    lines = [
        "| layer | detection | identification | incoherent | random-vector claims | n (injection / random) |",
        "|---|---|---|---|---|---|",
    ]
    for layer in sorted({int(c["layer"]) for c in cells}):
        at = [c for c in cells if int(c["layer"]) == layer]
        rand = [c for c in random if int(c["layer"]) == layer]
        (det, n), (ident, _), (inc, _) = (_pooled(at, m) for m in ("detection", "identification", "incoherent"))
        rand_rate, n_rand = _pooled(rand, "detection")
        lines.append(
            f"| {layer} | {100 * det:.1f} | {100 * ident:.1f} | {100 * inc:.0f} | {100 * rand_rate:.1f} | "
            f"{n} / {n_rand} |"
        )
    return lines


def read_run(run: str, num_loops: int | None) -> tuple[dict, list[dict], int]:
    """(summary, graded trials, loop count) of an eval-introspection folder; SystemExit naming what is missing."""
    paths = [os.path.join(run, name) for name in ("introspection.json", "trials.jsonl")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"error: {run}: no {', '.join(os.path.basename(p) for p in missing)}")
    with open(paths[0]) as f:
        summary = json.load(f)["summary"]
    with open(paths[1]) as f:
        trials = [json.loads(line) for line in f if line.strip()]
    loop_counts = sorted({r["num_loops"] for r in summary["by_injection_loop"]})
    if num_loops is None and len(loop_counts) > 1:
        raise SystemExit(f"error: {run} has loop counts {loop_counts}: pick one with --num-loops")
    return summary, trials, num_loops if num_loops is not None else loop_counts[0]


def _run_name(run: str) -> str:
    """A run's name in the table: its folder, or the recipe's output folder for its ``before/`` / ``after/``."""
    path = os.path.normpath(run)
    return os.path.basename(os.path.dirname(path) if os.path.basename(path) in ("before", "after") else path)


def verdict_row(name: str, verdict: dict) -> str:
    """One run's row of the concept-specific rule: its parts with their concept-clustered intervals, what holds."""
    holds = {"specific_holds": "1", "beyond_fp_holds": "2", "identification_holds": "3"}
    held = [n for k, n in holds.items() if verdict[k]]
    return (
        f"| {name} | {_signed(verdict['detection'])} | {_signed(verdict['random_claims'])} | "
        f"{_signed(verdict['question_drift'])} | {_signed(verdict['specific_detection'])} | "
        f"{_signed(verdict['detection_minus_fp'])} | {_signed(verdict['identification'])} | "
        f"{'yes' if verdict['holds'] else 'no'} ({', '.join(held) or 'none'} of 1, 2, 3) |"
    )


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.concept_words < 1:
        raise SystemExit(f"error: --concept-words must be >= 1, got {args.concept_words}")
    runs = [(run, *read_run(run, args.num_loops)) for run in args.run]  # every folder checked before any bootstrap
    chance = 1.0 / args.concept_words
    if len(runs) > 1:
        lines = [
            "| run | detection | random-vector claims | control-question drift | specific detection | detection − FP "
            "| identification | holds (parts) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for run, _, trials, num_loops in runs:
            verdict = specificity_verdict(
                trials, args.injection_loop, num_loops, args.concept_words, n_boot=args.n_boot
            )
            lines.append(verdict_row(_run_name(run), verdict))
        text = "\n".join(lines) + "\n"
        if args.out:
            atomic_write_text(args.out, text)
        sys.stdout.write(text)
        return 0
    ((_, summary, trials, num_loops),) = runs
    row = site_row(summary, num_loops, args.injection_loop)
    lines = baseline_lines(summary, row, num_loops, args.injection_loop, chance)
    lines += ["", *layer_lines(summary, num_loops, args.injection_loop)]
    verdict = specificity_verdict(trials, args.injection_loop, num_loops, args.concept_words, n_boot=args.n_boot)
    holds = [k for k in ("specific_holds", "beyond_fp_holds", "identification_holds") if verdict[k]]
    lines += [
        "",
        f"detection − false positives: {_signed(row['detection_minus_fp'])}",
        f"concept-specific rule: specific detection {_signed(verdict['specific_detection'])}, identification "
        f"{_signed(verdict['identification'])} against chance {100 * chance:.1f}; parts holding: "
        f"{', '.join(holds) or 'none'}",
    ]
    text = "\n".join(lines) + "\n"
    if args.out:
        atomic_write_text(args.out, text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
