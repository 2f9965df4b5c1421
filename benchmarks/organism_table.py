"""The table of organism builds in docs/organism.md ("Below the ceiling"), from the builds' own JSON.

    python benchmarks/organism_table.py ORGANISM_DIR [ORGANISM_DIR ...] --save docs/figures/organism_below_ceiling.json
    python benchmarks/organism_table.py docs/figures/organism_below_ceiling.json
    python benchmarks/organism_table.py docs/figures/organism_below_ceiling.json NEW_DIR --save docs/figures/organism_below_ceiling.json

An organism folder gives its config, build fingerprint, model-card figures and properties (``organism.json``) and the
all-sites readout of its card evaluation (``eval/gap.json``); ``--save`` keeps one row per build in a small JSON,
which the second form reads back. Printed: loop = the trained depth, figures in %.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="organism folders and JSONs written by --save, in table order")
    parser.add_argument("--save", help="write every row read (folders and JSONs) to this JSON")
    return parser


def build_row(folder: str) -> dict:
    """One build's row: its operands, kernel path and loop figures at the trained depth."""
    with open(os.path.join(folder, "organism.json")) as f:
        meta = json.load(f)
    depth = meta["config"]["num_loops"]
    (card,) = [r for r in meta["eval"]["table"] if r["loop"] == depth]
    (tp,) = [r for r in meta["eval"]["tp"] if r["loop"] == depth]
    (unbiased,) = [s for s in meta["eval"]["slices"] if s["loop"] == depth and s["slice"] == "unbiased"]
    every = None
    with open(os.path.join(folder, "eval", "gap.json")) as f:
        for row in json.load(f)["table"]:
            if row["loop"] == depth:
                every = row.get("rr_all_sites")
    build = meta["build"]
    return {
        "folder": os.path.basename(os.path.normpath(folder)),
        "max_operand": meta["config"]["max_operand"],
        "steps": meta["config"]["steps"],
        "kernel_path": f"{build['cpu_capability']}, MKL {build['mkl_instructions']}",
        "loop": depth,
        "tp": tp["accuracy"],
        "sv": card["sv"],
        "rr": card["rr"],
        "rr_all_sites": every,
        "gap": card["gap"],
        "gap_lo": card["gap_lo"],
        "gap_hi": card["gap_hi"],
        "unbiased_sv": unbiased["sv"],
        "failing": sorted(name for name, p in meta["properties"].items() if not p["ok"]),
    }


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| operands | steps | kernel path | TP | SV | RR | RR all sites | gap RR − SV | unbiased SV | card properties "
        "failing |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = f"{100 * r['gap']:.1f} [{100 * r['gap_lo']:.1f}, {100 * r['gap_hi']:.1f}]"
        lines.append(
            f"| 0..{r['max_operand']} | {r['steps']} | {r['kernel_path']} | {_pct(r['tp'])} | {_pct(r['sv'])} | {_pct(r['rr'])} | "
            f"{_pct(r['rr_all_sites'])} | {gap} | {_pct(r['unbiased_sv'])} | {', '.join(r['failing']) or 'none'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    rows = []
    for name in args.inputs:  # saved rows (a JSON written by --save) and organism folders, in the order given
        if name.endswith(".json"):
            with open(name) as f:
                rows += json.load(f)["rows"]
        else:
            rows.append(build_row(name))
    if args.save:
        with open(args.save, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    sys.stdout.write(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
