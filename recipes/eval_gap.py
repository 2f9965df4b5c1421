"""SV / RR / gap (and TP) per loop for a looped model; writes gap.json, gap.md, plots and probes.

    python recipes/eval_gap.py                        # the model organism (built on first use), its held-out tasks
    python recipes/eval_gap.py --model tiny --loops 1-8 --out outputs/eval_tiny   # a random tiny Ouro: noise
    python recipes/eval_gap.py --model ByteDance/Ouro-1.4B --data builds/math --loops 1-8 --out outputs/eval --tp
    python recipes/eval_gap.py --model PATH --data DIR --out outputs/after --compare outputs/before

``--model organism`` (the default) is loopalign's model organism (``loopalign.organism``: a tiny Ouro
trained here that shows the gap), built into the cache first when missing; ``--model tiny`` a
random tiny Ouro. Both use the local tokenizer. Without ``--data`` the organism is measured on its own
held-out tasks (digit sums of its evaluation triples, gold + one wrong digit each, clustered by
triple; ``--n-problems`` of them, ``--data-seed``), the tiny model on held-out synthetic arithmetic
from data_builders (problems, gold + controlled wrong answers, the verification prompt).
"""

from __future__ import annotations

import argparse
import os

from data_builders.verification import synthetic_verification_records
from loopalign.eval import (
    LOCAL_MODELS,
    CompareConfig,
    FeatureConfig,
    GapConfig,
    GapResult,
    ReadoutConfig,
    TaskConfig,
    compare,
    evaluate_gap,
    load_eval_dataset,
    load_model_and_tokenizer,
    parse_loops,
)
from loopalign.io import atomic_write_text
from loopalign.organism import DIGIT_GROUP_FIELD, organism_config_for, organism_eval_records
from loopalign.speed import set_cpu_threads


def _token(s: str):
    return int(s) if s.lstrip("-").isdigit() else s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism", help="'organism' (default), 'tiny', a local folder or a hub name")
    ap.add_argument(
        "--data",
        default=None,
        help="build folder, save_to_disk folder or .jsonl (default with organism / tiny: synthetic arithmetic)",
    )
    ap.add_argument("--loops", default="1-8", help="loop counts, e.g. 1-8 or 1,2,4")
    ap.add_argument("--out", default=None, help="output folder (default outputs/eval_gap_<model>)")
    ap.add_argument(
        "--metric",
        default="auto",
        choices=["auto", "accuracy", "balanced_accuracy", "f1", "auroc"],
        help="headline metric; auto: accuracy on balanced labels, balanced_accuracy on unbalanced ones",
    )
    ap.add_argument(
        "--min-minority-share", type=float, default=0.4, help="labels are unbalanced below this minority share"
    )
    ap.add_argument("--sv-decision", default="forced", choices=["forced", "strict"])
    ap.add_argument("--verdict-tokens", default=None, help="yes,no strings or ids (default Yes,No)")
    ap.add_argument("--split", default="holdout", choices=["holdout", "kfold"])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--position", default="verdict", help="verdict, answer_end, concat or an index into probe_indices")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--n-problems", type=int, default=300, help="synthetic problems (2 records each) without --data")
    ap.add_argument("--levels", default="1", help="levels of the synthetic problems without --data (the organism: 1)")
    ap.add_argument("--data-seed", type=int, default=20_000, help="seed of the synthetic problems (held out)")
    ap.add_argument("--tp", action="store_true", help="also measure task performance (generation)")
    ap.add_argument("--tp-loops", default=None)
    ap.add_argument(
        "--tp-max-new-tokens",
        type=int,
        default=None,
        help="new tokens per TP answer (default: enough for the records' source, e.g. GSM8K 512; a cut-off answer is unparsed)",
    )
    ap.add_argument("--sampled-verdict", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wandb", action="store_true", help="log to W&B (offline without an API key)")
    ap.add_argument("--wandb-project", default="loopalign")
    ap.add_argument("--compare", default=None, help="a previous --out folder (the 'before'); writes compare.md/json")
    ap.add_argument(
        "--verdict-depth", type=int, default=None, help="loop of the --compare verdict (default: the trained depth)"
    )
    ap.add_argument(
        "--no-controls", action="store_true", help="skip the shortcut controls (question-only, author, noise probes)"
    )
    ap.add_argument(
        "--author-field",
        default="auto",
        help="record field naming each answer's author for the author control ('auto' looks for author, "
        "source_model, model, policy; 'none' turns it off)",
    )
    args = ap.parse_args(argv)
    for option in ("loops", "tp_loops"):  # checked before the model loads, naming the option
        if getattr(args, option) is not None:
            try:
                parse_loops(getattr(args, option), f"--{option.replace('_', '-')}")
            except ValueError as e:
                ap.error(str(e))

    if args.data is None and args.model not in LOCAL_MODELS:
        ap.error(f"--data is required unless --model is one of {LOCAL_MODELS}")
    if args.compare and not os.path.exists(
        os.path.join(args.compare, "gap.json") if os.path.isdir(args.compare) else args.compare
    ):
        ap.error(
            f"--compare {args.compare}: no gap.json there (a before/ folder of eval_gap or sft_gap, or its gap.json)"
        )
    out_dir = args.out or f"outputs/eval_gap_{args.model if args.model in LOCAL_MODELS else 'model'}"
    set_cpu_threads(on_cpu=args.device == "cpu" or None, announce=True)
    model, tok = load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype, seed=args.seed)
    group_by = "task"
    organism = organism_config_for(args.model) if args.model == "organism" else None
    if args.data is None and organism is not None and organism.tasks == "digits":
        # the organism's own held-out tasks (its evaluation triples), clustered by triple
        data = organism_eval_records(tok, args.n_problems, seed=args.data_seed, max_operand=organism.max_operand)
        group_by = DIGIT_GROUP_FIELD
    elif args.data is None:
        levels = tuple(int(x) for x in args.levels.split(","))
        data = synthetic_verification_records(tok, args.n_problems, seed=args.data_seed, levels=levels)
    else:
        data = load_eval_dataset(args.data)
    verdict = tuple(_token(s) for s in args.verdict_tokens.split(",")) if args.verdict_tokens else ("Yes", "No")
    position = int(args.position) if args.position.lstrip("-").isdigit() else args.position
    config = GapConfig(
        loops=args.loops,
        group_by=group_by,
        metric=args.metric,
        min_minority_share=args.min_minority_share,
        sv_decision=args.sv_decision,
        verdict_tokens=verdict,
        n_boot=args.n_boot,
        seed=args.seed,
        features=FeatureConfig(batch_size=args.batch_size),
        readout=ReadoutConfig(split=args.split, folds=args.folds, position=position, seed=args.seed),
        task=TaskConfig(max_new_tokens=args.tp_max_new_tokens, batch_size=args.batch_size) if args.tp else None,
        tp_loops=args.tp_loops,
        sampled_verdict=args.sampled_verdict,
        controls=not args.no_controls,
        author_field=None if args.author_field.lower() == "none" else args.author_field,
    )
    result = evaluate_gap(
        model,
        tok,
        data,
        config=config,
        out_dir=out_dir,
        wandb=args.wandb,
        wandb_kwargs={"project": args.wandb_project, "name": f"eval_gap:{args.model}"},
    )
    print(result.markdown())
    if args.compare:
        comp = compare(
            GapResult.from_json(args.compare), result, CompareConfig(loops=args.verdict_depth, seed=args.seed)
        )
        atomic_write_text(f"{out_dir}/compare.json", comp.to_json())
        atomic_write_text(f"{out_dir}/compare.md", comp.markdown())
        print(comp.verdict)
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
