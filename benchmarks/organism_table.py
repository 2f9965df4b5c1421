"""The table of organism builds in docs/organism.md ("Below the ceiling"), from the builds' own JSON.

    python benchmarks/organism_table.py ORGANISM_DIR [ORGANISM_DIR ...] --save docs/figures/organism_below_ceiling.json
    python benchmarks/organism_table.py docs/figures/organism_below_ceiling.json
    python benchmarks/organism_table.py docs/figures/organism_below_ceiling.json NEW_DIR --save docs/figures/organism_below_ceiling.json
    python benchmarks/organism_table.py docs/figures/organism_v3_builds.json --per_loop   # ranges per loop over builds

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
    parser.add_argument(
        "--per_loop", action="store_true", help="also print, per loop, the range of each figure over the builds read"
    )
    return parser


def build_row(folder: str) -> dict:
    """One build's row: its operands, kernel path and loop figures at the trained depth."""
    with open(os.path.join(folder, "organism.json")) as f:
        meta = json.load(f)
    depth = meta["config"]["num_loops"]
    (card,) = [r for r in meta["eval"]["table"] if r["loop"] == depth]
    (tp,) = [r for r in meta["eval"]["tp"] if r["loop"] == depth]
    slices = {s["slice"]: s for s in meta["eval"]["slices"] if s["loop"] == depth}
    with open(os.path.join(folder, "eval", "gap.json")) as f:
        full = {row["loop"]: row for row in json.load(f)["table"]}
    every = full[depth].get("rr_all_sites") if depth in full else None
    tp_by_loop = {r["loop"]: r["accuracy"] for r in meta["eval"]["tp"]}
    per_loop = [
        {
            "loop": r["loop"],
            "tp": tp_by_loop.get(r["loop"]),
            **{k: r.get(k) for k in ("sv", "rr", "gap")},
            **{k: full.get(r["loop"], {}).get(k) for k in ("sv_auroc", "rr_auroc")},
        }
        for r in meta["eval"]["table"]
    ]
    build = meta["build"]
    return {
        "folder": os.path.basename(os.path.normpath(folder)),
        "max_operand": meta["config"]["max_operand"],
        "exception_share": meta["config"].get("exception_share", 0.0),
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
        "unbiased_sv": slices["unbiased"]["sv"],
        # recipe v3: SV on the unbiased items' regular triples, and RR on the held-out exceptions (what it cannot know)
        "unbiased_regular_sv": slices["unbiased regular"]["sv"] if "unbiased regular" in slices else None,
        "exception_rr": slices["exception"]["rr"] if "exception" in slices else None,
        "failing": sorted(name for name, p in meta["properties"].items() if not p["ok"]),
        "per_loop": per_loop,
    }


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| operands | held-out exceptions | steps | kernel path | TP | SV | RR | RR all sites | gap RR − SV | unbiased SV "
        "(regular triples) | RR on exceptions | card properties failing |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gap = f"{100 * r['gap']:.1f} [{100 * r['gap_lo']:.1f}, {100 * r['gap_hi']:.1f}]"
        unbiased = _pct(r["unbiased_sv"])
        if r.get("unbiased_regular_sv") is not None:
            unbiased += f" ({_pct(r['unbiased_regular_sv'])})"
        lines.append(
            f"| 0..{r['max_operand']} | {_pct(r.get('exception_share', 0.0))} | {r['steps']} | {r['kernel_path']} | "
            f"{_pct(r['tp'])} | {_pct(r['sv'])} | {_pct(r['rr'])} | {_pct(r['rr_all_sites'])} | {gap} | {unbiased} | "
            f"{_pct(r.get('exception_rr'))} | {', '.join(r['failing']) or 'none'} |"
        )
    return "\n".join(lines) + "\n"


def per_loop_table(rows: list[dict], depth: int) -> str:
    """Per loop, each figure's range (min–max) over the builds in ``rows`` that saved their loops; ``depth`` bold."""
    with_loops = [r for r in rows if r.get("per_loop")]
    if not with_loops:
        return "no build with per-loop figures (rows saved before --per_loop existed)\n"
    lines = [
        "| loop | TP | SV | RR | gap RR − SV | AUROC SV | AUROC RR |",
        "|---|---|---|---|---|---|---|",
    ]
    loops = sorted({x["loop"] for r in with_loops for x in r["per_loop"]})
    for loop in loops:
        cells = []
        for key in ("tp", "sv", "rr", "gap", "sv_auroc", "rr_auroc"):
            values = [x[key] for r in with_loops for x in r["per_loop"] if x["loop"] == loop and x.get(key) is not None]
            if not values:
                cells.append("–")
                continue
            lo, hi = min(values), max(values)
            fmt = (lambda v: f"{v:.3f}") if "auroc" in key else _pct
            cells.append(fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)}–{fmt(hi)}")
        name = f"**{loop} (trained depth)**" if loop == depth else str(loop)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
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
    if args.per_loop:
        sys.stdout.write("\n" + per_loop_table(rows, rows[0]["loop"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
