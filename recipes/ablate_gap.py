"""Ablate the gap-SFT objective on the model organism: variants x seeds, one table and one plot.

    python recipes/ablate_gap.py                                  # every variant, seeds 0 1 2, 2 runs at a time
    python recipes/ablate_gap.py --variants lm probe_distill --seeds 0 1 2 3 4
    python recipes/ablate_gap.py --out outputs/ablate_gap -- --max_steps 300   # after --: passed to every run

Each run is `recipes/sft_gap.py` with its defaults (the organism, its training tasks, 300 held-out
tasks = 600 records, loops 1-6) plus one variant's objective and `--seed S` (which also draws the
run's training and held-out tasks), in OUT/VARIANT/seed-S/ with its log beside it. A finished run
(its compare.json) is reused, so an interrupted ablation resumes where it stopped. The table
(`ablation.md`, `ablation.json`) and the plot (`ablation.png`) are written to OUT; the training-free
steering baseline is computed from the runs' before-evaluations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from loopalign.eval.ablation import ablation_markdown, ablation_rows, load_run, plot_ablation, steering_rows
from loopalign.io import atomic_write_text

RECIPE = Path(__file__).resolve().parent / "sft_gap.py"

#: name -> (what it is, the sft_gap arguments that make it)
VARIANTS = {
    "rr_distill": (
        "lm + replay + rr_distill 1 (the default)",
        {"loss_weights": {"lm": 1.0, "replay": 1.0, "rr_distill": 1.0}},
    ),
    "lm": ("lm + replay", {"loss_weights": {"lm": 1.0, "replay": 1.0}}),
    "lm_no_replay": ("lm only, no replay", {"loss_weights": {"lm": 1.0}}),
    "probe_distill": (
        "lm + replay + probe_distill",
        {"loss_weights": {"lm": 1.0, "replay": 1.0, "probe_distill": 1.0}},
    ),
    "joint_consistency": (
        "lm + replay + joint probe + consistency (old default)",
        {"loss_weights": {"lm": 1.0, "replay": 1.0, "probe": 1.0, "consistency": 1.0}},
    ),
    "lm_10pct": ("lm + replay, 10% labels", {"loss_weights": {"lm": 1.0, "replay": 1.0}, "label_fraction": 0.1}),
    "lm_10pct_probe_distill": (
        "lm on 10% labels + probe_distill on all + replay",
        {"loss_weights": {"lm": 1.0, "replay": 1.0, "probe_distill": 1.0}, "label_fraction": 0.1},
    ),
}


def run_command(variant: str, seed: int, out: Path, extra: list[str]) -> list[str]:
    args = [sys.executable, str(RECIPE), "--output_dir", str(out), "--seed", str(seed), "--report_to", "none"]
    for key, value in VARIANTS[variant][1].items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return args + ["--disable_tqdm", "true", *extra]


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default="outputs/ablate_gap")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one torch thread)")
    ap.add_argument("--n-boot", type=int, default=500)
    args = ap.parse_args(argv)
    if args.jobs < 1 or len(args.seeds) < 1:
        raise SystemExit("ablate_gap: --jobs and the number of --seeds must be >= 1")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)

    todo = [(v, s) for v in args.variants for s in args.seeds if not (root / v / f"seed-{s}" / "compare.json").exists()]
    print(f"{len(args.variants)} variants x {len(args.seeds)} seeds: {len(todo)} runs to do, {args.jobs} at a time")
    running: list[tuple[str, int, subprocess.Popen, float, object]] = []
    failed = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    while todo or running:
        while todo and len(running) < args.jobs:
            variant, seed = todo.pop(0)
            out = root / variant / f"seed-{seed}"
            out.parent.mkdir(exist_ok=True)
            log = open(root / variant / f"seed-{seed}.log", "w")
            proc = subprocess.Popen(
                run_command(variant, seed, out, extra), stdout=log, stderr=subprocess.STDOUT, env=env
            )
            running.append((variant, seed, proc, time.perf_counter(), log))
        time.sleep(1.0)
        for item in list(running):
            variant, seed, proc, start, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            took = time.perf_counter() - start
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"  {variant} seed {seed}: {status} in {took:.0f} s (log: {root / variant}/seed-{seed}.log)")
            if proc.returncode:
                failed.append(f"{variant}/seed-{seed}")
    if failed:
        raise SystemExit(f"ablate_gap: {len(failed)} run(s) failed: {failed}; rerun to retry them")

    runs = {v: [load_run(root / v / f"seed-{s}") for s in args.seeds] for v in args.variants}
    depth = json.loads((root / args.variants[0] / f"seed-{args.seeds[0]}" / "compare.json").read_text())["depth"]
    rows = ablation_rows({VARIANTS[v][0]: rs for v, rs in runs.items()}, n_boot=args.n_boot)
    rows += steering_rows(runs[args.variants[0]], n_boot=args.n_boot)
    text = ablation_markdown(rows, depth)
    atomic_write_text(root / "ablation.md", text)
    atomic_write_text(root / "ablation.json", json.dumps({"depth": depth, "seeds": args.seeds, "rows": rows}, indent=1))
    plot_ablation(rows, depth, str(root / "ablation.png"))
    print(text)
    print(f"table, JSON and plot in {root}/")


if __name__ == "__main__":
    main()
