"""The verdict's accuracy on the training batches as ``sft-gap`` logged it, step by step, for one or more runs: when
each run's verdict left its plateau (docs/real-models.md, "Does the looped model learn the verdict from labels").

    python benchmarks/training_sv.py docs/figures/runs/PV200_plain_verdict_only_s0 \\
        docs/figures/runs/HLV200_healed_loops_verdict_only_s0

Reads each run's ``log_history.json`` (the Trainer's logs: ``sv/loop_t`` is the mean, over the logging window's
steps, of the share of the labelled training records whose verbal verdict matched their label) at the run's
verdict depth (``depth`` in its ``compare.json``). Prints one markdown row per logged step, a column per run, and a
last row with each run's plateau exit: the first logged step whose value reaches ``--exit`` (default 0.65), or
"not by step N".
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="sft-gap output folders (each with log_history.json, compare.json)")
    parser.add_argument("--exit", type=float, default=0.65, help="the plateau exit's threshold (default 0.65)")
    return parser


def training_sv(run: str) -> tuple[int, dict[int, float]]:
    """-> (the run's verdict depth, {logged step: training-batch SV at that depth})."""
    with open(os.path.join(run, "compare.json")) as f:
        depth = int(json.load(f)["depth"])
    with open(os.path.join(run, "log_history.json")) as f:
        history = json.load(f)
    key = f"sv/loop_{depth}"
    values = {int(r["step"]): float(r[key]) for r in history if key in r}
    if not values:
        raise ValueError(f"{run}: log_history.json has no {key} (the verdict depth's training SV)")
    return depth, values


def plateau_exit(values: dict[int, float], threshold: float) -> str:
    step = next((s for s in sorted(values) if values[s] >= threshold), None)
    return f"step {step}" if step is not None else f"not by step {max(values)}"


def table(runs: list[str], threshold: float = 0.65) -> str:
    read = [(os.path.basename(os.path.normpath(r)), *training_sv(r)) for r in runs]
    head = "| step | " + " | ".join(f"{name} (loop {depth})" for name, depth, _ in read) + " |"
    lines = [head, "|---|" + "---|" * len(read)]
    for step in sorted({s for _, _, values in read for s in values}):
        cells = [f"{100 * values[step]:.1f}" if step in values else "–" for _, _, values in read]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    exits = [plateau_exit(values, threshold) for _, _, values in read]
    lines.append(f"| plateau exit (≥ {100 * threshold:.0f}) | " + " | ".join(exits) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not 0 < args.exit <= 1:
        parser.error("--exit must be in (0, 1]")
    for run in args.runs:
        for name in ("compare.json", "log_history.json"):
            if not os.path.isfile(os.path.join(run, name)):
                parser.error(f"{run}: no {name}")
    sys.stdout.write(table(args.runs, args.exit) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
