"""General drift of finished sft-gap runs: the continuous measure beside the ten general questions (docs/real-models.md).

    python benchmarks/general_drift.py outputs/MKR300_four_families_centred_rr_s0 outputs/MN300_four_families_s1 \
        --copy-to docs/figures/runs

For each run folder: its trained model (``final/``: the base model and the adapters) against the same model with the
adapters off, on the base model's own greedy answers to the 48 drift prompts
(``loopalign.eval.general.GENERAL_DRIFT_PROMPTS``, none trained on or checked): the mean per-token KL(base || tuned)
and the share of answer tokens whose top choice is kept, with bootstrap intervals over prompts. The result goes into
the run's ``general.json`` under ``drift`` (what sft-gap writes there itself since the measure exists), and with
``--copy-to DIR`` into ``DIR/<run name>/general.json`` as well when that file exists (the JSON the docs' tables are
regenerated from). A run whose ``general.json`` already holds a drift is read, not measured again (``--force``
measures it again). Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from loopalign.eval.general import general_drift
from loopalign.io import atomic_write_text
from loopalign.loading import is_gap_run_folder, load_model
from loopalign.models.contract import trained_loops
from loopalign.speed import set_cpu_threads

logger = logging.getLogger("general_drift")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="sft-gap output folders (each with final/ and general.json)")
    parser.add_argument("--copy-to", default=None, help="also write DIR/<run name>/general.json where it exists")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--force", action="store_true", help="measure again a run whose general.json has a drift")
    parser.add_argument("--threads", type=int, default=1)
    return parser


def _check(run: str) -> None:
    """Fails before any model is loaded, naming the run and what it lacks."""
    if not is_gap_run_folder(os.path.join(run, "final")):
        raise SystemExit(f"error: {run}: no final/ with adapters and gap_config.json (not a finished sft-gap run)")
    if not os.path.isfile(os.path.join(run, "general.json")):
        raise SystemExit(f"error: {run}: no general.json (the run was made without --general_questions true)")


def drift_of(run: str, max_new_tokens: int, force: bool) -> dict:
    path = os.path.join(run, "general.json")
    with open(path) as f:
        general = json.load(f)
    if general.get("drift") is not None and not force:
        return general
    model, tokenizer = load_model(os.path.join(run, "final"), device="cpu")
    # at the model's trained depth, as sft-gap measures it (one loop for a plain causal LM)
    general["drift"] = general_drift(
        model, tokenizer, num_loops=trained_loops(model), max_new_tokens=max_new_tokens
    ).to_dict()
    atomic_write_text(path, json.dumps(general, indent=1))
    return general


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for run in args.runs:  # every run checked before the first is measured
        _check(run)
    set_cpu_threads(True, default=args.threads)
    torch.manual_seed(0)
    for run in args.runs:
        general = drift_of(run, args.max_new_tokens, args.force)
        name = os.path.basename(os.path.normpath(run))
        if args.copy_to:
            target = os.path.join(args.copy_to, name, "general.json")
            if os.path.isfile(target):
                atomic_write_text(target, json.dumps(general, indent=1))
            else:
                logger.warning("%s: no %s to copy the drift into", name, target)
        d = general["drift"]
        before, after = general["before"], general["after"]
        row = {
            "run": name,
            "kl": round(d["kl_mean"], 4),
            "kl_ci": [round(x, 4) for x in d["kl_ci"]],
            "top1": round(d["top1_mean"], 4),
            "top1_ci": [round(x, 4) for x in d["top1_ci"]],
            "general": f"{sum(before['right'])} -> {sum(after['right'])}" if after else None,
        }
        if "entropy_base" in d:  # measured since the entropies are part of the drift
            row["entropy"] = [round(sum(d[k]) / len(d[k]), 4) for k in ("entropy_base", "entropy_tuned")]
        sys.stdout.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
