"""Ablate the gap-SFT objective (on the model organism by default): variants x seeds, one table and one plot.

    python recipes/ablate_gap.py                          # every variant, seeds 0 1 2, 2 runs at a time
    loopalign ablate-gap --variants lm probe_distill --seeds 0 1 2 3 4
    loopalign ablate-gap --output_dir outputs/ablate_gap -- --max_steps 300   # after --: passed to every run
    loopalign ablate-gap --variants lm probe_distill -- --model_name_or_path smollm2-135m --dataset statements \
        --probe_layer 18 --lora_layers 12-29     # any causal LM: each run trains it as a one-loop model

Each run is ``loopalign sft-gap`` (recipes/sft_gap.py) with its defaults (the organism, its
training tasks, 300 held-out tasks = 600 records, loops 1-6) plus one variant's objective and
``--seed S`` (which also draws the run's training and held-out tasks), in OUT/VARIANT/seed-S/ with
its log beside it. A finished run (its compare.json) is reused, so an interrupted ablation resumes
where it stopped. The table (``ablation.md``, ``ablation.json``) and the plot (``ablation.png``) are
written to OUT; the training-free steering baseline is computed from the runs' before-evaluations. The options
after ``--`` are the runs' own (``loopalign sft-gap --help``): another model or dataset changes every run; the
variants with replay need a model that answers its tasks (replay trains on its own answers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import loopalign
from loopalign.errors import ConfigError
from loopalign.eval.ablation import (
    ablation_markdown,
    ablation_rows,
    load_run,
    plot_ablation,
    rule_markdown,
    rule_rows,
    steering_rows,
)
from loopalign.io import atomic_write_text
from loopalign.log import command_console
from loopalign.scripts.args import make_parser, parse_or_exit

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
    "lm_free": (
        "probe_distill + replay, no lm (10% labels fit the target probe only)",
        {"loss_weights": {"lm": 0.0, "replay": 1.0, "probe_distill": 1.0}, "label_fraction": 0.1},
    ),
    "item_transfer": (
        "lm + replay + rr_distill; items eggs, marbles, shells never trained on",
        {
            "loss_weights": {"lm": 1.0, "replay": 1.0, "rr_distill": 1.0},
            "family_field": "item",
            "heldout_families": "eggs,marbles,shells",
        },
    ),
}


@dataclass
class AblateGapScriptArguments:
    """Which variants and seeds, where, how many at a time."""

    variants: list[str] = field(
        default_factory=lambda: list(VARIANTS), metadata={"help": f"Variants to run, of {list(VARIANTS)}."}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds of each variant."})
    output_dir: str = field(default="outputs/ablate_gap", metadata={"help": "Folder of the runs, table and plot."})
    jobs: int = field(default=2, metadata={"help": "Runs at a time (each on one torch thread)."})
    eval_n_boot: int = field(default=500, metadata={"help": "Bootstrap resamples of the table's CIs."})

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"variants: unknown {unknown}; choose from {list(VARIANTS)}")
        if self.jobs < 1 or not self.seeds:
            raise ConfigError(f"jobs and the number of seeds must be >= 1, got jobs={self.jobs}, seeds={self.seeds}")
        if self.eval_n_boot < 10:
            raise ConfigError(f"eval_n_boot must be >= 10, got {self.eval_n_boot}")


def run_command(variant: str, seed: int, out: Path, extra: list[str]) -> list[str]:
    """The ``loopalign sft-gap`` command line of one run."""
    args = [sys.executable, "-m", "loopalign", "sft-gap", "--output_dir", str(out), "--seed", str(seed)]
    args += ["--report_to", "none"]
    for key, value in VARIANTS[variant][1].items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return args + ["--disable_tqdm", "true", *extra]


def child_env() -> dict[str, str]:
    """One torch thread per run, and this loopalign importable by ``python -m loopalign`` in the runs."""
    root = str(Path(loopalign.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root if not path else os.pathsep.join([root, path]))


def ablate(args: AblateGapScriptArguments, extra: list[str]) -> str:
    """Run the missing (variant, seed) runs, ``args.jobs`` at a time, then the table and plot. -> the table."""
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    todo = [(v, s) for v in args.variants for s in args.seeds if not (root / v / f"seed-{s}" / "compare.json").exists()]
    print(f"{len(args.variants)} variants x {len(args.seeds)} seeds: {len(todo)} runs to do, {args.jobs} at a time")
    running: list[tuple[str, int, subprocess.Popen, float, object]] = []
    failed = []
    env = child_env()
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
    rows = ablation_rows({VARIANTS[v][0]: rs for v, rs in runs.items()}, n_boot=args.eval_n_boot)
    rows += steering_rows(runs[args.variants[0]], n_boot=args.eval_n_boot)
    rules = rule_rows({VARIANTS[v][0]: rs for v, rs in runs.items()})
    text = ablation_markdown(rows, depth) + "\n".join(rule_markdown(rules)) + "\n"
    atomic_write_text(root / "ablation.md", text)
    atomic_write_text(
        root / "ablation.json",
        json.dumps({"depth": depth, "seeds": args.seeds, "rows": rows, "rule": rules}, indent=1),
    )
    plot_ablation(rows, depth, str(root / "ablation.png"))
    print(text)
    print(f"table, JSON and plot in {root}/")
    return text


def build_parser(argv: list[str] | None = None):
    """The script's ``TrlParser`` (AblateGapScriptArguments; YAML with ``--config``)."""
    return make_parser((AblateGapScriptArguments,), __doc__)


def main(argv: list[str] | None = None) -> int:
    """``recipes/ablate_gap.py`` / ``loopalign ablate-gap``: parse ``argv`` (default ``sys.argv[1:]``; what follows
    ``--`` goes to every run), run the ablation."""
    command_console()
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    (args,) = parse_or_exit(build_parser(argv), argv)
    ablate(args, extra)
    return 0
